"""Lava's runtime for one network: compile and start once, run steps, stop for sure.

:class:`LavaSession` compiles the processes connected to a root process on
``Loihi2SimCfg(select_tag="fixed_pt")`` and starts Lava's runtime once; its
:meth:`~LavaSession.run_steps` then advances every process by a number of steps
(:func:`await_run` watches Lava's processes while it waits, so a process that
fails raises instead of hanging the host). :meth:`~LavaSession.close` stops Lava
(:func:`shutdown_runtime`), also after an error or Ctrl-C: Lava's processes are
forked with SIGINT ignored, so Ctrl-C reaches only the host, which then stops
them, terminating any that do not stop in time. The session's work directory
(the shared result files, in /dev/shm when usable: :func:`make_workdir`) is
removed on close, or by a finalizer if the session is never closed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csqcfs_deploy.errors import BackendUnavailable
from csqcfs_deploy.simulators.lava.compat import INSTALL_HINT, import_lava

import_lava()

from lava.magma.core.run_conditions import RunSteps  # noqa: E402
from lava.magma.core.run_configs import Loihi2SimCfg  # noqa: E402
from lava.magma.runtime.mgmt_token_enums import MGMT_RESPONSE, enum_equal  # noqa: E402

STOP_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- Lava's processes


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes forked inside inherit SIGINT ignored (the host stops them on Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    wait for processes that are blocked on a dead neighbour). Then terminates,
    by handle, any of its processes still alive, joins the host ends of its
    channels and shuts its shared-memory manager down. Returns the problems
    met, one line each.
    """
    problems: list[str] = []
    actors = _actors(runtime)
    infra = getattr(runtime, "_messaging_infrastructure", None)
    smm = getattr(infra, "smm", None)
    manager_proc = getattr(smm, "_process", None)

    def stop() -> None:
        try:
            runtime.stop()
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            problems.append(f"Lava stop: {type(exc).__name__}: {exc}")

    stopped = interrupted = False
    if polite and getattr(runtime, "_is_started", False):
        stopper = threading.Thread(target=stop, name="lava-stop", daemon=True)
        stopper.start()
        try:
            stopper.join(timeout_s)
        except KeyboardInterrupt:  # a second Ctrl-C: still end every process, then re-raise
            interrupted = True
        stopped = not stopper.is_alive()
        if not stopped:
            problems.append(f"Lava did not stop within {timeout_s:.0f} s; terminating its "
                            "processes")
    for proc in (*actors, manager_proc):
        if proc is None or not _alive(proc):
            continue
        proc.terminate()
        _join_quietly(proc, 2.0)
        if _alive(proc):
            proc.kill()
            _join_quietly(proc, 2.0)
    if not stopped:
        with contextlib.suppress(OSError, EOFError, ValueError, AttributeError, TypeError):
            runtime.join()  # the host ends of Lava's channels (their threads end)
        if smm is not None:
            with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
                smm.shutdown()
        watchdog = getattr(runtime, "_watchdog_manager", None)
        if watchdog is not None:
            with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
                watchdog.stop()
    if hasattr(runtime, "_is_started"):
        runtime._is_started = False
        runtime._is_running = False
    if interrupted:
        raise KeyboardInterrupt
    return problems


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
    """A fresh directory for result files (in /dev/shm when it is usable)."""
    return Path(tempfile.mkdtemp(prefix="csqcfs-lava-", dir=_shm_dir()))


class LavaSession:
    """The Lava processes connected to ``root``, compiled and started once.

    ``models``: the ProcessModel per process (see :func:`.network.process_models`);
    ``workdir``: the result-file directory, removed by :meth:`close`. Lava's
    processes are forked with SIGINT ignored: Ctrl-C reaches only the host,
    which then stops them.
    """

    def __init__(self, root: Any, models: dict[Any, type], workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self._runtime: Any = None
        self._closed = False
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
            with _children_ignore_sigint():
                try:
                    root.create_runtime(executable=executable)
                except (RuntimeError, OSError, ValueError, EOFError) as exc:
                    raise BackendUnavailable(f"Lava failed to start its processes "
                                             f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
                                             ) from None
                finally:
                    self._runtime = root.runtime
                    self._finalizer.detach()
                    self._finalizer = weakref.finalize(self, _cleanup, workdir, self._runtime)
            t2 = time.perf_counter()
        except BaseException:
            self.close(polite=False)
            raise
        self.compile_s = t1 - t0
        self.start_s = t2 - t1

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

        ``polite``: ask Lava to stop first (False after a failure: terminate).
        """
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        if self._runtime is not None:
            problems = shutdown_runtime(self._runtime, polite=polite)
        self._finalizer.detach()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


def _cleanup(directory: Path, runtime: Any) -> None:
    """Finalizer of a session that was never closed (interpreter exit or garbage)."""
    if runtime is not None:
        shutdown_runtime(runtime, timeout_s=5.0)
    shutil.rmtree(directory, ignore_errors=True)


def _shm_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and _writable(shm) else None


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False
