"""The IF graph: the hardware-ready integrate-and-fire network (SPEC section 3).

A DAG of *layers* (one :class:`InputLayer`, :class:`IFLayer` neuron groups, one
non-spiking :class:`ReadoutLayer`) joined by *projections* (synapse groups:
:class:`ConvProjection`, :class:`DenseProjection`, :class:`IdentityProjection`).
A projection may start with a sum pool (:class:`SumPool`, the folded average
pool) and a dense projection flattens a (C, H, W) source in C-major order.

A neuron group receives the sum of its incoming projections. In one step of
the integer simulation (SPEC section 4), with ``s_src`` the source's spikes
(0/1; the input layer emits its integer input every step)::

    acc = sum over projections p of shift(W_p (*) pool_p(s_src_p), weight_exp_p)
    v   = saturate(v + current(acc) + bias);  s = v (>|>=) v_th;  v -= s * v_th

Arrays are per output channel, shape (C,): ``v_th``, ``v_init``, ``bias``;
weights are (O, I/groups, kH, kW) for conv, (O, F) for dense, (C,) for
identity. A graph is either *float* (``meta.profile is None``: the folded
network in threshold units, ``v_th = 1``, ``v_init = phi``) or *integer*
(every array int64, in the profile's membrane units).

Every node is a frozen dataclass that validates itself; one registry
(:data:`NODE_TYPES`) drives both :func:`save_graph` and :func:`load_graph`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.encoding import InputEncoding

NODE_TYPES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register(cls: _T) -> _T:
    """Add a node class to the registry that drives save and load."""
    NODE_TYPES[cls.__name__] = cls
    return cls


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except TypeError:
        raise GraphError(f"{what} must be a sequence of ints, got {value!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise GraphError(f"{what} must be non-empty with positive sizes, got {shape}")
    return shape


def _as_array(value: Any, what: str, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise GraphError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    else:
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise GraphError(f"{what} contains a non-finite value")
    if ndim is not None and arr.ndim != ndim:
        raise GraphError(f"{what} must have {ndim} dimensions, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


class Node:
    """Common behaviour of every registered dataclass: array-aware equality."""

    def equals(self, other: object) -> bool:
        """True when ``other`` has the same type and identical fields (arrays: dtype too)."""
        if type(other) is not type(self):
            return False
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
                    return False
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif isinstance(a, Node):
                if not a.equals(b):
                    return False
            elif a != b:
                return False
        return True


# --------------------------------------------------------------------------- layers


@register
@dataclass(frozen=True, eq=False)
class InputLayer(Node):
    """Integer (or, in a float graph, real) input fed every step.

    ``scale`` is the real value of one input unit. ``raw_max``, ``mean``,
    ``std`` and ``bits`` are the dataset encoding (see
    :class:`csqcfs_deploy.ir.encoding.InputEncoding`).
    """

    name: str
    shape: tuple[int, ...]
    scale: float
    raw_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bits: int

    def __post_init__(self) -> None:
        _set(self, "shape", _as_shape(self.shape, f"input {self.name} shape"))
        _set(self, "mean", tuple(float(m) for m in self.mean))
        _set(self, "std", tuple(float(s) for s in self.std))
        if not self.scale > 0:
            raise GraphError(f"input {self.name}: scale must be > 0, got {self.scale}")
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise GraphError(f"input {self.name}: mean/std need {self.shape[0]} values")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def encoding(self) -> InputEncoding:
        """The dataset encoding that maps raw samples to this layer's units."""
        return InputEncoding(raw_max=self.raw_max, mean=self.mean, std=self.std, bits=self.bits)


@register
@dataclass(frozen=True, eq=False)
class IFLayer(Node):
    """A group of integrate-and-fire neurons, shape (C, H, W) or (F,).

    Per output channel (C,): ``v_th`` threshold, ``v_init`` initial membrane,
    ``bias`` added every step, ``threshold_real`` the trained CS-QCFS threshold
    ``lambda_c`` (the real value one spike carries). ``reset`` is
    ``"subtract"`` (``v -= v_th`` on a spike) or ``"zero"`` (``v = 0``).
    """

    RESETS: ClassVar[tuple[str, ...]] = ("subtract", "zero")

    name: str
    shape: tuple[int, ...]
    v_th: np.ndarray
    v_init: np.ndarray
    bias: np.ndarray
    threshold_real: np.ndarray
    reset: str = "subtract"

    def __post_init__(self) -> None:
        _set(self, "shape", _as_shape(self.shape, f"layer {self.name} shape"))
        c = self.shape[0]
        for f in ("v_th", "v_init", "bias", "threshold_real"):
            arr = _as_array(getattr(self, f), f"layer {self.name} {f}", 1)
            if arr.shape != (c,):
                raise GraphError(f"layer {self.name}: {f} has shape {arr.shape}, expected ({c},)")
            _set(self, f, arr)
        if np.any(self.v_th <= 0):
            raise GraphError(f"layer {self.name}: non-positive threshold {self.v_th.min()}")
        if np.any(self.threshold_real <= 0):
            raise GraphError(
                f"layer {self.name}: non-positive real threshold {self.threshold_real.min()}"
            )
        if self.reset not in self.RESETS:
            raise GraphError(f"layer {self.name}: reset must be one of {self.RESETS}")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def neurons(self) -> int:
        return int(np.prod(self.shape))


@register
@dataclass(frozen=True, eq=False)
class ReadoutLayer(Node):
    """Non-spiking readout, shape (F,): accumulates ``v += current(acc) + bias``.

    ``scale`` is the real logit of one membrane unit per counted step: after
    ``T`` steps, ``logits = v * scale / T``.
    """

    name: str
    shape: tuple[int, ...]
    bias: np.ndarray
    scale: float

    def __post_init__(self) -> None:
        _set(self, "shape", _as_shape(self.shape, f"readout {self.name} shape"))
        if len(self.shape) != 1:
            raise GraphError(f"readout {self.name} must be 1-D, got {self.shape}")
        arr = _as_array(self.bias, f"readout {self.name} bias", 1)
        if arr.shape != self.shape:
            raise GraphError(f"readout {self.name}: bias shape {arr.shape} != {self.shape}")
        _set(self, "bias", arr)
        if not self.scale > 0:
            raise GraphError(f"readout {self.name}: scale must be > 0")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def neurons(self) -> int:
        return self.shape[0]


Layer = InputLayer | IFLayer | ReadoutLayer


# --------------------------------------------------------------------------- projections


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@register
@dataclass(frozen=True, eq=False)
class SumPool(Node):
    """Sum over ``kernel`` windows (zero padding), applied before a projection's weights."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] = (0, 0)

    def __post_init__(self) -> None:
        for f in ("kernel", "stride"):
            val = tuple(int(v) for v in getattr(self, f))
            if len(val) != 2 or min(val) < 1:
                raise GraphError(f"sum pool {f} must be two positive ints, got {val}")
            _set(self, f, val)
        pad = tuple(int(v) for v in self.padding)
        if len(pad) != 2 or min(pad) < 0:
            raise GraphError(f"sum pool padding must be two ints >= 0, got {pad}")
        _set(self, "padding", pad)

    @property
    def window(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 3:
            raise GraphError(f"sum pool needs a (C, H, W) input, got {shape}")
        c, h, w = shape
        oh = _pool_out(h, self.kernel[0], self.stride[0], self.padding[0])
        ow = _pool_out(w, self.kernel[1], self.stride[1], self.padding[1])
        if oh < 1 or ow < 1:
            raise GraphError(f"sum pool {self.kernel} does not fit input {shape}")
        return (c, oh, ow)


@dataclass(frozen=True, eq=False)
class Projection(Node):
    """Base of synapse groups from layer ``src`` to layer ``dst``.

    ``weight_exp``: the summed input is shifted left by it (right, flooring,
    when negative) before it reaches the neuron (Lava's Dense weight exponent).
    """

    name: str
    src: str
    dst: str
    weight: np.ndarray
    pool: SumPool | None = None
    weight_exp: int = 0

    def pooled_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        return src_shape if self.pool is None else self.pool.out_shape(src_shape)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_common(self, ndim: int) -> None:
        _set(self, "weight", _as_array(self.weight, f"projection {self.name} weight", ndim))
        _set(self, "weight_exp", int(self.weight_exp))
        if self.pool is not None and not isinstance(self.pool, SumPool):
            raise GraphError(f"projection {self.name}: pool must be a SumPool")

    @functools.cached_property
    def max_abs_row_sum(self) -> float:
        """Largest ``sum |W|`` over the synapses of one output neuron (before pooling).

        Computed once per projection (the node is immutable).
        """
        w = np.abs(self.weight.astype(np.float64))
        rows = w.reshape(w.shape[0], -1).sum(axis=1) if w.ndim > 1 else w
        return float(rows.max(initial=0.0))


@register
@dataclass(frozen=True, eq=False)
class ConvProjection(Projection):
    """2-D convolution, weight (O, I/groups, kH, kW), zero padding."""

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    groups: int = 1

    def __post_init__(self) -> None:
        self._check_common(4)
        _set(self, "stride", tuple(int(v) for v in self.stride))
        _set(self, "padding", tuple(int(v) for v in self.padding))
        _set(self, "groups", int(self.groups))
        if len(self.stride) != 2 or min(self.stride) < 1:
            raise GraphError(f"projection {self.name}: bad stride {self.stride}")
        if len(self.padding) != 2 or min(self.padding) < 0:
            raise GraphError(f"projection {self.name}: bad padding {self.padding}")
        if self.groups < 1 or self.weight.shape[0] % self.groups:
            raise GraphError(f"projection {self.name}: groups {self.groups} do not divide "
                             f"{self.weight.shape[0]} output channels")

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.pooled_shape(src_shape)
        if len(shape) != 3:
            raise GraphError(f"projection {self.name}: conv needs (C, H, W) input, got {shape}")
        c, h, w = shape
        if c != self.weight.shape[1] * self.groups:
            raise GraphError(f"projection {self.name}: weight expects "
                             f"{self.weight.shape[1] * self.groups} input channels, source has {c}")
        oh = _pool_out(h, self.kernel[0], self.stride[0], self.padding[0])
        ow = _pool_out(w, self.kernel[1], self.stride[1], self.padding[1])
        if oh < 1 or ow < 1:
            raise GraphError(f"projection {self.name}: kernel does not fit input {shape}")
        return (int(self.weight.shape[0]), oh, ow)


@register
@dataclass(frozen=True, eq=False)
class DenseProjection(Projection):
    """Fully connected, weight (O, F); a (C, H, W) source is flattened C-major."""

    def __post_init__(self) -> None:
        self._check_common(2)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        features = int(np.prod(self.pooled_shape(src_shape)))
        if features != self.weight.shape[1]:
            raise GraphError(f"projection {self.name}: weight expects {self.weight.shape[1]} "
                             f"inputs, source gives {features}")
        return (int(self.weight.shape[0]),)


@register
@dataclass(frozen=True, eq=False)
class IdentityProjection(Projection):
    """One synapse per neuron (an explicit shortcut), weight (C,) per channel."""

    def __post_init__(self) -> None:
        self._check_common(1)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.pooled_shape(src_shape)
        if shape[0] != self.weight.shape[0]:
            raise GraphError(f"projection {self.name}: weight has {self.weight.shape[0]} "
                             f"channels, source has {shape[0]}")
        return shape


ProjectionT = ConvProjection | DenseProjection | IdentityProjection


@register
@dataclass(frozen=True, eq=False)
class GraphMeta(Node):
    """Graph-wide facts: profile (None for a float graph), levels, phi, provenance."""

    levels: int
    phi: float
    profile: str | None = None
    arch: str = ""
    num_classes: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        if int(self.levels) < 1:
            raise GraphError(f"levels must be >= 1, got {self.levels}")
        _set(self, "levels", int(self.levels))
        _set(self, "phi", float(self.phi))
