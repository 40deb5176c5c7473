"""The config a checkpoint records (:class:`ModelConfig`), read back field by field.

A checkpoint may come from anywhere, so :meth:`ModelConfig.from_json` checks every
field's type and range before anything is built from it: ``arch`` one of the zoo's,
``input_shape`` that architecture's input, ``levels`` in 1..:data:`MAX_LEVELS`,
``phi`` in [0, 1), ``num_classes`` in 1..:data:`MAX_CLASSES`, an encoding with one
finite mean and std per input channel. A bool is not accepted where a number is
(``True`` is an int in Python). A bad field is an InputFileError naming the file and
the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from csqcfs_deploy.errors import CsqcfsError, InputFileError
from csqcfs_deploy.ir import InputEncoding
from csqcfs_deploy.train.zoo import ARCHITECTURES, arch_spec


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
    def from_json(cls, data: object, source: Path | str = "checkpoint") -> ModelConfig:
        """The config of a checkpoint's JSON text, every field checked (type and range);
        InputFileError naming ``source`` and the field otherwise."""
        if not isinstance(data, dict):
            raise InputFileError(f"{source}: checkpoint config is a {type(data).__name__}, "
                                 "not a JSON object")
        missing = [k for k in CONFIG_FIELDS if k not in data]
        if missing:
            raise InputFileError(f"{source}: checkpoint config has no field "
                                 f"{', '.join(map(repr, missing))}")
        arch = _config_field(data, "arch", lambda v: isinstance(v, str) and v in ARCHITECTURES,
                             f"one of {', '.join(sorted(ARCHITECTURES))}", source)
        spec_shape = arch_spec(arch).input_shape
        shape = _config_field(data, "input_shape", lambda v: isinstance(v, list) and
                              tuple(v) == tuple(spec_shape) and all(_is_int(d) for d in v),
                              f"{list(spec_shape)} (the input of {arch})", source)
        return cls(
            arch=arch,
            levels=_config_field(data, "levels", lambda v: _is_int(v) and
                                 1 <= v <= MAX_LEVELS, f"an integer in 1..{MAX_LEVELS}", source),
            phi=float(_config_field(data, "phi", lambda v: _is_real(v) and 0 <= v < 1,
                                    "a number in [0, 1)", source)),
            num_classes=_config_field(data, "num_classes", lambda v: _is_int(v) and
                                      1 <= v <= MAX_CLASSES,
                                      f"an integer in 1..{MAX_CLASSES}", source),
            input_shape=tuple(int(d) for d in shape),
            encoding=_config_encoding(data["encoding"], int(spec_shape[0]), source),
            dataset=_config_field(data, "dataset", lambda v: isinstance(v, str) and bool(v),
                                  "a dataset name", source),
            extra=dict(_config_field(data, "extra", lambda v: isinstance(v, dict),
                                     "a JSON object", source, default={})),
        )


#: the fields every checkpoint config has
CONFIG_FIELDS = ("arch", "levels", "phi", "num_classes", "input_shape", "encoding", "dataset")
#: most quantization levels L accepted (QCFS uses 1..16)
MAX_LEVELS = 1024
#: most classes a checkpoint may declare
MAX_CLASSES = 100_000


def _is_int(value: object) -> TypeGuard[int]:
    """An int, not a bool (``True`` is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[int | float]:
    """A finite int or float, not a bool."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _config_field(data: dict[str, Any], name: str, ok: Callable[[Any], bool], want: str,
                  source: Path | str, default: object = None) -> Any:
    """``data[name]`` if ``ok`` accepts it, else InputFileError naming file and field."""
    value = data.get(name, default)
    if not ok(value):
        raise InputFileError(f"{source}: checkpoint config field {name!r} must be {want}, "
                             f"got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    """``value`` as JSON, cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _config_encoding(value: object, channels: int, source: Path | str) -> InputEncoding:
    """The config's input encoding, with one mean and std per input channel."""
    if not isinstance(value, dict):
        raise InputFileError(f"{source}: checkpoint config field 'encoding' must be a JSON "
                             f"object, got {_shown(value)}")
    for key in ("mean", "std"):
        items = value.get(key)
        if not (isinstance(items, list) and len(items) == channels and
                all(_is_real(v) for v in items)):
            raise InputFileError(f"{source}: checkpoint config field 'encoding.{key}' must be "
                                 f"{channels} finite number(s), got {_shown(items)}")
    for key in ("raw_max", "bits"):
        if key in value and not _is_real(value[key]):
            raise InputFileError(f"{source}: checkpoint config field 'encoding.{key}' must be "
                                 f"a finite number, got {_shown(value[key])}")
    try:
        return InputEncoding.from_json(value)
    except CsqcfsError as exc:
        raise InputFileError(f"{source}: checkpoint config field 'encoding': {exc}") from None
