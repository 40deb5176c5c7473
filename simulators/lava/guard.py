"""Lava's worker processes end with the host, and no signal is lost while they start.

Lava forks its workers (its shared-memory manager, one process per Lava process,
the runtime service) with multiprocessing's fork start method. Three rules make
them end with the host, the process that runs the command, however it ends:

* **A death signal.** A child forked inside :func:`guarded_forks` (Lava's
  start-up) asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; it exits at once if the parent died before it
  asked), so even a SIGKILL of the host ends every worker; the multiprocessing
  resource tracker, which exits when the last holder of its pipe does, then
  unlinks the shared memory the manager had left. Each such child reports its
  pid (:attr:`Forked.pids`), so a host interrupted in the middle of starting one
  can end it although Lava never learnt of it.
* **The host owns the signals.** Those children ignore SIGINT, SIGTERM and
  SIGHUP: a Ctrl-C or a hang-up reaches the whole process group, and the host
  stops the workers in order instead (so Lava's manager unlinks its /dev/shm
  segments); :mod:`.session` ends a worker that must not wait with SIGKILL.
* **Signals in the host unwind.** While a session is open (:func:`open_guard`
  .. :func:`close_guard`), SIGINT, SIGTERM and SIGHUP raise in the host what the
  handler in place before raises (``KeyboardInterrupt``, the CLI's
  ``Terminated``), or ``SystemExit(128 + signum)`` where that was the default
  action, so the session's close runs. Python drops an exception raised in an
  at-fork callback (this lost Ctrl-C during Lava's start-up) or in ``__del__``:
  a signal that arrives while the host forks is recorded and raised at the
  first call after the fork (a one-shot profile hook), and one raised during
  :func:`guarded_forks` is sent again every :data:`RESEND_S` until it leaves
  the block. Inside :func:`deferred` (a session's shutdown) signals are
  recorded and raised when the block ends.

The state is per process and module-wide because signal handlers and at-fork
hooks are.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1                 # linux/prctl.h
HOST_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REDELIVER_S = 0.005                  # without a profile hook: send again this late
RESEND_S = 0.1                       # a raised signal that did not leave guarded_forks
REPORT_WAIT_S = 1.0                  # how long a guarded block waits for children's pids
ORPHAN_EXIT_CODE = 70                # a child whose parent died before it could ask to follow
_PID = struct.Struct("=i")


@dataclass
class _Guard:
    """The host's handlers and what they saw; the fork hooks' switches."""

    host_pid: int = 0                  # the process whose handlers these are
    sessions: int = 0                  # open sessions
    installed: bool = False            # our handlers are in place
    previous: dict[int, Any] = field(default_factory=dict)
    guarding: int = 0                  # depth of guarded_forks()
    report_fd: int = -1                # guarded children write their pid here
    forks: int = 0                     # guarded forks so far (parent side)
    forking: bool = False              # between our before- and after-fork hooks
    fork_parent_pid: int = 0
    deferring: int = 0                 # depth of deferred()
    pending: list[int] = field(default_factory=list)
    seen: int = 0                      # signals handled in the host so far
    raised: list[int] = field(default_factory=list)   # raised inside guarded_forks()
    hooks: bool = False


_GUARD = _Guard()


def _libc_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


# --------------------------------------------------------------------------- fork hooks


def _before_fork() -> None:
    if _GUARD.guarding:
        _GUARD.forking = True
        _GUARD.fork_parent_pid = os.getpid()


def _after_fork_in_parent() -> None:
    """End of a guarded fork: raise a signal that came during it at the next call."""
    if not _GUARD.forking:
        return
    _GUARD.forks += 1
    if _GUARD.pending and not _GUARD.deferring:
        pending, _GUARD.pending = _GUARD.pending, []
        _deliver_after_fork(pending[0])
    _GUARD.forking = False     # last: a signal during this hook is recorded, not dropped


def _deliver_after_fork(signum: int) -> None:
    """Raise ``signum`` at the first Python event after the at-fork hooks (a one-shot
    profile hook of the main thread); send it again shortly where that cannot be used."""
    if threading.current_thread() is threading.main_thread() and sys.getprofile() is None:
        hook_code = _after_fork_in_parent.__code__

        def deliver(frame: FrameType, event: str, arg: Any) -> None:
            if frame.f_code is hook_code or frame.f_code is _deliver_after_fork.__code__:
                return
            sys.setprofile(None)
            _raise_for(signum, frame)

        sys.setprofile(deliver)
        return
    _send_later(signum, REDELIVER_S)


def _send_later(signum: int, delay_s: float,
                unless: Callable[[], bool] | None = None) -> None:
    def send() -> None:
        if unless is None or not unless():
            os.kill(_GUARD.host_pid, signum)

    timer = threading.Timer(delay_s, send)
    timer.daemon = True
    timer.start()


def _after_fork_in_child() -> None:
    """In a child of a guarded fork: ignore the host's signals, die with the parent,
    report the pid."""
    if not _GUARD.guarding:
        return
    _GUARD.forking = False
    _GUARD.pending = []
    for signum in HOST_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != _GUARD.fork_parent_pid:   # the parent died before prctl
        os._exit(ORPHAN_EXIT_CODE)
    if _GUARD.report_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(_GUARD.report_fd, _PID.pack(os.getpid()))
            os.close(_GUARD.report_fd)
        _GUARD.report_fd = -1


def _register_fork_hooks() -> None:
    """Once per process, as late as possible (at the first session, when Lava, torch and
    logging have registered theirs): ours then run outermost around every fork."""
    if not _GUARD.hooks:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _GUARD.hooks = True


@dataclass
class Forked:
    """The pids of the children forked inside a :func:`guarded_forks` block (filled when
    the block ends)."""

    pids: list[int] = field(default_factory=list)


def _read_pids(fd: int, count: int) -> list[int]:
    """The pids ``count`` children write to ``fd``, waiting up to :data:`REPORT_WAIT_S`
    for those just forked (a child that died first never writes)."""
    data = b""
    deadline = time.monotonic() + REPORT_WAIT_S
    while len(data) < count * _PID.size:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        data += chunk
    usable = len(data) - len(data) % _PID.size
    return [p for (p,) in _PID.iter_unpack(data[:usable])]


@contextlib.contextmanager
def guarded_forks() -> Iterator[Forked]:
    """Children forked inside die with their parent and ignore the host's signals; their
    pids are in the yielded :class:`Forked`. A signal that arrives during one of these
    forks is raised after it; one whose exception was raised but has not left the block
    is sent again, and raised when the block ends."""
    _register_fork_hooks()
    forked = Forked()
    read_fd, write_fd = os.pipe()
    outer_fd = _GUARD.report_fd
    _GUARD.report_fd = write_fd
    _GUARD.guarding += 1
    mark, forks = len(_GUARD.raised), _GUARD.forks
    try:
        yield forked
    finally:
        _GUARD.guarding -= 1
        _GUARD.report_fd = outer_fd
        os.close(write_fd)
        forked.pids = _read_pids(read_fd, _GUARD.forks - forks)
        os.close(read_fd)
        lost = _GUARD.raised[mark:]
        del _GUARD.raised[mark:]
    if lost:
        _raise_for(lost[0], None)


# --------------------------------------------------------------------------- host handlers


def _raise_for(signum: int, frame: FrameType | None) -> None:
    """What the handler in place before ours does for ``signum`` (raises, normally)."""
    previous = _GUARD.previous.get(signum, signal.SIG_DFL)
    if _GUARD.guarding:
        _GUARD.raised.append(signum)
        token = len(_GUARD.raised)
        _send_later(signum, RESEND_S, unless=lambda: len(_GUARD.raised) < token
                    or not _GUARD.guarding)
    if callable(previous):
        previous(signum, frame)
        if _GUARD.guarding:
            _GUARD.raised.pop()   # it did not raise (e.g. it defers the signal itself)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _in_child(signum: int, frame: FrameType | None) -> None:
    """Our handler in a forked child: nothing in a guarded child (its at-fork hook is
    about to ignore the signal), else what the handler before ours does."""
    if _GUARD.guarding:
        return
    previous = _GUARD.previous.get(signum, signal.SIG_DFL)
    signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _GUARD.host_pid:
        _in_child(signum, frame)
        return
    _GUARD.seen += 1
    if _GUARD.forking or _GUARD.deferring:
        _GUARD.pending.append(signum)
        return
    _raise_for(signum, frame)


def signals_seen() -> int:
    """How many signals the host's handler has handled so far (compare two readings)."""
    return _GUARD.seen


def open_guard() -> None:
    """A session opens: in the main thread, the first one installs the host's handlers
    (a signal ignored on purpose, e.g. SIGHUP under nohup, stays ignored)."""
    _GUARD.sessions += 1
    if _GUARD.installed or threading.current_thread() is not threading.main_thread():
        return
    _GUARD.host_pid = os.getpid()
    _GUARD.previous = {}
    for signum in HOST_SIGNALS:
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN and current is not None:
            _GUARD.previous[signum] = current
            signal.signal(signum, _on_signal)
    _GUARD.installed = True


def close_guard() -> None:
    """A session closed: after the last one, the previous handlers are put back (where
    ours are still in place; from the main thread)."""
    _GUARD.sessions = max(0, _GUARD.sessions - 1)
    if (_GUARD.sessions or not _GUARD.installed
            or threading.current_thread() is not threading.main_thread()):
        return
    for signum, previous in _GUARD.previous.items():
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous)
    _GUARD.previous = {}
    _GUARD.installed = False


def pending_signal() -> bool:
    """Whether a signal is waiting to be raised at the end of :func:`deferred`."""
    return bool(_GUARD.pending)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, the host's signals are recorded (:func:`pending_signal`), not raised; the
    first is raised when the outermost block ends (unless it ends by an exception)."""
    _GUARD.deferring += 1
    pending: list[int] = []
    try:
        yield
    finally:
        _GUARD.deferring -= 1
        if not _GUARD.deferring:
            pending, _GUARD.pending = _GUARD.pending, []
    if pending and os.getpid() == _GUARD.host_pid:
        _raise_for(pending[0], None)
