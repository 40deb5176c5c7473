"""Checkpoints: weights plus a JSON-able config, loaded with ``weights_only=True``.

File layout (``torch.save`` of a plain dict)::

    {"format": "csqcfs-deploy-checkpoint", "version": 1,
     "config": "<JSON text of ModelConfig>", "state_dict": {name: tensor}}

Users' own models come in as ``module:factory`` (see :mod:`.user_model`) plus a
weights file; :func:`load_user_model` builds and loads them. Weights files are
read as people save them (:func:`read_state_dict`): a plain state dict, one
wrapped under ``state_dict``/``model``/``net``, with ``module.`` (DataParallel,
DDP) or ``_orig_mod.`` (torch.compile) prefixes, or this tool's own format.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeGuard

import torch
from torch import nn

from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.train.model_config import ModelConfig
from csqcfs_deploy.train.user_model import build_user_model, parse_model_spec
from csqcfs_deploy.train.zoo import build_model

CHECKPOINT_FORMAT = "csqcfs-deploy-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig) -> Path:
    """Write weights and config to ``path`` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(config.to_json(), sort_keys=True),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


#: torch's reasons for refusing a pickled object under weights_only=True (the text after
#: its "WeightsUnpickler error:" or its blocked-module line)
_REFUSALS = ("Unsupported global", "unsupported GLOBAL", "Can only create new object",
             "Can only build", "Trying to call reduce", "Trying to instantiate",
             "persistent_load", "unsupported persistent id")


def _refused_global(text: str) -> str | None:
    """The ``module.name`` a refused pickle asks to import, if torch's message names one."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return None if found is None else found.group(1)


def _refusal(text: str) -> str | None:
    """torch's one-sentence reason for refusing a pickled object, if it is one."""
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(_REFUSALS):
            return line.split(". Please use")[0].rstrip(".")
    return None


def _load_error(path: Path, what: str, exc: BaseException) -> InputFileError:
    """One line for a file torch.load refused or could not read."""
    text = str(exc)
    name = _refused_global(text)
    if name is not None:
        return InputFileError(
            f"{path}: refused to load: it holds a pickled Python object ({name}) and asks "
            f"to import {name} (checkpoints load with weights_only=True, which imports "
            "nothing); save model.state_dict() or a dict of tensors and numbers instead")
    reason = _refusal(text)
    if reason is not None:
        return InputFileError(f"{path}: refused to load: {reason} (checkpoints load with "
                              "weights_only=True); save model.state_dict() instead")
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand is not None:
        detail = f"pickle opcode {operand.group(1)} is not one torch.load reads"
    elif path.stat().st_size == 0:
        detail = "the file is empty"
    else:
        first = " ".join(text.split())[:120]
        detail = f"{type(exc).__name__}{': ' + first if first else ''}"
    return InputFileError(f"{path} is not a PyTorch {what} ({detail})")


def _torch_load(path: Path, what: str) -> object:
    """``torch.load(weights_only=True)``; InputFileError naming ``path`` for anything it
    refuses or cannot read, torch's warnings kept off the terminal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            OSError, AttributeError, KeyError, IndexError, TypeError, OverflowError,
            MemoryError, RecursionError, UnicodeDecodeError, zlib.error) as exc:
        raise _load_error(path, what, exc) from None


def check_tensors(state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Raise GraphError naming the first tensor that is complex, not a dense (strided)
    tensor, or has a NaN or infinite value."""
    for name, tensor in state_dict.items():
        if tensor.is_complex():
            raise GraphError(f"{source}: parameter {name!r} is complex ({tensor.dtype}); "
                             "only real tensors are accepted")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise GraphError(f"{source}: parameter {name!r} is a {tensor.layout} "
                             f"{tensor.dtype} tensor; only dense real tensors are accepted")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
            raise GraphError(f"{source}: parameter {name!r} contains a non-finite value ({bad})")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    p = require_file(path, "checkpoint")
    payload = _torch_load(p, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(f"{p} is not a csqcfs-deploy checkpoint (no format marker; "
                             "for a plain state dict use --model MODULE:FACTORY --weights FILE)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise InputFileError(f"{p}: unsupported checkpoint version {payload.get('version')!r}")
    text, state = payload.get("config"), payload.get("state_dict")
    if not isinstance(text, str):
        raise InputFileError(f"{p}: checkpoint has no config text")
    try:
        config = ModelConfig.from_json(json.loads(text), p)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputFileError(f"{p}: checkpoint config is not valid JSON "
                             f"({type(exc).__name__})") from None
    if not _is_tensor_dict(state):
        raise InputFileError(f"{p}: checkpoint state_dict is not a dict of tensors")
    check_tensors(state, p)
    model = build_model(config.arch, config.levels, config.phi, config.num_classes)
    _load_state(model, state, p)
    model.eval()
    return model, config


# --- state dicts as people save them -------------------------------------------------

#: keys under which training scripts commonly keep the model's state dict
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
#: prefixes added by DataParallel / DistributedDataParallel and by torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_tensor_dict(value: object) -> TypeGuard[dict[str, torch.Tensor]]:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _find_state(payload: object, depth: int = 0) -> dict[str, torch.Tensor] | None:
    if _is_tensor_dict(payload):
        return dict(payload)
    if not isinstance(payload, dict) or depth > 2:
        return None
    if payload.get("format") == CHECKPOINT_FORMAT:
        return _find_state(payload.get("state_dict"), depth + 1)
    for key in WRAPPER_KEYS:
        if key in payload:
            found = _find_state(payload[key], depth + 1)
            if found is not None:
                return found
    return None


def _not_a_state_dict(payload: object, source: Path | str) -> str:
    if not isinstance(payload, dict):
        return (f"{source} is not a state dict (it holds a {type(payload).__name__}); "
                "save model.state_dict()")
    if not payload:
        return f"{source} holds an empty dict, not a state dict"
    bad = [(k, v) for k, v in payload.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if len(bad) * 2 < len(payload):
        key, value = bad[0]
        return (f"{source} is not a state dict of tensors: {key!r} is a "
                f"{type(value).__name__}, not a tensor")
    keys = ", ".join(repr(k) for k in list(payload)[:6]) + (", ..." if len(payload) > 6 else "")
    return (f"{source} holds a dict with keys {keys} and no state dict in it (looked under "
            f"{', '.join(WRAPPER_KEYS)})")


def extract_state_dict(payload: object, source: Path | str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: plain, wrapped, or this tool's own format."""
    found = _find_state(payload)
    if found is None:
        raise InputFileError(_not_a_state_dict(payload, source))
    check_tensors(found, source)
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file (``weights_only=True``) and return the state dict in it."""
    p = require_file(path, "weights file")
    return extract_state_dict(_torch_load(p, "state dict"), p)


def strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: Iterable[str]
                           ) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` (repeatedly) where every key has it and the
    model's keys do not."""
    wanted = list(expected)
    while True:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not (
                    wanted and all(k.startswith(prefix) for k in wanted)):
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            return state


def _short(key: str) -> str:
    return key if len(key) <= 48 else f"{key[:20]}...{key[-25:]}"


def _names(keys: Sequence[str]) -> str:
    return ", ".join(_short(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _count(n: int, what: str, plural: str = "s") -> str:
    return f"{n} {what}{'' if n == 1 else plural}"


def _common_prefixes(keys: Sequence[str]) -> list[str]:
    """The dotted prefixes every key shares ('a.', 'a.b.'), shortest first."""
    if not keys:
        return []
    common: list[str] = []
    for parts in zip(*(k.split(".")[:-1] for k in keys), strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return [".".join(common[:i]) + "." for i in range(1, len(common) + 1)]


def _prefix_candidates(keys: Sequence[str]) -> list[str]:
    heads = Counter(k.split(".")[0] + "." for k in keys if "." in k)
    return ["", *_common_prefixes(keys), *(h for h, _ in heads.most_common(8))]


def _prefix_hint(missing: Sequence[str], unexpected: Sequence[str], file_keys: Sequence[str],
                 model_keys: Sequence[str]) -> str | None:
    want = set(missing)
    best: tuple[int, str, str] = (0, "", "")
    for pf in dict.fromkeys(_prefix_candidates(unexpected)):
        for pm in dict.fromkeys(_prefix_candidates(missing)):
            if pf == pm:
                continue
            gain = len({pm + k[len(pf):] for k in unexpected if k.startswith(pf)} & want)
            if gain > best[0]:
                best = (gain, pf, pm)
    gain, pf, pm = best
    if gain == 0:
        return None
    example = next(k for k in unexpected if k.startswith(pf) and pm + k[len(pf):] in want)
    if not pm:
        who = "every key in the file starts" if all(k.startswith(pf) for k in file_keys) \
            else "the file's unmatched keys start"
        text = f"{who} with '{pf}' and the model's do not: remove that prefix"
    elif not pf:
        who = "every key of the model starts" if all(k.startswith(pm) for k in model_keys) \
            else "the model's missing keys start"
        text = (f"{who} with '{pm}' (e.g. '{_short(pm + example)}' for "
                f"'{_short(example)}'): add that prefix")
    else:
        text = (f"the file's unmatched keys start with '{pf}' where the model's missing keys "
                f"start with '{pm}': replace that prefix")
    if gain < len(missing):
        text += f" (then {gain} of the {len(missing)} missing keys match)"
    return text


def _by_parent(keys: Sequence[str], n: int) -> dict[str, list[tuple[str, str]]]:
    """(key, its last ``n`` names) grouped by what is left when those are dropped."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        parts = k.split(".")
        if len(parts) >= n:
            groups.setdefault(".".join(parts[:-n]), []).append((k, ".".join(parts[-n:])))
    return groups


def _rename_hint(missing: Sequence[str], unexpected: Sequence[str]) -> str | None:
    """Keys that differ only in their last one or two names (e.g. 'up' vs 'thresh')."""
    for n in (1, 2):
        file_groups, model_groups = _by_parent(unexpected, n), _by_parent(missing, n)
        pairs: Counter[tuple[str, str]] = Counter()
        examples: dict[tuple[str, str], tuple[str, str]] = {}
        for parent, ks in file_groups.items():
            ms = model_groups.get(parent, [])
            if len(ks) == 1 and len(ms) == 1:
                tails = (ks[0][1], ms[0][1])
                pairs[tails] += 1
                examples.setdefault(tails, (ks[0][0], ms[0][0]))
        if pairs:
            (file_tail, model_tail), count = pairs.most_common(1)[0]
            u, m = examples[(file_tail, model_tail)]
            names = "name" if n == 1 else "two names"
            verb = "differs" if count == 1 else "differ"
            return (f"{_count(count, 'key')} {verb} only in the last {names}: '{file_tail}' in "
                    f"the file, '{model_tail}' in the model (e.g. '{_short(u)}' for "
                    f"'{_short(m)}'); rename them")
    return None


def describe_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                      ) -> str | None:
    """A short account of why ``state`` does not fit a model whose state is ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{_count(len(missing), 'missing key')} ({_names(missing)})")
    if unexpected:
        parts.append(f"{_count(len(unexpected), 'unexpected key')} ({_names(unexpected)})")
    if shapes:
        listed = ", ".join(f"{_short(k)}: file {_shape(a)}, model {_shape(b)}"
                           for k, a, b in shapes[:3])
        more = ", ..." if len(shapes) > 3 else ""
        parts.append(f"{_count(len(shapes), 'shape mismatch', 'es')} ({listed}{more})")
    hints = [h for h in (_prefix_hint(missing, unexpected, list(state), list(expected)),
                         _rename_hint(missing, unexpected)) if h]
    return "; ".join(parts) + ("; hint: " + "; ".join(hints) if hints else "")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load ``state`` into ``model`` strictly, after stripping DataParallel/compile prefixes.

    A mismatch is an InputFileError with counts, a few names and a hint, never
    torch's full key dump.
    """
    expected = model.state_dict()
    state = strip_wrapper_prefixes(state, expected)
    problem = describe_mismatch(state, dict(expected))
    if problem is not None:
        raise InputFileError(f"{source}: weights do not fit the model: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:2])[:300]
        raise InputFileError(f"{source}: weights do not fit the model ({detail})") from None


def load_user_model(spec: str, weights: str | Path | None, model_args: str | None = None
                    ) -> nn.Module:
    """Build ``--model`` (``module:factory``, ``file.py:factory``, optionally with literal
    arguments ``factory(num_classes=100)``) and load ``weights`` into it.

    ``model_args`` is ``--model-args``: a JSON object of keyword arguments. ``weights``
    may be a plain state dict, one wrapped under ``state_dict``/``model``/``net``, with
    DataParallel/compile prefixes, or this tool's own checkpoint; it is loaded with
    ``torch.load(weights_only=True)``.
    """
    parsed = parse_model_spec(spec, model_args)
    model = build_user_model(parsed)
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {parsed.name} returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    if weights is not None:
        p = require_file(weights, "weights file")
        _load_state(model, read_state_dict(p), p)
    else:
        check_tensors(dict(model.state_dict()), spec)
    model.eval()
    return model
