"""Type and range checks of the IF graph's node fields, and the limits they enforce.

Every node dataclass (:mod:`.nodes`, :mod:`.kinds`) validates its own fields with these
functions in ``__post_init__``, so a graph read from a file (``.ifg``, ``.nir``) or
built in code is checked the same way: a wrong type (a string where an int is
expected, a bool, a float for an int, a non-finite float), a value out of range or a
size beyond the limits below raises :class:`~csqcfs_deploy.errors.GraphError` naming
the field. Integral numpy scalars count as ints, numpy floats as floats.

Limits (sizes a real network stays far below; a graph past one is refused):

* :data:`MAX_LAYER_NEURONS` neurons in one layer (and in one zero-padded conv or pool
  input plane, ``C * (H + 2p) * (W + 2p)``), :data:`MAX_GRAPH_NEURONS` in a graph;
* :data:`MAX_SHAPE_DIMS` dimensions in a layer shape;
* :data:`MAX_WINDOW` for a kernel, stride or padding size (per axis);
* :data:`MAX_WEIGHT_EXP`: ``|weight_exp|`` (a profile narrows it further);
* :data:`MAX_LEVELS` quantization levels; :data:`MAX_STEPS` time steps in a
  calibration record; :data:`MAX_NAME_CHARS` characters in a node name,
  :data:`MAX_TEXT_CHARS` in other text fields.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import GraphError

#: A node's numeric array: int64 in an integer graph, float64 in a float graph.
Array = npt.NDArray[Any]

MAX_LAYER_NEURONS = 2**26
MAX_GRAPH_NEURONS = 2**28
MAX_SHAPE_DIMS = 4
MAX_WINDOW = 4096
MAX_WEIGHT_EXP = 31
MAX_LEVELS = 2**16
MAX_STEPS = 2**24
MAX_NAME_CHARS = 1024
MAX_TEXT_CHARS = 2**16

_INT64_MAX = int(np.iinfo(np.int64).max)


def as_int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (inclusive); bools, floats and strings refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise GraphError(f"{what} must be an integer, got {_show(value)}")
    out = int(value)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise GraphError(f"{what} must be in {_range(lo, hi)}, got {out}")
    return out


def as_float(value: Any, what: str, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` when ``positive``); bools and strings refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise GraphError(f"{what} must be a number, got {_show(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise GraphError(f"{what} is too large: {_show(value)}") from None
    if not math.isfinite(out):
        raise GraphError(f"{what} must be finite, got {out}")
    if positive and not out > 0:
        raise GraphError(f"{what} must be > 0, got {out}")
    return out


def as_str(value: Any, what: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """``value`` as a str of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise GraphError(f"{what} must be a string, got {_show(value)}")
    if len(value) > max_chars:
        raise GraphError(f"{what} is longer than {max_chars} characters")
    return value


def as_sequence(value: Any, what: str) -> tuple[Any, ...]:
    """``value`` (a tuple, list or 1-D array) as a tuple; strings and mappings refused."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return tuple(value.tolist())
    if not isinstance(value, (tuple, list)):
        raise GraphError(f"{what} must be a sequence, got {_show(value)}")
    return tuple(value)


def as_floats(value: Any, what: str, positive: bool = False) -> tuple[float, ...]:
    """``value`` as a tuple of finite floats (each ``> 0`` when ``positive``)."""
    return tuple(as_float(v, f"{what}[{i}]", positive)
                 for i, v in enumerate(as_sequence(value, what)))


def as_pair(value: Any, what: str, lo: int, hi: int = MAX_WINDOW) -> tuple[int, int]:
    """``value`` as two ints in ``lo..hi`` (a kernel, stride or padding)."""
    items = as_sequence(value, what)
    if len(items) != 2:
        raise GraphError(f"{what} must be two integers, got {_show(value)}")
    a, b = (as_int(v, what, lo, hi) for v in items)
    return a, b


def as_shape(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a layer shape: 1..MAX_SHAPE_DIMS positive ints, at most
    MAX_LAYER_NEURONS neurons."""
    dims = as_sequence(value, what)
    if not 1 <= len(dims) <= MAX_SHAPE_DIMS:
        raise GraphError(f"{what} must have 1..{MAX_SHAPE_DIMS} dimensions, got {_show(value)}")
    shape = tuple(as_int(d, what, 1, MAX_LAYER_NEURONS) for d in dims)
    check_neurons(math.prod(shape), what)
    return shape


def check_neurons(count: int, what: str, limit: int = MAX_LAYER_NEURONS) -> None:
    """GraphError when ``count`` neurons (or values of a plane) exceed ``limit``."""
    if count > limit:
        raise GraphError(f"{what}: {count} neurons exceed the limit of {limit}")


def as_array(value: Any, what: str, ndim: int | None = None) -> Array:
    """``value`` as a read-only int64 (integers) or finite float64 array of ``ndim`` dims.

    Bool, complex, string, object and structured arrays are refused, and so are
    unsigned values beyond int64.
    """
    if isinstance(value, (str, bytes, dict)):
        raise GraphError(f"{what} must be a numeric array, got {_show(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise GraphError(f"{what} is not a numeric array ({exc})") from None
    if arr.dtype.kind not in "iuf" or arr.dtype.fields is not None:
        raise GraphError(f"{what} must be an int or float array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise GraphError(f"{what} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise GraphError(f"{what} has a value beyond the int64 range")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    else:
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise GraphError(f"{what} contains a non-finite value")
    arr.setflags(write=False)
    return arr


def _range(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"{lo}..{hi}"


def _show(value: Any) -> str:
    """A short description of a bad value for a message (type and a clipped repr)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
