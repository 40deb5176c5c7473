"""The commands' sharded runs: what one worker does with its shard, and the merge.

A command opens :func:`sharding` once (``None`` when it runs in one process) and
calls :func:`evaluate_on` / :func:`verify_on` / :func:`count_on`: in one process
these are :func:`~csqcfs_deploy.run.evaluation.evaluate`,
:func:`~csqcfs_deploy.run.verify.verify` and the report's counting; sharded, each
worker runs that same function on its shard (:mod:`csqcfs_deploy.cli.workers`) and
the parts are merged (:mod:`csqcfs_deploy.run.shards`).

The graph travels by file: the parent writes it once as an ``.ifg`` to a temporary
directory and each local worker loads it itself; Ray workers, which may be on other
machines, get the same ``.ifg`` bytes through Ray's object store.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from csqcfs_deploy.cli.workers import Parallel, Progress, ShardPool, open_pool
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.ifg import graph_from_bytes, graph_to_bytes, load_graph, save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.evaluation import EvalSummary, evaluate
from csqcfs_deploy.run.shards import (
    ReportCounts,
    Shard,
    merge_evaluations,
    merge_report_counts,
    merge_verifications,
    plan_shards,
)
from csqcfs_deploy.run.verify import VerifyResult, verify


@dataclass(frozen=True)
class GraphRef:
    """Where a worker finds the graph: an ``.ifg`` ``path``, or its bytes (Ray)."""

    path: str | None = None
    data: bytes | None = None

    def load(self) -> IFGraph:
        if self.path is not None:
            return load_graph(self.path)
        return graph_from_bytes(self.data or b"", "<ifg sent to the Ray worker>")


@dataclass(frozen=True)
class Sharder:
    """An open pool and the graph it runs (one per command)."""

    pool: ShardPool
    graph: GraphRef

    def shards(self, samples: int, batch_size: int) -> list[Shard]:
        return plan_shards(samples, batch_size, self.pool.width)


@contextlib.contextmanager
def sharding(parallel: Parallel, graph: IFGraph) -> Iterator[Sharder | None]:
    """The pool ``parallel`` asks for with ``graph`` written for it; None for one process."""
    if not parallel.sharded:
        yield None
        return
    with open_pool(parallel) as pool:
        if parallel.ray is not None:
            yield Sharder(pool, GraphRef(data=graph_to_bytes(graph)))
            return
        with tempfile.TemporaryDirectory(prefix="csqcfs-shards-") as tmp:
            path = save_graph(graph, Path(tmp) / "graph.ifg")
            yield Sharder(pool, GraphRef(path=str(path)))


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class EvalJob:
    """One shard of :func:`evaluate`: its raw samples and labels."""

    shard: Shard
    graph: GraphRef
    backend: str
    raw: NDArray[Any]
    labels: NDArray[np.integer[Any]]
    cfg: RunConfig
    batch_size: int
    options: BackendOptions


def evaluate_task(job: EvalJob, progress: Progress) -> EvalSummary:
    """In a worker: :func:`evaluate` on the job's shard."""
    return evaluate(job.backend, job.graph.load(), job.raw, job.labels, job.cfg,
                    job.batch_size, job.options, progress=False, on_batch=progress)


def evaluate_on(sharder: Sharder | None, backend: str, graph: IFGraph, raw: NDArray[Any],
                labels: NDArray[np.integer[Any]], cfg: RunConfig, batch_size: int,
                options: BackendOptions, progress: bool) -> EvalSummary:
    """:func:`evaluate`, in one process (``sharder`` None) or over the shards."""
    if sharder is None:
        return evaluate(backend, graph, raw, labels, cfg, batch_size, options,
                        progress=progress)
    start = time.perf_counter()
    worker_options = BackendOptions(device=options.device, progress=False)
    shards = sharder.shards(len(raw), batch_size)
    jobs = [EvalJob(s, sharder.graph, backend, raw[s.start:s.stop], labels[s.start:s.stop],
                    cfg, batch_size, worker_options) for s in shards]
    parts = sharder.pool.map(evaluate_task, jobs, len(raw),
                             f"{backend} T={cfg.timesteps} P={cfg.presim}", progress)
    return merge_evaluations(graph, cfg, list(zip(shards, parts, strict=True)), labels,
                             time.perf_counter() - start)


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyJob:
    """One shard of :func:`verify`: its integer inputs."""

    shard: Shard
    graph: GraphRef
    x_int: NDArray[Any]
    timesteps: int
    presim: int
    backends: tuple[str, ...]
    batch_size: int
    options: BackendOptions


def verify_task(job: VerifyJob, progress: Progress) -> VerifyResult:
    """In a worker: :func:`verify` on the job's shard (sample indices from 0)."""
    return verify(job.graph.load(), torch.from_numpy(job.x_int), job.timesteps, job.presim,
                  list(job.backends), job.batch_size, job.options, progress=False,
                  on_batch=progress)


def verify_on(sharder: Sharder | None, graph: IFGraph, x_int: torch.Tensor, timesteps: int,
              presim: int, backends: list[str], batch_size: int, options: BackendOptions,
              progress: bool) -> VerifyResult:
    """:func:`verify`, in one process (``sharder`` None) or over the shards."""
    if sharder is None:
        return verify(graph, x_int, timesteps, presim, backends, batch_size, options,
                      progress=progress)
    x_np = x_int.numpy()
    shards = sharder.shards(len(x_np), batch_size)
    jobs = [VerifyJob(s, sharder.graph, x_np[s.start:s.stop], timesteps, presim,
                      tuple(backends), batch_size, options) for s in shards]
    parts = sharder.pool.map(verify_task, jobs, len(x_np), "verify", progress)
    return merge_verifications(list(zip(shards, parts, strict=True)), len(x_np))


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportJob:
    """One shard of the report's counting: its raw samples and labels."""

    shard: Shard
    graph: GraphRef
    raw: NDArray[Any]
    labels: NDArray[np.integer[Any]]
    cfg: RunConfig
    batch_size: int


def report_task(job: ReportJob, progress: Progress) -> ReportCounts:
    """In a worker: the report's counting on the job's shard."""
    from csqcfs_deploy.cli.commands.report import count_report  # the command imports us

    return count_report(job.graph.load(), job.raw, job.labels, job.cfg, job.batch_size,
                        progress=False, on_batch=progress)


def count_on(sharder: Sharder | None, graph: IFGraph, raw: NDArray[Any],
             labels: NDArray[np.integer[Any]], cfg: RunConfig, batch_size: int,
             progress: bool) -> ReportCounts:
    """The report's counting, in one process (``sharder`` None) or over the shards."""
    from csqcfs_deploy.cli.commands.report import count_report  # the command imports us

    if sharder is None:
        return count_report(graph, raw, labels, cfg, batch_size, progress)
    shards = sharder.shards(len(raw), batch_size)
    jobs = [ReportJob(s, sharder.graph, raw[s.start:s.stop], labels[s.start:s.stop], cfg,
                      batch_size) for s in shards]
    parts = sharder.pool.map(report_task, jobs, len(raw), "report", progress)
    return merge_report_counts(list(zip(shards, parts, strict=True)), len(raw))
