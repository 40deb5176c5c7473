"""Why the Norse module's float arithmetic is exact: the per-layer integer bounds.

Let ``M`` be the largest integer up to which every integer is representable in the
module's dtype (:func:`csqcfs_deploy.ir.neuron.exact_float_bound`: ``2**24`` for
float32, ``2**53`` for float64). Every value the module computes is an integer; a
float sum, difference or product of integers is exact while its true value stays
within ``[-M, M]``. Per layer, :func:`layer_bounds` computes (see :class:`LayerBound`):

1. *synaptic sums*: ``A = sum over incoming projections of max_o sum|W[o]| x pool
   window x largest source value x 2**max(weight_exp, 0)`` (source value: 1 for
   spikes, ``input_max_abs`` for the input layer;
   :func:`csqcfs_deploy.ir.synapses.max_abs_output` and
   :func:`csqcfs_deploy.ir.neuron.shifted_bound`). Every partial sum a convolution
   or matrix product forms is bounded by ``A``, so with ``A <= M`` it is exact in
   any summation order. On CUDA the module switches TF32 off while it runs (TF32
   keeps 10 mantissa bits); the result is rounded to the nearest integer
   (:class:`~csqcfs_deploy.simulators.norse.synapses.IntegerRound`, a no-op when
   exact, which also absorbs the tiny error of transform-based convolution
   algorithms).
2. *current stage* (loihi2): ``u = acc * 2**6`` then one 24-bit wrap, ``u -/+ 2**24``
   (:func:`csqcfs_deploy.ir.neuron.current_bound`). Both are ``2**6 * k`` with
   ``|k| <= A + 2**18``: exact when ``A + 2**(current_bits - act_shift) <= M``.
   Where ``A * 2**6 < 2**23`` the wrap cannot fire and is skipped
   (:attr:`LayerBound.may_wrap`).
3. *membrane*: the saturating update is computed as ``v + clamp(u + bias, v_min - v,
   v_max - v)`` (identical to ``clamp(v + u + bias, v_min, v_max)`` over the
   integers). Either

   - **range**: ``2 * max(|v_min|, v_max, |v_init|, v_th) + 1 <= M`` and
     ``|bias| <= M``: the clamp limits and every membrane value are exact, the only
     possibly rounded quantity is ``u + bias`` and it is rounded only outside
     ``[-M, M]``, where the (exact) clamp limits decide anyway, because rounding is
     monotone. Holds for any number of steps: loihi2 (24-bit membrane) in float32,
     every profile in float64.
   - **steps**: after ``S`` steps ``|v| <= start + S * a``
     (:func:`csqcfs_deploy.ir.neuron.membrane_reach`) with ``start = max(|v_init|,
     v_th)`` and ``a = |u| + |bias|`` bounds; when ``2 * start + S * a + 1 <= M``
     and the saturation cannot be reached (``start + S * a <= min(|v_min|, v_max)``)
     every value is exact. This lets int8/int16 (32-bit membrane) run in float32 for
     a known number of steps (``max_steps``).

   The comparison is ``heaviside(v - v_th)`` (``v > v_th``) or ``heaviside(v - v_th +
   1)`` (``v >= v_th`` over the integers), the reset ``v - z * v_th`` (or ``(1 - z) *
   v``): all within the same bounds.

The bound is checked per layer when the module is built and whenever it moves to
another dtype (``.to(dtype)``, ``.float()``, ``.double()``, ``.half()``): a dtype
under which it fails is refused with :class:`GraphError` before anything is
converted. Moving devices (``.to("cuda")``) keeps the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from csqcfs_deploy.errors import GraphError, TargetError, UsageError
from csqcfs_deploy.ir import IFGraph, IFLayer, ProjectionT
from csqcfs_deploy.ir.neuron import current_bound, exact_float_bound, shifted_bound
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.synapses import max_abs_output

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32,
                                         torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerBound:
    """Integer magnitudes one layer's float arithmetic must hold exactly.

    ``synaptic``: A, bound of ``|acc|`` (the summed synaptic input of a step);
    ``wrap_span``: ``2**(current_bits - act_shift)`` on profiles with a wrapping
    current stage, else 0; ``current``: bound of ``|u|`` after the current stage
    (shift and one wrap); ``bias``: max ``|bias|``; ``v_min`` / ``v_max``: the
    saturation limits; ``start``: ``max(|v_init|, v_th)`` (0 for the readout, which
    starts at 0 and has no threshold).
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
        """False when ``|acc << act_shift| < 2**(current_bits - 1)``: the wrap never fires.

        The same condition as the second value of
        :func:`csqcfs_deploy.ir.neuron.current_bound` (``2 * A >= wrap_span``).
        """
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
        """Steps for which the membrane stays exact in ``dtype`` (None: unlimited; 0: none).

        The largest ``S`` with ``R = membrane_reach(start, S, current, bias)`` meeting
        ``start + R + 1 <= M`` and ``R <= min(|v_min|, v_max)`` (the "steps" argument).
        """
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
        name = dtype_name(dtype)
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


def projection_bound(p: ProjectionT, source_max: int) -> int:
    """Bound of every partial sum one projection's float layer forms, as an int.

    ``max_abs_output(p, source_max)`` (``max_o sum|W[o]| x pool window x
    source_max``, from the projection's cached ``max_abs_row_sum``) or, after the
    weight exponent, :func:`~csqcfs_deploy.ir.neuron.shifted_bound` of it, whichever
    is larger: the sum before a right shift must be exact too. Both are integers
    held exactly in float64 below ``2**53``, the largest ``M`` of any dtype.
    """
    out = max_abs_output(p, float(source_max))
    return int(max(out, shifted_bound(out, p.weight_exp)))


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
        layer = graph.neuron_group(name)
        synaptic = sum(
            projection_bound(p, in_max if p.src == graph.input.name else 1)
            for p in graph.incoming(name)
        )
        if isinstance(layer, IFLayer):
            start = int(max(np.abs(layer.v_init).max(), layer.v_th.max()))
        else:
            start = 0
        current, _ = current_bound(float(synaptic), profile)
        bounds.append(LayerBound(
            layer=name, synaptic=synaptic, wrap_span=span, current=int(current),
            bias=int(np.abs(layer.bias).max()), v_min=profile.voltage_min,
            v_max=profile.voltage_max, start=start,
        ))
    return tuple(bounds)


def check_exact(bounds: tuple[LayerBound, ...], dtype: torch.dtype, steps: int | None) -> None:
    """Raise :class:`GraphError` naming the first layer ``dtype`` is not exact for."""
    if dtype not in FLOAT_DTYPES:
        raise TargetError(f"the Norse module computes in a float dtype "
                         f"({', '.join(dtype_name(d) for d in FLOAT_DTYPES)}), "
                         f"not {dtype_name(dtype)}")
    for b in bounds:
        why = b.problem(dtype, steps)
        if why is not None:
            raise TargetError(f"{why}; use float64" if dtype != torch.float64 else why)


def exact_dtype(bounds: tuple[LayerBound, ...], steps: int | None) -> torch.dtype:
    """float32 where every layer is provably exact in it, else float64 (or GraphError)."""
    for dtype in (torch.float32, torch.float64):
        if all(b.problem(dtype, steps) is None for b in bounds):
            return dtype
    check_exact(bounds, torch.float64, steps)
    raise AssertionError("unreachable")  # pragma: no cover
