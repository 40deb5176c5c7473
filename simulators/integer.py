"""The bit-accurate integer simulator: the golden reference (SPEC section 4).

:func:`simulate` runs one batch of integer inputs through an integer IF graph
under a :class:`~csqcfs_deploy.ir.schedule.RunConfig`; timing is defined in
:mod:`csqcfs_deploy.ir.schedule`, the neuron rules in :mod:`.neurons`.
:class:`Simulator` does the same with the graph's weights prepared once (what
the ``int`` back end keeps between batches).

Evaluation order: layers in topological order, each over *all* steps at once.
This is exact in both schedules because a layer's input at step ``t`` only
depends on its sources' outputs at steps ``t - delay`` (delay >= 0), which are
complete by then. Per layer: every incoming projection's synaptic sums for
all steps in one batched operation (a projection from the input layer once,
since the input is the same every step), then the per-step neuron scan.

Tensor layout: a layer of shape (C, H, W) is held as (S*N, C, H, W) in
channels-last memory (rows ``t*N .. t*N + N - 1`` are step ``t + 1``), a (F,)
layer as (S*N, F). Spikes are held as float32 0/1 (the next kernel's input).
In :class:`RunResult`, recorded spikes are contiguous bool (steps, N, *shape),
masks contiguous bool (N, *shape); the int32 counts keep the channels-last
layout (compare with ``torch.equal``, flatten with ``reshape``).

Exactness (:class:`LayerArithmetic`, derived per layer and per batch from the
weights, the input's largest magnitude and the step count):

* synaptic sums: every partial sum of ``W (*) pool(s)`` is an integer of
  magnitude at most ``sum|W| * pool window * max|s|``; below 2**24 float32
  kernels are exact, below 2**53 float64 kernels are, beyond that the
  simulator refuses. Float32 is only used while PyTorch computes float32
  convolutions and products in IEEE float32 (no bf16/tf32 modes). The optional
  ``kernel="int8"`` path multiplies int8 spikes by int8 weight mantissas with
  ``torch._int_mm`` into int32 (exact below 2**31).
* neuron state: with ``U`` the bound of the current after the profile's shift
  and wrap, ``B = max|bias|`` and ``V0 = max|v_init|``, every membrane obeys
  ``|v_t| <= V0 + t * (U + B)`` (a reset only moves ``v`` towards 0 or back to
  ``v_init``). The scan runs in the sums' own float dtype when every
  intermediate stays inside its exact-integer range (no conversion at all),
  else in int32 when none can reach 2**31, else in int64; it skips the wrap
  and the saturation when they cannot trigger. ``U`` comes from the weights'
  bound or, when that leaves a wrap, clamp or conversion, from this batch's
  actual sums (one min/max pass).
* a one-step run (synchronous, T = 1, P = 0) is a single comparison of the
  float sums per neuron; the last step of any run skips the reset and, where
  :attr:`.neurons.IFConstants.final_exact` holds, the clamp.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    IFLayer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.neuron import IFParams, exact_float_bound, readout_step
from csqcfs_deploy.ir.profiles import Profile, get_profile
from csqcfs_deploy.ir.schedule import (
    RunConfig,
    boundary,
    fill_reset_step,
    projection_delay,
    recording_bytes,
    total_steps,
)
from csqcfs_deploy.ir.synapses import (
    apply_projection,
    apply_weight_exp,
    max_abs_output,
    sum_pool,
)
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.neurons import IFConstants, if_fire_final, if_fire_reset_

SynapseKernel = Literal["auto", "float", "int8"]
KERNELS: tuple[str, ...] = ("auto", "float", "int8")
INT32_MAX = 2**31 - 1


def _per_channel(values: np.ndarray, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1) or (1, C) int64 for broadcasting against (N, *shape)."""
    t = torch.tensor(np.asarray(values), dtype=torch.int64)
    return t.view(1, -1, *([1] * (ndim - 2)))


def float32_kernels_exact() -> bool:
    """True while PyTorch computes float32 conv/matmul in IEEE float32 on the CPU."""
    mkl = torch.backends.mkldnn
    modes = {getattr(getattr(mkl, sub, None), "fp32_precision", "none") for sub in
             ("conv", "matmul")}
    modes.add(getattr(mkl, "fp32_precision", "none"))
    return modes <= {"none", "ieee"} and torch.get_float32_matmul_precision() == "highest"


def compute_dtype(p: ProjectionT, max_abs_source: float) -> torch.dtype:
    """float32 when every partial sum is provably exact in it, else float64."""
    bound = max_abs_output(p, max_abs_source)
    if bound < exact_float_bound(torch.float32) and float32_kernels_exact():
        return torch.float32
    if bound < exact_float_bound(torch.float64):
        return torch.float64
    raise GraphError(f"projection {p.name}: synaptic sums may reach {bound:.3g}, beyond exact "
                     "float64 arithmetic")


def _shifted_bound(bound: float, weight_exp: int) -> float:
    """Bound of ``|shift(x, weight_exp)|`` when ``|x| <= bound``."""
    if weight_exp >= 0:
        return bound * 2.0**weight_exp
    return float(math.ceil(bound / 2.0**-weight_exp))


def sum_dtype_for(name: str, projection_bounds: list[tuple[float, int]],
                  float32_ok: bool | None = None) -> torch.dtype:
    """float32 or float64: the dtype in which one layer's synaptic sums are provably exact.

    ``projection_bounds``: per incoming projection, (bound of ``|W (*) pool(x)|``,
    weight_exp). Every projection's own sums and their shifted total must stay
    below the dtype's exact-integer range.
    """
    raw = max((b for b, _ in projection_bounds), default=0.0)
    need = max(raw, shifted_total(projection_bounds))
    if float32_ok is None:
        float32_ok = float32_kernels_exact()
    if need < exact_float_bound(torch.float32) and float32_ok:
        return torch.float32
    if need < exact_float_bound(torch.float64):
        return torch.float64
    raise GraphError(f"layer {name}: synaptic sums may reach {need:.3g}, beyond exact "
                     "float64 arithmetic")


def shifted_total(projection_bounds: list[tuple[float, int]]) -> float:
    """Bound of the layer's summed input after every projection's weight_exp."""
    return sum(_shifted_bound(b, e) for b, e in projection_bounds)


@dataclass(frozen=True)
class LayerArithmetic:
    """The exactness proof of one layer's neuron scan for one run (module docstring).

    ``sum_bound``: bound of the step's summed synaptic input (after weight_exp,
    from the weights or observed in this batch); ``sum_dtype``: float32 or
    float64, the dtype the sums are held in; ``current_bound``: bound of the
    current after shift and wrap; ``wraps``: whether the profile's wrap can
    trigger; ``state_dtype``: the dtype of the scan (the sums' own float dtype
    when every value stays inside its exact-integer range, else int32 when
    below 2**31, else int64); ``clamp``: whether saturation can trigger.
    """

    sum_bound: float
    sum_dtype: torch.dtype
    current_bound: float
    wraps: bool
    state_dtype: torch.dtype
    clamp: bool

    @classmethod
    def derive(cls, sum_bound: float, sum_dtype: torch.dtype, profile: Profile,
               bias_max: int, v_init_max: int, v_th_max: int, steps: int) -> LayerArithmetic:
        before_wrap = sum_bound * 2.0**profile.act_shift
        wraps = False
        current = before_wrap
        if profile.current_bits is not None:
            half = 2.0 ** (profile.current_bits - 1)
            wraps = before_wrap >= half
            if wraps:
                current = max(half, before_wrap - 2 * half)
        reach = v_init_max + steps * (current + bias_max)
        clamp = reach > min(profile.voltage_max, -profile.voltage_min)
        v_abs = min(reach, max(profile.voltage_max, -profile.voltage_min))
        widest = max(before_wrap, v_abs + current + bias_max, v_th_max + v_abs)
        if widest < exact_float_bound(sum_dtype):
            state = sum_dtype
        elif widest <= INT32_MAX:
            state = torch.int32
        else:
            state = torch.int64
        return cls(sum_bound, sum_dtype, current, wraps, state, clamp)

    @property
    def ideal(self) -> bool:
        """Nothing a tighter bound could improve: no wrap, no clamp, no conversion."""
        return not self.wraps and not self.clamp and self.state_dtype == self.sum_dtype


@dataclass
class _Part:
    """Synaptic sums of one projection: rows for steps ``delay + 1 ..`` (or one row block
    repeated from step ``delay + 1`` on, when ``constant``)."""

    sums: torch.Tensor
    delay: int
    constant: bool


@dataclass
class _Source:
    """A layer's output in the dtypes its consumers asked for (bool spikes, or the input)."""

    values: torch.Tensor
    max_abs: float
    as_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def get(self, dtype: torch.dtype) -> torch.Tensor:
        if self.values.dtype == dtype:
            return self.values
        if dtype not in self.as_dtype:
            self.as_dtype[dtype] = self.values.to(dtype)
        return self.as_dtype[dtype]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, channels-last when 4-D."""
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


class Simulator:
    """The integer simulator of one graph, weights prepared once.

    ``kernel``: how synaptic sums are computed. ``"auto"`` and ``"float"``:
    float32/float64 kernels chosen per layer by the exactness bound;
    ``"int8"``: ``torch._int_mm`` (int8 x int8 -> int32) for every projection
    whose weights (per weight step) and source values fit int8, float kernels
    elsewhere. All kernels give identical integers; they differ in speed only.
    (On CPUs without int8 dot-product instructions PyTorch runs ``_int_mm`` as
    a plain loop, far slower than float32 -- measured in
    ``benchmarks/bench_simulator.py`` -- so ``"auto"`` uses float kernels.)
    """

    def __init__(self, graph: IFGraph, kernel: SynapseKernel = "auto") -> None:
        if not graph.is_integer:
            raise GraphError("the simulator runs quantized graphs; convert with a --profile "
                             "first")
        if kernel not in KERNELS:
            raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.graph = graph
        self.kernel = kernel
        self.profile = get_profile(str(graph.meta.profile))
        self._order = graph.topological_order()
        self._weights: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._cache: dict[tuple[object, ...], object] = {}
        self._consumers = {la.name: len(graph.outgoing(la.name)) for la in graph.layers}

    # ---- synaptic operations ---------------------------------------------
    def _bound(self, p: ProjectionT, max_abs_source: float) -> float:
        """:func:`~csqcfs_deploy.ir.synapses.max_abs_output` (cheap: the fan-in is cached)."""
        return max_abs_output(p, max_abs_source)

    def _weight(self, p: ProjectionT, dtype: torch.dtype, src_shape: tuple[int, ...]
                ) -> torch.Tensor:
        """The weight of ``p`` laid out for the kernel: conv channels-last, dense columns
        in (H, W, C) order for a (C, H, W) source, int8 kernels as (K, O) mantissas."""
        key = (p.name, dtype)
        if key not in self._weights:
            w = torch.tensor(np.asarray(p.weight), dtype=torch.int64)
            if dtype == torch.int8:
                w = w // self.profile.weight_step
            pooled = p.pooled_shape(src_shape)
            if isinstance(p, ConvProjection):
                if dtype == torch.int8:  # (O, I, kh, kw) -> (kh * kw * I, O)
                    w = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])
                    w = w.to(dtype).contiguous()
                else:
                    w = _channels_last(w.to(dtype))
            elif isinstance(p, DenseProjection):
                if len(pooled) == 3:
                    c, h, wd = pooled
                    w = w.view(-1, c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
                w = w.t().to(dtype).contiguous() if dtype == torch.int8 else w.to(dtype)
            else:
                w = w.to(dtype).view(1, -1, *([1] * (len(pooled) - 1)))
            self._weights[key] = w
        return self._weights[key]

    def _int8_ok(self, p: ProjectionT, max_src: float) -> bool:
        """``_int_mm`` is usable and exact for ``p``: groups 1, int8 operands, int32 sums."""
        if self.kernel != "int8" or isinstance(p, IdentityProjection):
            return False
        if isinstance(p, ConvProjection) and p.groups != 1:
            return False
        window = 1 if p.pool is None else p.pool.window
        w = np.asarray(p.weight) // self.profile.weight_step
        if w.size == 0 or w.min() < -128 or w.max() > 127:
            return False
        if max_src * window > 127 or not float(max_src).is_integer():
            return False
        fan = float(np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max())
        return fan * window * max_src * self.profile.weight_step <= INT32_MAX

    def _adds_in_place(self, p: ProjectionT, src: _Source) -> bool:
        """An unpooled, unshifted identity projection on the float kernels: its sums can be
        added straight into another projection's sums (``addcmul_``: one pass)."""
        return (isinstance(p, IdentityProjection) and p.pool is None and p.weight_exp == 0
                and not self._int8_ok(p, src.max_abs))

    def _project(self, p: ProjectionT, src: _Source, src_shape: tuple[int, ...],
                 sum_dtype: torch.dtype, rows: int) -> torch.Tensor:
        """``shift(W (*) pool(x), weight_exp)`` for the first ``rows`` rows of the source,
        as exact integers in ``sum_dtype`` (float32/float64)."""
        if self._int8_ok(p, src.max_abs):
            x = src.get(torch.int8)[:rows]
            out = self._int_mm_projection(p, x, src_shape).to(sum_dtype)
        else:
            x = src.get(sum_dtype)[:rows]
            out = self._float_projection(p, x, src_shape, sum_dtype)
        if p.weight_exp > 0:
            out.mul_(2.0**p.weight_exp)
        elif p.weight_exp < 0:
            out = torch.floor(out.div_(2.0**-p.weight_exp))
        return out

    def _pool(self, p: ProjectionT, x: torch.Tensor) -> torch.Tensor:
        pool = p.pool
        if pool is None:
            return x
        if all(2 * pd <= k for pd, k in zip(pool.padding, pool.kernel, strict=True)) \
                and x.dtype in (torch.float32, torch.float64):
            return F.avg_pool2d(x, pool.kernel, pool.stride, pool.padding,
                                divisor_override=1)
        return sum_pool(x, pool)

    def _float_projection(self, p: ProjectionT, x: torch.Tensor, src_shape: tuple[int, ...],
                          dtype: torch.dtype) -> torch.Tensor:
        w = self._weight(p, dtype, src_shape)
        x = self._pool(p, x)
        if isinstance(p, ConvProjection):
            return F.conv2d(x, w, None, p.stride, p.padding, 1, p.groups)
        if isinstance(p, DenseProjection):
            if x.dim() == 4:  # channels-last memory: (N, H, W, C) flattening is a view
                x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            return F.linear(x, w)
        return x * w

    def _int_mm_projection(self, p: ProjectionT, x: torch.Tensor, src_shape: tuple[int, ...]
                           ) -> torch.Tensor:
        """int8 x int8 -> int32 with ``torch._int_mm``; conv as im2col on (N, H, W, C)."""
        w = self._weight(p, torch.int8, src_shape)
        if p.pool is not None:  # window sums of int8 values <= 127: exact in float32
            x = self._pool(p, x.to(torch.float32)).to(torch.int8)
        if isinstance(p, DenseProjection):
            if x.dim() == 4:
                x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            out = torch._int_mm(x.contiguous(), w)
        else:
            assert isinstance(p, ConvProjection)
            n = x.shape[0]
            kh, kw = p.kernel
            (sh, sw), (ph, pw) = p.stride, p.padding
            nhwc = x.permute(0, 2, 3, 1)
            if ph or pw:
                nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
            nhwc = nhwc.contiguous()
            _, hp, wp, c = nhwc.shape
            oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
            s0, s1, s2, s3 = nhwc.stride()
            patches = nhwc.as_strided((n, oh, ow, kh, kw, c),
                                      (s0, s1 * sh, s2 * sw, s1, s2, s3))
            out = torch._int_mm(patches.reshape(n * oh * ow, kh * kw * c), w)
            out = out.view(n, oh, ow, -1).permute(0, 3, 1, 2)
        if self.profile.weight_step != 1:
            out = out * self.profile.weight_step
        return out

    # ---- the run ------------------------------------------------------------
    @torch.no_grad()
    def run(self, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
        """Run integer inputs ``x_int`` (N, *input_shape) for ``total_steps`` steps."""
        graph = self.graph
        if tuple(x_int.shape[1:]) != graph.input.shape:
            raise GraphError(f"input has shape {tuple(x_int.shape[1:])}, graph expects "
                             f"{graph.input.shape}")
        if x_int.dtype.is_floating_point and not torch.equal(x_int, x_int.round()):
            raise GraphError("the integer simulator needs integer inputs")
        n = int(x_int.shape[0])
        steps = total_steps(graph, cfg)
        if cfg.record:
            check_recording_memory(graph, cfg, n)
        x_abs = float(x_int.abs().max()) if x_int.numel() else 0.0
        float32_ok = float32_kernels_exact()  # PyTorch's precision settings, read per run
        sources: dict[str, _Source] = {
            graph.input.name: _Source(_channels_last(x_int.to(torch.int64)), x_abs)}
        pending = dict(self._consumers)
        spikes: dict[str, torch.Tensor] = {}
        spike_counts: dict[str, torch.Tensor] = {}
        window_counts: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        readout_v: torch.Tensor | None = None

        for name in self._order[1:]:
            layer = self.graph.node(name)
            projs = graph.incoming(name)
            bounds = [(self._bound(p, sources[p.src].max_abs), p.weight_exp) for p in projs]
            sum_dtype = sum_dtype_for(name, bounds, float32_ok)
            parts: list[_Part] = []
            # identity shortcuts last: they can be added in place into a conv's sums
            for p in sorted(projs, key=lambda q: isinstance(q, IdentityProjection)):
                src = sources[p.src]
                constant = p.src == graph.input.name
                delay = projection_delay(graph, cfg, p.name)
                rows = n if constant else (steps - delay) * n
                same = next((pt for pt in parts if (pt.delay, pt.constant) == (delay, constant)),
                            None)
                if rows > 0 and same is not None and self._adds_in_place(p, src):
                    w = self._weight(p, sum_dtype, graph.node(p.src).shape)
                    same.sums.addcmul_(src.get(sum_dtype)[:rows], w)  # exact: layer bound
                elif rows > 0:
                    sums = self._project(p, src, graph.node(p.src).shape, sum_dtype, rows)
                    parts.append(_Part(sums, delay, constant))
                pending[p.src] -= 1
                if pending[p.src] == 0 and not constant:
                    del sources[p.src]
            arith = self._arithmetic(layer, parts, shifted_total(bounds), sum_dtype, steps)
            parts = _merge_parts(parts, steps, n)
            b = boundary(graph, cfg, name)
            if isinstance(layer, IFLayer):
                out = self._scan_if(layer, parts, arith, steps, n, cfg, b,
                                    fill_reset_step(graph, cfg, name), masks)
                window_counts[name] = _count(out, n, b, b + cfg.timesteps)
                spike_counts[name] = (window_counts[name] if steps == cfg.timesteps
                                      else _count(out, n, 0, steps))
                if cfg.record:
                    spikes[name] = out.view(steps, n, *layer.shape).to(
                        torch.bool, memory_format=torch.contiguous_format)
                sources[name] = _Source(out, 1.0)
            else:
                assert isinstance(layer, ReadoutLayer)
                readout_v = self._scan_readout(layer, parts, arith, steps, n, b)
        assert readout_v is not None
        logits = readout_v.to(torch.float64) * graph.readout.scale / cfg.timesteps
        return RunResult(
            readout=readout_v, logits=logits, steps=steps,
            spikes=spikes if cfg.record else None, spike_counts=spike_counts,
            window_counts=window_counts,
            masks={k: v.contiguous() for k, v in masks.items()} if cfg.presim > 0 else None,
        )

    # ---- neuron scans ---------------------------------------------------------
    def _arithmetic(self, layer: IFLayer | ReadoutLayer, parts: list[_Part],
                    static_bound: float, sum_dtype: torch.dtype, steps: int
                    ) -> LayerArithmetic:
        """The layer's proof from the weights' bound, tightened by this batch's actual
        sums when the weights' bound leaves a wrap, a clamp or a conversion in the scan."""
        consts = self._extremes(layer)
        arith = LayerArithmetic.derive(static_bound, sum_dtype, self.profile, *consts, steps)
        if arith.ideal or not parts:
            return arith
        observed = 0.0
        for pt in parts:
            if pt.sums.numel():
                lo, hi = torch.aminmax(_flat(pt.sums))
                observed += max(-float(lo), float(hi))
        if observed >= static_bound:
            return arith
        return LayerArithmetic.derive(observed, sum_dtype, self.profile, *consts, steps)

    def _drive(self, parts: list[_Part], t: int, n: int, arith: LayerArithmetic,
               offset: torch.Tensor, shape: tuple[int, ...],
               cache: dict[tuple[int, int], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """``current(acc_t) + offset`` of step ``t + 1`` in the state dtype; (tensor, owned).

        ``offset`` is the bias, or bias + v_init for a step that starts from v_init.
        A drive made only of constant (input) sums is computed once and cached.
        """
        active = [pt for pt in parts if t >= pt.delay]
        if not active:
            return offset.expand(n, *shape), False
        if all(pt.constant for pt in active):
            key = (len(active), id(offset))
            if key not in cache:
                acc = active[0].sums
                for pt in active[1:]:
                    acc = acc + pt.sums
                cache[key] = self._current(acc, arith, offset)
            return cache[key], False
        acc = None
        for pt in active:
            rows = pt.sums if pt.constant else pt.sums[(t - pt.delay) * n:(t - pt.delay + 1) * n]
            acc = rows if acc is None else acc + rows
        assert acc is not None
        return self._current(acc, arith, offset), True

    def _current(self, acc: torch.Tensor, arith: LayerArithmetic, offset: torch.Tensor
                 ) -> torch.Tensor:
        """``profile.current(acc) + offset`` of exact integer sums, as a new tensor."""
        scale = 1 << self.profile.act_shift
        if acc.dtype == arith.state_dtype:
            if not arith.wraps:
                return torch.add(offset, acc, alpha=scale)
            u = acc * scale
        else:
            u = acc.to(arith.state_dtype)
            if scale != 1:
                u.mul_(scale)
        if arith.wraps:  # once, as Profile.current: u > h -> u - 2h, then u <= -h -> u + 2h
            assert self.profile.current_bits is not None
            half = 1 << (self.profile.current_bits - 1)
            hit = torch.gt(u, half, out=torch.empty_like(u))
            u.add_(hit, alpha=-2 * half)
            torch.le(u, -half, out=hit)
            u.add_(hit, alpha=2 * half)
        return u.add_(offset)

    def _scan_if(self, layer: IFLayer, parts: list[_Part], arith: LayerArithmetic,
                 steps: int, n: int, cfg: RunConfig, b: int, fill: int,
                 masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output spikes of one IF layer, float32 0/1 (steps * N, *shape).

        ``b``: boundary step (mask and re-initialisation when P > 0); ``fill``:
        fill-reset step (0: none). ``v = None`` stands for ``v_init`` everywhere.
        """
        c, bias, start = self._constants(layer, arith.state_dtype, arith.clamp)
        single = self._single_step(layer, parts, arith, steps, c)
        if single is not None:
            return single
        scale = 1 << self.profile.act_shift
        direct = (len(parts) == 1 and not parts[0].constant and not arith.wraps
                  and parts[0].sums.dtype == arith.state_dtype)
        out = _empty((steps * n, *layer.shape), torch.float32)
        # spikes are written straight into float32 rows when the state is float
        # (comparison and reset then need no conversion); an integer state goes
        # through a bool scratch row.
        scratch = (None if arith.state_dtype.is_floating_point and layer.reset == "subtract"
                   else _empty((n, *layer.shape), torch.bool))
        v: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        cache: dict[tuple[int, int], torch.Tensor] = {}
        for t in range(steps):  # t = step - 1
            if v is None:
                v, owned = self._drive(parts, t, n, arith, start, layer.shape, cache)
                if not owned:
                    v = v.clone()
            elif direct and t >= parts[0].delay:  # v += acc << k; v += bias (no temporaries)
                d = parts[0].delay
                v.add_(parts[0].sums[(t - d) * n:(t - d + 1) * n], alpha=scale).add_(bias)
            else:
                v.add_(self._drive(parts, t, n, arith, bias, layer.shape, cache)[0])
            o = out[t * n:(t + 1) * n]
            fired = o if scratch is None else scratch
            if t == steps - 1 and c.final_exact:
                if_fire_final(v, c, fired)
            else:
                v = if_fire_reset_(v, c, fired)
            if scratch is not None:
                o.copy_(scratch)
            if mask is not None:
                o.mul_(mask)
            if cfg.presim > 0 and t + 1 == b:
                masks[layer.name] = v > 0
                mask = masks[layer.name].to(torch.float32)
                v = None
            elif t + 1 == fill:
                v = None
        return out

    def _single_step(self, layer: IFLayer, parts: list[_Part], arith: LayerArithmetic,
                     steps: int, c: IFConstants) -> torch.Tensor | None:
        """One-step runs (synchronous, T = 1, P = 0) on the float sums directly.

        With ``v = v_init``, no wrap and a clamp invisible to the comparison, the
        spike is ``acc << k > fire_th - bias - v_init``, i.e. ``acc > floor((fire_th -
        bias - v_init) / 2**k)`` for the integer ``acc``: one comparison per neuron.
        """
        if steps != 1 or arith.wraps or not c.final_exact or len(parts) != 1 \
                or parts[0].delay != 0:
            return None
        acc = parts[0].sums
        key = (layer.name, "cut", acc.dtype)
        if key not in self._cache:
            params = self._params(layer)
            margin = (params.v_th - (0 if self.profile.strict else 1) - params.bias
                      - params.v_init)
            cut = torch.div(margin, 1 << self.profile.act_shift, rounding_mode="floor")
            limit = exact_float_bound(acc.dtype)
            self._cache[key] = cut.clamp(-limit, limit).to(acc.dtype)
        out = torch.empty_like(acc, dtype=torch.float32)
        return torch.gt(acc, self._cache[key], out=out)

    # ---- per-layer constants, built once ---------------------------------------
    def _params(self, layer: IFLayer) -> IFParams:
        key = (layer.name, "params")
        if key not in self._cache:
            ndim = len(layer.shape) + 1
            self._cache[key] = IFParams(
                v_th=_per_channel(layer.v_th, ndim), v_init=_per_channel(layer.v_init, ndim),
                bias=_per_channel(layer.bias, ndim), reset=layer.reset, profile=self.profile)
        return self._cache[key]  # type: ignore[return-value]

    def _constants(self, layer: IFLayer, dtype: torch.dtype, clamp: bool
                   ) -> tuple[IFConstants, torch.Tensor, torch.Tensor]:
        """The scan's constants in ``dtype``: (IFConstants, bias, bias + v_init)."""
        key = (layer.name, dtype, clamp)
        if key not in self._cache:
            params = self._params(layer)
            self._cache[key] = (IFConstants.build(params, dtype, clamp), params.bias.to(dtype),
                                (params.bias + params.v_init).to(dtype))
        return self._cache[key]  # type: ignore[return-value]

    def _extremes(self, layer: IFLayer | ReadoutLayer) -> tuple[int, int, int]:
        """(max |bias|, max |v_init|, max v_th) of a layer (0 for a readout's v_init, v_th)."""
        key = (layer.name, "extremes")
        if key not in self._cache:
            b = int(np.abs(layer.bias).max(initial=0))
            if isinstance(layer, IFLayer):
                self._cache[key] = (b, int(np.abs(layer.v_init).max(initial=0)),
                                    int(layer.v_th.max(initial=0)))
            else:
                self._cache[key] = (b, 0, 0)
        return self._cache[key]  # type: ignore[return-value]

    def _scan_readout(self, layer: ReadoutLayer, parts: list[_Part], arith: LayerArithmetic,
                      steps: int, n: int, b: int) -> torch.Tensor:
        key = (layer.name, "bias")
        if key not in self._cache:
            self._cache[key] = _per_channel(layer.bias, 2)
        bias: torch.Tensor = self._cache[key]  # type: ignore[assignment]
        zero = torch.zeros_like(bias)
        v = torch.zeros((n, *layer.shape), dtype=torch.int64)
        wide = dataclasses.replace(arith, state_dtype=torch.int64)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        for t in range(steps):
            drive, _ = self._drive(parts, t, n, wide, zero, layer.shape, cache)
            v = readout_step(drive, v, bias, self.profile)
            if t + 1 == b:
                v = torch.zeros_like(v)
        return v


def _merge_parts(parts: list[_Part], steps: int, n: int) -> list[_Part]:
    """Sum parts that share a delay (one float add instead of one per step).

    Exact: the layer's bound covers the sum of all parts.
    """
    merged: dict[tuple[int, bool], _Part] = {}
    for pt in parts:
        key = (pt.delay, pt.constant)
        if key in merged:
            merged[key].sums = merged[key].sums + pt.sums
        else:
            merged[key] = _Part(pt.sums, pt.delay, pt.constant)
    return list(merged.values())


def _count(out: torch.Tensor, n: int, first: int, stop: int) -> torch.Tensor:
    """Spikes per neuron over steps ``first + 1 .. stop`` of a layer's float spikes
    ``out`` (steps * N, *shape) -> (N, *shape) int32 (float sums of 0/1: exact).

    The counts keep the spikes' memory layout (channels-last for (C, H, W)
    layers): compare with ``torch.equal``, flatten with ``reshape``."""
    total = out[first * n:(first + 1) * n]
    if stop - first > 1:
        total = total.clone()
        for t in range(first + 1, stop):
            total.add_(out[t * n:(t + 1) * n])
    return total.to(torch.int32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view in memory order (reductions over channels-last tensors are slow)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def check_recording_memory(graph: IFGraph, cfg: RunConfig, batch: int) -> int:
    """Bytes a recorded batch needs; UsageError when that exceeds the available memory."""
    need = recording_bytes(graph, cfg, batch)
    avail = available_memory_bytes()
    if avail is not None and need > avail // 2:
        raise UsageError(
            f"recording every spike of a batch of {batch} for {total_steps(graph, cfg)} steps "
            f"needs {format_bytes(need)}, more than half of the {format_bytes(avail)} "
            "available; use a smaller batch or fewer steps")
    return need


def simulate(graph: IFGraph, x_int: torch.Tensor, cfg: RunConfig,
             kernel: SynapseKernel = "auto") -> RunResult:
    """Run integer inputs ``x_int`` (N, *input_shape) through ``graph``."""
    return Simulator(graph, kernel).run(x_int, cfg)


@torch.no_grad()
def reference_simulate(graph: IFGraph, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
    """The same simulation the plain way: float64 ``apply_projection`` per step and
    :func:`.neurons.if_step` in int64. Slow; the independent check of :class:`Simulator`."""
    from csqcfs_deploy.ir.neuron import if_step

    if not graph.is_integer:
        raise GraphError("the simulator runs quantized graphs")
    profile = get_profile(str(graph.meta.profile))
    steps = total_steps(graph, cfg)
    n = x_int.shape[0]
    x = x_int.to(torch.float64)
    outs: dict[str, torch.Tensor] = {}
    spikes: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    readout_v = None
    for name in graph.topological_order()[1:]:
        layer = graph.node(name)
        acc = torch.zeros((steps, n, *layer.shape), dtype=torch.int64)
        for p in graph.incoming(name):
            delay = projection_delay(graph, cfg, p.name)
            for t in range(delay, steps):
                src = x if p.src == graph.input.name else outs[p.src][t - delay]
                if max_abs_output(p, float(src.abs().max()) if src.numel() else 0.0) >= 2**53:
                    raise GraphError(f"projection {p.name}: sums beyond float64")
                part = apply_projection(p, src).round().to(torch.int64)
                acc[t] += apply_weight_exp(part, p.weight_exp)
        b = boundary(graph, cfg, name)
        ndim = len(layer.shape) + 1
        if isinstance(layer, IFLayer):
            params = IFParams(_per_channel(layer.v_th, ndim), _per_channel(layer.v_init, ndim),
                              _per_channel(layer.bias, ndim), layer.reset, profile)
            v = params.v_init.expand(n, *layer.shape).clone()
            mask = None
            out = torch.zeros((steps, n, *layer.shape), dtype=torch.bool)
            fill = fill_reset_step(graph, cfg, name)
            for t in range(steps):
                s, v = if_step(profile.current(acc[t]), v, params)
                out[t] = s if mask is None else s & mask
                if cfg.presim > 0 and t + 1 == b:
                    mask = v > 0
                    masks[name] = mask
                    v = params.v_init.expand(n, *layer.shape).clone()
                elif t + 1 == fill:
                    v = params.v_init.expand(n, *layer.shape).clone()
            outs[name] = out.to(torch.float64)
            spikes[name] = out
        else:
            bias = _per_channel(layer.bias, 2)
            v = torch.zeros((n, *layer.shape), dtype=torch.int64)
            for t in range(steps):
                v = readout_step(profile.current(acc[t]), v, bias, profile)
                if t + 1 == b:
                    v = torch.zeros_like(v)
            readout_v = v
    assert readout_v is not None
    window = {k: s[boundary(graph, cfg, k):boundary(graph, cfg, k) + cfg.timesteps]
              .sum(0, dtype=torch.int32) for k, s in spikes.items()}
    return RunResult(
        readout=readout_v,
        logits=readout_v.to(torch.float64) * graph.readout.scale / cfg.timesteps,
        steps=steps, spikes=spikes, spike_counts={k: s.sum(0, dtype=torch.int32)
                                                  for k, s in spikes.items()},
        window_counts=window, masks=masks if cfg.presim > 0 else None)
