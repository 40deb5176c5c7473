"""The Norse back end: an integer IF graph as a Norse (PyTorch) module, spike for spike.

:func:`to_norse` turns an integer :class:`~csqcfs_deploy.ir.graph.IFGraph` into a
:class:`NorseIFNetwork`, a ``torch.nn.Module`` made of Norse parts that runs
the **synchronous** schedule (SPEC sections 4 and 6, timing in
:mod:`csqcfs_deploy.ir.schedule`) and reproduces the integer simulator
(:func:`csqcfs_deploy.simulators.integer.simulate`) exactly: every spike of
every layer at every step.

Layout (Norse's ``functional/`` vs ``module/`` split):

* synapses are torch layers holding the integer weights as floats:
  ``nn.Conv2d`` / ``nn.Linear`` (after ``nn.Flatten``) / :class:`ChannelScale`
  (identity shortcuts), each after a :class:`SumPool2d` where the projection
  has a pool, then :class:`IntegerRound` and, where ``weight_exp != 0``,
  :class:`WeightExponent`;
* IF neurons are :class:`IFNeuronCell`, a ``norse.torch.module.snn.SNNCell``
  whose activation is the pure step function :func:`if_feed_forward_step`
  (Norse's ``threshold`` for the spike, Norse's ``reset_subtract`` /
  ``reset_value`` for the reset); the readout is :class:`ReadoutCell` over
  :func:`readout_feed_forward_step` (it never spikes);
* :class:`NorseIFNetwork` is the stateful container. It follows Norse's
  ``SequentialState`` conventions (``forward(x, state=None) -> (output,
  state)``, ``state=None`` starts from the initial state) for a DAG: residual
  networks have several projections into one layer.

**Why the float arithmetic is exact.** Let ``M`` be the largest integer up to
which every integer is representable in the module's dtype (``2**24`` for
float32, ``2**53`` for float64). Every value below is an integer; a float sum,
difference or product of integers is exact while its true value stays within
``[-M, M]``. Per layer, :func:`layer_bounds` computes (see :class:`LayerBound`):

1. *synaptic sums*: ``A = sum over incoming projections of max_o sum|W[o]| x
   pool window x largest source value x 2**max(weight_exp, 0)`` (source value:
   1 for spikes, ``input_max_abs`` for the input layer). Every partial sum a
   convolution or matrix product forms is bounded by ``A``, so with ``A <= M``
   it is exact in any summation order. On CUDA the module switches TF32 off
   while it runs (TF32 keeps 10 mantissa bits); the result is rounded to the
   nearest integer (:class:`IntegerRound`, a no-op when exact, which also
   absorbs the tiny error of transform-based convolution algorithms).
2. *current stage* (loihi2): ``u = acc * 2**6`` then one 24-bit wrap,
   ``u -/+ 2**24``. Both are ``2**6 * k`` with ``|k| <= A + 2**18``: exact when
   ``A + 2**(current_bits - act_shift) <= M``. Where ``A * 2**6 < 2**23`` the
   wrap cannot fire and is skipped (:attr:`LayerBound.may_wrap`).
3. *membrane*: the saturating update is computed as
   ``v + clamp(u + bias, v_min - v, v_max - v)`` (identical to
   ``clamp(v + u + bias, v_min, v_max)`` over the integers). Either

   - **range**: ``2 * max(|v_min|, v_max, |v_init|, v_th) + 1 <= M`` and
     ``|bias| <= M``: the clamp limits and every membrane value are exact, the
     only possibly rounded quantity is ``u + bias`` and it is rounded only
     outside ``[-M, M]``, where the (exact) clamp limits decide anyway, because
     rounding is monotone. Holds for any number of steps: loihi2 (24-bit
     membrane) in float32, every profile in float64.
   - **steps**: after ``S`` steps ``|v| <= start + S * a`` with ``start =
     max(|v_init|, v_th)`` and ``a = |u| + |bias|`` bounds; when ``2 * start +
     S * a + 1 <= M`` and the saturation cannot be reached (``start + S * a <=
     min(|v_min|, v_max)``) every value is exact. This lets int8/int16 (32-bit
     membrane) run in float32 for a known number of steps (``max_steps``).

   The comparison is ``heaviside(v - v_th)`` (``v > v_th``) or
   ``heaviside(v - v_th + 1)`` (``v >= v_th`` over the integers), the reset
   ``v - z * v_th`` (or ``(1 - z) * v``): all within the same bounds.

The bound is checked per layer when the module is built and whenever it moves
to another dtype (``.to(dtype)``, ``.float()``, ``.double()``, ``.half()``):
a dtype under which it fails is refused with :class:`GraphError` before
anything is converted. Moving devices (``.to("cuda")``) keeps the dtype.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from norse.torch.functional.heaviside import heaviside
from norse.torch.functional.reset import reset_subtract, reset_value
from norse.torch.functional.threshold import threshold
from norse.torch.module.snn import SNNCell
from torch import nn

from csqcfs_deploy.errors import BackendUnavailable, GraphError, UsageError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    IFLayer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)
from csqcfs_deploy.ir.neuron import exact_float_bound
from csqcfs_deploy.ir.profiles import Profile, get_profile
from csqcfs_deploy.ir.schedule import RunConfig, total_steps
from csqcfs_deploy.ir.synapses import sum_pool
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult

#: Norse threshold methods whose forward pass is the exact Heaviside step (the
#: stochastic ``logistic`` / ``circ_dist`` are excluded).
THRESHOLD_METHODS: tuple[str, ...] = ("super", "heaviside", "triangle", "tanh", "circ",
                                      "heavi_erfc")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32,
                                         torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- exactness bounds


@dataclass(frozen=True)
class LayerBound:
    """Integer magnitudes one layer's float arithmetic must hold exactly.

    ``synaptic``: A, bound of ``|acc|`` (the summed synaptic input of a step);
    ``wrap_span``: ``2**(current_bits - act_shift)`` on profiles with a
    wrapping current stage, else 0; ``current``: bound of ``|u|`` after the
    current stage (shift and one wrap); ``bias``: max ``|bias|``; ``v_min`` /
    ``v_max``: the saturation limits; ``start``: ``max(|v_init|, v_th)`` (0 for
    the readout, which starts at 0 and has no threshold).
    """

    layer: str
    synaptic: int
    wrap_span: int
    current: int
    bias: int
    v_min: int
    v_max: int
    start: int

    def __post_init__(self) -> None:
        for name in ("synaptic", "wrap_span", "current", "bias", "start"):
            if getattr(self, name) < 0:
                raise GraphError(f"layer {self.layer}: bound {name} must be >= 0")
        if self.v_min > 0 or self.v_max < 0:
            raise GraphError(f"layer {self.layer}: saturation range must contain 0")

    @property
    def may_wrap(self) -> bool:
        """False when ``|acc << act_shift| < 2**(current_bits - 1)``: the wrap never fires."""
        return self.wrap_span > 0 and 2 * self.synaptic >= self.wrap_span

    @property
    def per_step(self) -> int:
        """a: the largest change of the membrane in one step before the reset."""
        return self.current + self.bias

    @property
    def range_needed(self) -> int:
        """Largest magnitude in the range argument (membrane limits and differences)."""
        r = max(-self.v_min, self.v_max, self.start)
        return 2 * r + 1

    def synaptic_exact(self, dtype: torch.dtype) -> bool:
        return self.synaptic + self.wrap_span <= exact_float_bound(dtype)

    def range_exact(self, dtype: torch.dtype) -> bool:
        m = exact_float_bound(dtype)
        return self.range_needed <= m and self.bias <= m

    def max_steps(self, dtype: torch.dtype) -> int | None:
        """Steps for which the membrane stays exact in ``dtype`` (None: unlimited; 0: none)."""
        if not self.synaptic_exact(dtype):
            return 0
        if self.range_exact(dtype):
            return None
        a = self.per_step
        if a == 0:
            return None if 2 * self.start + 1 <= exact_float_bound(dtype) else 0
        by_precision = (exact_float_bound(dtype) - 1 - 2 * self.start) // a
        by_saturation = (min(-self.v_min, self.v_max) - self.start) // a
        return max(0, min(by_precision, by_saturation))

    def problem(self, dtype: torch.dtype, steps: int | None) -> str | None:
        """Why ``dtype`` is not exact for this layer over ``steps`` steps (None: it is)."""
        name = _dtype_name(dtype)
        m = exact_float_bound(dtype)
        if not self.synaptic_exact(dtype):
            what = f"synaptic sums may reach {self.synaptic}"
            if self.wrap_span:
                what += f" (+ {self.wrap_span} for the current wrap)"
            return (f"layer {self.layer}: {what}, beyond the exact integers of {name} "
                    f"(2**{m.bit_length() - 1})")
        limit = self.max_steps(dtype)
        if limit is None:
            return None
        if steps is not None and steps <= limit:
            return None
        rng = f"membrane range [{self.v_min}, {self.v_max}]"
        if limit == 0:
            return f"layer {self.layer}: the {rng} is not exact in {name}"
        run = "an unlimited number of steps" if steps is None else f"{steps} steps"
        return (f"layer {self.layer}: the {rng} is not exact in {name} for {run} "
                f"(exact for at most {limit} steps)")


def _projection_bound(p: ProjectionT, source_max: int) -> int:
    """max_o sum|W[o]| x pool window x source_max x 2**max(weight_exp, 0), as an exact int."""
    w = np.abs(np.asarray(p.weight, dtype=np.float64))
    rows = w.reshape(w.shape[0], -1).sum(axis=1) if w.ndim > 1 else w
    fan_in = int(rows.max(initial=0.0))
    window = 1 if p.pool is None else p.pool.window
    return fan_in * window * int(source_max) * (1 << max(p.weight_exp, 0))


def _current_bound(synaptic: int, profile: Profile) -> int:
    """Bound of ``|profile.current(acc)|`` for ``|acc| <= synaptic``."""
    raw = synaptic << profile.act_shift
    if profile.current_bits is None:
        return raw
    half = 1 << (profile.current_bits - 1)
    return max(half, raw - 2 * half) if raw >= half else raw


def layer_bounds(graph: IFGraph, input_max_abs: int | None = None) -> tuple[LayerBound, ...]:
    """The :class:`LayerBound` of every non-input layer, in topological order."""
    if not graph.is_integer:
        raise GraphError("the Norse back end runs quantized graphs; convert with a --profile "
                         "first")
    profile = get_profile(str(graph.meta.profile))
    in_max = graph.input.encoding.max_abs_int if input_max_abs is None else int(input_max_abs)
    if in_max < 0:
        raise UsageError(f"input_max_abs must be >= 0, got {in_max}")
    span = 0 if profile.current_bits is None else 1 << (profile.current_bits - profile.act_shift)
    bounds: list[LayerBound] = []
    for name in graph.topological_order()[1:]:
        layer = graph.node(name)
        synaptic = sum(
            _projection_bound(p, in_max if p.src == graph.input.name else 1)
            for p in graph.incoming(name)
        )
        if isinstance(layer, IFLayer):
            start = int(max(np.abs(layer.v_init).max(), layer.v_th.max()))
        else:
            start = 0
        bounds.append(LayerBound(
            layer=name, synaptic=synaptic, wrap_span=span,
            current=_current_bound(synaptic, profile), bias=int(np.abs(layer.bias).max()),
            v_min=profile.voltage_min, v_max=profile.voltage_max, start=start,
        ))
    return tuple(bounds)


def check_exact(bounds: tuple[LayerBound, ...], dtype: torch.dtype, steps: int | None) -> None:
    """Raise :class:`GraphError` naming the first layer ``dtype`` is not exact for."""
    if dtype not in FLOAT_DTYPES:
        raise GraphError(f"the Norse module computes in a float dtype "
                         f"({', '.join(_dtype_name(d) for d in FLOAT_DTYPES)}), "
                         f"not {_dtype_name(dtype)}")
    for b in bounds:
        why = b.problem(dtype, steps)
        if why is not None:
            raise GraphError(f"{why}; use float64" if dtype != torch.float64 else why)


def exact_dtype(bounds: tuple[LayerBound, ...], steps: int | None) -> torch.dtype:
    """float32 where every layer is provably exact in it, else float64 (or GraphError)."""
    for dtype in (torch.float32, torch.float64):
        if all(b.problem(dtype, steps) is None for b in bounds):
            return dtype
    check_exact(bounds, torch.float64, steps)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- pure step functions


class IFNeuronParameters(NamedTuple):
    """Constants of one IF group, tensors shaped (1, C, 1, 1) or (1, C).

    ``offset``: 0 for the strict comparison ``v > v_th`` (loihi2), 1 for
    ``v >= v_th`` (int8/int16); ``boundary``: the step P after which the
    pre-simulation mask is taken and the membranes return to ``v_init`` (0: no
    pre-simulation); ``method`` / ``alpha``: Norse's threshold function (its
    forward pass is the Heaviside step for every allowed method).
    """

    v_th: torch.Tensor
    v_init: torch.Tensor
    bias: torch.Tensor
    profile: Profile
    v_min: float
    v_max: float
    offset: float
    reset: str
    boundary: int
    method: str = "super"
    alpha: float = 100.0
    may_wrap: bool = True


class IFNeuronState(NamedTuple):
    """``z``: output spikes of the last step (after the mask), (N, *shape);
    ``v``: membranes (N, *shape); ``mask``: None until the pre-simulation
    boundary, then (N, *shape) 0/1; ``t``: steps done."""

    z: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    t: int


def saturating_add(v: torch.Tensor, w: torch.Tensor, v_min: float, v_max: float
                   ) -> torch.Tensor:
    """``clamp(v + w, v_min, v_max)`` written as ``v + clamp(w, v_min - v, v_max - v)``.

    Equal over the integers; in floats it keeps every quantity inside the
    exactly representable range (see the module docstring, "range").
    """
    return v + torch.clamp(w, v_min - v, v_max - v)


def synaptic_current(acc: torch.Tensor, profile: Profile, may_wrap: bool = True
                     ) -> torch.Tensor:
    """``profile.current(acc)`` (shift, then the wrap); ``may_wrap=False`` (the layer's
    bound shows ``|acc << act_shift| < 2**(current_bits - 1)``) skips the wrap, which
    could not fire."""
    if may_wrap:
        return profile.current(acc)
    return acc * float(1 << profile.act_shift) if profile.act_shift else acc


def if_feed_forward_step(input_tensor: torch.Tensor, state: IFNeuronState,
                         p: IFNeuronParameters, dt: float = 1.0
                         ) -> tuple[torch.Tensor, IFNeuronState]:
    """One step of an integer IF group, in floats holding integers.

    With ``acc = input_tensor`` the step's summed synaptic input (N, *shape)::

        u    = profile.current(acc)                   # loihi2: acc << 6, 24-bit wrap
        v    = clamp(v + u + bias, v_min, v_max)      # saturate
        z    = heaviside(v - v_th + offset)           # v > v_th, or v >= v_th (offset 1)
        v    = v - z * v_th                           # reset "subtract" (or v = (1-z) v)
        out  = z * mask                               # mask: 1 until the P boundary
        at t == P > 0:  mask = heaviside(v); v = v_init

    Returns ``(out, new state)``; ``dt`` is unused (Norse's signature).
    """
    t = state.t + 1
    u = synaptic_current(input_tensor, p.profile, p.may_wrap)
    v = saturating_add(state.v, u + p.bias, p.v_min, p.v_max)
    z = threshold(v - p.v_th + p.offset if p.offset else v - p.v_th, p.method, p.alpha)
    zero = v.new_zeros(())
    if p.reset == "subtract":
        v = reset_subtract(z, v, zero, p.v_th)
    else:
        v = reset_value(z, v, zero, p.v_th)
    out = z if state.mask is None else z * state.mask
    mask = state.mask
    if p.boundary > 0 and t == p.boundary:
        mask = heaviside(v)
        v = p.v_init.expand_as(v).clone()
    return out, IFNeuronState(z=out, v=v, mask=mask, t=t)


class ReadoutParameters(NamedTuple):
    """Constants of the non-spiking readout: ``bias`` (1, F); ``boundary``: the
    step after which the membrane is set to 0 (0: never)."""

    bias: torch.Tensor
    profile: Profile
    v_min: float
    v_max: float
    boundary: int
    may_wrap: bool = True


class ReadoutState(NamedTuple):
    """``v``: readout membranes (N, F); ``t``: steps done."""

    v: torch.Tensor
    t: int


def readout_feed_forward_step(input_tensor: torch.Tensor, state: ReadoutState,
                              p: ReadoutParameters, dt: float = 1.0
                              ) -> tuple[torch.Tensor, ReadoutState]:
    """One step of the readout (N, F), in floats holding integers::

        v = clamp(v + profile.current(acc) + bias, v_min, v_max)
        at t == P > 0:  v = 0

    Returns ``(v, new state)``.
    """
    t = state.t + 1
    u = synaptic_current(input_tensor, p.profile, p.may_wrap)
    v = saturating_add(state.v, u + p.bias, p.v_min, p.v_max)
    if p.boundary > 0 and t == p.boundary:
        v = torch.zeros_like(v)
    return v, ReadoutState(v=v, t=t)


# --------------------------------------------------------------------------- synapse modules


class SumPool2d(nn.Module):
    """Sum over pooling windows with zero padding, (N, C, H, W) -> (N, C, H', W')."""

    def __init__(self, pool: SumPool) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_pool(x, self.pool)

    def extra_repr(self) -> str:
        return f"kernel={self.pool.kernel}, stride={self.pool.stride}, padding={self.pool.padding}"


class ChannelScale(nn.Module):
    """Identity projection: one synapse per neuron, ``x * w[c]``; weight (C,)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class IntegerRound(nn.Module):
    """Round to the nearest integer; identity gradient (straight-through)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return x.round()
        return x + (x.round() - x).detach()


class WeightExponent(nn.Module):
    """Shift an integer sum by ``exp``: ``x * 2**exp``, or ``floor(x / 2**-exp)``."""

    def __init__(self, exp: int) -> None:
        super().__init__()
        self.exp = int(exp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exp >= 0:
            return x * float(1 << self.exp)
        return torch.floor(x / float(1 << -self.exp))

    def extra_repr(self) -> str:
        return f"exp={self.exp}"


def synapse_module(p: ProjectionT, dtype: torch.dtype) -> nn.Sequential:
    """The torch layers of one projection, holding its integer weights in ``dtype``."""
    w = torch.tensor(np.asarray(p.weight), dtype=dtype)
    parts: list[nn.Module] = []
    if p.pool is not None:
        parts.append(SumPool2d(p.pool))
    if isinstance(p, ConvProjection):
        conv = nn.Conv2d(w.shape[1] * p.groups, w.shape[0], p.kernel, stride=p.stride,
                         padding=p.padding, groups=p.groups, bias=False, dtype=dtype)
        conv.weight = nn.Parameter(w, requires_grad=False)
        parts.append(conv)
    elif isinstance(p, DenseProjection):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
        lin.weight = nn.Parameter(w, requires_grad=False)
        parts += [nn.Flatten(1), lin]
    elif isinstance(p, IdentityProjection):
        parts.append(ChannelScale(w))
    else:  # pragma: no cover - the graph only holds the three kinds
        raise GraphError(f"projection {p.name}: unsupported type {type(p).__name__}")
    parts.append(IntegerRound())
    if p.weight_exp != 0:
        parts.append(WeightExponent(p.weight_exp))
    return nn.Sequential(*parts)


# --------------------------------------------------------------------------- neuron modules


def _per_channel(values: np.ndarray, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1) or (1, C) for broadcasting against (N, *shape)."""
    return torch.tensor(np.asarray(values), dtype=dtype).view(1, -1, *([1] * (ndim - 1)))


class _CheckedCell(SNNCell):
    """A Norse cell that refuses a dtype under which its layer's bound fails."""

    bound: LayerBound
    max_steps: int | None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> nn.Module:
        probe = fn(torch.empty(0, dtype=self.bias.dtype, device=self.bias.device))
        check_exact((self.bound,), probe.dtype, self.max_steps)
        return super()._apply(fn, recurse)


class IFNeuronCell(_CheckedCell):
    """Norse cell of one IF group (shape (C, H, W) or (F,)) over :func:`if_feed_forward_step`.

    ``forward(acc, state=None) -> (spikes, IFNeuronState)``; ``acc`` is the
    step's summed synaptic input (N, *shape). ``v_th``, ``v_init``, ``bias``
    are buffers (they move with ``.to()``).
    """

    def __init__(self, layer: IFLayer, profile: Profile, bound: LayerBound, boundary: int,
                 max_steps: int | None, dtype: torch.dtype, method: str = "super",
                 alpha: float = 100.0) -> None:
        super().__init__(activation=if_feed_forward_step, state_fallback=self.initial_state,
                         p=None, dt=1.0)
        ndim = len(layer.shape)
        self.register_buffer("v_th", _per_channel(layer.v_th, ndim, dtype))
        self.register_buffer("v_init", _per_channel(layer.v_init, ndim, dtype))
        self.register_buffer("bias", _per_channel(layer.bias, ndim, dtype))
        self.layer_name = layer.name
        self.shape = layer.shape
        self.profile = profile
        self.reset = layer.reset
        self.boundary = int(boundary)
        self.method = method
        self.alpha = float(alpha)
        self.bound = bound
        self.max_steps = max_steps

    def neuron_parameters(self) -> IFNeuronParameters:
        return IFNeuronParameters(
            v_th=self.v_th, v_init=self.v_init, bias=self.bias, profile=self.profile,
            v_min=float(self.profile.voltage_min), v_max=float(self.profile.voltage_max),
            offset=0.0 if self.profile.strict else 1.0, reset=self.reset,
            boundary=self.boundary, method=self.method, alpha=self.alpha,
            may_wrap=self.bound.may_wrap,
        )

    def initial_state(self, input_tensor: torch.Tensor) -> IFNeuronState:
        v = self.v_init.expand_as(input_tensor).clone()
        return IFNeuronState(z=torch.zeros_like(v), v=v, mask=None, t=0)

    def forward(self, input_tensor: torch.Tensor, state: IFNeuronState | None = None
                ) -> tuple[torch.Tensor, IFNeuronState]:
        state = state if state is not None else self.initial_state(input_tensor)
        return self.activation(input_tensor, state, self.neuron_parameters(), self.dt)

    def extra_repr(self) -> str:
        cmp = ">" if self.profile.strict else ">="
        return (f"{self.layer_name}: shape={self.shape}, spike when v {cmp} v_th, "
                f"reset={self.reset}, profile={self.profile.name}, boundary={self.boundary}, "
                f"method={self.method}")


class ReadoutCell(_CheckedCell):
    """Norse cell of the non-spiking readout (F,) over :func:`readout_feed_forward_step`.

    ``forward(acc, state=None) -> (v, ReadoutState)``.
    """

    def __init__(self, layer: ReadoutLayer, profile: Profile, bound: LayerBound, boundary: int,
                 max_steps: int | None, dtype: torch.dtype) -> None:
        super().__init__(activation=readout_feed_forward_step,
                         state_fallback=self.initial_state, p=None, dt=1.0)
        self.register_buffer("bias", _per_channel(layer.bias, 1, dtype))
        self.layer_name = layer.name
        self.shape = layer.shape
        self.profile = profile
        self.boundary = int(boundary)
        self.bound = bound
        self.max_steps = max_steps

    def readout_parameters(self) -> ReadoutParameters:
        return ReadoutParameters(
            bias=self.bias, profile=self.profile, v_min=float(self.profile.voltage_min),
            v_max=float(self.profile.voltage_max), boundary=self.boundary,
            may_wrap=self.bound.may_wrap,
        )

    def initial_state(self, input_tensor: torch.Tensor) -> ReadoutState:
        return ReadoutState(v=torch.zeros_like(input_tensor), t=0)

    def forward(self, input_tensor: torch.Tensor, state: ReadoutState | None = None
                ) -> tuple[torch.Tensor, ReadoutState]:
        state = state if state is not None else self.initial_state(input_tensor)
        return self.activation(input_tensor, state, self.readout_parameters(), self.dt)

    def extra_repr(self) -> str:
        return (f"{self.layer_name}: shape={self.shape}, non-spiking, "
                f"profile={self.profile.name}, boundary={self.boundary}")


# --------------------------------------------------------------------------- the network


class NetworkState(NamedTuple):
    """State of a :class:`NorseIFNetwork`: ``t`` steps done and one cell state per
    non-input layer (in :attr:`NorseIFNetwork.layer_names` order)."""

    t: int
    layers: tuple[IFNeuronState | ReadoutState, ...]


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, switch TF32 off for cuDNN convolutions and cuBLAS matmuls; restored after.

    TF32 keeps 10 mantissa bits, so float32 sums of integers would round.
    """
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch < 2.9: the legacy flags
        saved_legacy = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved_legacy
        return
    saved = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _key(name: str) -> str:
    return name.replace(".", "_")


class NorseIFNetwork(nn.Module):
    """An integer IF graph as a stateful Norse module (synchronous schedule).

    ``forward(x, state=None) -> (readout_v, NetworkState)`` runs one step on
    integer inputs ``x`` (N, *input_shape) (any integer or integral float
    dtype); ``readout_v`` (N, F) holds integers in the module's dtype. The
    spikes of every IF layer of that step: :meth:`layer_spikes`. Several steps
    with the constant input's synaptic sums computed once: :meth:`steps`.
    """

    def __init__(self, graph: IFGraph, bounds: tuple[LayerBound, ...], dtype: torch.dtype,
                 presim: int, max_steps: int | None, input_max_abs: int, method: str,
                 alpha: float) -> None:
        super().__init__()
        profile = get_profile(str(graph.meta.profile))
        self.profile = profile
        self.input_name = graph.input.name
        self.input_shape = graph.input.shape
        self.input_max_abs = int(input_max_abs)
        self.presim = int(presim)
        self.max_steps = max_steps
        self.bounds = bounds
        self.readout_scale = float(graph.readout.scale)
        order = graph.topological_order()[1:]
        self.layer_names: tuple[str, ...] = order
        self.if_layer_names: tuple[str, ...] = tuple(
            n for n in order if isinstance(graph.node(n), IFLayer))
        self.readout_name = graph.readout.name
        keys = [_key(p.name) for p in graph.projections] + [_key(n) for n in order]
        if len(set(keys)) != len(keys):
            raise GraphError("node names collide once '.' is replaced by '_'")
        self.synapses = nn.ModuleDict({_key(p.name): synapse_module(p, dtype)
                                       for p in graph.projections})
        self.incoming: dict[str, tuple[tuple[str, str], ...]] = {
            n: tuple((_key(p.name), p.src) for p in graph.incoming(n)) for n in order}
        by_name = {b.layer: b for b in bounds}
        cells: dict[str, nn.Module] = {}
        for n in order:
            layer = graph.node(n)
            if isinstance(layer, IFLayer):
                cells[_key(n)] = IFNeuronCell(layer, profile, by_name[n], presim, max_steps,
                                              dtype, method, alpha)
            else:
                cells[_key(n)] = ReadoutCell(layer, profile, by_name[n], presim, max_steps,
                                             dtype)
        self.cells = nn.ModuleDict(cells)

    # ---- dtype / device ------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.cells[_key(self.readout_name)].bias.dtype

    @property
    def device(self) -> torch.device:
        return self.cells[_key(self.readout_name)].bias.device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> nn.Module:
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        check_exact(self.bounds, probe.dtype, self.max_steps)  # before anything converts
        return super()._apply(fn, recurse)

    # ---- stepping --------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """GraphError unless ``x`` is (N, *input_shape) integers within ``input_max_abs``."""
        if not isinstance(x, torch.Tensor):
            raise GraphError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise GraphError(f"input has shape {tuple(x.shape)}, the network expects "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        if x.is_complex() or x.dtype == torch.bool:
            raise GraphError(f"input must hold integers, got dtype {_dtype_name(x.dtype)}")
        if x.numel() == 0:
            return
        if x.is_floating_point() and not bool(torch.all(x == torch.round(x))):
            raise GraphError("input must hold integers (integer input units), found a "
                             "fractional value")
        peak = int(x.abs().max())
        if peak > self.input_max_abs:
            raise GraphError(f"input magnitude {peak} exceeds {self.input_max_abs}, the bound "
                             "the module was built for (to_norse(..., input_max_abs=...))")

    def input_currents(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synaptic sums of every projection from the input (constant over steps)."""
        xf = x.to(device=self.device, dtype=self.dtype)
        out: dict[str, torch.Tensor] = {}
        for dst in self.layer_names:
            for key, src in self.incoming[dst]:
                if src == self.input_name:
                    out[key] = self.synapses[key](xf)
        return out

    def _step(self, currents: dict[str, torch.Tensor], state: NetworkState | None
              ) -> tuple[torch.Tensor, NetworkState]:
        t = 0 if state is None else state.t
        if self.max_steps is not None and t >= self.max_steps:
            raise GraphError(f"the module was built for at most {self.max_steps} steps "
                             "(to_norse(..., max_steps=...))")
        outputs: dict[str, torch.Tensor] = {}
        new_states: list[IFNeuronState | ReadoutState] = []
        readout = None
        for i, name in enumerate(self.layer_names):
            acc: torch.Tensor | None = None
            for key, src in self.incoming[name]:
                part = currents[key] if src == self.input_name else self.synapses[key](
                    outputs[src])
                acc = part if acc is None else acc + part
            assert acc is not None  # every non-input layer has an incoming projection
            out, s = self.cells[_key(name)](acc, None if state is None else state.layers[i])
            outputs[name] = out
            new_states.append(s)
            if name == self.readout_name:
                readout = out
        assert readout is not None
        return readout, NetworkState(t=t + 1, layers=tuple(new_states))

    def forward(self, x: torch.Tensor, state: NetworkState | None = None
                ) -> tuple[torch.Tensor, NetworkState]:
        """One step: integer input ``x`` (N, *input_shape) -> (readout v (N, F), state)."""
        self.check_input(x)
        with ieee_float32(self.device):
            return self._step(self.input_currents(x), state)

    def steps(self, x: torch.Tensor, count: int, state: NetworkState | None = None
              ) -> Iterator[tuple[torch.Tensor, NetworkState]]:
        """Run ``count`` steps on the same input; yields (readout v, state) after each."""
        if count < 0:
            raise UsageError(f"step count must be >= 0, got {count}")
        self.check_input(x)
        with ieee_float32(self.device):
            currents = self.input_currents(x)
        for _ in range(count):
            with ieee_float32(self.device):
                readout, state = self._step(currents, state)
            yield readout, state

    def layer_spikes(self, state: NetworkState) -> dict[str, torch.Tensor]:
        """Output spikes (after the mask) of every IF layer in the last step, (N, *shape)."""
        return {n: s.z for n, s in zip(self.layer_names, state.layers, strict=True)
                if isinstance(s, IFNeuronState)}

    def layer_masks(self, state: NetworkState) -> dict[str, torch.Tensor]:
        """Pre-simulation masks (N, *shape) of every IF layer (empty before the boundary)."""
        return {n: s.mask for n, s in zip(self.layer_names, state.layers, strict=True)
                if isinstance(s, IFNeuronState) and s.mask is not None}

    def extra_repr(self) -> str:
        return (f"profile={self.profile.name}, presim={self.presim}, "
                f"max_steps={self.max_steps}, input_max_abs={self.input_max_abs}")


def to_norse(graph: IFGraph, *, presim: int = 0, dtype: torch.dtype | None = None,
             max_steps: int | None = None, input_max_abs: int | None = None,
             method: str = "super", alpha: float = 100.0) -> NorseIFNetwork:
    """Build the Norse module of an integer IF graph (synchronous schedule).

    Example (``x_int``: integer input units (N, *input_shape); ``load_graph`` from
    :mod:`csqcfs_deploy.ir`)::

        >>> net = to_norse(load_graph("digits.ifg"))      # an integer IF graph file
        >>> readout_v, state = net(x_int)                  # one step, (N, classes)
        >>> spikes = net.layer_spikes(state)               # {layer: (N, *shape) 0/1}

    ``presim``: pre-simulation steps P (the mask is taken at the end of step P);
    ``dtype``: float32 / float64; None picks float32 where every layer is
    provably exact in it, else float64; a dtype whose bound fails is refused
    with :class:`GraphError`. ``max_steps``: the longest run the module will
    do (None: unlimited); a known length can make float32 exact for 32-bit
    membranes. ``input_max_abs``: largest input magnitude (default: the
    graph's input encoding's). ``method`` / ``alpha``: Norse's surrogate
    threshold (forward: the Heaviside step) for gradients.
    """
    if not isinstance(graph, IFGraph):
        raise UsageError(f"to_norse needs an IFGraph, got {type(graph).__name__}")
    if presim < 0:
        raise UsageError(f"presim must be >= 0, got {presim}")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"max_steps must be >= 1, got {max_steps}")
    if method not in THRESHOLD_METHODS:
        raise UsageError(f"threshold method must be one of {', '.join(THRESHOLD_METHODS)}, "
                         f"got {method!r}")
    bounds = layer_bounds(graph, input_max_abs)
    if dtype is None:
        dtype = exact_dtype(bounds, max_steps)
    else:
        check_exact(bounds, dtype, max_steps)
    in_max = graph.input.encoding.max_abs_int if input_max_abs is None else int(input_max_abs)
    net = NorseIFNetwork(graph, bounds, dtype, presim, max_steps, in_max, method, alpha)
    return net.eval()


# --------------------------------------------------------------------------- back end


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``; BackendUnavailable when CUDA is asked for and absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r} (the norse back end runs on cpu or cuda)"
                         ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {name}: no CUDA GPU is available to torch "
                                     "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {name}: only {torch.cuda.device_count()} "
                                     "CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r}: the norse back end runs on cpu or cuda")
    return device


@dataclass
class NorseRunner:
    """The Norse module of one graph, run for one :class:`RunConfig` (P + T steps)."""

    net: NorseIFNetwork
    cfg: RunConfig
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.cfg.schedule != "synchronous":
            raise UsageError(f"the norse back end runs the synchronous schedule, not "
                             f"{self.cfg.schedule}")
        if self.steps_total > exact_float_bound(self.net.dtype):
            raise UsageError(f"{self.steps_total} steps: spike counts would not be exact in "
                             f"{_dtype_name(self.net.dtype)}")
        if self.net.presim != self.cfg.presim:
            raise UsageError(f"the module was built for presim {self.net.presim}, the run "
                             f"asks for presim {self.cfg.presim}")

    @property
    def steps_total(self) -> int:
        """P + T: the synchronous schedule's steps."""
        return self.cfg.presim + self.cfg.timesteps

    @torch.no_grad()
    def run(self, x_int: torch.Tensor) -> RunResult:
        """Integer inputs (N, *input_shape) -> the same RunResult as the simulator's."""
        start = time.perf_counter()
        cfg, net = self.cfg, self.net
        recorded: dict[str, list[torch.Tensor]] = {name: [] for name in net.if_layer_names}
        counts: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        readout: torch.Tensor | None = None
        state: NetworkState | None = None
        for readout, state in net.steps(x_int, self.steps_total):  # noqa: B007 - last one used
            in_window = state.t > cfg.presim
            for name, z in net.layer_spikes(state).items():  # float counts: exact, P+T <= M
                counts[name] = z if name not in counts else counts[name] + z
                if in_window:
                    window[name] = z if name not in window else window[name] + z
                if cfg.record:
                    recorded[name].append(z.to(torch.bool).cpu())
        assert readout is not None and state is not None  # steps_total >= 1
        readout_int = readout.round().to(device="cpu", dtype=torch.int64)
        masks = None
        if cfg.presim > 0:
            masks = {k: m.to(torch.bool).cpu() for k, m in net.layer_masks(state).items()}
        logits = readout_int.to(torch.float64) * net.readout_scale / cfg.timesteps
        self.seconds += time.perf_counter() - start
        return RunResult(
            readout=readout_int, logits=logits, steps=self.steps_total,
            spikes={k: torch.stack(v) for k, v in recorded.items()} if cfg.record else None,
            spike_counts={k: v.to(device="cpu", dtype=torch.int32) for k, v in counts.items()},
            window_counts={k: v.to(device="cpu", dtype=torch.int32) for k, v in window.items()},
            masks=masks,
        )

    def close(self) -> None:
        pass


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> NorseRunner:
    """Build the Norse module for ``graph`` and ``cfg`` (synchronous) on ``options.device``."""
    if cfg.schedule != "synchronous":
        raise UsageError(f"the norse back end runs the synchronous schedule, not {cfg.schedule}")
    device = resolve_device(options.device)
    # the runner needs no gradients: the plain Heaviside step is Norse's cheapest threshold
    net = to_norse(graph, presim=cfg.presim, max_steps=total_steps(graph, cfg),
                   method="heaviside").to(device)
    return NorseRunner(net=net, cfg=cfg)
