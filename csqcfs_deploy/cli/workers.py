"""Run one task per shard in local worker processes (``--workers N``) or on Ray (``--ray``).

:func:`open_pool` gives a :class:`ShardPool`; its :meth:`~ShardPool.map` runs
``task(job, progress)`` once per job, each in its own worker, shows one progress bar of
the samples done across all workers, and returns the results in job order. Every job
carries its :class:`~csqcfs_deploy.run.shards.Shard`, so a failure names it:

* a task that raises a :class:`~csqcfs_deploy.errors.CsqcfsError` raises the same
  error in the parent, prefixed by the shard (same exit code);
* a worker that dies (killed, out of memory) or raises anything else is a
  :class:`~csqcfs_deploy.errors.WorkerFailed` naming the shard and the reason.

Either way the other workers are stopped and nothing is merged: a failure is never a
smaller sample count.

Local workers: one :class:`~concurrent.futures.ProcessPoolExecutor` of one process per
shard (so a dead process breaks only its own shard's pool and is named exactly), started
with the ``forkserver`` method (Lava, inside a worker, forks its own processes; the
worker itself is a clean fork of the server, not of this multi-threaded parent), torch
limited to one thread per worker. Ray: ``--ray local`` starts a local cluster of
``--workers`` CPUs (default 2) for the command and stops it after; any other address
joins that cluster. Ray is the optional extra ``ray``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from csqcfs_deploy.errors import BackendUnavailable, CsqcfsError, UsageError, WorkerFailed
from csqcfs_deploy.run.shards import Shard

#: ``--ray local`` without ``--workers``: CPUs of the local cluster
DEFAULT_RAY_CPUS = 2
#: how often the parent drains the progress queue, seconds
POLL_S = 0.2
#: test-only: a worker whose shard index (0-based) this names kills itself with SIGKILL
KILL_SHARD_ENV = "CSQCFS_TEST_KILL_SHARD"
RAY_HINT = ("install the 'ray' extra: .venv/bin/python -m pip install -c "
            "requirements/constraints.txt ray==2.60.0 (or pip install 'csqcfs-deploy[ray]')")


@dataclass(frozen=True)
class Parallel:
    """How a command runs its samples: ``workers`` local processes, or on the Ray
    cluster at ``ray`` (``"local"``: one started here)."""

    workers: int | None = None
    ray: str | None = None

    @property
    def sharded(self) -> bool:
        return self.ray is not None or (self.workers or 1) > 1


def add_parallel_args(parser: Any) -> None:
    """``--workers N`` and ``--ray ADDRESS`` (for run, sweep, verify, report)."""
    from csqcfs_deploy.cli.arg_types import positive_int

    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="split the samples into N contiguous shards, one local worker "
                        "process each (with --ray: the shards, and the CPUs of --ray local; "
                        "default 2 there). Shards are whole batches, so that the merged "
                        "result equals one process's: give a --batch-size of at most "
                        "samples / N to use every worker")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run the shards on an existing Ray cluster at ADDRESS, or "
                        "'local' to start one here (needs the 'ray' extra)")


def parallel_of(args: Any) -> Parallel:
    return Parallel(getattr(args, "workers", None), getattr(args, "ray", None))


class Progress:
    """A task's progress sink: ``progress(samples)`` after each batch."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def __call__(self, samples: int) -> None:
        self.sink.put(("samples", samples))


def _prepare_worker() -> None:
    """In each worker: one torch thread (the workers share the cores), and ``fork`` as
    the start method of the processes it starts itself (Lava's runtime needs it; a
    forkserver child inherits 'forkserver', which Lava refuses)."""
    import torch

    multiprocessing.set_start_method("fork", force=True)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _kill_shard() -> str | None:
    """The parent's test-only kill hook (read there: a forkserver's children inherit the
    server's environment, not the parent's)."""
    return os.environ.get(KILL_SHARD_ENV)


def _run_task(task: Callable[[Any, Progress], Any], job: Any, sink: Any,
              kill: str | None = None) -> Any:
    """A worker's entry: report its pid, honour the test-only kill hook, run ``task``."""
    sink.put(("pid", job.shard.index, os.getpid()))
    if kill == str(job.shard.index):
        os.kill(os.getpid(), signal.SIGKILL)
    return task(job, Progress(sink))


def shard_error(shard: Shard, exc: BaseException) -> CsqcfsError:
    """The parent's error for a shard whose worker failed with ``exc``."""
    if isinstance(exc, CsqcfsError):
        try:
            return type(exc)(f"{shard.describe()}: {exc}")
        except TypeError:  # a subclass with other constructor arguments
            return WorkerFailed(f"{shard.describe()}: {exc}")
    if isinstance(exc, BrokenProcessPool):
        return WorkerFailed(f"the worker for {shard.describe()} died (killed or crashed: "
                            "out of memory, a signal, or a fault in a native library)")
    return WorkerFailed(f"the worker for {shard.describe()} failed: "
                        f"{type(exc).__name__}: {exc}")


class ShardPool(Protocol):
    """Workers for one command: ``width`` shards at a time."""

    width: int

    def map(self, task: Callable[[Any, Progress], Any], jobs: Sequence[Any], total: int,
            desc: str, progress: bool) -> list[Any]: ...


class _Bar:
    """One progress bar of samples done across all workers."""

    def __init__(self, total: int, desc: str, progress: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress,
                        leave=False)

    def take(self, message: tuple[Any, ...], pids: dict[int, int]) -> None:
        if message[0] == "samples":
            self.bar.update(int(message[1]))
        elif message[0] == "pid":
            pids[int(message[1])] = int(message[2])

    def close(self) -> None:
        self.bar.close()


@dataclass
class LocalPool:
    """``width`` local worker processes (module doc)."""

    width: int

    def map(self, task: Callable[[Any, Progress], Any], jobs: Sequence[Any], total: int,
            desc: str, progress: bool) -> list[Any]:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "csqcfs_deploy.cli.sharded"])
        bar = _Bar(total, desc, progress)
        pids: dict[int, int] = {}
        pools = [ProcessPoolExecutor(1, mp_context=ctx, initializer=_prepare_worker)
                 for _ in jobs]
        with ctx.Manager() as manager:
            sink = manager.Queue()
            finished = False
            try:
                futures = [pool.submit(_run_task, task, job, sink, _kill_shard())
                           for pool, job in zip(pools, jobs, strict=True)]
                self._wait(futures, jobs, sink, bar, pids)
                self._drain(sink, bar, pids)
                finished = True
                return [f.result() for f in futures]
            finally:
                bar.close()
                _stop(pids, pools, finished)

    @staticmethod
    def _wait(futures: list[Future[Any]], jobs: Sequence[Any], sink: Any, bar: _Bar,
              pids: dict[int, int]) -> None:
        """Until every future is done; the first failure (in shard order) raises."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_EXCEPTION)
            LocalPool._drain(sink, bar, pids)
            for future, job in zip(futures, jobs, strict=True):
                if future in done and future.exception() is not None:
                    raise shard_error(job.shard, future.exception())  # type: ignore[arg-type]

    @staticmethod
    def _drain(sink: Any, bar: _Bar, pids: dict[int, int]) -> None:
        while True:
            try:
                bar.take(sink.get_nowait(), pids)
            except queue_mod.Empty:
                return


def _stop(pids: dict[int, int], pools: list[ProcessPoolExecutor], finished: bool) -> None:
    """End the workers: after a failure (or Ctrl-C) those still running get SIGTERM
    (their Lava sessions close); after success they just exit."""
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)
    if not finished:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for pool in pools:
        pool.shutdown(wait=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendUnavailable(f"--ray needs Ray, which is not installed: {RAY_HINT}"
                                 ) from None
    return ray


def _ray_entry(task: Callable[[Any, Progress], Any], job: Any, sink: Any,
               kill: str | None) -> Any:
    """A Ray task's entry: one torch thread, then as a local worker."""
    _prepare_worker()
    return _run_task(task, job, sink, kill)


@dataclass
class RayPool:
    """Tasks on a Ray cluster, one CPU each (module doc)."""

    width: int
    ray: Any

    def map(self, task: Callable[[Any, Progress], Any], jobs: Sequence[Any], total: int,
            desc: str, progress: bool) -> list[Any]:
        from ray.util.queue import Queue

        ray = self.ray
        sink = Queue(actor_options={"num_cpus": 0})
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_entry)
        refs = [remote.remote(task, job, sink, _kill_shard()) for job in jobs]
        bar = _Bar(total, desc, progress)
        pids: dict[int, int] = {}
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                self._drain(sink, bar, pids)
                for ref, job in zip(refs, jobs, strict=True):
                    if ref in ready:
                        self._check(ref, job.shard)
            self._drain(sink, bar, pids)
            return [ray.get(ref) for ref in refs]
        finally:
            bar.close()
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.kill(sink.actor)

    def _check(self, ref: Any, shard: Shard) -> None:
        """Raise the shard's error when its task failed."""
        from ray.exceptions import RayTaskError

        try:
            self.ray.get(ref, timeout=0)
        except RayTaskError as exc:
            raise shard_error(shard, exc.cause if exc.cause is not None else exc) from None
        except self.ray.exceptions.RayError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerFailed(f"the Ray worker for {shard.describe()} died: {reason}"
                               ) from None

    @staticmethod
    def _drain(sink: Any, bar: _Bar, pids: dict[int, int]) -> None:
        while not sink.empty():
            try:
                bar.take(sink.get_nowait(), pids)
            except Exception:  # ray.util.queue.Empty: emptied meanwhile
                return


@contextlib.contextmanager
def open_pool(parallel: Parallel) -> Iterator[ShardPool]:
    """The workers ``parallel`` asks for, for one command (a local Ray cluster is
    started here and stopped on exit)."""
    if parallel.ray is None:
        yield LocalPool(parallel.workers or 1)
        return
    ray = _import_ray()
    local = parallel.ray == "local"
    if not parallel.ray.strip():
        raise UsageError("--ray needs an address (host:port, ray://host:port, auto) or 'local'")
    try:
        if local:
            ray.init(num_cpus=parallel.workers or DEFAULT_RAY_CPUS, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=parallel.ray, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendUnavailable(f"cannot start or join the Ray cluster {parallel.ray!r}: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield RayPool(parallel.workers or cpus, ray)
    finally:
        ray.shutdown()
