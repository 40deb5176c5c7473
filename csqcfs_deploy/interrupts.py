"""Signals during a command: SIGTERM and SIGHUP unwind like Ctrl-C, and no Ctrl-C is lost.

- :func:`signals_as_exceptions` (the CLI, for a command's lifetime) turns SIGTERM and
  SIGHUP into :class:`Terminated`, which unwinds the stack like ``KeyboardInterrupt``
  so :func:`csqcfs_deploy.files.atomic_path` removes its temporary file.
- :func:`deferred_signals` and :func:`check_signals` keep Ctrl-C (and those two) from
  being lost in HDF5 writes. Python raises ``KeyboardInterrupt`` from its handler at
  the next bytecode; when h5py is closing an object, that bytecode is a weakref
  callback, whose exception Python prints as "Exception ignored" and drops (8 of 8
  Ctrl-C during ``export`` were lost so). Inside :func:`deferred_signals` the
  handler only records the signal; the writer calls :func:`check_signals` between
  short HDF5 calls, which raises it from our own code.

A process forked while a handler is installed (Lava's workers) does not inherit the
conversion: there the signal does what it did before (SIGTERM ends the process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

#: The signals that end a command (with :class:`Terminated`) besides Ctrl-C.
TERMINATING: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException like ``KeyboardInterrupt``, so that no
    ``except Exception`` on the way swallows it; the CLI exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class _SignalState:
    """Who installed the handlers (their pid), how deep :func:`deferred_signals` is
    nested, and the signals recorded meanwhile."""

    owner_pid: int = 0
    depth: int = 0
    pending: list[int] = field(default_factory=list)


_STATE = _SignalState()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Record the signal inside :func:`deferred_signals`, raise it outside; in a forked
    child, give the signal its default action (a Lava worker dies as it used to)."""
    if os.getpid() != _STATE.owner_pid:
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT
                      else signal.default_int_handler)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        return
    if _STATE.depth:
        _STATE.pending.append(signum)
        return
    _raise_for(signum)


def _install(signums: tuple[int, ...], replaceable: tuple[object, ...]
             ) -> dict[int, object]:
    """Put :func:`_on_signal` on each signal whose handler is one of ``replaceable`` (a
    signal ignored on purpose, e.g. SIGHUP under nohup, stays ignored); return the
    handlers replaced."""
    replaced: dict[int, object] = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if any(current is r for r in replaceable):
            replaced[signum] = current
            signal.signal(signum, _on_signal)
    _STATE.owner_pid = os.getpid()
    return replaced


def _restore(replaced: dict[int, object]) -> None:
    for signum, handler in replaced.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """For a command's lifetime: SIGTERM and SIGHUP raise :class:`Terminated` (where
    their action is the default one). Outside the main thread it does nothing."""
    if not _in_main_thread():
        yield
        return
    replaced = _install(tuple(TERMINATING), (signal.SIG_DFL,))
    try:
        yield
    finally:
        _restore(replaced)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Inside: Ctrl-C (where Python's default handler has it) and, under
    :func:`signals_as_exceptions`, SIGTERM and SIGHUP are recorded, not raised; they
    are raised by the next :func:`check_signals` or when the block ends normally.
    Keep the code between two checks short (one slice of a dataset: ~0.1 s)."""
    if not _in_main_thread():
        yield
        return
    outer = _STATE.depth == 0
    replaced = _install((signal.SIGINT,), (signal.default_int_handler,)) if outer else {}
    _STATE.depth += 1
    pending: list[int] = []
    try:
        yield
    finally:
        _STATE.depth -= 1
        if outer:
            _restore(replaced)
            pending, _STATE.pending = _STATE.pending, []
    if pending:
        _raise_for(pending[0])


def check_signals() -> None:
    """Raise the first signal recorded by :func:`deferred_signals` (``KeyboardInterrupt``
    or :class:`Terminated`); nothing when none came."""
    if _STATE.pending:
        first = _STATE.pending[0]
        _STATE.pending.clear()
        _raise_for(first)
