"""The IF graph's nodes: layers, the projection base, sum pools, graph metadata (SPEC section 3).

A DAG of *layers* (one :class:`InputLayer`, :class:`IFLayer` neuron groups, one
non-spiking :class:`ReadoutLayer`) joined by *projections* (synapse groups). The
projection *kinds* (``ConvProjection``, ``DenseProjection``, ``IdentityProjection``)
live in :mod:`csqcfs_deploy.ir.kinds`, one module per kind, on the :class:`Projection`
base defined here. A projection may start with a sum pool (:class:`SumPool`, the
folded average pool).

A neuron group receives the sum of its incoming projections. In one step of
the integer simulation (SPEC section 4), with ``s_src`` the source's spikes
(0/1; the input layer emits its integer input every step)::

    acc = sum over projections p of shift(W_p (*) pool_p(s_src_p), weight_exp_p)
    v   = saturate(v + current(acc) + bias);  s = v (>|>=) v_th;  v -= s * v_th

Arrays are per output channel, shape (C,): ``v_th``, ``v_init``, ``bias``; a
projection's weight has its output channel on axis 0 (the rest are that output's
synapses). A graph is either *float* (``meta.profile is None``: the folded
network in threshold units, ``v_th = 1``, ``v_init = phi``) or *integer*
(every array int64, in the profile's membrane units).

Every node is a frozen dataclass that validates itself; one registry
(:data:`NODE_TYPES`, class name = the ``.ifg`` type tag) drives both
:func:`~csqcfs_deploy.ir.ifg.save_graph` and :func:`~csqcfs_deploy.ir.ifg.load_graph`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.encoding import InputEncoding

NODE_TYPES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)

#: A node's numeric array: int64 in an integer graph, float64 in a float graph.
Array = npt.NDArray[Any]


def register(cls: _T) -> _T:
    """Add a node class to the registry that drives save and load."""
    NODE_TYPES[cls.__name__] = cls
    return cls


def as_shape(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive ints (GraphError naming ``what``)."""
    try:
        shape = tuple(int(d) for d in value)
    except TypeError:
        raise GraphError(f"{what} must be a sequence of ints, got {value!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise GraphError(f"{what} must be non-empty with positive sizes, got {shape}")
    return shape


def as_array(value: Any, what: str, ndim: int | None = None) -> Array:
    """``value`` as a read-only int64 (integers) or finite float64 array of ``ndim`` dims."""
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


def set_field(obj: object, name: str, value: Any) -> None:
    """Set a field of a frozen dataclass during its validation (``__post_init__``)."""
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
        set_field(self, "shape", as_shape(self.shape, f"input {self.name} shape"))
        set_field(self, "mean", tuple(float(m) for m in self.mean))
        set_field(self, "std", tuple(float(s) for s in self.std))
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
    v_th: Array
    v_init: Array
    bias: Array
    threshold_real: Array
    reset: str = "subtract"

    def __post_init__(self) -> None:
        set_field(self, "shape", as_shape(self.shape, f"layer {self.name} shape"))
        c = self.shape[0]
        for f in ("v_th", "v_init", "bias", "threshold_real"):
            arr = as_array(getattr(self, f), f"layer {self.name} {f}", 1)
            if arr.shape != (c,):
                raise GraphError(f"layer {self.name}: {f} has shape {arr.shape}, expected ({c},)")
            set_field(self, f, arr)
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
    bias: Array
    scale: float

    def __post_init__(self) -> None:
        set_field(self, "shape", as_shape(self.shape, f"readout {self.name} shape"))
        if len(self.shape) != 1:
            raise GraphError(f"readout {self.name} must be 1-D, got {self.shape}")
        arr = as_array(self.bias, f"readout {self.name} bias", 1)
        if arr.shape != self.shape:
            raise GraphError(f"readout {self.name}: bias shape {arr.shape} != {self.shape}")
        set_field(self, "bias", arr)
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


def window_out(size: int, k: int, s: int, p: int) -> int:
    """Output size of a window ``k``, stride ``s``, zero padding ``p`` over ``size``."""
    return (size + 2 * p - k) // s + 1


@register
@dataclass(frozen=True, eq=False)
class SumPool(Node):
    """Sum over ``kernel`` windows (zero padding), applied before a projection's weights."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for f in ("kernel", "stride"):
            val = tuple(int(v) for v in getattr(self, f))
            if len(val) != 2 or min(val) < 1:
                raise GraphError(f"sum pool {f} must be two positive ints, got {val}")
            set_field(self, f, val)
        pad = tuple(int(v) for v in self.padding)
        if len(pad) != 2 or min(pad) < 0:
            raise GraphError(f"sum pool padding must be two ints >= 0, got {pad}")
        set_field(self, "padding", pad)

    @property
    def window(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 3:
            raise GraphError(f"sum pool needs a (C, H, W) input, got {shape}")
        c, h, w = shape
        oh = window_out(h, self.kernel[0], self.stride[0], self.padding[0])
        ow = window_out(w, self.kernel[1], self.stride[1], self.padding[1])
        if oh < 1 or ow < 1:
            raise GraphError(f"sum pool {self.kernel} does not fit input {shape}")
        return (c, oh, ow)


@dataclass(frozen=True, eq=False)
class Projection(Node):
    """Base of synapse groups from layer ``src`` to layer ``dst`` (one subclass per kind).

    ``weight`` has the output channel on axis 0 for every kind. ``weight_exp``: the
    summed input is shifted left by it (right, flooring, when negative) before it
    reaches the neuron (Lava's Dense weight exponent). ``weight_exp_refusal`` is, for
    a kind whose integer profiles cannot carry a weight exponent, the reason (else None).
    """

    weight_exp_refusal: ClassVar[str | None] = None

    name: str
    src: str
    dst: str
    weight: Array
    pool: SumPool | None = None
    weight_exp: int = 0

    def pooled_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        return src_shape if self.pool is None else self.pool.out_shape(src_shape)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(*dst_shape) for a source of shape ``src_shape``; each kind defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define out_shape")

    def _check_common(self, ndim: int) -> None:
        set_field(self, "weight", as_array(self.weight, f"projection {self.name} weight", ndim))
        set_field(self, "weight_exp", int(self.weight_exp))
        if self.pool is not None and not isinstance(self.pool, SumPool):
            raise GraphError(f"projection {self.name}: pool must be a SumPool")

    @functools.cached_property
    def max_abs_row_sum(self) -> float:
        """Largest ``sum |W|`` over the synapses of one output neuron (before pooling).

        The same for every kind (axis 0 of the weight is the output channel); computed
        once per projection (the node is immutable).
        """
        w = np.abs(self.weight.astype(np.float64))
        rows = w.reshape(w.shape[0], -1).sum(axis=1) if w.ndim > 1 else w
        return float(rows.max(initial=0.0))


@register
@dataclass(frozen=True, eq=False)
class CalibrationRecord(Node):
    """What an integer graph's scales were calibrated for (SPEC 4b): ``timesteps`` T and
    ``presim`` P, on ``samples`` inputs from ``source``, and the quantization fidelity
    (0..1) the integer graph reached against the float IF graph on them."""

    timesteps: int
    presim: int
    samples: int
    source: str
    fidelity: float

    def __post_init__(self) -> None:
        for f in ("timesteps", "presim", "samples"):
            set_field(self, f, int(getattr(self, f)))
        set_field(self, "fidelity", float(self.fidelity))
        if self.timesteps < 1 or self.presim < 0 or self.samples < 1:
            raise GraphError(f"calibration record: T {self.timesteps}, P {self.presim}, "
                             f"{self.samples} samples out of range")
        if not 0.0 <= self.fidelity <= 1.0:
            raise GraphError(f"calibration record: fidelity {self.fidelity} not in 0..1")

    @property
    def steps(self) -> int:
        return self.timesteps + self.presim


@register
@dataclass(frozen=True, eq=False)
class GraphMeta(Node):
    """Graph-wide facts: profile (None for a float graph), levels, phi, provenance;
    ``calibration``: what the scales were calibrated for (None: weight-only scales)."""

    levels: int
    phi: float
    profile: str | None = None
    arch: str = ""
    num_classes: int = 0
    notes: str = ""
    calibration: CalibrationRecord | None = None

    def __post_init__(self) -> None:
        if int(self.levels) < 1:
            raise GraphError(f"levels must be >= 1, got {self.levels}")
        set_field(self, "levels", int(self.levels))
        set_field(self, "phi", float(self.phi))
        if self.calibration is not None and not isinstance(self.calibration,
                                                           CalibrationRecord):
            raise GraphError("graph meta: calibration must be a CalibrationRecord")
