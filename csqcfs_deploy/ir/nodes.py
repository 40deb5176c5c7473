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

from csqcfs_deploy.errors import DatasetError, GraphError
from csqcfs_deploy.ir.encoding import InputEncoding
from csqcfs_deploy.ir.fields import (
    MAX_LAYER_NEURONS,
    MAX_LEVELS,
    MAX_STEPS,
    MAX_TEXT_CHARS,
    MAX_WEIGHT_EXP,
    as_array,
    as_float,
    as_floats,
    as_int,
    as_pair,
    as_shape,
    as_str,
    check_neurons,
)
from csqcfs_deploy.ir.fields import Array as Array  # re-exported: the nodes' array type
from csqcfs_deploy.ir.profiles import PROFILES

NODE_TYPES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register(cls: _T) -> _T:
    """Add a node class to the registry that drives save and load."""
    NODE_TYPES[cls.__name__] = cls
    return cls


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
        where = f"input {as_str(self.name, 'input layer name')}"
        set_field(self, "shape", as_shape(self.shape, f"{where} shape"))
        set_field(self, "scale", as_float(self.scale, f"{where} scale", positive=True))
        set_field(self, "raw_max", as_float(self.raw_max, f"{where} raw_max", positive=True))
        set_field(self, "mean", as_floats(self.mean, f"{where} mean"))
        set_field(self, "std", as_floats(self.std, f"{where} std", positive=True))
        set_field(self, "bits", as_int(self.bits, f"{where} bits", 2, 24))
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise GraphError(f"{where}: mean/std need {self.shape[0]} values")
        try:
            InputEncoding(self.raw_max, self.mean, self.std, self.bits)
        except DatasetError as exc:
            raise GraphError(f"{where}: {exc}") from None

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
        as_str(self.name, "layer name")
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
        if not isinstance(self.reset, str) or self.reset not in self.RESETS:
            raise GraphError(f"layer {self.name}: reset must be one of {self.RESETS}, "
                             f"got {self.reset!r}")

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
        as_str(self.name, "readout name")
        set_field(self, "shape", as_shape(self.shape, f"readout {self.name} shape"))
        if len(self.shape) != 1:
            raise GraphError(f"readout {self.name} must be 1-D, got {self.shape}")
        arr = as_array(self.bias, f"readout {self.name} bias", 1)
        if arr.shape != self.shape:
            raise GraphError(f"readout {self.name}: bias shape {arr.shape} != {self.shape}")
        set_field(self, "bias", arr)
        set_field(self, "scale", as_float(self.scale, f"readout {self.name} scale", positive=True))

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


def check_padded(shape: tuple[int, ...], padding: tuple[int, int], what: str) -> None:
    """GraphError when the zero-padded (C, H, W) plane a window slides over is too big."""
    c, h, w = shape
    check_neurons(c * (h + 2 * padding[0]) * (w + 2 * padding[1]),
                  f"{what}: the zero-padded input {shape} + padding {padding}")


@register
@dataclass(frozen=True, eq=False)
class SumPool(Node):
    """Sum over ``kernel`` windows (zero padding), applied before a projection's weights."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        set_field(self, "kernel", as_pair(self.kernel, "sum pool kernel", 1))
        set_field(self, "stride", as_pair(self.stride, "sum pool stride", 1))
        set_field(self, "padding", as_pair(self.padding, "sum pool padding", 0))

    @property
    def window(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 3:
            raise GraphError(f"sum pool needs a (C, H, W) input, got {shape}")
        c, h, w = shape
        check_padded(shape, self.padding, f"sum pool {self.kernel}")
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
        """Validate the fields every kind has; ``ndim``: the weight's dimensions."""
        as_str(self.name, "projection name")
        for end in ("src", "dst"):
            as_str(getattr(self, end), f"projection {self.name} {end}")
        weight = as_array(self.weight, f"projection {self.name} weight", ndim)
        if 0 in weight.shape:
            raise GraphError(f"projection {self.name}: empty weight of shape {weight.shape}")
        set_field(self, "weight", weight)
        set_field(self, "weight_exp", as_int(self.weight_exp, f"projection {self.name} "
                                             "weight_exp", -MAX_WEIGHT_EXP, MAX_WEIGHT_EXP))
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
        set_field(self, "timesteps", as_int(self.timesteps, "calibration timesteps", 1,
                                            MAX_STEPS))
        set_field(self, "presim", as_int(self.presim, "calibration presim", 0, MAX_STEPS))
        set_field(self, "samples", as_int(self.samples, "calibration samples", 1))
        as_str(self.source, "calibration source", MAX_TEXT_CHARS)
        set_field(self, "fidelity", as_float(self.fidelity, "calibration fidelity"))
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
        set_field(self, "levels", as_int(self.levels, "graph levels", 1, MAX_LEVELS))
        set_field(self, "phi", as_float(self.phi, "graph phi"))
        if self.profile is not None and (not isinstance(self.profile, str)
                                         or self.profile not in PROFILES):
            raise GraphError(f"graph profile {self.profile!r} is not one of "
                             f"{', '.join(sorted(PROFILES))}")
        as_str(self.arch, "graph arch", MAX_TEXT_CHARS)
        as_str(self.notes, "graph notes", MAX_TEXT_CHARS)
        set_field(self, "num_classes", as_int(self.num_classes, "graph num_classes", 0,
                                              MAX_LAYER_NEURONS))
        if self.calibration is not None and not isinstance(self.calibration,
                                                           CalibrationRecord):
            raise GraphError("graph meta: calibration must be a CalibrationRecord")
