"""The bit-accurate integer simulator: the golden reference (SPEC section 4).

:func:`simulate` runs one batch of integer inputs through an integer IF graph
under a :class:`~csqcfs_deploy.schedule.RunConfig`; timing is defined in
:mod:`csqcfs_deploy.schedule`, the neuron rules in :mod:`.neurons`.

Evaluation order: layers in topological order, each over *all* steps at once.
This is exact in both schedules because a layer's input at step ``t`` only
depends on its sources' outputs at steps ``t - delay`` (delay >= 0), which are
complete by then. Per layer: every incoming projection's synaptic sums for
all steps in one batched operation (the constant input's once), then the
per-step neuron scan with :func:`.neurons.if_step`.

Exactness: synaptic sums are computed in float32 when a per-projection bound
(``sum |W|`` x pool window x largest source value) stays below 2**24, where
every integer is exact in float32; otherwise in float64 (below 2**53);
otherwise the simulator refuses. Results are rounded to int64 before any
profile arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.graph import IFGraph, IFLayer, ProjectionT, ReadoutLayer
from csqcfs_deploy.profiles import Profile, get_profile
from csqcfs_deploy.schedule import (
    RunConfig,
    RunResult,
    boundary,
    fill_reset_step,
    projection_delay,
    total_steps,
)
from csqcfs_deploy.synapses import (
    apply_projection,
    apply_weight_exp,
    exact_float_bound,
    max_abs_output,
)

from .neurons import IFParams, if_step, readout_step


def _per_channel(values: np.ndarray, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1) or (1, C) int64 for broadcasting against (N, *shape)."""
    t = torch.tensor(np.asarray(values), dtype=torch.int64)
    return t.view(1, -1, *([1] * (ndim - 2)))


def compute_dtype(p: ProjectionT, max_abs_source: float) -> torch.dtype:
    """float32 when every partial sum is provably exact in it, else float64."""
    bound = max_abs_output(p, max_abs_source)
    if bound < exact_float_bound(torch.float32):
        return torch.float32
    if bound < exact_float_bound(torch.float64):
        return torch.float64
    raise GraphError(f"projection {p.name}: synaptic sums may reach {bound:.3g}, beyond exact "
                     "float64 arithmetic")


def _synaptic_input(p: ProjectionT, source: torch.Tensor, constant: bool, steps: int,
                    delay: int, max_abs_source: float) -> torch.Tensor:
    """Integer synaptic sums of ``p`` for every step, (steps, N, *dst_shape) int64.

    ``source`` is (N, *src) when ``constant`` (the input, the same every step),
    else (steps, N, *src) outputs of the source layer.
    """
    dtype = compute_dtype(p, max_abs_source)
    if constant:
        once = apply_projection(p, source.to(dtype)).round().to(torch.int64)
        once = apply_weight_exp(once, p.weight_exp)
        out = once.unsqueeze(0).expand(steps, *once.shape).clone()
    else:
        n = source.shape[1]
        live = steps - delay
        out = torch.zeros(steps, n, *_dst_shape(p, source.shape[2:]), dtype=torch.int64)
        if live > 0:
            flat = source[:live].reshape(live * n, *source.shape[2:]).to(dtype)
            sums = apply_projection(p, flat).round().to(torch.int64)
            sums = apply_weight_exp(sums, p.weight_exp)
            out[delay:] = sums.reshape(live, n, *sums.shape[1:])
        return out
    if delay > 0:
        out[:delay] = 0
    return out


def _dst_shape(p: ProjectionT, src_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return p.out_shape(tuple(int(d) for d in src_shape))


@torch.no_grad()
def simulate(graph: IFGraph, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
    """Run integer inputs ``x_int`` (N, *input_shape) through ``graph``."""
    if not graph.is_integer:
        raise GraphError("the simulator runs quantized graphs; convert with a --profile first")
    if tuple(x_int.shape[1:]) != graph.input.shape:
        raise GraphError(f"input has shape {tuple(x_int.shape[1:])}, graph expects "
                         f"{graph.input.shape}")
    profile = get_profile(str(graph.meta.profile))
    steps = total_steps(graph, cfg)
    x = x_int.to(torch.int64)
    max_abs: dict[str, float] = {graph.input.name: float(x.abs().max()) if x.numel() else 0.0}
    outputs: dict[str, torch.Tensor] = {}
    pending = {la.name: len(graph.outgoing(la.name)) for la in graph.layers}
    spikes: dict[str, torch.Tensor] = {}
    spike_counts: dict[str, torch.Tensor] = {}
    window_counts: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    readout_v: torch.Tensor | None = None

    for name in graph.topological_order()[1:]:
        layer = graph.node(name)
        acc: torch.Tensor | None = None
        for p in graph.incoming(name):
            constant = p.src == graph.input.name
            source = x if constant else outputs[p.src]
            part = _synaptic_input(p, source, constant, steps,
                                   projection_delay(graph, cfg, p.name), max_abs[p.src])
            acc = part if acc is None else acc + part
            pending[p.src] -= 1
            if pending[p.src] == 0 and not constant:
                del outputs[p.src]
        assert acc is not None
        b = boundary(graph, cfg, name)
        if isinstance(layer, IFLayer):
            out = _scan_if(layer, acc, profile, cfg, b, fill_reset_step(graph, cfg, name), masks)
            if cfg.record:
                spikes[name] = out
            spike_counts[name] = out.sum(0, dtype=torch.int32)
            window_counts[name] = out[b : b + cfg.timesteps].sum(0, dtype=torch.int32)
            outputs[name] = out
            max_abs[name] = 1.0
        else:
            assert isinstance(layer, ReadoutLayer)
            readout_v = _scan_readout(layer, acc, profile, b)
    assert readout_v is not None
    logits = readout_v.to(torch.float64) * graph.readout.scale / cfg.timesteps
    return RunResult(
        readout=readout_v, logits=logits, steps=steps,
        spikes=spikes if cfg.record else None, spike_counts=spike_counts,
        window_counts=window_counts, masks=masks if cfg.presim > 0 else None,
    )


def _scan_if(layer: IFLayer, acc: torch.Tensor, profile: Profile, cfg: RunConfig, b: int,
             fill: int, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-step scan of one IF layer over synaptic sums ``acc`` (steps, N, *shape).

    ``b``: boundary step (mask and reset when P > 0); ``fill``: fill-reset step.
    """
    ndim = acc.dim() - 1
    params = IFParams(
        v_th=_per_channel(layer.v_th, ndim), v_init=_per_channel(layer.v_init, ndim),
        bias=_per_channel(layer.bias, ndim), reset=layer.reset, profile=profile,
    )
    v = params.v_init.expand(acc.shape[1:]).clone()
    mask: torch.Tensor | None = None
    out = torch.zeros(acc.shape, dtype=torch.bool)
    for t in range(acc.shape[0]):  # t = step - 1
        s, v = if_step(profile.current(acc[t]), v, params)
        out[t] = s if mask is None else s & mask
        if cfg.presim > 0 and t + 1 == b:
            mask = v > 0
            masks[layer.name] = mask
            v = params.v_init.expand(v.shape).clone()
        elif t + 1 == fill:
            v = params.v_init.expand(v.shape).clone()
    return out


def _scan_readout(layer: ReadoutLayer, acc: torch.Tensor, profile: Profile, b: int
                  ) -> torch.Tensor:
    bias = _per_channel(layer.bias, 2)
    v = torch.zeros(acc.shape[1:], dtype=torch.int64)
    for t in range(acc.shape[0]):
        v = readout_step(profile.current(acc[t]), v, bias, profile)
        if t + 1 == b:
            v = torch.zeros_like(v)
    return v
