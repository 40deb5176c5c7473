"""Cross-back-end verification: every spike of every neuron at every step.

Each back end runs the same integer inputs under its own schedule and is
compared with the integer simulator under that schedule (SPEC section 4):

* ``lava``  vs ``int`` pipelined,
* ``norse`` vs ``int`` synchronous,
* ``int`` pipelined vs ``int`` synchronous shifted by each layer's depth,
* the quantized ANN vs ``int`` synchronous, where SPEC section 2 says they
  must agree: ``L = 1``, ``T = 1``, no pre-simulation (predictions and every
  layer's binary activations).

The *first mismatch* is the earliest step at which anything differs; ties go
to the layer that comes first in topological order, then the lowest sample,
then the lowest neuron index — so a fault injected in one neuron is reported
at that neuron.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, layer_depths
from csqcfs_deploy.run.backends import BackendOptions, Runner, backend_info, open_backend
from csqcfs_deploy.run.reference import ann_forward
from csqcfs_deploy.run.results import RunResult


@dataclass(frozen=True)
class Mismatch:
    """One differing spike (or readout value): where, when, and both values."""

    backend: str
    reference: str
    layer: str
    sample: int
    neuron: tuple[int, ...]
    step: int            # 1-based step of the back end's own run (0 for the readout's end)
    expected: int
    got: int

    def to_json(self) -> dict[str, object]:
        return {"backend": self.backend, "reference": self.reference, "layer": self.layer,
                "sample": self.sample, "neuron": list(self.neuron), "step": self.step,
                "expected": self.expected, "got": self.got}

    def describe(self) -> str:
        idx = ",".join(str(i) for i in self.neuron)
        where = f"step {self.step}" if self.step else "end of run"
        return (f"{self.backend} vs {self.reference}: layer {self.layer}, sample {self.sample}, "
                f"neuron ({idx}), {where}: expected {self.expected}, got {self.got}")


@dataclass
class Comparison:
    """One back end against its reference, accumulated over batches.

    ``key``: short stable id used in JSON (the back end, ``int-pipelined`` or ``ann``).
    """

    key: str
    name: str
    backend: str
    reference: str
    schedule: str
    steps: int = 0
    samples: int = 0
    compared: dict[str, int] = field(default_factory=dict)     # spike slots per layer
    mismatches: dict[str, int] = field(default_factory=dict)
    first: Mismatch | None = None

    @property
    def total_compared(self) -> int:
        return sum(self.compared.values())

    @property
    def total_mismatches(self) -> int:
        return sum(self.mismatches.values())

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "backend": self.backend, "reference": self.reference,
                "schedule": self.schedule, "samples": self.samples, "steps": self.steps,
                "layers": len(self.compared), "compared": self.total_compared,
                "mismatches": self.total_mismatches,
                "per_layer": {k: {"compared": v, "mismatches": self.mismatches.get(k, 0)}
                              for k, v in self.compared.items()},
                "first_mismatch": None if self.first is None else self.first.to_json()}


@dataclass
class VerifyResult:
    comparisons: list[Comparison]
    layer_spikes: dict[str, int]          # int synchronous, all samples and steps
    layer_neurons: dict[str, int]
    skipped: dict[str, str]               # comparison -> why it does not apply

    @property
    def identical(self) -> bool:
        return all(c.total_mismatches == 0 for c in self.comparisons)

    @property
    def first_mismatch(self) -> Mismatch | None:
        """The first comparison's first mismatch (comparisons in the order run)."""
        return next((c.first for c in self.comparisons if c.first is not None), None)

    def to_json(self) -> dict[str, object]:
        first = self.first_mismatch
        return {"identical": self.identical,
                "compared": {c.key: c.to_json() for c in self.comparisons},
                "not_compared": self.skipped,
                "first_mismatch": None if first is None else first.to_json(),
                "layers": {k: {"neurons": self.layer_neurons[k], "spikes": v}
                           for k, v in self.layer_spikes.items()}}


def _first_in(diff: torch.Tensor) -> tuple[int, ...] | None:
    """Index (step, sample, *neuron) of the earliest difference, or None."""
    if not bool(diff.any()):
        return None
    steps = diff.flatten(1).any(1).nonzero()[0, 0].item()
    at = diff[steps]
    flat = at.flatten(1)
    sample = flat.any(1).nonzero()[0, 0].item()
    neuron_flat = flat[sample].nonzero()[0, 0].item()
    neuron = np.unravel_index(neuron_flat, tuple(at.shape[1:]))
    return (int(steps), int(sample), *(int(i) for i in neuron))


def _compare(cmp: Comparison, graph: IFGraph, ref: RunResult, got: RunResult,
             shift: dict[str, int], offset: int, order: dict[str, int]) -> None:
    """Accumulate spike and readout differences of one batch into ``cmp``.

    ``shift[layer]``: the back end's step index = reference's + shift (pipelined
    vs synchronous); ``offset``: index of the batch's first sample.
    """
    assert ref.spikes is not None and got.spikes is not None
    candidates: list[tuple[tuple[int, int, int, int], Mismatch]] = []
    for name, r in ref.spikes.items():
        if name not in got.spikes:
            raise UsageError(f"{cmp.backend} did not record layer {name}")
        g = got.spikes[name]
        s = shift.get(name, 0)
        g = g[s : s + r.shape[0]]
        if g.shape != r.shape:
            raise UsageError(f"{cmp.backend} recorded layer {name} with shape "
                             f"{tuple(g.shape)}, expected {tuple(r.shape)}")
        diff = g != r
        cmp.compared[name] = cmp.compared.get(name, 0) + r.numel()
        cmp.mismatches[name] = cmp.mismatches.get(name, 0) + int(diff.sum())
        idx = _first_in(diff)
        if idx is not None:
            step, sample, *neuron = idx
            m = Mismatch(cmp.backend, cmp.reference, name, offset + sample, tuple(neuron),
                         step + 1 + s, int(r[idx]), int(g[idx]))
            candidates.append(((step, order[name], sample, 0), m))
    name = graph.readout.name
    diff = got.readout != ref.readout
    cmp.compared[name] = cmp.compared.get(name, 0) + ref.readout.numel()
    cmp.mismatches[name] = cmp.mismatches.get(name, 0) + int(diff.sum())
    if bool(diff.any()):
        sample, neuron = (int(i) for i in diff.nonzero()[0])
        m = Mismatch(cmp.backend, cmp.reference, name, offset + sample, (neuron,), 0,
                     int(ref.readout[sample, neuron]), int(got.readout[sample, neuron]))
        candidates.append(((10**9, order[name], sample, 0), m))
    if candidates and cmp.first is None:
        cmp.first = min(candidates, key=lambda c: c[0])[1]


def verify(graph: IFGraph, x_int: torch.Tensor, timesteps: int, presim: int,
           backends: list[str], batch_size: int = 64, options: BackendOptions | None = None,
           graphs: dict[str, IFGraph] | None = None, progress: bool = True,
           on_batch: Callable[[int], None] | None = None) -> VerifyResult:
    """Run every back end on ``x_int`` and compare spike for spike (see module doc).

    ``graphs`` may give a back end a different graph than ``graph`` (used to
    prove that a one-LSB fault is found).
    """
    for b in backends:
        backend_info(b)
    options = options or BackendOptions()
    graphs = graphs or {}
    others = [b for b in backends if b != "int"]
    sync = RunConfig(timesteps, presim, "synchronous", record=True)
    pipe = RunConfig(timesteps, presim, "pipelined", record=True)
    cfg_for = {b: (pipe if "pipelined" == backend_info(b).schedules[0] else sync)
               for b in others}
    order = {name: i for i, name in enumerate(graph.topological_order())}
    depths = layer_depths(graph, pipe)
    comparisons: dict[str, Comparison] = {}
    for b in others:
        ref = "int (pipelined)" if cfg_for[b] is pipe else "int (synchronous)"
        comparisons[b] = Comparison(b, f"{b} vs {ref}", b, ref, cfg_for[b].schedule)
    comparisons["int-pipelined"] = Comparison(
        "int-pipelined", "int (pipelined) vs int (synchronous), shifted by depth",
        "int (pipelined)", "int (synchronous)", "pipelined")
    skipped: dict[str, str] = {}
    ann_applies = graph.meta.levels == 1 and timesteps == 1 and presim == 0
    if ann_applies:
        comparisons["ann"] = Comparison("ann", "quantized ANN vs int (synchronous)",
                                        "quantized ANN",
                                        "int (synchronous)", "synchronous")
    else:
        skipped["quantized ANN vs int"] = (
            "SPEC section 2: the whole network equals the quantized ANN only at L = T = 1 "
            f"without pre-simulation (here L = {graph.meta.levels}, T = {timesteps}, "
            f"P = {presim})")
    layer_spikes = {la.name: 0 for la in graph.if_layers}
    with contextlib.ExitStack() as stack:
        runners: dict[str, Runner] = {"int-sync": stack.enter_context(
            open_backend("int", graph, sync)), "int-pipe": stack.enter_context(
            open_backend("int", graph, pipe))}
        for b in others:
            runners[b] = stack.enter_context(open_backend(b, graphs.get(b, graph), cfg_for[b],
                                                          options))
        bar = tqdm(total=len(x_int), desc="verify", unit="sample", disable=not progress,
                   leave=False)
        for i in range(0, len(x_int), batch_size):
            x = x_int[i : i + batch_size]
            r_sync = runners["int-sync"].run(x)
            r_pipe = runners["int-pipe"].run(x)
            for name, c in r_sync.spike_counts.items():
                layer_spikes[name] += int(c.to(torch.int64).sum())
            _compare(comparisons["int-pipelined"], graph, r_sync, r_pipe, depths, i, order)
            for b in others:
                got = runners[b].run(x)
                ref = r_pipe if cfg_for[b] is pipe else r_sync
                _compare(comparisons[b], graph, ref, got, {}, i, order)
            if ann_applies:
                _compare_ann(comparisons["ann"], graph, r_sync, x, i, order)
            for c in comparisons.values():
                c.samples += len(x)
            bar.update(len(x))
            if on_batch is not None:
                on_batch(len(x))
        bar.close()
    for c in comparisons.values():  # steps of the reference run that were compared
        c.steps = r_pipe.steps if c.reference == "int (pipelined)" else r_sync.steps
    return VerifyResult(list(comparisons.values()), layer_spikes,
                        {la.name: la.neurons for la in graph.if_layers}, skipped)


def _compare_ann(cmp: Comparison, graph: IFGraph, r_sync: RunResult, x: torch.Tensor,
                 offset: int, order: dict[str, int]) -> None:
    """Quantized ANN counts (L = 1: binary activations) against step-1 spikes."""
    ann = ann_forward(graph, x, levels=1)
    assert r_sync.spikes is not None
    ann_as_run = RunResult(
        readout=ann.readout.to(torch.int64), logits=ann.logits, steps=1,
        spikes={k: ann.counts[k].bool().unsqueeze(0) for k in r_sync.spikes},
        spike_counts={}, window_counts={}, masks=None)
    _compare(cmp, graph, r_sync, ann_as_run, {}, offset, order)
