"""Synaptic operations, MACs and energy estimates (SPEC section 7).

**Fan-out.** A source neuron's fan-out along a projection is the number of
(source, target) synapse paths that leave it: for a conv it is counted from
the graph (borders, stride, groups, padding exact) as the adjoint of the
all-ones connectivity applied to all-ones targets, i.e. a transposed
convolution of ones — the same rule as sinabs' ``SNNAnalyzer``; a sum-pool
prefix contributes its windows (one path per window the neuron is in, so
exactly one synapse per connected pair for non-overlapping pools, as in every
zoo network); dense: every output; identity: one.

**SOPs.** A layer's SOPs are the sum over its *input spikes* of each spike's
fan-out into it: ``SOP_j = sum_p sum_i spikes_i * fanout_p[i]`` over the
projections ``p`` into ``j`` whose source spikes. The first layer receives the
analog input (integers every step), which costs MACs, not SOPs:
``MAC_first = ANN MACs of that projection x steps``.

**ANN MACs** of a projection: conv ``O*H'*W'*(I/groups)*kH*kW``, dense
``O*F``; identity shortcuts and pooling are additions, not MACs.

**Energy** under a named constant set (each with its source)::

    E_SNN = e_mac * MAC_first + e_sop * SOPs + e_active * active + e_inactive * inactive
    E_ANN = e_mac * MACs(all layers)           (only for sets with a MAC energy)

where ``active`` counts neuron-steps in which the neuron spiked and
``inactive`` the other neuron-steps (an assumption: Loihi's table does not
define activity further). A set without a MAC energy (Loihi) sends the
analog input as graded spikes: those count as SOPs (non-zero inputs x fan-out
per step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import InputFileError, UsageError
from csqcfs_deploy.files import require_file
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    ProjectionT,
)

# --------------------------------------------------------------------------- counting


def fanout(p: ProjectionT, src_shape: tuple[int, ...]) -> torch.Tensor:
    """Per source neuron (*src_shape), the number of synapse paths of ``p`` leaving it."""
    x = torch.ones(1, *src_shape, dtype=torch.float64, requires_grad=True)
    y = x
    if p.pool is not None:
        ones = torch.ones(src_shape[0], 1, *p.pool.kernel, dtype=torch.float64)
        y = F.conv2d(F.pad(y, (p.pool.padding[1],) * 2 + (p.pool.padding[0],) * 2), ones,
                     stride=p.pool.stride, groups=src_shape[0])
    if isinstance(p, ConvProjection):
        w = torch.ones(p.weight.shape, dtype=torch.float64)
        y = F.conv2d(y, w, None, p.stride, p.padding, 1, p.groups)
    elif isinstance(p, DenseProjection):
        y = y.flatten(1).sum(1, keepdim=True) * p.weight.shape[0]
    elif isinstance(p, IdentityProjection):
        pass
    y.sum().backward()
    assert x.grad is not None
    return x.grad[0].round().to(torch.int64)


def projection_macs(p: ProjectionT, src_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the ANN layer that ``p`` stands for (one forward pass)."""
    if isinstance(p, ConvProjection):
        out = p.out_shape(src_shape)
        return int(np.prod(out)) * int(np.prod(p.weight.shape[1:]))
    if isinstance(p, DenseProjection):
        return int(p.weight.shape[0] * p.weight.shape[1])
    return 0


def input_synapses(p: ProjectionT, src_shape: tuple[int, ...]) -> int:
    """Synapse paths of a projection from the input (all of them carry the analog input)."""
    return int(fanout(p, src_shape).sum())


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
            assert self.nonzero_inputs is not None
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
        layer = graph.node(name)
        sops = macs_in = graded = ann = 0
        for p in graph.incoming(name):
            src_shape = graph.node(p.src).shape
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


# --------------------------------------------------------------------------- energy


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules, with the source it comes from."""

    name: str
    source: str
    sop_pj: float
    mac_pj: float | None = None
    neuron_active_pj: float = 0.0
    neuron_inactive_pj: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("sop_pj", "neuron_active_pj", "neuron_inactive_pj"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"energy set {self.name!r}: {field_name} must be a finite "
                                 f"number >= 0, got {value!r}")
        if self.mac_pj is not None and not (math.isfinite(self.mac_pj) and self.mac_pj >= 0):
            raise UsageError(f"energy set {self.name!r}: mac_pj must be >= 0")
        if not self.source.strip():
            raise UsageError(f"energy set {self.name!r} needs a source")


BUILTIN_ENERGY: dict[str, EnergyConstants] = {
    "cmos45": EnergyConstants(
        "cmos45", "Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm, 0.9 V): "
        "32-bit float MAC 4.6 pJ, add (AC) 0.9 pJ", sop_pj=0.9, mac_pj=4.6),
    "loihi": EnergyConstants(
        "loihi", "Davies et al., 'Loihi', IEEE Micro 38(1), 2018, Table 2: synaptic spike op "
        "23.6 pJ, neuron update 81 pJ active / 52 pJ inactive (pre-silicon)",
        sop_pj=23.6, mac_pj=None, neuron_active_pj=81.0, neuron_inactive_pj=52.0),
}


def load_energy_json(path: str | Path) -> EnergyConstants:
    """A user-supplied constant set: JSON with name, source, sop_pj and optional others."""
    p = require_file(path, "energy constants file")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{p}: expected a JSON object with name, source, sop_pj")
    allowed = {"name", "source", "sop_pj", "mac_pj", "neuron_active_pj", "neuron_inactive_pj"}
    unknown = set(data) - allowed
    if unknown:
        raise InputFileError(f"{p}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    missing = {"name", "source", "sop_pj"} - set(data)
    if missing:
        raise InputFileError(f"{p}: missing keys {sorted(missing)}")
    try:
        return EnergyConstants(**data)
    except TypeError as exc:
        raise InputFileError(f"{p}: {exc}") from None


def resolve_energy(names: str) -> list[EnergyConstants]:
    """Comma-separated built-in names and/or paths to JSON files."""
    sets: list[EnergyConstants] = []
    for item in (s.strip() for s in names.split(",") if s.strip()):
        if item in BUILTIN_ENERGY:
            sets.append(BUILTIN_ENERGY[item])
        elif item.endswith(".json") or Path(item).exists():
            sets.append(load_energy_json(item))
        else:
            raise UsageError(f"unknown energy set {item!r} (built in: "
                             f"{', '.join(BUILTIN_ENERGY)}; or a JSON file)")
    return sets


@dataclass(frozen=True)
class EnergyEstimate:
    constants: EnergyConstants
    snn_pj: float
    ann_pj: float | None

    @property
    def ratio(self) -> float | None:
        """E_ANN / E_SNN (how many times less energy the SNN needs)."""
        if self.ann_pj is None or self.snn_pj == 0:
            return None
        return self.ann_pj / self.snn_pj

    def to_json(self) -> dict[str, object]:
        return {"name": self.constants.name, "source": self.constants.source,
                "constants": {k: v for k, v in self.constants.__dict__.items()
                              if k not in ("name", "source")},
                "snn_pj_per_sample": self.snn_pj, "ann_pj_per_sample": self.ann_pj,
                "ann_over_snn": self.ratio}


def estimate(activity: Activity, constants: EnergyConstants) -> EnergyEstimate:
    """Energy per sample (pJ) of the SNN and, where a MAC energy is known, the ANN."""
    n = max(activity.samples, 1)
    active = activity.spikes
    inactive = activity.neuron_steps - active
    if constants.mac_pj is not None:
        first = constants.mac_pj * activity.input_macs
    else:
        first = constants.sop_pj * activity.input_graded_sops
    snn = (first + constants.sop_pj * activity.sops + constants.neuron_active_pj * active
           + constants.neuron_inactive_pj * inactive) / n
    ann = None if constants.mac_pj is None else constants.mac_pj * activity.ann_macs / n
    return EnergyEstimate(constants, snn, ann)
