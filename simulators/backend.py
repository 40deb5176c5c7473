"""The integer simulator as a back end (``--backend int``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csqcfs_deploy.backends import BackendOptions
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.graph import IFGraph
from csqcfs_deploy.schedule import RunConfig, RunResult

from .integer import simulate


@dataclass
class IntRunner:
    graph: IFGraph
    cfg: RunConfig

    def run(self, x_int: torch.Tensor) -> RunResult:
        return simulate(self.graph, x_int, self.cfg)

    def close(self) -> None:
        pass


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> IntRunner:
    if options.device != "cpu":
        raise UsageError("the integer simulator runs on the CPU (--device cpu)")
    return IntRunner(graph, cfg)
