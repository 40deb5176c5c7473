"""Back ends that run an integer IF graph: ``int`` (the simulator), ``lava``, ``norse``.

A back end is opened once per graph and run configuration and then runs
batches of integer inputs::

    with open_backend("int", graph, cfg) as runner:
        result = runner.run(x_int)          # -> RunResult

Each back end module is imported only when it is asked for; a missing
package becomes :class:`BackendUnavailable` naming what to install.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from csqcfs_deploy.errors import BackendUnavailable, UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, Schedule
from csqcfs_deploy.run.results import RunResult


class Runner(Protocol):
    """A back end prepared for one graph and run configuration."""

    def run(self, x_int: torch.Tensor) -> RunResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendInfo:
    """Where a back end lives and which schedules it runs."""

    name: str
    module: str              # importable module with ``open_runner(graph, cfg, options)``
    schedules: tuple[Schedule, ...]      # the first is the one it runs natively
    install_hint: str
    description: str


@dataclass(frozen=True)
class BackendOptions:
    """How a back end runs: the torch ``device`` (norse) and whether it shows progress."""

    device: str = "cpu"
    progress: bool = False


BACKENDS: dict[str, BackendInfo] = {
    "int": BackendInfo("int", "csqcfs_deploy.simulators.integer.backend",
                       ("synchronous", "pipelined"),
                       "it is part of csqcfs-deploy", "bit-accurate integer simulator"),
    "lava": BackendInfo("lava", "csqcfs_deploy.simulators.lava.runner", ("pipelined",),
                        "install the 'lava' extra (make setup does: lava-nc 0.10 with "
                        "--ignore-requires-python)", "lava-nc fixed-point Loihi 2 simulation"),
    "norse": BackendInfo("norse", "csqcfs_deploy.simulators.norse.runner", ("synchronous",),
                         "install the 'norse' extra (make setup does: norse 1.1 --no-deps, "
                         "nir, nirtorch)", "Norse (PyTorch) module"),
}


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})") from None


def default_schedule(name: str) -> Schedule:
    """The schedule a back end runs natively (its first)."""
    return backend_info(name).schedules[0]


@contextlib.contextmanager
def open_backend(name: str, graph: IFGraph, cfg: RunConfig,
                 options: BackendOptions | None = None) -> Iterator[Runner]:
    """Open back end ``name`` for ``graph`` under ``cfg``; closed on exit, also on error."""
    info = backend_info(name)
    if cfg.schedule not in info.schedules:
        raise UsageError(f"backend {name} runs the {' or '.join(info.schedules)} schedule, "
                         f"not {cfg.schedule}")
    try:
        module = importlib.import_module(info.module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name} is unavailable ({exc.name or exc}): {info.install_hint}"
        ) from None
    runner: Runner = module.open_runner(graph, cfg, options or BackendOptions())
    try:
        yield runner
    finally:
        runner.close()
