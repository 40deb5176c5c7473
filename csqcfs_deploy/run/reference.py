"""ANN-mode evaluation of an IF graph: the reference the simulator must meet.

No spikes: each neuron group's output is its spike *count* over ``L`` steps,
computed in one shot from its sources' counts (the input counts ``L * x``
because it is fed every step)::

    acc   = sum_p shift(W_p (*) pool(c_src), weight_exp_p)
    z     = saturate(v_init + current(acc) + L * bias)       # integer graphs
    c     = clip(floor((z - delta) / v_th), 0, L)             # ir.neuron.if_count
    readout: z = current(acc) + L * bias;  logits = z * scale / L

For a float graph (``v_th = 1``, ``v_init = phi``, no profile, ``delta = 0``)
this is exactly the CS-QCFS network: ``c = clip(floor(L z + phi), 0, L)``.
For an integer graph at ``L = 1`` it is exactly the synchronous simulator at
``T = 1``; for ``L > 1`` the profile's wrap and saturation are applied to the
L-step total (an ideal model: the simulator applies them every step).

The count is the one specification's closed form
:func:`csqcfs_deploy.ir.neuron.if_count` (``delta = 1`` for ``v > v_th``).
Integer arithmetic runs in float64 convolutions (exact below 2**53; checked)
and int64 elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import exact_float_bound, if_count, per_channel
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
    def predictions(self) -> npt.NDArray[np.int64]:
        return self.logits.argmax(dim=1).cpu().numpy()


def input_units(graph: IFGraph, raw: npt.NDArray[Any]) -> torch.Tensor:
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
    profile = get_profile(str(graph.meta.profile)) if integer else None
    counts: dict[str, torch.Tensor] = {graph.input.name: x.to(torch.float64) * L}
    max_abs: dict[str, float] = {graph.input.name: float(x.abs().max()) * L if x.numel() else 0.0}
    readout = logits = None
    for name in graph.topological_order()[1:]:
        layer = graph.neuron_group(name)
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
        bias = per_channel(layer.bias, cur.dim())
        if integer:
            bias = bias.to(torch.int64)
        if isinstance(layer, IFLayer):
            v_init = per_channel(layer.v_init, cur.dim())
            v_th = per_channel(layer.v_th, cur.dim())
            z = v_init.to(cur.dtype) + cur + L * bias
            if profile is not None:
                z = profile.saturate(z)
            counts[name] = if_count(z, v_th, L, profile)
            max_abs[name] = float(L)
        elif isinstance(layer, ReadoutLayer):
            z = cur + L * bias
            if profile is not None:
                z = profile.saturate(z)
            readout = z
            logits = z.to(torch.float64) * layer.scale / L
    assert readout is not None and logits is not None
    return AnnOutput(counts, readout, logits)
