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

Results are data (:class:`VerifyResult`, its ``to_json()``); the CLI
(:mod:`csqcfs_deploy.cli.commands.verify`) prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, layer_depths, total_steps
from csqcfs_deploy.run.backends import BackendOptions, Runner, backend_info, open_backend
from csqcfs_deploy.run.reference import ann_forward
from csqcfs_deploy.run.results import RunResult

#: Order key of the readout's mismatch: after every spike (it is the end-of-run value).
_READOUT_STEP_KEY = 10**9


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


@dataclass(frozen=True)
class BatchDiff:
    """What one batch adds to a comparison: per layer, values compared and how many
    differ, and the batch's earliest mismatch (module doc's order)."""

    compared: dict[str, int]
    mismatches: dict[str, int]
    first: Mismatch | None


@dataclass(frozen=True)
class Comparison:
    """One back end against its reference, over ``samples`` inputs of ``steps`` steps.

    ``key``: short stable id used in JSON (the back end, ``int-pipelined`` or ``ann``);
    ``compared[layer]`` / ``mismatches[layer]``: spike slots (the readout: final
    membrane values) compared and differing; ``first``: the earliest mismatch of the
    first batch that had one.
    """

    key: str
    name: str
    backend: str
    reference: str
    schedule: str
    steps: int = 0
    samples: int = 0
    compared: dict[str, int] = dataclasses.field(default_factory=dict)
    mismatches: dict[str, int] = dataclasses.field(default_factory=dict)
    first: Mismatch | None = None

    @property
    def total_compared(self) -> int:
        return sum(self.compared.values())

    @property
    def total_mismatches(self) -> int:
        return sum(self.mismatches.values())

    def add(self, diff: BatchDiff, samples: int) -> Comparison:
        """This comparison with one more batch of ``samples`` inputs counted."""
        return dataclasses.replace(
            self, samples=self.samples + samples,
            compared=_summed(self.compared, diff.compared),
            mismatches=_summed(self.mismatches, diff.mismatches),
            first=self.first if self.first is not None else diff.first)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "backend": self.backend, "reference": self.reference,
                "schedule": self.schedule, "samples": self.samples, "steps": self.steps,
                "layers": len(self.compared), "compared": self.total_compared,
                "mismatches": self.total_mismatches,
                "per_layer": {k: {"compared": v, "mismatches": self.mismatches.get(k, 0)}
                              for k, v in self.compared.items()},
                "first_mismatch": None if self.first is None else self.first.to_json()}


def _summed(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Per-key sums; keys keep their first-seen order."""
    out = dict(total)
    for k, v in more.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass(frozen=True)
class VerifyResult:
    """Every comparison (in the order run) and the int simulator's activity.

    ``layer_spikes[name]``: spikes of IF layer ``name`` in the synchronous int run,
    all samples and steps; ``layer_neurons[name]``: its neurons; ``skipped``: a
    comparison that does not apply -> why.
    """

    comparisons: tuple[Comparison, ...]
    layer_spikes: dict[str, int]
    layer_neurons: dict[str, int]
    skipped: dict[str, str]

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
    """Index (step, sample, *neuron) of the earliest ``True`` in ``diff`` (steps, N, *shape)."""
    if not bool(diff.any()):
        return None
    step = int(diff.flatten(1).any(1).nonzero()[0, 0])
    at = diff[step]
    flat = at.flatten(1)
    sample = int(flat.any(1).nonzero()[0, 0])
    neuron_flat = int(flat[sample].nonzero()[0, 0])
    neuron = np.unravel_index(neuron_flat, tuple(at.shape[1:]))
    return (step, sample, *(int(i) for i in neuron))


def _recorded(result: RunResult, who: str) -> dict[str, torch.Tensor]:
    """The recorded spikes of ``result`` (every run here records)."""
    if result.spikes is None:
        raise UsageError(f"{who} did not record spikes")
    return result.spikes


def _diff(cmp: Comparison, graph: IFGraph, ref: RunResult, got: RunResult,
          shift: dict[str, int], offset: int, order: dict[str, int]) -> BatchDiff:
    """Spike and readout differences of one batch, ``got`` against ``ref``.

    Spikes are bool (steps, N, *shape) per IF layer; ``shift[layer]``: the back end's
    step index = reference's + shift (pipelined vs synchronous); ``offset``: index of
    the batch's first sample; ``order``: topological index of each layer.
    """
    ref_spikes, got_spikes = _recorded(ref, cmp.reference), _recorded(got, cmp.backend)
    compared: dict[str, int] = {}
    mismatches: dict[str, int] = {}
    candidates: list[tuple[tuple[int, int, int, int], Mismatch]] = []
    for name, r in ref_spikes.items():
        if name not in got_spikes:
            raise UsageError(f"{cmp.backend} did not record layer {name}")
        s = shift.get(name, 0)
        g = got_spikes[name][s : s + r.shape[0]]
        if g.shape != r.shape:
            raise UsageError(f"{cmp.backend} recorded layer {name} with shape "
                             f"{tuple(g.shape)}, expected {tuple(r.shape)}")
        diff = g != r
        compared[name] = r.numel()
        mismatches[name] = int(diff.sum())
        idx = _first_in(diff)
        if idx is not None:
            step, sample, *neuron = idx
            m = Mismatch(cmp.backend, cmp.reference, name, offset + sample, tuple(neuron),
                         step + 1 + s, int(r[idx]), int(g[idx]))
            candidates.append(((step, order[name], sample, 0), m))
    name = graph.readout.name
    diff = got.readout != ref.readout
    compared[name] = ref.readout.numel()
    mismatches[name] = int(diff.sum())
    if bool(diff.any()):
        row, col = (int(i) for i in diff.nonzero()[0])
        m = Mismatch(cmp.backend, cmp.reference, name, offset + row, (col,), 0,
                     int(ref.readout[row, col]), int(got.readout[row, col]))
        candidates.append(((_READOUT_STEP_KEY, order[name], row, 0), m))
    first = min(candidates, key=lambda c: c[0])[1] if candidates else None
    return BatchDiff(compared, mismatches, first)


def _ann_diff(cmp: Comparison, graph: IFGraph, r_sync: RunResult, x: torch.Tensor,
              offset: int, order: dict[str, int]) -> BatchDiff:
    """Quantized ANN counts (L = 1: binary activations) against step-1 spikes."""
    ann = ann_forward(graph, x, levels=1)
    ann_as_run = RunResult(
        readout=ann.readout.to(torch.int64), logits=ann.logits, steps=1,
        spikes={k: ann.counts[k].bool().unsqueeze(0) for k in _recorded(r_sync, "int")},
        spike_counts={}, window_counts={}, masks=None)
    return _diff(cmp, graph, r_sync, ann_as_run, {}, offset, order)


def _plan(graph: IFGraph, timesteps: int, presim: int, cfg_for: dict[str, RunConfig]
          ) -> tuple[dict[str, Comparison], dict[str, str]]:
    """The comparisons to run (empty counts), in order, and those that do not apply."""
    comparisons: dict[str, Comparison] = {}
    for b, cfg in cfg_for.items():
        ref = f"int ({cfg.schedule})"
        comparisons[b] = Comparison(b, f"{b} vs {ref}", b, ref, cfg.schedule)
    comparisons["int-pipelined"] = Comparison(
        "int-pipelined", "int (pipelined) vs int (synchronous), shifted by depth",
        "int (pipelined)", "int (synchronous)", "pipelined")
    skipped: dict[str, str] = {}
    if _ann_applies(graph, timesteps, presim):
        comparisons["ann"] = Comparison("ann", "quantized ANN vs int (synchronous)",
                                        "quantized ANN", "int (synchronous)", "synchronous")
    else:
        skipped["quantized ANN vs int"] = (
            "SPEC section 2: the whole network equals the quantized ANN only at L = T = 1 "
            f"without pre-simulation (here L = {graph.meta.levels}, T = {timesteps}, "
            f"P = {presim})")
    return comparisons, skipped


def _ann_applies(graph: IFGraph, timesteps: int, presim: int) -> bool:
    """SPEC section 2: the network equals the quantized ANN at L = T = 1, P = 0."""
    return graph.meta.levels == 1 and timesteps == 1 and presim == 0


def verify(graph: IFGraph, x_int: torch.Tensor, timesteps: int, presim: int,
           backends: list[str], batch_size: int = 64, options: BackendOptions | None = None,
           graphs: dict[str, IFGraph] | None = None, progress: bool = True,
           on_batch: Callable[[int], None] | None = None) -> VerifyResult:
    """Run every back end on ``x_int`` (N, *input_shape) and compare spike for spike.

    See the module doc for what is compared. ``graphs`` may give a back end a
    different graph than ``graph`` (used to prove that a one-LSB fault is found).
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
    comparisons, skipped = _plan(graph, timesteps, presim, cfg_for)
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
            for name, counts in r_sync.spike_counts.items():
                layer_spikes[name] += int(counts.to(torch.int64).sum())
            diffs = {"int-pipelined": _diff(comparisons["int-pipelined"], graph, r_sync,
                                            r_pipe, depths, i, order)}
            for b in others:
                got = runners[b].run(x)
                ref_run = r_pipe if cfg_for[b] is pipe else r_sync
                diffs[b] = _diff(comparisons[b], graph, ref_run, got, {}, i, order)
            if "ann" in comparisons:
                diffs["ann"] = _ann_diff(comparisons["ann"], graph, r_sync, x, i, order)
            comparisons = {k: c.add(diffs[k], len(x)) for k, c in comparisons.items()}
            bar.update(len(x))
            if on_batch is not None:
                on_batch(len(x))
        bar.close()
    steps = {"int (pipelined)": total_steps(graph, pipe)}  # steps of the reference run
    final = tuple(dataclasses.replace(c, steps=steps.get(c.reference, total_steps(graph, sync)))
                  for c in comparisons.values())
    return VerifyResult(final, layer_spikes, {la.name: la.neurons for la in graph.if_layers},
                        skipped)
