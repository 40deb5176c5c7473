"""Opening an untrusted HDF5 file (NIR, netx) so that a corrupt one cannot crash us.

libhdf5 trusts the bytes it reads: a ``.nir`` with a few flipped bits can segfault
it (exit 139) or loop forever inside one C call, and a 300 KB file whose compressed
chunks declare 382 GiB is expanded on read. No Python ``try`` helps with either, so
:func:`probed_hdf5` first probes the file in a short-lived child process
(:mod:`csqcfs_deploy.exporters.hdf5_walk`, ``python -I``, importing only numpy and
h5py): it opens the file, walks every group, link and attribute, checks every
dataset's declared size against :class:`Hdf5Limits` and then reads every dataset in
full. Only when the child reports success is the file read in-process. A child that
dies by a signal, runs past the timeout or reports an error becomes one
:class:`InputFileError` naming the file.

The file is *pinned* for the probe and the read: it is opened once, and both the
child and the in-process reader open that same inode through ``/proc/self/fd/N``
(where ``/proc`` exists), so a file replaced between the two (an atomic rename by a
concurrent writer) cannot swap a probed file for an unprobed one: the reader sees the
probed bytes, or (HDF5 2.0, which resolves the real path of a deleted inode and fails)
refuses the file.

Limits (:data:`DEFAULT_LIMITS`; a real NIR or netx file of a network that fits the
IF graph's limits stays far below them):

* :attr:`Hdf5Limits.dataset_bytes` (2 GiB): one dataset or attribute, shape x item size;
* :attr:`Hdf5Limits.total_bytes` (4 GiB): all datasets and attributes together;
* :attr:`Hdf5Limits.chunk_bytes` (512 MiB): one chunk (decompressed whole);
* :attr:`Hdf5Limits.objects` (100,000) groups and datasets, nested at most
  :attr:`Hdf5Limits.depth` (64) deep; only hard links (no soft or external ones);
* :meth:`Hdf5Limits.timeout_for` the probe's time: 20 s plus 1 s per 20 MiB of file (a
  digits-cnn ``.nir`` takes well under 1 s; a hang is a corrupt file). The child also
  caps its address space at one dataset at the limit plus 1 GiB and loads no filter
  plugins.

Cost (measured on 2 shared cores, CPU time of the child, median of 5): a digits-cnn
``.nir`` of 0.3 MiB 0.39 s (about 0.35 s of it starting Python and importing h5py;
``nir.read`` in-process takes 0.06 s), a VGG-16 ``.nir`` of 53 MiB 1.5 s (``nir.read``
1.1 s). A forked child (no exec) would start faster but inherits libhdf5's and the
threads' state from a process that has torch loaded; the exec'ed child is clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csqcfs_deploy.errors import InputFileError
from csqcfs_deploy.interrupts import Terminated

GIB = 2**30
MIB = 2**20
WALKER = Path(__file__).with_name("hdf5_walk.py")


@dataclass(frozen=True)
class Hdf5Limits:
    """What one probed HDF5 file may declare and how long its probe may take."""

    dataset_bytes: int = 2 * GIB
    total_bytes: int = 4 * GIB
    chunk_bytes: int = 512 * MIB
    objects: int = 100_000
    depth: int = 64
    timeout_s: float = 20.0
    timeout_s_per_mib: float = 0.05

    def timeout_for(self, file_bytes: int) -> float:
        """The probe's time limit for a file of ``file_bytes``: :attr:`timeout_s` plus
        :attr:`timeout_s_per_mib` per MiB (20 MB/s: decompressing takes longer)."""
        return self.timeout_s + self.timeout_s_per_mib * file_bytes / MIB


DEFAULT_LIMITS = Hdf5Limits()


@dataclass(frozen=True)
class ProbeReport:
    """A probe that passed: objects and datasets walked, bytes declared, wall seconds."""

    objects: int
    datasets: int
    declared_bytes: int
    seconds: float


def _child_env() -> dict[str, str]:
    """The child's environment: one BLAS thread (a faster start), no HDF5 plugins."""
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HDF5_PLUGIN_PRELOAD="::")
    return env


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise_died(path: Path, signum: int) -> None:
    """Raise for a child killed by ``signum``: a stop request (Ctrl-C, SIGTERM, SIGHUP,
    which reached the child with us) is passed on, any other signal is a corrupt file."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signum in (signal.SIGTERM, signal.SIGHUP):
        raise Terminated(signum)
    hint = " (out of memory?)" if signum == signal.SIGKILL else ""
    raise InputFileError(f"{path}: corrupt HDF5 file (reading it crashed libhdf5 with "
                          f"{_signal_name(signum)}{hint})")


def _run_child(path: Path, target: str, fd: int | None, limits: Hdf5Limits,
               timeout_s: float) -> subprocess.CompletedProcess[str]:
    settings = {**dataclasses.asdict(limits), "timeout_s": timeout_s}
    argv = [sys.executable, "-I", str(WALKER), target, json.dumps(settings)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=_child_env(),
                              timeout=timeout_s, pass_fds=() if fd is None else (fd,),
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise InputFileError(f"{path}: corrupt HDF5 file (reading it did not finish within "
                             f"{timeout_s:.3g} s)") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot start the HDF5 probe ({exc})") from None


def _report(path: Path, what: str, done: subprocess.CompletedProcess[str], seconds: float
            ) -> ProbeReport:
    """The child's JSON line as a report, or the error it describes."""
    if done.returncode < 0:
        _raise_died(path, -done.returncode)
    lines = done.stdout.strip().splitlines()
    try:
        data: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        data = {}
    if done.returncode != 0 or "ok" not in data:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise InputFileError(f"{path}: corrupt HDF5 file (the probe exited with status "
                             f"{done.returncode}: {tail})")
    if data["ok"]:
        return ProbeReport(int(data["objects"]), int(data["datasets"]),
                           int(data["declared_bytes"]), seconds)
    error = str(data.get("error", "unknown error"))
    if data.get("kind") == "open":
        raise InputFileError(f"{path} is not a readable {what} file ({error})")
    if data.get("kind") == "limit":
        raise InputFileError(f"{path}: refused before reading: {error}")
    raise InputFileError(f"{path}: corrupt HDF5 file ({error})")


def _pin(path: Path) -> int:
    """An open read-only descriptor of ``path``, refusing anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputFileError(f"cannot open {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputFileError(f"{path} is not a regular file")
    return fd


def _fd_path(fd: int) -> str | None:
    """``/proc/self/fd/N`` when this system has it (the same path works in the child)."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else None


def probe_hdf5(path: Path, what: str, limits: Hdf5Limits = DEFAULT_LIMITS,
               target: str | None = None, fd: int | None = None) -> ProbeReport:
    """Probe ``path`` (opened as ``target``, which may be ``/proc/self/fd/{fd}``) in a child
    process; InputFileError naming ``path`` and calling it a ``what`` file on failure."""
    start = time.perf_counter()
    size = os.fstat(fd).st_size if fd is not None else os.stat(path).st_size
    done = _run_child(path, target or str(path), fd, limits, limits.timeout_for(size))
    return _report(path, what, done, time.perf_counter() - start)


@contextlib.contextmanager
def probed_hdf5(path: Path, what: str, limits: Hdf5Limits = DEFAULT_LIMITS
                ) -> Iterator[str]:
    """Probe ``path`` in a child process, then yield a path to open it in-process with.

    The yielded path names the probed inode (``/proc/self/fd/N`` while the block runs)
    when the system has ``/proc``, else ``path`` itself. Errors: :class:`InputFileError`
    naming ``path`` (see the module docstring).
    """
    fd = _pin(path)
    try:
        proc = _fd_path(fd)
        probe_hdf5(path, what, limits, proc, fd if proc else None)
        yield proc or str(path)
    finally:
        os.close(fd)
