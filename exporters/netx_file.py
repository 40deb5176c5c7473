"""Reading a lava-dl netx file back: the probe, the ``csqcfs_netx`` description, checked.

:func:`opened_netx` probes the file in a child process
(:func:`~csqcfs_deploy.exporters.hdf5_probe.probed_hdf5`: a corrupt file cannot crash
or hang us, nor declare more data than the probe's limits), reads the description
:func:`~csqcfs_deploy.exporters.netx.write_netx` stores in the root attribute
:data:`NETX_ATTR` and checks it against the file's own layer groups, then yields the
description and a path to the probed file that lava-dl's ``netx.hdf5.Network`` can
open. :func:`read_netx_plan` returns the description only.

The description (:class:`csqcfs_deploy.exporters.netx.NetxPlan.meta`) must be JSON with
``version`` :data:`FORMAT_VERSION`, an ``input_shape`` and per layer a ``name``, a
``kind`` and a ``shape`` (each within the IF graph's layer limits, and equal to the
``shape`` dataset of its layer group), one ``readout_offset`` per readout neuron and
the ``load_kwargs`` :func:`load_kwargs` gives for its input bits and depth.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.hdf5_probe import probed_hdf5
from csqcfs_deploy.files import require_file
from csqcfs_deploy.ir.fields import MAX_NAME_CHARS, as_shape

NETX_ATTR = "csqcfs_netx"
FORMAT_VERSION = 1
#: Most layers a netx file may describe (the IF graph's node limit).
MAX_LAYERS = 4096
#: Input message bits a netx file may ask for (lava-dl takes up to 32).
MAX_INPUT_BITS = 32
#: What h5py raises on a file it cannot read.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError,
              IndexError, AttributeError, UnicodeError)


def load_kwargs(input_bits: int, depth: int) -> dict[str, int]:
    """Arguments of ``lava.lib.dl.netx.hdf5.Network`` that make the file run as exported."""
    return {"input_message_bits": input_bits, "reset_interval": 1 + depth, "reset_offset": 1}


@dataclass(frozen=True)
class NetxFile:
    """An opened netx file: its checked description and the path to give lava-dl."""

    meta: dict[str, Any]
    path: str


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _field(p: Path, meta: dict[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputFileError(f"{p}: netx description field {key!r} must be a "
                             f"{kind.__name__}, got {type(value).__name__}")
    return value


def _shape(p: Path, what: str, value: Any) -> tuple[int, ...]:
    try:
        return as_shape(value if isinstance(value, list) else None, what)
    except GraphError as exc:
        raise InputFileError(f"{p}: netx description: {exc}") from None


def _check_layers(p: Path, layers: list[Any]) -> None:
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise InputFileError(f"{p}: netx description lists {len(layers)} layers "
                             f"(1..{MAX_LAYERS})")
    for i, la in enumerate(layers):
        if not isinstance(la, dict):
            raise InputFileError(f"{p}: netx description layer {i} is not an object")
        name, kind = la.get("name"), la.get("kind")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise InputFileError(f"{p}: netx description layer {i} has no valid name")
        if kind not in ("conv", "dense"):
            raise InputFileError(f"{p}: netx layer {name}: kind {kind!r} is not conv or dense")
        _shape(p, f"layer {name} shape", la.get("shape"))


def _check_meta(p: Path, meta: Any) -> dict[str, Any]:
    """``meta`` (parsed JSON) as a checked description (see the module docstring)."""
    if not isinstance(meta, dict):
        raise InputFileError(f"{p}: the {NETX_ATTR} attribute is not a JSON object")
    if not _is_int(meta.get("version"), FORMAT_VERSION, FORMAT_VERSION):
        raise InputFileError(f"{p}: netx description version {meta.get('version')!r} is not "
                             f"supported")
    _shape(p, "input_shape", meta.get("input_shape"))
    bits: Any = meta.get("input_bits")
    if not _is_int(bits, 1, MAX_INPUT_BITS):
        raise InputFileError(f"{p}: netx description input_bits must be 1..{MAX_INPUT_BITS}, "
                             f"got {bits!r}")
    layers = _field(p, meta, "layers", list)
    _check_layers(p, layers)
    offset = _field(p, meta, "readout_offset", list)
    readout = math.prod(layers[-1]["shape"])
    if len(offset) != readout or not all(_is_int(v, -2**31, 2**31 - 1) for v in offset):
        raise InputFileError(f"{p}: netx description readout_offset must be {readout} "
                             "integers, one per readout neuron")
    if meta.get("load_kwargs") != load_kwargs(int(bits), len(layers)):
        raise InputFileError(f"{p}: netx description load_kwargs {meta.get('load_kwargs')!r}"
                             f" contradict its {len(layers)} layers and {bits} input bits")
    return meta


def _parse(p: Path, text: Any) -> dict[str, Any]:
    if text is None:
        raise InputFileError(f"{p} was not written by csqcfs-deploy (no {NETX_ATTR} attribute)")
    if not isinstance(text, (str, bytes)):
        raise InputFileError(f"{p}: the {NETX_ATTR} attribute is not text")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputFileError(f"{p}: the {NETX_ATTR} attribute is not JSON "
                             f"({str(exc)[:100]})") from None
    return _check_meta(p, meta)


def _file_shapes(f: h5py.File) -> list[tuple[str, tuple[int, ...]]]:
    """(type, shape) of each ``layer/N`` group in order (flatten groups carry no shape)."""
    root = f.get("layer")
    if not isinstance(root, h5py.Group):
        return []
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(len(root)):
        group = root.get(str(i))
        if not isinstance(group, h5py.Group) or "type" not in group:
            return out
        shape = np.asarray(group["shape"][()] if "shape" in group else ()).reshape(-1)
        if shape.dtype.kind not in "iu":
            shape = np.zeros(0, dtype=np.int64)
        out.append((_first_text(group["type"][()]), tuple(int(d) for d in shape[:8])))
    return out


def _first_text(value: Any) -> str:
    """The first element of a string dataset as text ("" when it holds none)."""
    items = np.asarray(value).reshape(-1)
    if not items.size:
        return ""
    first = items[0]
    return first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)


def _check_file_shapes(p: Path, meta: dict[str, Any],
                       found: list[tuple[str, tuple[int, ...]]]) -> None:
    """The layer groups lava-dl builds from must be the layers the description lists."""
    blocks = [shape for kind, shape in found if kind != "flatten"]
    want = [tuple(meta["input_shape"])] + [tuple(la["shape"]) for la in meta["layers"]]
    if blocks != want:
        raise InputFileError(f"{p}: the file's layer groups (shapes {blocks[:6]}) are not the "
                             f"layers its {NETX_ATTR} description lists ({want[:6]})")


@contextlib.contextmanager
def opened_netx(path: str | Path) -> Iterator[NetxFile]:
    """Probe and check a netx file; yield its description and a path for lava-dl (the
    probed file, pinned while the block runs). InputFileError names the file."""
    p = require_file(path, "netx file")
    with probed_hdf5(p, "netx") as pinned:
        try:
            with h5py.File(pinned, "r") as f:
                text = f.attrs.get(NETX_ATTR)
                found = _file_shapes(f)
        except _H5_ERRORS as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputFileError(f"{p} is not a readable netx file ({detail})") from None
        meta = _parse(p, text)
        _check_file_shapes(p, meta, found)
        yield NetxFile(meta, pinned)


def read_netx_plan(path: str | Path) -> dict[str, Any]:
    """The checked ``csqcfs_netx`` description of a file written by ``write_netx``."""
    with opened_netx(path) as netx:
        return netx.meta
