"""Signals with the real Lava back end end every Lava worker, and leave nothing behind.

The real CLI (``run --backend lava``) runs in a subprocess of its own session (so
a Ctrl-C can be sent to its whole process group, as a terminal does) with its
stdout and stderr on pipes. Once Lava's workers exist, SIGTERM, SIGHUP (to the
host) or Ctrl-C (to the group, during Lava's start-up) must end the command
with ``128 + signum`` and one error line; every descendant recorded before the
signal (Lava's workers, its shared-memory manager, the resource tracker) must
be gone, every /dev/shm file they had mapped unlinked, our work directory
removed, and the stdout pipe must reach EOF (a caller capturing output does not
hang). A SIGKILL of the host must end the workers too (their death signal); the
work directory it leaves is swept by the next session.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.ir import save_graph
from csqcfs_deploy.simulators.lava import guard
from csqcfs_deploy.simulators.lava.session import WORKDIR_PREFIX, sweep_stale_workdirs
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.datasets import DIGITS_ENCODING

from .conftest import randomize_batchnorm

SHM = Path("/dev/shm")
LAVA_FORKS = 9          # 7 processes of the graph below, the runtime service, the manager
START_TIMEOUT_S = 240.0  # the CLI's imports and Lava's compile on a loaded 2-core machine
EXIT_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 15.0
CLI = [sys.executable, "-c", "import sys; from csqcfs_deploy.cli import main; sys.exit(main())"]


# --------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (from the ppid of every process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (a zombie counts as ended)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"}


def shm_files(pids: set[int]) -> set[Path]:
    """The /dev/shm files the processes map (Lava's segments, our result files)."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(str(SHM) + "/"):
                found.add(Path(parts[5].replace(" (deleted)", "")))
    return found


def workdirs(pid: int) -> list[Path]:
    return list(SHM.glob(f"{WORKDIR_PREFIX}{pid}-*"))


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())


# --------------------------------------------------------------------------- the command


class Command:
    """The CLI in a session of its own; its stdout and stderr read by threads."""

    def __init__(self, graph: Path, samples: int, timesteps: int) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "run", str(graph), "--backend", "lava", "-T", str(timesteps),
             "--samples", str(samples)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.stdout_eof = threading.Event()
        self.stderr_lines: list[tuple[float, str]] = []   # (monotonic time, line)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        while self.proc.stdout.read(65536):
            pass
        self.stdout_eof.set()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append((time.monotonic(), line.decode(errors="replace")))

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.stderr_lines)

    def error_line_at(self) -> float | None:
        """When the ``error:`` line came (monotonic), or None (a progress bar may still
        stand before it on its line)."""
        return next((t for t, line in self.stderr_lines if "error:" in line), None)

    def kill_all(self) -> None:
        """Test clean-up: whatever is left of the command's process group."""
        with_group = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in with_group:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conv -> IF -> conv -> IF -> dense readout on 1x8x8 (7 Lava processes)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), CSQCFS(4, 1),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), CSQCFS(4, 1),
        nn.Flatten(), nn.Linear(256, 10)), seed=1).eval()
    graph = quantize(fold(model, (1, 8, 8), DIGITS_ENCODING).graph, "loihi2")[0]
    return save_graph(graph, tmp_path_factory.mktemp("signals") / "small.ifg")


def _lava_started(cmd: Command, forks: int) -> bool:
    return len(descendants(cmd.proc.pid)) >= forks or cmd.proc.poll() is not None


def _assert_nothing_left(cmd: Command, workers: set[int], mapped: set[Path]) -> None:
    assert wait_until(lambda: not alive(workers), GONE_TIMEOUT_S), \
        f"processes left: {alive(workers)}"
    assert cmd.stdout_eof.wait(5.0), "the stdout pipe never reached EOF"
    assert wait_until(lambda: not any(p.exists() for p in mapped), GONE_TIMEOUT_S), \
        f"/dev/shm files left: {sorted(p for p in mapped if p.exists())}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("signum, phase", [
    (signal.SIGTERM, "run"), (signal.SIGINT, "start-up"),
    pytest.param(signal.SIGHUP, "run", marks=pytest.mark.slow)],   # SIGTERM's path
    ids=["SIGTERM-run", "ctrl-c-start-up", "SIGHUP-run"])
def test_a_signal_ends_every_lava_worker_and_leaves_nothing(
        small_graph: Path, signum: signal.Signals, phase: str) -> None:
    cmd = Command(small_graph, samples=300, timesteps=8)
    try:
        if phase == "start-up":   # Lava has begun to fork its workers
            assert wait_until(lambda: _lava_started(cmd, 2), START_TIMEOUT_S, poll_s=0.005)
        else:                     # every worker is up and samples are running
            assert wait_until(lambda: _lava_started(cmd, LAVA_FORKS)
                              and "lava T=" in cmd.stderr, START_TIMEOUT_S)
        assert cmd.proc.poll() is None, cmd.stderr
        workers = descendants(cmd.proc.pid)
        mapped = shm_files(workers | {cmd.proc.pid})
        sent = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(cmd.proc.pid, signum)       # a terminal's Ctrl-C: the whole group
        else:
            cmd.proc.send_signal(signum)          # to the host only
        code = cmd.proc.wait(EXIT_TIMEOUT_S)
        exited = time.monotonic() - sent
        assert code == 128 + signum, cmd.stderr
        assert wait_until(lambda: cmd.error_line_at() is not None, 5.0), cmd.stderr
        said = (cmd.error_line_at() or sent) - sent
        print(f"{signum.name} during {phase}: error line after {said:.2f} s (Lava stopped), "
              f"exit {code} after {exited:.2f} s; {len(workers)} workers, "
              f"{len(mapped)} /dev/shm files")
        _assert_nothing_left(cmd, workers, mapped)
        assert not workdirs(cmd.proc.pid)
        err = cmd.stderr
        assert "Traceback" not in err and "leaked" not in err, err
        assert "error:" in err.strip().splitlines()[-1], err
    finally:
        cmd.kill_all()


@pytest.mark.slow
def test_sigkill_of_the_host_ends_every_lava_worker(small_graph: Path) -> None:
    """The workers' death signal ends them; the resource tracker then unlinks Lava's
    segments; the next session removes the work directory the host left."""
    cmd = Command(small_graph, samples=300, timesteps=8)
    try:
        assert wait_until(lambda: _lava_started(cmd, LAVA_FORKS) and "lava T=" in cmd.stderr,
                          START_TIMEOUT_S)
        assert cmd.proc.poll() is None, cmd.stderr
        workers = descendants(cmd.proc.pid)
        segments = {p for p in shm_files(workers) if not p.name.startswith(WORKDIR_PREFIX)
                    and WORKDIR_PREFIX not in str(p.parent)}
        cmd.proc.kill()
        assert cmd.proc.wait(EXIT_TIMEOUT_S) == -signal.SIGKILL
        _assert_nothing_left(cmd, workers, segments)
        left = workdirs(cmd.proc.pid)
        assert left, "a SIGKILLed host cannot remove its work directory"
        assert set(left) <= set(sweep_stale_workdirs(SHM))
        assert not workdirs(cmd.proc.pid)
    finally:
        cmd.kill_all()


# --------------------------------------------------------------------------- the guard alone


def _report_child_state(conn: multiprocessing.connection.Connection) -> None:
    """In a forked child: its death signal and its ignored-signal mask, then wait."""
    death = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(death), 0, 0, 0)  # GET_PDEATHSIG
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("SigIgn:")), 16)
    conn.send((death.value, ignored))
    time.sleep(60)


def test_ctrl_c_while_forking_is_raised_within_a_second_and_children_are_guarded() -> None:
    """A Ctrl-C that lands in a fork is not dropped by an at-fork callback (as it was in
    Lava's start-up): it is raised in the host right after the fork; every child forked
    in the guarded block ignores the host's signals, has SIGKILL as its death signal and
    is reported (also one whose start the Ctrl-C interrupted)."""
    ctx = multiprocessing.get_context("fork")
    children: list[multiprocessing.process.BaseProcess] = []
    reports = []
    forked = guard.Forked()
    guard.open_guard()
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            with guard.guarded_forks() as forked:
                timer.start()
                start = time.monotonic()
                while time.monotonic() < start + 10.0:   # fork back to back, as Lava does
                    ours, theirs = ctx.Pipe()
                    child = ctx.Process(target=_report_child_state, args=(theirs,))
                    reports.append(ours)
                    child.start()
                    children.append(child)
        latency = time.monotonic() - start - 0.3
        assert latency < 1.0, f"Ctrl-C raised after {latency:.2f} s"
        assert children and {c.pid for c in children} <= set(forked.pids)
        for conn in reports[:len(children)]:
            death, ignored = conn.recv()
            assert death == signal.SIGKILL
            for signum in guard.HOST_SIGNALS:
                assert ignored >> (signum - 1) & 1, signum
    finally:
        guard.close_guard()
        for pid in forked.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for child in children:
            child.join(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_work_directories_of_dead_hosts_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{WORKDIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{WORKDIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{WORKDIR_PREFIX}xyz"
    for d in (stale, live, other):
        d.mkdir()
        (d / "input.bin").write_bytes(b"0" * 8)
    assert sweep_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
