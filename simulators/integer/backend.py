"""The integer simulator as a back end (``--backend int``), on ``--device`` cpu or
cuda[:i] (:mod:`.device`: the exactness proof there)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer.device import simulator_device
from csqcfs_deploy.simulators.integer.simulator import Simulator


@dataclass
class IntRunner:
    """Runs batches through one :class:`Simulator` (weights prepared once, on ``device``);
    results come back on the CPU."""

    graph: IFGraph
    cfg: RunConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    simulator: Simulator = field(init=False)

    def __post_init__(self) -> None:
        self.simulator = Simulator(self.graph, device=self.device)

    def run(self, x_int: torch.Tensor) -> RunResult:
        return self.simulator.run(x_int, self.cfg)

    def close(self) -> None:
        pass


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> IntRunner:
    """The runner on ``options.device`` (cpu or cuda[:i]; UsageError for any other,
    BackendUnavailable when CUDA is absent)."""
    return IntRunner(graph, cfg, simulator_device(options.device))
