"""Lava's runtime for one network: compile and start once, run steps, stop for sure.

:class:`LavaSession` compiles the processes connected to a root process on
``Loihi2SimCfg(select_tag="fixed_pt")`` and starts Lava's runtime once; its
:meth:`~LavaSession.run_steps` then advances every process by a number of steps
(:func:`await_run` watches Lava's processes while it waits, so a process that
fails raises instead of hanging the host). :meth:`~LavaSession.close` stops Lava
(:func:`shutdown_runtime`), also after an error, Ctrl-C, SIGTERM or SIGHUP:
Lava's processes ignore those signals and die with the host (:mod:`.guard`), so
a signal reaches only the host, which then stops them (killing any that do not
stop in time, or at once after a signal). The session's work directory (the
shared result files, in /dev/shm when usable: :func:`make_workdir`) is removed
on close, or by a finalizer if the session is never closed; one left by a host
that was killed is removed by the next session (:func:`sweep_stale_workdirs`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from csqcfs_deploy.errors import BackendUnavailable
from csqcfs_deploy.simulators.lava.compat import INSTALL_HINT, import_lava
from csqcfs_deploy.simulators.lava.guard import (
    Forked,
    close_guard,
    deferred,
    guarded_forks,
    open_guard,
    pending_signal,
    signals_seen,
)

import_lava()

from lava.magma.core.run_conditions import RunSteps  # noqa: E402
from lava.magma.core.run_configs import Loihi2SimCfg  # noqa: E402
from lava.magma.runtime.mgmt_token_enums import MGMT_RESPONSE, enum_equal  # noqa: E402

STOP_TIMEOUT_S = 20.0
WORKDIR_PREFIX = "csqcfs-lava-"


# --------------------------------------------------------------------------- Lava's processes


def _actors(runtime: Any) -> list[Any]:
    infra = getattr(runtime, "_messaging_infrastructure", None)
    return list(getattr(infra, "actors", []) or [])


def _child_errors(runtime: Any) -> list[str]:
    """One line per exception raised inside Lava's processes."""
    lines = []
    for actor in _actors(runtime):
        with contextlib.suppress(ValueError, OSError, EOFError):
            exc = actor.exception
            if exc:
                err = exc[0]
                lines.append(f"{type(err).__name__}: {err}")
    return lines


def _alive(proc: Any) -> bool:
    try:
        return bool(proc.is_alive())
    except ValueError:  # closed: Lava already joined it
        return False


def shutdown_runtime(runtime: Any, polite: bool = True,
                     timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop a Lava runtime and make sure every process it started has ended.

    ``polite``: first ask Lava to stop (in a helper thread, so a wedged runtime
    cannot hang the host; skipped after a failure, when Lava's own stop would
    wait for processes that are blocked on a dead neighbour; cut short by a
    signal). Then kills, by handle, any of its processes still alive (they
    ignore SIGTERM: :mod:`.guard`), joins the host ends of its channels and asks
    its shared-memory manager to shut down, which unlinks Lava's /dev/shm
    segments. Signals that arrive meanwhile are raised when it is done. Returns
    the problems met, one line each.
    """
    with deferred():
        problems: list[str] = []
        stopped = polite and _stop_politely(runtime, timeout_s, problems)
        if not stopped:
            _stop_by_force(runtime)
        if hasattr(runtime, "_is_started"):
            runtime._is_started = False
            runtime._is_running = False
    return problems


def _stop_politely(runtime: Any, timeout_s: float, problems: list[str]) -> bool:
    """Lava's own stop, waited for up to ``timeout_s`` or until a signal comes; whether
    it finished."""
    if not getattr(runtime, "_is_started", False):
        return False

    def stop() -> None:
        try:
            runtime.stop()
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            problems.append(f"Lava stop: {type(exc).__name__}: {exc}")

    stopper = threading.Thread(target=stop, name="lava-stop", daemon=True)
    stopper.start()
    deadline = time.monotonic() + timeout_s
    while stopper.is_alive() and not pending_signal() and time.monotonic() < deadline:
        stopper.join(0.05)
    if stopper.is_alive():
        problems.append("Lava was interrupted while it stopped; killing its processes"
                        if pending_signal() else
                        f"Lava did not stop within {timeout_s:.0f} s; killing its processes")
        return False
    return True


def _stop_by_force(runtime: Any) -> None:
    """Kill Lava's processes still alive, end the host side, shut the manager down."""
    infra = getattr(runtime, "_messaging_infrastructure", None)
    smm = getattr(infra, "smm", None)
    alive = [proc for proc in _actors(runtime) if _alive(proc)]
    for proc in alive:
        proc.kill()
    for proc in alive:
        _join_quietly(proc, 2.0)
    with contextlib.suppress(OSError, EOFError, ValueError, AttributeError, TypeError):
        runtime.join()  # the host ends of Lava's channels (their threads end)
    if smm is not None:
        manager = getattr(getattr(smm, "_manager", None), "_process", None)
        with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
            smm.shutdown()  # the manager unlinks its segments and exits
        if manager is not None and _alive(manager):
            manager.kill()
            _join_quietly(manager, 2.0)
    watchdog = getattr(runtime, "_watchdog_manager", None)
    if watchdog is not None:
        with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
            watchdog.stop()


def await_run(runtime: Any, poll_max_s: float = 0.005) -> None:
    """Wait until Lava's runtime services report the run done, watching its processes.

    Lava's own blocking wait hangs when a process fails (its neighbours block on
    the dead process's channel, so no error ever reaches the host); here a
    process that ends during a run raises :class:`LavaProcessFailed` with its
    exception. Polls with a growing sleep (0.5 ms up to ``poll_max_s``), which
    also lets Ctrl-C through.
    """
    pending = list(runtime.service_to_runtime)
    actors = _actors(runtime)
    sleep_s = 0.0005
    while pending:
        for port in list(pending):
            if port.probe():
                data = port.recv()
                if not enum_equal(data, MGMT_RESPONSE.DONE):
                    raise LavaProcessFailed(_child_errors(runtime)
                                            or [f"Lava's runtime answered {data}"])
                pending.remove(port)
        if not pending:
            break
        dead = [a for a in actors if not _alive(a)]
        if dead:
            raise LavaProcessFailed(_child_errors(runtime)
                                    or [f"{len(dead)} Lava process(es) ended during the run"])
        time.sleep(sleep_s)
        sleep_s = min(2 * sleep_s, poll_max_s)
    runtime._is_running = False


class LavaProcessFailed(BackendUnavailable):
    """A Lava process ended during a run (internal: :meth:`LavaSession.run_steps` stops Lava
    and reports a one-line BackendUnavailable instead)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _join_quietly(proc: Any, timeout_s: float) -> None:
    """Join with a timeout (Lava's SystemProcess.join() has none: use multiprocessing's)."""
    with contextlib.suppress(ValueError, AssertionError):
        multiprocessing.Process.join(proc, timeout_s)


# --------------------------------------------------------------------------- session


def make_workdir() -> Path:
    """A fresh directory for result files (in /dev/shm when it is usable), named after
    this process; stale ones of dead hosts are removed first."""
    parent = _shm_dir()
    sweep_stale_workdirs(Path(parent or tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))


def sweep_stale_workdirs(parent: Path) -> list[Path]:
    """Remove the work directories in ``parent`` whose host process is gone (a host
    killed by SIGKILL cannot remove its own); returns those removed."""
    removed = []
    with contextlib.suppress(OSError):
        for path in parent.glob(f"{WORKDIR_PREFIX}*-*"):
            pid = path.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and path.is_dir() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    return True


class LavaSession:
    """The Lava processes connected to ``root``, compiled and started once.

    ``models``: the ProcessModel per process (see :func:`.network.process_models`);
    ``workdir``: the result-file directory, removed by :meth:`close`. From start
    to close the host's SIGINT, SIGTERM and SIGHUP raise (and none is lost while
    Lava forks); Lava's processes ignore them and die with the host
    (:mod:`.guard`), so a signal stops them through the host's :meth:`close`.
    """

    def __init__(self, root: Any, models: dict[Any, type], workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self._runtime: Any = None
        self._closed = False
        self._forked = Forked()
        open_guard()
        self._signals_at_open = signals_seen()
        self._finalizer = weakref.finalize(self, _cleanup, workdir, None)
        try:
            t0 = time.perf_counter()
            run_cfg = Loihi2SimCfg(select_tag="fixed_pt", exception_proc_model_map=models)
            try:
                executable = root.compile(run_cfg)
            except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
                raise BackendUnavailable(f"Lava failed to compile the network "
                                         f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
                                         ) from None
            t1 = time.perf_counter()
            self._start(executable)
            t2 = time.perf_counter()
        except BaseException:
            self.close(polite=False)
            raise
        self.compile_s = t1 - t0
        self.start_s = t2 - t1

    def _start(self, executable: Any) -> None:
        """Start Lava's runtime (its processes are forked here, guarded)."""
        try:
            with guarded_forks() as self._forked:
                self.root.create_runtime(executable=executable)
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            raise BackendUnavailable(f"Lava failed to start its processes "
                                     f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
                                     ) from None
        finally:
            self._runtime = getattr(self.root, "runtime", None)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self.workdir, self._runtime)

    @property
    def closed(self) -> bool:
        return self._closed

    def run_steps(self, steps: int) -> None:
        """Advance every process by ``steps`` steps; a failure stops Lava and raises
        BackendUnavailable naming the error raised inside Lava."""
        if self._closed:
            raise BackendUnavailable("the Lava runner is closed (Lava was stopped)")
        try:
            self.root.run(condition=RunSteps(num_steps=steps, blocking=False))
            await_run(self._runtime)
        except LavaProcessFailed as exc:
            self.close(polite=False)
            raise BackendUnavailable(f"Lava failed during the run ({exc}); its processes "
                                     "were stopped") from None
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            self.close(polite=False)
            raise BackendUnavailable(f"Lava failed during the run ({type(exc).__name__}: "
                                     f"{exc}); its processes were stopped") from None

    def close(self, polite: bool = True) -> list[str]:
        """Stop Lava's processes and remove the work directory; idempotent.

        ``polite``: ask Lava to stop first (False after a failure, and after a signal
        since the session opened: kill). A signal during close is raised after it.
        """
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        try:
            with deferred():
                if self._runtime is not None:
                    polite = polite and signals_seen() == self._signals_at_open
                    problems = shutdown_runtime(self._runtime, polite=polite)
                _kill_leftovers(self._forked.pids)
                self._finalizer.detach()
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            close_guard()
        return problems


def _kill_leftovers(pids: list[int]) -> None:
    """Kill and reap the children forked at start-up that are still there after Lava's
    shutdown (a start interrupted between a fork and Lava recording the process);
    through multiprocessing where it knows the process, so its bookkeeping stays right."""
    known = {proc.pid: proc for proc in multiprocessing.active_children()}
    for pid in pids:
        if pid in known:
            known[pid].kill()
            _join_quietly(known[pid], 2.0)
        elif _parent_of(pid) == os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def _parent_of(pid: int) -> int | None:
    """The parent pid of a process (a zombie too), or None when there is none."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cleanup(directory: Path, runtime: Any) -> None:
    """Finalizer of a session that was never closed (interpreter exit or garbage)."""
    try:
        if runtime is not None:
            shutdown_runtime(runtime, timeout_s=5.0)
        shutil.rmtree(directory, ignore_errors=True)
    finally:
        close_guard()


def _shm_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and _writable(shm) else None


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False
