"""``--backend lava``: the integer IF graph as lava-nc processes on Loihi2SimCfg.

The pipeline of the back end, one module each:

* :mod:`.layout`: which Lava synapse process carries each projection (pools
  folded into the weights, identities as depthwise conv or diagonal dense) and
  the check that Lava's fixed-point models run the graph bit-exactly;
* :mod:`.network`: the Lava processes of the graph and their shared result files;
* :mod:`.processes`: our Lava processes (input, IF neurons, readout, delay line);
* :mod:`.session`: compiling, starting, running and stopping Lava's runtime;
* this module: :class:`LavaRunner`, which runs batches of integer inputs and
  returns the simulator's :class:`~csqcfs_deploy.run.results.RunResult`.

Every Lava hop takes one step, so this is the *pipelined* schedule of
:mod:`csqcfs_deploy.ir.schedule`. Only the ``loihi2`` profile is Lava's arithmetic.

Running: the network is compiled and its processes started once
(:func:`open_runner`); samples then run back to back, ``S = P + T + D`` steps
each, with every process restoring its state at each sample's first step (no
recompilation, no ``Var.set``). Inputs and results pass through memory-mapped
files (see :mod:`.processes`). :meth:`LavaRunner.close` stops Lava's
processes, also after an error, Ctrl-C, SIGTERM or SIGHUP; they also die with
the host if it is killed (see :mod:`.session` and :mod:`.guard`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from csqcfs_deploy.errors import BackendUnavailable, UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult, check_integer_input, make_run_result
from csqcfs_deploy.simulators.lava.network import LavaFiles, build_network, process_models
from csqcfs_deploy.simulators.lava.session import LavaSession, make_workdir

SAMPLES_PER_RUN = 8     # samples per Lava run call (the progress bar moves in these steps)

Memmap = np.memmap[Any, Any]


@dataclass(frozen=True)
class LavaTimings:
    """Seconds spent building the processes, compiling and starting Lava's runtime."""

    build_s: float
    compile_s: float
    start_s: float


@dataclass
class _Views:
    """The host's maps of the result files."""

    inputs: Memmap
    readout: Memmap
    layers: dict[str, dict[str, Memmap]]

    @classmethod
    def open(cls, files: LavaFiles) -> _Views:
        layers = {}
        for name, rec in files.recordings.items():
            maps = {"counts": rec.counts.open(), "window": rec.window.open(),
                    "masks": rec.masks.open()}
            if rec.spikes is not None:
                maps["spikes"] = rec.spikes.open()
            layers[name] = maps
        return cls(files.inputs.open(), files.readout.open(), layers)


class LavaRunner:
    """A compiled, started Lava network; :meth:`run` runs batches of integer inputs."""

    def __init__(self, graph: IFGraph, cfg: RunConfig, options: BackendOptions,
                 slots: int | None = None, samples_per_run: int = SAMPLES_PER_RUN) -> None:
        if options.device != "cpu":
            raise UsageError("the Lava back end simulates on the CPU (--device cpu)")
        if samples_per_run < 1:
            raise UsageError(f"samples_per_run must be >= 1, got {samples_per_run}")
        self.graph = graph
        self.cfg = cfg
        self.progress = options.progress
        self._samples_run = 0
        workdir = make_workdir()
        try:
            t0 = time.perf_counter()
            self.network = build_network(graph, cfg, workdir, slots)
            build_s = time.perf_counter() - t0
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.session = LavaSession(self.network.root, process_models(self.network), workdir)
        self.timings = LavaTimings(build_s=build_s, compile_s=self.session.compile_s,
                                   start_s=self.session.start_s)
        self.files = self.network.files
        # samples per Lava run call: at most one slot each (a slot is reused only after
        # the host has read it)
        self.samples_per_run = min(samples_per_run, self.files.clock.slots)
        self._views: _Views | None = _Views.open(self.files)

    @property
    def steps(self) -> int:
        return self.files.clock.steps

    def run(self, x_int: torch.Tensor) -> RunResult:
        """Run inputs (N, *input_shape) and return what the simulator's ``simulate`` returns."""
        if self.session.closed or self._views is None:
            raise BackendUnavailable("the Lava runner is closed (Lava was stopped)")
        views = self._views
        graph, cfg = self.graph, self.cfg
        check_integer_input(graph, x_int, "lava", floats=False, in_range=True)
        x = x_int.detach().cpu().to(torch.int64).reshape(x_int.shape[0], -1).numpy()
        x = x.astype(np.int32)
        n = x.shape[0]
        slots = self.files.clock.slots
        steps = self.steps
        readout = np.zeros((n, graph.readout.neurons), dtype=np.int64)
        layers = graph.if_layers
        counts = {la.name: np.zeros((n, la.neurons), np.int32) for la in layers}
        window = {la.name: np.zeros((n, la.neurons), np.int32) for la in layers}
        masks = {la.name: np.zeros((n, la.neurons), bool) for la in layers}
        spikes = ({la.name: np.zeros((steps, n, la.neurons), bool) for la in layers}
                  if cfg.record else None)
        bar = tqdm(total=n, desc=f"lava T={cfg.timesteps} P={cfg.presim}", unit="sample",
                   disable=not self.progress, leave=False)
        try:
            for first in range(0, n, self.samples_per_run):
                chunk = range(first, min(n, first + self.samples_per_run))
                slot_of = {i: (self._samples_run + k) % slots for k, i in enumerate(chunk)}
                for i, slot in slot_of.items():
                    views.inputs[slot] = x[i]
                self.session.run_steps(steps * len(chunk))
                self._samples_run += len(chunk)
                for i, slot in slot_of.items():
                    readout[i] = views.readout[slot]
                    for la in layers:
                        view = views.layers[la.name]
                        counts[la.name][i] = view["counts"][slot]
                        window[la.name][i] = view["window"][slot]
                        masks[la.name][i] = view["masks"][slot]
                        if spikes is not None:
                            spikes[la.name][:, i] = view["spikes"][slot]
                bar.update(len(chunk))
        finally:
            bar.close()

        def shaped(arrays: dict[str, NDArray[Any]]) -> dict[str, torch.Tensor]:
            """(..., n) per neuron, C-major -> (..., *layer shape) tensors."""
            return {name: torch.from_numpy(a.reshape(*a.shape[:-1], *graph.layer(name).shape))
                    for name, a in arrays.items()}

        return make_run_result(graph, cfg, steps, torch.from_numpy(readout), shaped(counts),
                               shaped(window),
                               spikes=shaped(spikes) if spikes is not None else None,
                               masks=shaped(masks))

    def close(self, polite: bool = True) -> list[str]:
        """Stop Lava's processes and remove the result files; idempotent."""
        self._views = None
        return self.session.close(polite=polite)


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> LavaRunner:
    """The back-end entry point (see :mod:`csqcfs_deploy.run.backends`)."""
    return LavaRunner(graph, cfg, options)
