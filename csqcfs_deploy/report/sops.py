"""Synaptic operations and MACs from spike counts (SPEC section 7).

**Fan-out.** A source neuron's fan-out along a projection is the number of
(source, target) synapse paths that leave it (:func:`~csqcfs_deploy.ir.kinds.fanout`,
one rule for every kind): the adjoint of the all-ones connectivity applied to
all-ones targets, i.e. for a conv a transposed convolution of ones (borders,
stride, groups, padding exact) -- the same rule as sinabs' ``SNNAnalyzer``; a
sum-pool prefix contributes its windows (one path per window the neuron is in, so
exactly one synapse per connected pair for non-overlapping pools, as in every zoo
network); dense: every output; identity: one.

**SOPs.** A layer's SOPs are the sum over its *input spikes* of each spike's
fan-out into it: ``SOP_j = sum_p sum_i spikes_i * fanout_p[i]`` over the
projections ``p`` into ``j`` whose source spikes. The first layer receives the
analog input (integers every step), which costs MACs, not SOPs:
``MAC_first = ANN MACs of that projection x steps``; sent as graded spikes
instead, it costs ``non-zero inputs x fan-out`` SOPs per step.

**ANN MACs** of a projection (:func:`~csqcfs_deploy.ir.kinds.projection_macs`, per
kind): conv ``O*H'*W'*(I/groups)*kH*kW``, dense ``O*F``; identity shortcuts and
pooling are additions, not MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.kinds import fanout, projection_macs


@dataclass(frozen=True)
class LayerActivity:
    """One row of the report: a neuron group (or the readout) and what reaches it."""

    name: str
    kind: str
    neurons: int
    spikes: int                 # spikes this layer emitted, all samples, all steps
    firing_rate: float          # spikes per neuron per step
    sops: int                   # synaptic operations into this layer (spiking sources)
    input_macs: int             # MACs into this layer from the analog input (all steps)
    input_graded_sops: int      # the same input sent as graded spikes (non-zero inputs)
    ann_macs: int               # MACs of the ANN layer(s) feeding it, per sample

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Activity:
    """Counts over ``samples`` inputs of ``steps`` steps each."""

    layers: tuple[LayerActivity, ...]
    samples: int
    steps: int

    @property
    def sops(self) -> int:
        return sum(la.sops for la in self.layers)

    @property
    def input_macs(self) -> int:
        return sum(la.input_macs for la in self.layers)

    @property
    def input_graded_sops(self) -> int:
        return sum(la.input_graded_sops for la in self.layers)

    @property
    def ann_macs(self) -> int:
        """ANN MACs for all samples (one forward pass each)."""
        return sum(la.ann_macs for la in self.layers) * self.samples

    @property
    def neuron_steps(self) -> int:
        return sum(la.neurons for la in self.layers if la.kind != "readout") * self.steps \
            * self.samples

    @property
    def spikes(self) -> int:
        return sum(la.spikes for la in self.layers)


@dataclass
class ActivityCounter:
    """Accumulates per-neuron spike counts over batches (memory: one tensor per layer)."""

    graph: IFGraph
    steps: int
    samples: int = 0
    neuron_spikes: dict[str, torch.Tensor] | None = None
    nonzero_inputs: torch.Tensor | None = None

    def add(self, spike_counts: dict[str, torch.Tensor], x_int: torch.Tensor) -> None:
        """``spike_counts[name]``: (N, *shape) spikes over all steps (``RunResult``);
        ``x_int``: the (N, *input_shape) integer inputs of the same batch."""
        sums = {k: v.to(torch.int64).sum(0) for k, v in spike_counts.items()}
        nz = (x_int != 0).to(torch.int64).sum(0)
        if self.neuron_spikes is None:
            self.neuron_spikes, self.nonzero_inputs = sums, nz
        else:
            for k, v in sums.items():
                self.neuron_spikes[k] += v
            if self.nonzero_inputs is not None:
                self.nonzero_inputs += nz
        self.samples += int(x_int.shape[0])

    def activity(self) -> Activity:
        if self.neuron_spikes is None or self.nonzero_inputs is None:
            raise UsageError("no samples were counted")
        return count_activity(self.graph, self.neuron_spikes, self.nonzero_inputs,
                              self.samples, self.steps)


def count_activity(graph: IFGraph, neuron_spikes: dict[str, torch.Tensor],
                   nonzero_inputs: torch.Tensor, samples: int, steps: int) -> Activity:
    """SOPs and MACs from per-neuron spike counts summed over ``samples`` inputs.

    ``neuron_spikes[name]``: (*shape) output spikes of IF layer ``name`` over all
    ``steps`` steps and all samples; ``nonzero_inputs``: (*input_shape) how many
    samples had a non-zero integer input at each position.
    """
    rows: list[LayerActivity] = []
    for name in graph.topological_order()[1:]:
        layer = graph.layer(name)
        sops = macs_in = graded = ann = 0
        for p in graph.incoming(name):
            src_shape = graph.layer(p.src).shape
            fo = fanout(p, src_shape)
            ann += projection_macs(p, src_shape)
            if p.src == graph.input.name:
                macs_in += projection_macs(p, src_shape) * samples * steps
                graded += int((nonzero_inputs * fo).sum()) * steps
            else:
                sops += int((neuron_spikes[p.src].to(torch.int64) * fo).sum())
        spikes = int(neuron_spikes[name].sum()) if name in neuron_spikes else 0
        neurons = int(np.prod(layer.shape))
        is_readout = name == graph.readout.name
        rows.append(LayerActivity(
            name=name, kind="readout" if is_readout else "IF", neurons=neurons, spikes=spikes,
            firing_rate=0.0 if is_readout else spikes / (neurons * steps * max(samples, 1)),
            sops=sops, input_macs=macs_in, input_graded_sops=graded, ann_macs=ann,
        ))
    return Activity(tuple(rows), samples, steps)
