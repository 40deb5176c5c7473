"""Checkpoints: weights plus a JSON-able config, loaded with ``weights_only=True``.

File layout (``torch.save`` of a plain dict)::

    {"format": "csqcfs-deploy-checkpoint", "version": 1,
     "config": "<JSON text of ModelConfig>", "state_dict": {name: tensor}}

Users' own models come in as ``package.module:factory`` plus a state-dict file;
:func:`load_user_model` builds and loads them.
"""

from __future__ import annotations

import importlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.ir import InputEncoding
from csqcfs_deploy.train.zoo import arch_spec, build_model

CHECKPOINT_FORMAT = "csqcfs-deploy-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained network and feed it data."""

    arch: str
    levels: int
    phi: float
    num_classes: int
    input_shape: tuple[int, ...]
    encoding: InputEncoding
    dataset: str
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "arch": self.arch, "levels": self.levels, "phi": self.phi,
            "num_classes": self.num_classes, "input_shape": list(self.input_shape),
            "encoding": self.encoding.to_json(), "dataset": self.dataset, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ModelConfig:
        try:
            return cls(
                arch=str(data["arch"]),
                levels=int(data["levels"]),  # type: ignore[call-overload]
                phi=float(data["phi"]),  # type: ignore[arg-type]
                num_classes=int(data["num_classes"]),  # type: ignore[call-overload]
                input_shape=tuple(int(d) for d in data["input_shape"]),  # type: ignore[attr-defined]
                encoding=InputEncoding.from_json(data["encoding"]),  # type: ignore[arg-type]
                dataset=str(data["dataset"]),
                extra=dict(data.get("extra", {})),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"checkpoint config is malformed: {exc}") from None


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig) -> Path:
    """Write weights and config to ``path`` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(config.to_json(), sort_keys=True),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def _torch_load(path: Path, what: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            OSError, AttributeError, KeyError, IndexError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputFileError(f"{path} is not a readable {what}: corrupt or not a torch file "
                             f"({type(exc).__name__}{': ' + text[:120] if text else ''})"
                             ) from None


def check_finite(state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Raise GraphError naming the first tensor with a NaN or infinite value."""
    for name, tensor in state_dict.items():
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
    try:
        config = ModelConfig.from_json(json.loads(str(payload["config"])))
        state = payload["state_dict"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{p}: checkpoint is malformed ({exc})") from None
    if not isinstance(state, dict):
        raise InputFileError(f"{p}: checkpoint state_dict is not a dict")
    check_finite(state, p)
    arch_spec(config.arch)
    model = build_model(config.arch, config.levels, config.phi, config.num_classes)
    _load_state(model, state, p)
    model.eval()
    return model, config


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise InputFileError(f"{source}: weights do not fit the model ({detail})") from None


def load_user_model(spec: str, weights: str | Path | None) -> nn.Module:
    """Build ``package.module:factory`` and load a state dict into it.

    ``weights`` may be a plain state dict or a dict with a ``state_dict`` key;
    it is loaded with ``torch.load(weights_only=True)``.
    """
    if ":" not in spec:
        raise UsageError(f"--model must be package.module:factory, got {spec!r}")
    module_name, factory_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import model module {module_name!r}: {exc}") from None
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{module_name} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        p = require_file(weights, "weights file")
        state = _torch_load(p, "state dict")
        if isinstance(state, dict) and "state_dict" in state and isinstance(
            state["state_dict"], dict
        ):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise InputFileError(f"{p} is not a state dict of tensors")
        check_finite(state, p)
        _load_state(model, state, p)
    else:
        check_finite(dict(model.state_dict()), spec)
    model.eval()
    return model
