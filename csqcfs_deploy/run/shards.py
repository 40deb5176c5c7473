"""Split a run's samples into contiguous shards and merge what each shard returns.

A sharded run (``--workers N``, ``--ray ADDRESS``) gives each worker the samples
``start .. stop - 1`` of one shard; the worker runs exactly the code a one-process
run runs (:func:`~csqcfs_deploy.run.evaluation.evaluate`,
:func:`~csqcfs_deploy.run.verify.verify`) on them, and the parent merges the parts
here, in shard order. Shards start on a multiple of the batch size, so every
worker runs the very batches the one-process run runs, and the merge is exact:
predictions are concatenated, counts summed, and the first mismatch is that of the
first shard that has one (sample indices shifted by the shard's start), which is the
first batch's that has one, as in one process. Only wall times differ.

Pure: no processes here (those are :mod:`csqcfs_deploy.cli.workers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.report.sops import ActivityCounter
from csqcfs_deploy.run.evaluation import EvalSummary, add_counts, summarize
from csqcfs_deploy.run.verify import BatchDiff, Comparison, Mismatch, VerifyResult


@dataclass(frozen=True)
class Shard:
    """Samples ``start .. stop - 1`` of a run, the ``index``-th of ``count`` shards."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        """E.g. ``shard 2 of 4 (samples 32..63)``."""
        return f"shard {self.index + 1} of {self.count} (samples {self.start}..{self.stop - 1})"


def plan_shards(samples: int, batch_size: int, workers: int) -> list[Shard]:
    """At most ``workers`` contiguous shards of ``samples`` inputs, in order, each a whole
    number of batches of ``batch_size`` (the last batch may be short) and as even as the
    batches allow; fewer shards when there are fewer batches than workers."""
    if samples < 1 or batch_size < 1 or workers < 1:
        raise UsageError(f"cannot shard {samples} samples in batches of {batch_size} over "
                         f"{workers} workers")
    batches = -(-samples // batch_size)
    count = min(workers, batches)
    per, extra = divmod(batches, count)
    shards: list[Shard] = []
    first_batch = 0
    for index in range(count):
        last_batch = first_batch + per + (1 if index < extra else 0)
        shards.append(Shard(index, count, first_batch * batch_size,
                            min(last_batch * batch_size, samples)))
        first_batch = last_batch
    return shards


def _check_cover(shards: Sequence[Shard], total: int) -> None:
    """The shards are contiguous, in order, and cover ``0 .. total - 1`` (no sample lost)."""
    at = 0
    for shard in shards:
        if shard.start != at or shard.stop <= shard.start:
            raise UsageError(f"{shard.describe()} does not follow sample {at - 1}")
        at = shard.stop
    if at != total:
        raise UsageError(f"the shards cover {at} of {total} samples")


def merge_evaluations(graph: IFGraph, cfg: RunConfig,
                      parts: Sequence[tuple[Shard, EvalSummary]],
                      labels: NDArray[np.integer[Any]], seconds: float) -> EvalSummary:
    """One :class:`EvalSummary` of the shards' summaries (in shard order) over ``labels``
    (all N); ``seconds``: the wall time of the whole sharded run. The kernel choice
    (``kernels``, measured in each worker) is the first shard's."""
    _check_cover([s for s, _ in parts], len(labels))
    for shard, part in parts:
        if part.samples != shard.samples:
            raise UsageError(f"{shard.describe()} returned {part.samples} results")
    first = parts[0][1]
    layer_spikes = {name: sum(p.layer_spikes[name] for _, p in parts)
                    for name in first.layer_spikes}
    wrapped, saturated = first.layer_wrapped, first.layer_saturated
    for _, part in parts[1:]:
        wrapped = add_counts(wrapped, part.layer_wrapped)
        saturated = add_counts(saturated, part.layer_saturated)
    predictions = np.concatenate([p.predictions for _, p in parts])
    return summarize(first.backend, graph, cfg, predictions, labels, layer_spikes, wrapped,
                     saturated, seconds, first.kernels)


def _shifted(m: Mismatch | None, start: int) -> Mismatch | None:
    """A shard's mismatch with its sample index counted from the run's first sample."""
    return None if m is None else dataclasses.replace(m, sample=m.sample + start)


def merge_verifications(parts: Sequence[tuple[Shard, VerifyResult]], total: int
                        ) -> VerifyResult:
    """One :class:`VerifyResult` of the shards' results (in shard order, ``total``
    samples in all): counts summed, the first mismatch of each comparison from the
    first shard that has one."""
    _check_cover([s for s, _ in parts], total)
    head = parts[0][1]
    merged: list[Comparison] = []
    for k, c0 in enumerate(head.comparisons):
        cmp = dataclasses.replace(c0, samples=0, compared={}, mismatches={}, first=None)
        for shard, part in parts:
            c = part.comparisons[k]
            if c.key != c0.key or c.samples != shard.samples:
                raise UsageError(f"{shard.describe()} returned comparison {c.key} over "
                                 f"{c.samples} samples")
            cmp = cmp.add(BatchDiff(c.compared, c.mismatches, _shifted(c.first, shard.start)),
                          c.samples)
        merged.append(cmp)
    spikes = {name: sum(p.layer_spikes[name] for _, p in parts) for name in head.layer_spikes}
    return VerifyResult(tuple(merged), spikes, dict(head.layer_neurons), dict(head.skipped))


@dataclass(frozen=True)
class ReportCounts:
    """What ``report`` counts over ``samples`` inputs: ``neuron_spikes[layer]`` (*shape)
    spikes per neuron over all samples and steps, ``nonzero_inputs`` (*input_shape) how
    many samples had each input non-zero, and ``correct`` predictions (int64 sums: exact
    in any order)."""

    neuron_spikes: dict[str, NDArray[np.int64]]
    nonzero_inputs: NDArray[np.int64]
    samples: int
    correct: int

    @classmethod
    def of(cls, counter: ActivityCounter, correct: int) -> ReportCounts:
        if counter.neuron_spikes is None or counter.nonzero_inputs is None:
            raise UsageError("no samples were counted")
        return cls({k: v.numpy() for k, v in counter.neuron_spikes.items()},
                   counter.nonzero_inputs.numpy(), counter.samples, correct)

    def counter(self, graph: IFGraph, steps: int) -> ActivityCounter:
        """The counts as the :class:`ActivityCounter` of ``graph`` over ``steps`` steps."""
        return ActivityCounter(graph, steps, self.samples,
                               {k: torch.from_numpy(v) for k, v in self.neuron_spikes.items()},
                               torch.from_numpy(self.nonzero_inputs))


def merge_report_counts(parts: Sequence[tuple[Shard, ReportCounts]], total: int
                        ) -> ReportCounts:
    """The shards' counts (in shard order, ``total`` samples in all) summed."""
    _check_cover([s for s, _ in parts], total)
    for shard, part in parts:
        if part.samples != shard.samples:
            raise UsageError(f"{shard.describe()} returned {part.samples} results")
    head = parts[0][1]
    spikes = {k: np.sum([p.neuron_spikes[k] for _, p in parts], axis=0, dtype=np.int64)
              for k in head.neuron_spikes}
    nonzero = np.sum([p.nonzero_inputs for _, p in parts], axis=0, dtype=np.int64)
    return ReportCounts(spikes, nonzero, sum(p.samples for _, p in parts),
                        sum(p.correct for _, p in parts))
