"""The integer simulator as a back end (``--backend int``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer.simulator import Simulator


@dataclass
class IntRunner:
    """Runs batches through one :class:`Simulator` (weights prepared once)."""

    graph: IFGraph
    cfg: RunConfig
    simulator: Simulator = field(init=False)

    def __post_init__(self) -> None:
        self.simulator = Simulator(self.graph)

    def run(self, x_int: torch.Tensor) -> RunResult:
        return self.simulator.run(x_int, self.cfg)

    def close(self) -> None:
        pass


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> IntRunner:
    if options.device != "cpu":
        raise UsageError("the integer simulator runs on the CPU (--device cpu)")
    return IntRunner(graph, cfg)
