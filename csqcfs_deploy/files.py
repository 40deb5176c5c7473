"""Output files: checked before the work, written atomically, no temporary file left behind.

- :func:`check_output`: every command calls it on each file it will write *before* any
  work, so a bad ``--output``/``--json FILE``/``--plot`` fails at once with one line.
- :func:`atomic_path`: a failure (an exception, Ctrl-C, or SIGTERM/SIGHUP under
  :func:`csqcfs_deploy.interrupts.signals_as_exceptions`) never leaves a half-written
  target nor a temporary file behind.
- Temporary files are ``.NAME.PID.XXXXXXXX.tmp`` beside the target. One left by a
  writer that was killed (SIGKILL, a power cut) is swept when the same target is
  written next: when its pid is not a live process or it is older than
  :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from csqcfs_deploy.errors import InputFileError

#: Pseudo file systems: a "file" written there is a kernel interface, never an output.
PSEUDO_ROOTS: tuple[Path, ...] = (Path("/proc"), Path("/sys"))

#: A temporary file of ours older than this is stale even if its pid is in use again.
STALE_AFTER_S = 3600.0

#: errno values of a write that fails for want of room or permission (not a bug of ours).
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                            errno.EACCES, errno.EPERM, errno.EIO})


# --------------------------------------------------------------------------- checks


def _under_pseudo_root(path: Path) -> Path | None:
    resolved = path.resolve()
    for root in PSEUDO_ROOTS:
        if resolved == root or root in resolved.parents:
            return root
    return None


def _checked_target(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path after the checks that need no write: not empty, not under
    /proc or /sys, not a directory or a special file, its directory exists."""
    if not str(path):
        raise InputFileError(f"{what}: empty file name")
    target = Path(path)
    root = _under_pseudo_root(target)
    if root is not None:
        raise InputFileError(f"cannot write {what} {target}: {root} is a kernel interface, "
                             "not a place for files")
    with contextlib.suppress(OSError):
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise InputFileError(f"cannot write {what} {target}: it is a directory")
        if not stat.S_ISREG(mode):
            raise InputFileError(f"cannot write {what} {target}: it exists and is not a "
                                 "regular file (a device, pipe or socket)")
    directory = target.parent
    if not directory.exists():
        raise InputFileError(f"output directory does not exist: {directory} (for {target})")
    if not directory.is_dir():
        raise InputFileError(f"cannot write {what} {target}: {directory} is not a directory")
    return target


def check_directory_writable(directory: Path, name: str = "probe") -> None:
    """InputFileError unless a file can really be created in ``directory``: ``os.access``,
    then a real probe (create and remove a temporary file) since read-only mounts and
    immutable directories pass ``os.access`` as root."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputFileError(f"output directory is not writable: {directory}")
    fd, probe = _make_temp(directory, name)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)


def check_output(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Check, before any work, that ``path`` can be written: its directory exists and is
    really writable, and it is not a directory, a special file or under /proc or /sys.
    Raise one-line :class:`InputFileError` naming the path and the reason."""
    target = _checked_target(path, what)
    check_directory_writable(target.parent, target.name)
    return target


def check_output_dir(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Create ``path`` (and its parents) if needed and check it really takes files."""
    directory = Path(path)
    root = _under_pseudo_root(directory)
    if root is not None:
        raise InputFileError(f"cannot write {what} {directory}: {root} is a kernel "
                             "interface, not a place for files")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputFileError(f"{what} {directory} exists and is not a directory") from None
    except OSError as exc:
        raise InputFileError(f"cannot create {what} {directory}: {exc.strerror}") from None
    check_directory_writable(directory)
    return directory


# --------------------------------------------------------------------------- temp files


def _temp_pattern(name: str) -> re.Pattern[str]:
    """``.NAME.PID.XXXXXXXX.tmp`` (PID optional: files of older versions have none)."""
    return re.compile(re.escape(f".{name}.") + r"(?:(\d+)\.)?\w{8}\.tmp")


def _make_temp(directory: Path, name: str) -> tuple[int, Path]:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise InputFileError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    return fd, Path(tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def sweep_stale_temps(target: Path, now_s: float | None = None) -> list[Path]:
    """Remove the temporary files of ours beside ``target`` whose writer is gone (its pid
    is no live process) or that are older than :data:`STALE_AFTER_S`; return them."""
    directory = target.parent
    pattern = _temp_pattern(target.name)
    now = time.time() if now_s is None else now_s
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            dead = match.group(1) is not None and not _pid_alive(int(match.group(1)))
            if old or dead:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _give_usual_mode(tmp: Path) -> None:
    """mkstemp makes the file private (0600); give it the usual mode for new files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception (``KeyboardInterrupt`` and
    :class:`~csqcfs_deploy.interrupts.Terminated` included) the temporary file is
    removed and ``path`` is untouched. A write that fails for want of room or
    permission is an :class:`InputFileError`.
    """
    target = _checked_target(path, "output file")
    sweep_stale_temps(target)
    fd, tmp = _make_temp(target.parent, target.name)
    os.close(fd)
    try:
        yield tmp
        _give_usual_mode(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS | {errno.EISDIR}:
            raise InputFileError(f"cannot write {target}: {exc.strerror}") from None
        raise


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise InputFileError if it is not a file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputFileError(f"{what} is not a regular file: {p}")
    return p
