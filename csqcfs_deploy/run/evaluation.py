"""Run a back end over a dataset split in batches and summarise the result."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, latency_steps, pipeline_depth
from csqcfs_deploy.run.backends import BackendOptions, open_backend
from csqcfs_deploy.run.reference import input_units


@dataclass(frozen=True)
class EvalSummary:
    """Accuracy and activity of one back end on ``samples`` inputs.

    ``predictions``: (samples,) predicted class per input; ``layer_spikes[name]``:
    output spikes of IF layer ``name`` in its counted window, summed over all samples;
    ``layer_neurons[name]``: its neurons; ``seconds``: wall time of the whole run.
    ``layer_wrapped[name]`` / ``layer_saturated[name]``: neuron-steps (every step of the
    run, all samples) of IF layer or readout ``name`` whose current wrapped / whose
    membrane saturated (:class:`~csqcfs_deploy.run.results.RunResult`), summed over the
    batches; None when the back end does not count them. ``readout`` names the readout
    layer and ``readout_neurons`` its size. ``kernels``: the integer simulator's kernel
    choice per projection in the first batch (:attr:`RunResult.kernels
    <csqcfs_deploy.run.results.RunResult.kernels>`; a sharded run: the first shard's),
    None for other back ends; not part of :meth:`to_json` (``run --json`` adds it).
    """

    backend: str
    schedule: str
    samples: int
    accuracy: float
    timesteps: int
    presim: int
    latency_steps: int
    pipeline_depth: int
    firing_rate: float          # output spikes per IF neuron per counted step
    seconds: float
    predictions: NDArray[np.int64] = field(repr=False)
    layer_spikes: dict[str, int] = field(default_factory=dict)   # counted window, all samples
    layer_neurons: dict[str, int] = field(default_factory=dict)
    layer_wrapped: dict[str, int] | None = None
    layer_saturated: dict[str, int] | None = None
    readout: str = ""
    readout_neurons: int = 0
    kernels: dict[str, dict[str, object]] | None = None

    @property
    def throughput(self) -> float:
        """Samples per second of wall time (inf for a run too short to time)."""
        return self.samples / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, object]:
        """The summary as JSON values.

        ``"layers"``: one entry per IF layer (neurons, spikes, firing_rate, and the
        ``"wrapped"`` / ``"saturated"`` neuron-steps, null when not counted). The readout
        is *not* in ``"layers"`` (it has no spikes and no firing rate): it is the separate
        entry ``"readout"``: ``{"name", "neurons", "wrapped", "saturated"}``. Top level:
        ``"wrapped_total"`` / ``"saturated_total"`` over every IF layer and the readout,
        and ``"readout_saturated"``; each null when the back end does not count.
        """
        return {
            "backend": self.backend, "schedule": self.schedule, "accuracy": self.accuracy,
            "samples": self.samples, "timesteps": self.timesteps, "presim": self.presim,
            "latency_steps": self.latency_steps, "pipeline_depth": self.pipeline_depth,
            "firing_rate": self.firing_rate, "seconds": round(self.seconds, 4),
            "throughput": self.throughput,
            "layers": {k: {"neurons": self.layer_neurons[k], "spikes": v,
                           "firing_rate": v / (self.layer_neurons[k] * self.timesteps
                                               * max(self.samples, 1)),
                           "wrapped": _count(self.layer_wrapped, k),
                           "saturated": _count(self.layer_saturated, k)}
                       for k, v in self.layer_spikes.items()},
            "readout": {"name": self.readout, "neurons": self.readout_neurons,
                        "wrapped": _count(self.layer_wrapped, self.readout),
                        "saturated": _count(self.layer_saturated, self.readout)},
            "wrapped_total": _total(self.layer_wrapped),
            "saturated_total": _total(self.layer_saturated),
            "readout_saturated": _count(self.layer_saturated, self.readout),
        }


def _count(counts: dict[str, int] | None, name: str) -> int | None:
    """One layer's count, None when the back end does not count."""
    return None if counts is None else counts.get(name, 0)


def _total(counts: dict[str, int] | None) -> int | None:
    """The sum over every layer, None when the back end does not count."""
    return None if counts is None else sum(counts.values())


def add_counts(total: dict[str, int] | None, batch: dict[str, int] | None
               ) -> dict[str, int] | None:
    """Per-layer counts summed over batches: None as soon as one batch has none (the
    back end does not count). Keys in first-seen order (so the JSON is the same in
    every process)."""
    if total is None or batch is None:
        return None
    keys = [*total, *(k for k in batch if k not in total)]
    return {k: total.get(k, 0) + batch.get(k, 0) for k in keys}


def evaluate(backend: str, graph: IFGraph, raw: NDArray[Any], labels: NDArray[np.integer[Any]],
             cfg: RunConfig, batch_size: int = 128, options: BackendOptions | None = None,
             progress: bool = True, on_batch: Callable[[int], None] | None = None
             ) -> EvalSummary:
    """Run ``backend`` on raw samples (N, *input_shape) in batches of ``batch_size``;
    accuracy against ``labels`` (N,); ``on_batch(samples)`` after each batch. The
    wrapped and saturated neuron-steps are summed over the batches (:func:`add_counts`:
    None once a batch brings none; 0 per layer when no batch ran)."""
    options = options or BackendOptions()
    x_all = input_units(graph, raw)
    preds: list[NDArray[np.int64]] = []
    layer_spikes = {la.name: 0 for la in graph.if_layers}
    counted = [la.name for la in graph.if_layers] + [graph.readout.name]
    wrapped: dict[str, int] | None = dict.fromkeys(counted, 0)
    saturated: dict[str, int] | None = dict.fromkeys(counted, 0)
    kernels: dict[str, dict[str, object]] | None = None
    start = time.perf_counter()
    with open_backend(backend, graph, cfg, options) as runner:
        bar = tqdm(total=len(x_all), desc=f"{backend} T={cfg.timesteps} P={cfg.presim}",
                   unit="sample", disable=not progress, leave=False)
        for i in range(0, len(x_all), batch_size):
            result = runner.run(x_all[i : i + batch_size])
            preds.append(result.predictions)
            if i == 0:
                kernels = result.kernels
            for name, counts in result.window_counts.items():
                layer_spikes[name] += int(counts.to(torch.int64).sum())
            wrapped = add_counts(wrapped, result.wrapped)
            saturated = add_counts(saturated, result.saturated)
            bar.update(min(batch_size, len(x_all) - i))
            if on_batch is not None:
                on_batch(min(batch_size, len(x_all) - i))
        bar.close()
    seconds = time.perf_counter() - start
    predictions = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return summarize(backend, graph, cfg, predictions, labels, layer_spikes, wrapped,
                     saturated, seconds, kernels)


def summarize(backend: str, graph: IFGraph, cfg: RunConfig, predictions: NDArray[np.int64],
              labels: NDArray[np.integer[Any]], layer_spikes: dict[str, int],
              wrapped: dict[str, int] | None, saturated: dict[str, int] | None,
              seconds: float, kernels: dict[str, dict[str, object]] | None = None
              ) -> EvalSummary:
    """The summary of a run whose per-sample ``predictions`` and summed counts are known
    (one process: :func:`evaluate`; merged shards: :mod:`csqcfs_deploy.run.shards`)."""
    neurons = {la.name: la.neurons for la in graph.if_layers}
    total_neurons = sum(neurons.values())
    samples = len(predictions)
    rate = (sum(layer_spikes.values()) / (total_neurons * cfg.timesteps * samples)
            if samples and total_neurons else 0.0)
    return EvalSummary(
        backend=backend, schedule=cfg.schedule, samples=samples,
        accuracy=float((predictions == labels[:samples]).mean()) if samples else 0.0,
        timesteps=cfg.timesteps, presim=cfg.presim, latency_steps=latency_steps(graph, cfg),
        pipeline_depth=pipeline_depth(graph, cfg), firing_rate=rate, seconds=seconds,
        predictions=predictions, layer_spikes=layer_spikes, layer_neurons=neurons,
        layer_wrapped=wrapped, layer_saturated=saturated, readout=graph.readout.name,
        readout_neurons=graph.readout.neurons, kernels=kernels,
    )
