"""The per-step neuron scans of the integer simulator: one layer over all steps.

A layer's synaptic sums for every step are computed before its scan
(:class:`Part`: the rows of one delay; an input projection's sums are one
constant row block). Rows ``t*N .. t*N + N - 1`` are step ``t + 1``.

The IF scan (:func:`scan_if`) runs :func:`csqcfs_deploy.ir.neuron.if_step` in
the simulator's in-place form (:mod:`.fast`) in the dtype that
:class:`~.arithmetic.LayerArithmetic` proved exact; the readout scan
(:func:`scan_readout`) runs :func:`csqcfs_deploy.ir.neuron.readout_step` in
int64. When a layer's state changes outside the rule (mask and re-init, fill
re-init, readout clear, the counted window) comes from its
:class:`~csqcfs_deploy.ir.neuron.LayerEvents`. A one-step run is the closed
form :func:`~csqcfs_deploy.ir.neuron.first_step_cut` (one comparison per neuron),
and the last step of any run skips the reset and, where
:attr:`.fast.IFConstants.final_exact` holds, the clamp.

Both scans also count the layer's :class:`Overflow` (neuron-steps whose current
wrapped or whose membrane saturated, over every step and sample). Where the
layer's :class:`~.arithmetic.LayerArithmetic` proves that no wrap (``wraps``) or
no clamp (``clamp``) can trigger, that count is 0 without any work; elsewhere
it costs one counting pass per step (:func:`count_outside`, and in
:func:`current` a count that replaces the wrap's add when nothing wrapped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from csqcfs_deploy.ir import IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import (
    IFParams,
    LayerEvents,
    exact_float_bound,
    first_step_cut,
    if_params,
    per_channel,
    readout_step,
)
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.simulators.integer.arithmetic import LayerArithmetic, memory_order
from csqcfs_deploy.simulators.integer.fast import IFConstants, if_fire_final, if_fire_reset_


@dataclass(frozen=True)
class Overflow:
    """Neuron-steps of one layer in one run (all steps, all N samples) where the rule's
    bit widths changed a value: ``wrapped``: :meth:`Profile.current` changed
    ``acc << act_shift`` (left the current register's range); ``saturated``: the clamp
    changed ``v + current + bias`` (outside ``[voltage_min, voltage_max]``)."""

    wrapped: int = 0
    saturated: int = 0


def count_outside(v: torch.Tensor, low: int, high: int) -> int:
    """Elements of ``v`` outside ``[low, high]`` (exact integers in any dtype that holds
    them): one min/max pass, and the two comparisons only when one lies outside."""
    flat = memory_order(v)
    if not flat.numel():
        return 0
    lo, hi = torch.aminmax(flat)
    if lo.item() >= low and hi.item() <= high:
        return 0
    return int(torch.count_nonzero(flat > high)) + int(torch.count_nonzero(flat < low))


@dataclass(frozen=True)
class Part:
    """Synaptic sums of one or more projections: rows for steps ``delay + 1 ..`` (or one
    row block repeated from step ``delay + 1`` on, when ``constant``)."""

    sums: torch.Tensor
    delay: int
    constant: bool


def merge_parts(parts: list[Part]) -> list[Part]:
    """Sum parts that share a delay (one float add instead of one per step).

    Exact: the layer's bound covers the sum of all parts.
    """
    merged: dict[tuple[int, bool], torch.Tensor] = {}
    for pt in parts:
        key = (pt.delay, pt.constant)
        merged[key] = merged[key] + pt.sums if key in merged else pt.sums
    return [Part(sums, delay, constant) for (delay, constant), sums in merged.items()]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor on ``device``, channels-last when 4-D."""
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt, device=device)


def count_spikes(out: torch.Tensor, n: int, steps: slice) -> torch.Tensor:
    """Spikes per neuron over the 0-based step indices ``steps`` of a layer's float spikes
    ``out`` (steps * N, *shape) -> (N, *shape) int32 (float sums of 0/1: exact).

    The counts keep the spikes' memory layout (channels-last for (C, H, W)
    layers): compare with ``torch.equal``, flatten with ``reshape``."""
    first, stop = steps.start, steps.stop
    total = out[first * n:(first + 1) * n]
    if stop - first > 1:
        total = total.clone()
        for t in range(first + 1, stop):
            total.add_(out[t * n:(t + 1) * n])
    return total.to(torch.int32)


@dataclass(frozen=True)
class LayerConstants:
    """Per-layer constants of one graph under one profile, built once and cached, on
    ``device`` (the simulator's)."""

    profile: Profile
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cache: dict[tuple[object, ...], object] = field(default_factory=dict)

    def params(self, layer: IFLayer) -> IFParams:
        key = (layer.name, "params")
        if key not in self._cache:
            p = if_params(layer, self.profile)
            self._cache[key] = dataclasses.replace(
                p, v_th=p.v_th.to(self.device), v_init=p.v_init.to(self.device),
                bias=p.bias.to(self.device))
        return self._cache[key]  # type: ignore[return-value]

    def scan(self, layer: IFLayer, dtype: torch.dtype, clamp: bool
             ) -> tuple[IFConstants, torch.Tensor, torch.Tensor]:
        """The scan's constants in ``dtype``: (IFConstants, bias, bias + v_init)."""
        key = (layer.name, dtype, clamp)
        if key not in self._cache:
            params = self.params(layer)
            self._cache[key] = (IFConstants.build(params, dtype, clamp), params.bias.to(dtype),
                                (params.bias + params.v_init).to(dtype))
        return self._cache[key]  # type: ignore[return-value]

    def cut(self, layer: IFLayer, dtype: torch.dtype) -> torch.Tensor:
        """:func:`~csqcfs_deploy.ir.neuron.first_step_cut` in the sums' float ``dtype``
        (clamped to its exact range: a cut beyond every sum decides the same)."""
        key = (layer.name, "cut", dtype)
        if key not in self._cache:
            p = self.params(layer)
            limit = exact_float_bound(dtype)
            cut = first_step_cut(p.v_th, p.v_init, p.bias, self.profile)
            self._cache[key] = cut.clamp(-limit, limit).to(dtype)
        return self._cache[key]  # type: ignore[return-value]

    def readout_bias(self, layer: ReadoutLayer) -> torch.Tensor:
        key = (layer.name, "bias")
        if key not in self._cache:
            self._cache[key] = per_channel(layer.bias, 2, torch.int64).to(self.device)
        return self._cache[key]  # type: ignore[return-value]

    def extremes(self, layer: IFLayer | ReadoutLayer) -> tuple[int, int, int]:
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


# --------------------------------------------------------------------------- the drive


def current(acc: torch.Tensor, arith: LayerArithmetic, offset: torch.Tensor,
            profile: Profile) -> tuple[torch.Tensor, int]:
    """(``profile.current(acc) + offset``, wrapped) of exact integer sums: a new tensor in
    the state dtype and the number of its elements whose current wrapped.

    ``u = acc << act_shift``, wrapped once (when it can wrap) as :meth:`Profile.current`:
    ``u > h -> u - 2h``, then ``u <= -h -> u + 2h`` (the second test cannot hit a value
    the first one moved, so ``wrapped`` = #(u > h) + #(u <= -h) of the original ``u``).
    """
    scale = 1 << profile.act_shift
    if acc.dtype == arith.state_dtype:
        if not arith.wraps:
            return torch.add(offset, acc, alpha=scale), 0
        u = acc * scale
    else:
        u = acc.to(arith.state_dtype)
        if scale != 1:
            u.mul_(scale)
    wrapped = 0
    if arith.wraps and profile.current_bits is not None:
        half = 1 << (profile.current_bits - 1)
        hit = torch.gt(u, half, out=torch.empty_like(u))
        up = int(torch.count_nonzero(hit))
        if up:  # the count replaces the add when nothing wrapped
            u.add_(hit, alpha=-2 * half)
        torch.le(u, -half, out=hit)
        down = int(torch.count_nonzero(hit))
        if down:
            u.add_(hit, alpha=2 * half)
        wrapped = up + down
    return u.add_(offset), wrapped


def drive(parts: list[Part], t: int, n: int, arith: LayerArithmetic, offset: torch.Tensor,
          shape: tuple[int, ...], profile: Profile,
          cache: dict[tuple[int, int], tuple[torch.Tensor, int]]
          ) -> tuple[torch.Tensor, bool, int]:
    """``current(acc_t) + offset`` of step ``t + 1`` in the state dtype; (tensor, owned,
    wrapped: neuron-steps of this step whose current wrapped).

    ``offset`` is the bias, or bias + v_init for a step that starts from v_init.
    A drive made only of constant (input) sums is computed once and cached (with its
    wrap count, which then counts again at every step that uses it).
    """
    active = [pt for pt in parts if t >= pt.delay]
    if not active:
        return offset.expand(n, *shape), False, 0
    if all(pt.constant for pt in active):
        key = (len(active), id(offset))
        if key not in cache:
            acc = active[0].sums
            for pt in active[1:]:
                acc = acc + pt.sums
            cache[key] = current(acc, arith, offset, profile)
        cached, wrapped = cache[key]
        return cached, False, wrapped
    rows = [pt.sums if pt.constant else pt.sums[(t - pt.delay) * n:(t - pt.delay + 1) * n]
            for pt in active]
    acc = rows[0]
    for r in rows[1:]:
        acc = acc + r
    u, wrapped = current(acc, arith, offset, profile)
    return u, True, wrapped


# --------------------------------------------------------------------------- the scans


def scan_if(layer: IFLayer, parts: list[Part], arith: LayerArithmetic, steps: int, n: int,
            events: LayerEvents, consts: LayerConstants,
            masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Overflow]:
    """(output spikes of one IF layer, float32 0/1 (steps * N, *shape); its
    :class:`Overflow` over all steps); its mask (N, *shape) bool goes into ``masks``
    when ``events`` take one. ``v = None`` stands for ``v_init``.

    Saturation is counted on ``v + current + bias`` just before the clamp (also on
    a last step whose clamp :func:`if_fire_final` skips), only when ``arith.clamp``."""
    profile = consts.profile
    c, bias, start = consts.scan(layer, arith.state_dtype, arith.clamp)
    single = _single_step(layer, parts, arith, steps, c, consts)
    if single is not None:
        return single
    scale = 1 << profile.act_shift
    direct = (len(parts) == 1 and not parts[0].constant and not arith.wraps
              and parts[0].sums.dtype == arith.state_dtype)
    out = empty((steps * n, *layer.shape), torch.float32, bias.device)
    # spikes are written straight into float32 rows when the state is float
    # (comparison and reset then need no conversion); an integer state goes
    # through a bool scratch row.
    scratch = (None if arith.state_dtype.is_floating_point and layer.reset == "subtract"
               else empty((n, *layer.shape), torch.bool, bias.device))
    v: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    wrapped = saturated = 0
    for t in range(steps):  # t = step - 1
        if v is None:
            v, owned, w = drive(parts, t, n, arith, start, layer.shape, profile, cache)
            wrapped += w
            if not owned:
                v = v.clone()
        elif direct and t >= parts[0].delay:  # v += acc << k; v += bias (no temporaries)
            d = parts[0].delay
            v.add_(parts[0].sums[(t - d) * n:(t - d + 1) * n], alpha=scale).add_(bias)
        else:
            u, _, w = drive(parts, t, n, arith, bias, layer.shape, profile, cache)
            wrapped += w
            v.add_(u)
        if arith.clamp:
            saturated += count_outside(v, c.v_min, c.v_max)
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
        if events.masks_after(t + 1):
            masks[layer.name] = v > 0
            mask = masks[layer.name].to(torch.float32)
        if events.reinit_after(t + 1):
            v = None
    return out, Overflow(wrapped, saturated)


def _single_step(layer: IFLayer, parts: list[Part], arith: LayerArithmetic, steps: int,
                 c: IFConstants, consts: LayerConstants
                 ) -> tuple[torch.Tensor, Overflow] | None:
    """One-step runs (synchronous, T = 1, P = 0) on the float sums directly.

    With ``v = v_init``, no wrap and a clamp invisible to the comparison
    (``c.final_exact``), the spike is ``acc > first_step_cut(...)``: one comparison
    per neuron (and, only when ``arith.clamp``, the membrane ``v_init + current + bias``
    to count its saturation).
    """
    if steps != 1 or arith.wraps or not c.final_exact or len(parts) != 1 \
            or parts[0].delay != 0:
        return None
    acc = parts[0].sums
    out = torch.empty_like(acc, dtype=torch.float32)
    saturated = 0
    if arith.clamp:
        _, _, start = consts.scan(layer, arith.state_dtype, arith.clamp)
        v, _ = current(acc, arith, start, consts.profile)
        saturated = count_outside(v, c.v_min, c.v_max)
    return torch.gt(acc, consts.cut(layer, acc.dtype), out=out), Overflow(0, saturated)


def scan_readout(layer: ReadoutLayer, parts: list[Part], arith: LayerArithmetic, steps: int,
                 n: int, events: LayerEvents, consts: LayerConstants
                 ) -> tuple[torch.Tensor, Overflow]:
    """(the readout's membrane (N, F) int64 at the end, its :class:`Overflow` over all
    steps): :func:`readout_step` every step, cleared when ``events`` say so (so it
    accumulates the counted window only). Saturation is counted on
    ``v + current + bias`` before the clamp, only when ``arith.clamp``."""
    profile = consts.profile
    bias = consts.readout_bias(layer)
    zero = torch.zeros_like(bias)
    v = torch.zeros((n, *layer.shape), dtype=torch.int64, device=bias.device)
    wide = dataclasses.replace(arith, state_dtype=torch.int64)
    cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    wrapped = saturated = 0
    for t in range(steps):
        step_drive, _, w = drive(parts, t, n, wide, zero, layer.shape, profile, cache)
        wrapped += w
        if arith.clamp:
            saturated += count_outside(v + step_drive + bias, profile.voltage_min,
                                       profile.voltage_max)
        v = readout_step(step_drive, v, bias, profile)
        if events.clears_after(t + 1):
            v = torch.zeros_like(v)
    return v, Overflow(wrapped, saturated)
