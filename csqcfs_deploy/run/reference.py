"""ANN-mode evaluation of an IF graph: the reference the simulator must meet.

No spikes: each neuron group's output is its spike *count* over ``L`` steps,
computed in one shot from its sources' counts (the input counts ``L * x``
because it is fed every step)::

    acc   = sum_p shift(W_p (*) pool(c_src), weight_exp_p)
    z     = saturate(v_init + current(acc) + L * bias)       # integer graphs
    c     = clip(floor((z - delta) / v_th), 0, L)             # delta = 1 for v > v_th
    readout: z = current(acc) + L * bias;  logits = z * scale / L

For a float graph (``v_th = 1``, ``v_init = phi``, no profile, ``delta = 0``)
this is exactly the CS-QCFS network: ``c = clip(floor(L z + phi), 0, L)``.
For an integer graph at ``L = 1`` it is exactly the synchronous simulator at
``T = 1``; for ``L > 1`` the profile's wrap and saturation are applied to the
L-step total (an ideal model: the simulator applies them every step).

Integer arithmetic runs in float64 convolutions (exact below 2**53; checked)
and int64 elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import exact_float_bound
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.synapses import (
    apply_projection,
    apply_weight_exp,
    max_abs_output,
)


@dataclass(frozen=True)
class AnnOutput:
    """Per-layer spike counts (N, *shape) and the readout's value and logits (N, F)."""

    counts: dict[str, torch.Tensor]
    readout: torch.Tensor
    logits: torch.Tensor

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(dim=1).cpu().numpy()


def input_units(graph: IFGraph, raw: np.ndarray) -> torch.Tensor:
    """Raw dataset samples -> the graph's input units (integers, or reals for a float graph)."""
    enc = graph.input.encoding
    if graph.is_integer:
        return torch.from_numpy(enc.to_int(raw))
    return torch.from_numpy(enc.normalize(raw).astype(np.float64))


@torch.no_grad()
def ann_forward(graph: IFGraph, x: torch.Tensor, levels: int | None = None) -> AnnOutput:
    """Evaluate ``graph`` in ANN mode on input units ``x`` (N, *input_shape)."""
    L = int(levels if levels is not None else graph.meta.levels)
    integer = graph.is_integer
    profile = get_profile(graph.meta.profile) if integer else None
    counts: dict[str, torch.Tensor] = {graph.input.name: x.to(torch.float64) * L}
    max_abs: dict[str, float] = {graph.input.name: float(x.abs().max()) * L if x.numel() else 0.0}
    readout = logits = None
    for name in graph.topological_order()[1:]:
        layer = graph.node(name)
        acc: torch.Tensor | None = None
        for p in graph.incoming(name):
            if integer and max_abs_output(p, max_abs[p.src]) >= exact_float_bound(torch.float64):
                raise GraphError(f"projection {p.name}: sums may exceed 2**53 in ANN mode")
            part = apply_projection(p, counts[p.src])
            if integer:
                part = apply_weight_exp(part.round().to(torch.int64), p.weight_exp)
            acc = part if acc is None else acc + part
        assert acc is not None
        cur = profile.current(acc) if profile is not None else acc
        bias = _per_channel(torch.tensor(np.asarray(layer.bias)), cur)
        if integer:
            bias = bias.to(torch.int64)
        if isinstance(layer, IFLayer):
            v_init = _per_channel(torch.tensor(np.asarray(layer.v_init)), cur)
            v_th = _per_channel(torch.tensor(np.asarray(layer.v_th)), cur)
            z = v_init.to(cur.dtype) + cur + L * bias
            if profile is not None:
                z = profile.saturate(z)
                delta = 1 if profile.strict else 0
                c = torch.div(z - delta, v_th.to(torch.int64), rounding_mode="floor")
            else:
                c = torch.floor(z / v_th)
            counts[name] = torch.clamp(c, 0, L).to(torch.float64)
            max_abs[name] = float(L)
        elif isinstance(layer, ReadoutLayer):
            z = cur + L * bias
            if profile is not None:
                z = profile.saturate(z)
            readout = z
            logits = z.to(torch.float64) * layer.scale / L
    assert readout is not None and logits is not None
    return AnnOutput(counts, readout, logits)


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))
