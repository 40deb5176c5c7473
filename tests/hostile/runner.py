"""Run the CLI on hostile inputs and judge what a user would see.

Two ways to run a command: :class:`ForkServer` (a worker that forks a child per
command: fast, the imports done once) and :func:`run_subprocess` (a fresh
``python -m csqcfs_deploy.cli`` per command: slow, but import-time noise shows).
Both give an :class:`Outcome`; :func:`problems` lists what is wrong with it for a
bad input: exit 0, a crash (a signal), a hang, stderr other than exactly one line
``error: ...``, an internal error or a traceback, files left behind, a payload
that ran, a message that does not name the file.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORKSERVER = Path(__file__).with_name("forkserver.py")
REPO = Path(__file__).resolve().parents[2]
#: address space a command may use beyond the worker's (a bomb fails instead of eating RAM)
EXTRA_MEMORY_BYTES = 4 << 30
DEFAULT_TIMEOUT_S = 60.0
#: address space of a fresh interpreter: importing torch and Lava takes about 3.5 GiB
SUBPROCESS_MEMORY_BYTES = 8 << 30


@dataclass(frozen=True)
class Outcome:
    """What one command did: exit status (negative: killed by that signal), output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def stderr_lines(self) -> list[str]:
        """The non-empty stderr lines as a terminal shows them (a ``\\r`` returns to
        the start of the line, so a cleared progress bar leaves nothing)."""
        lines = (raw.rsplit("\r", 1)[-1].strip() for raw in self.stderr.split("\n"))
        return [line for line in lines if line]


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


class ForkServer:
    """A worker process (:mod:`tests.hostile.forkserver`) that runs each request in a
    forked child; use as a context manager."""

    def __init__(self, log_path: Path, startup_timeout_s: float = 300.0) -> None:
        self._log = log_path.open("w")
        self._proc = subprocess.Popen(
            [sys.executable, str(FORKSERVER)], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self._startup_timeout_s = startup_timeout_s
        self._ready = False

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if not self._ready:
            hello = self._proc.stdout.readline()
            if not hello:
                raise RuntimeError(f"fork server did not start (see {self._log.name})")
            self._ready = True
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (see {self._log.name})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _limits(self, timeout_s: float) -> dict[str, Any]:
        return {"timeout_s": timeout_s,
                "mem_bytes": _vm_size_bytes() + EXTRA_MEMORY_BYTES}

    def main(self, argv: Sequence[str], cwd: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
             env: dict[str, str] | None = None) -> Outcome:
        """``csqcfs-deploy argv`` in ``cwd``, in a fresh child."""
        reply = self._request({"argv": list(argv), "cwd": str(cwd), "env": env or {},
                               **self._limits(timeout_s)})
        return _outcome(tuple(argv), reply)

    def load(self, loader: str, path: Path, timeout_s: float = 30.0) -> Outcome:
        """One loader ("model", "netx" or "ifg") on ``path``, in a fresh child."""
        reply = self._request({"load": loader, "path": str(path), "cwd": str(path.parent),
                               **self._limits(timeout_s)})
        return _outcome(("load", loader, str(path)), reply)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


def _outcome(argv: tuple[str, ...], reply: dict[str, Any]) -> Outcome:
    return Outcome(argv, int(reply["returncode"]), str(reply["stdout"]),
                   str(reply["stderr"]), float(reply["seconds"]), bool(reply["timed_out"]))


def _child_limits() -> None:
    os.setpgid(0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limit = SUBPROCESS_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_subprocess(argv: Sequence[str], cwd: Path, timeout_s: float = 300.0,
                   env: dict[str, str] | None = None) -> Outcome:
    """``python -m csqcfs_deploy.cli argv`` in a fresh interpreter (its group killed
    after ``timeout_s``)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "csqcfs_deploy.cli", *argv], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            env={**os.environ, **(env or {})}, preexec_fn=_child_limits)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return Outcome(tuple(argv), proc.returncode, out, err, time.monotonic() - started,
                   timed_out)


# --------------------------------------------------------------------------- judging


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (hidden ones too), relative."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found.update(str(rel / name) for name in dirnames + filenames)
    return found


@dataclass(frozen=True)
class Expectation:
    """What a bad input must not do besides the universal rules (:func:`problems`)."""

    names: tuple[str, ...] = ()          # the error line must name one of these
    markers: tuple[Path, ...] = ()       # files a payload would create
    may_succeed: bool = False            # exit 0 (with nothing on stderr) is fine too


def _short(text: str, chars: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars] + "..."


def problems(outcome: Outcome, left_behind: Iterable[str] = (),
             expect: Expectation | None = None) -> list[str]:
    """What is wrong with ``outcome`` for a bad input (empty: handled well)."""
    expect = expect or Expectation()
    found: list[str] = []
    if outcome.timed_out:
        found.append(f"hang: killed after {outcome.seconds:.0f} s")
    elif outcome.returncode < 0:
        found.append(f"crash: {signal.Signals(-outcome.returncode).name}")
    elif outcome.returncode == 0 and not expect.may_succeed:
        found.append("accepted: exit 0")
    lines = outcome.stderr_lines()
    succeeded = outcome.returncode == 0 and expect.may_succeed
    if "Traceback (most recent call last)" in outcome.stderr:
        found.append("traceback: " + _short(lines[-1] if lines else ""))
    elif succeeded:
        pass
    elif len(lines) != 1:
        found.append(f"{len(lines)} stderr lines: " + _short(" | ".join(lines[:4])))
    elif not lines[0].startswith("error:"):
        found.append("not an error: line: " + _short(lines[0]))
    elif "internal error" in lines[0]:
        found.append(_short(lines[0]))
    elif expect.names and not any(name in lines[0] for name in expect.names):
        found.append(f"message does not name {expect.names[0]}: " + _short(lines[0]))
    for marker in expect.markers:
        if marker.exists():
            found.append(f"payload ran: {marker.name} was created")
    left = sorted(left_behind)
    if left and not succeeded:  # a command that may succeed writes its output
        found.append("left behind: " + ", ".join(left[:5]))
    return found
