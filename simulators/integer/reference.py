"""The plain, independent check of :class:`~.simulator.Simulator`.

:func:`reference_simulate` runs the same simulation the obvious way, step by
step, with nothing proven or fused: float64 :func:`~csqcfs_deploy.ir.synapses.apply_projection`
per step (exact below 2**53, checked), the one specification's
:func:`~csqcfs_deploy.ir.neuron.if_step` and :func:`~csqcfs_deploy.ir.neuron.readout_step`
in int64, and each layer's :class:`~csqcfs_deploy.ir.neuron.LayerEvents` for the
mask, the re-initialisations, the readout clear and the counted window. Slow;
``tests/test_simulator.py`` checks the simulator against it spike for spike.

It counts the wrapped and saturated neuron-steps of every layer on its own
(:func:`overflow_of_step`): each step, every neuron whose ``profile.current``
differs from ``acc << act_shift``, and every neuron whose ``v + current + bias``
differs from its saturated value; ``tests/test_overflow_counts.py`` checks the
simulator's counts against these.
"""

from __future__ import annotations

import torch

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import (
    exact_float_bound,
    graph_events,
    if_params,
    if_step,
    per_channel,
    readout_step,
)
from csqcfs_deploy.ir.profiles import Profile, get_profile
from csqcfs_deploy.ir.schedule import RunConfig, projection_delay, total_steps
from csqcfs_deploy.ir.synapses import apply_projection, apply_weight_exp, max_abs_output
from csqcfs_deploy.run.results import RunResult, check_integer_input, make_run_result


def overflow_of_step(acc: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     profile: Profile) -> tuple[torch.Tensor, int, int]:
    """(current, wrapped, saturated) of one step of a layer, the plain way.

    ``acc`` (N, *shape) int64 sums, ``v`` the membranes before the step, ``bias``
    broadcasting: ``current = profile.current(acc)``; ``wrapped`` = neurons where it
    differs from ``acc << act_shift``; ``saturated`` = neurons where
    ``profile.saturate(v + current + bias)`` differs from ``v + current + bias``.
    """
    cur = profile.current(acc)
    wrapped = int((cur != acc * (1 << profile.act_shift)).sum())
    pre = v + cur + bias
    saturated = int((profile.saturate(pre) != pre).sum())
    return cur, wrapped, saturated


@torch.no_grad()
def reference_simulate(graph: IFGraph, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
    """Run integer inputs ``x_int`` (N, *input_shape) through ``graph``, the plain way.

    Per layer ``j`` (topological order) and step ``t``: ``acc_t = sum_p
    shift(W_p (*) pool_p(out_src[t - delay_p]), weight_exp_p)`` (int64), then
    ``s, v = if_step(profile.current(acc_t), v, params)``, the output ``s & mask``,
    and at the end of the step the layer's events (mask ``v > 0`` and re-init to
    ``v_init``, fill re-init, readout clear); the wrapped and saturated neuron-steps of
    every step from :func:`overflow_of_step`.
    """
    if not graph.is_integer:
        raise GraphError("the simulator runs quantized graphs")
    check_integer_input(graph, x_int, "integer simulator")
    profile = get_profile(str(graph.meta.profile))
    steps = total_steps(graph, cfg)
    events = graph_events(graph, cfg)
    n = x_int.shape[0]
    x = x_int.to(torch.float64)
    outs: dict[str, torch.Tensor] = {}
    spikes: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    readout_v: torch.Tensor | None = None
    wrapped: dict[str, int] = {}
    saturated: dict[str, int] = {}
    for name in graph.topological_order()[1:]:
        layer = graph.layer(name)
        ev = events[name]
        acc = torch.zeros((steps, n, *layer.shape), dtype=torch.int64)
        for p in graph.incoming(name):
            delay = projection_delay(graph, cfg, p.name)
            for t in range(delay, steps):
                src = x if p.src == graph.input.name else outs[p.src][t - delay]
                peak = float(src.abs().max()) if src.numel() else 0.0
                if max_abs_output(p, peak) >= exact_float_bound(torch.float64):
                    raise GraphError(f"projection {p.name}: sums beyond float64")
                part = apply_projection(p, src).round().to(torch.int64)
                acc[t] += apply_weight_exp(part, p.weight_exp)
        wrapped[name] = saturated[name] = 0
        if isinstance(layer, IFLayer):
            params = if_params(layer, profile)
            v = params.v_init.expand(n, *layer.shape).clone()
            mask: torch.Tensor | None = None
            out = torch.zeros((steps, n, *layer.shape), dtype=torch.bool)
            for t in range(steps):
                cur, w, sat = overflow_of_step(acc[t], v, params.bias, profile)
                wrapped[name] += w
                saturated[name] += sat
                s, v = if_step(cur, v, params)
                out[t] = s if mask is None else s & mask
                if ev.masks_after(t + 1):
                    mask = v > 0
                    masks[name] = mask
                if ev.reinit_after(t + 1):
                    v = params.v_init.expand(n, *layer.shape).clone()
            outs[name] = out.to(torch.float64)
            spikes[name] = out
        elif isinstance(layer, ReadoutLayer):
            bias = per_channel(layer.bias, 2, torch.int64)
            v = torch.zeros((n, *layer.shape), dtype=torch.int64)
            for t in range(steps):
                cur, w, sat = overflow_of_step(acc[t], v, bias, profile)
                wrapped[name] += w
                saturated[name] += sat
                v = readout_step(cur, v, bias, profile)
                if ev.clears_after(t + 1):
                    v = torch.zeros_like(v)
            readout_v = v
    if readout_v is None:  # pragma: no cover - IFGraph validates its readout
        raise GraphError("the graph has no readout layer")
    return make_run_result(
        graph, cfg, steps, readout_v,
        spike_counts={k: s.sum(0, dtype=torch.int32) for k, s in spikes.items()},
        window_counts={k: s[events[k].window].sum(0, dtype=torch.int32)
                       for k, s in spikes.items()},
        spikes=spikes, masks=masks, wrapped=wrapped, saturated=saturated)
