"""A worker that runs many CLI commands (or loaders) quickly, each in a forked child.

Started as a script (``python forkserver.py``) by :class:`tests.hostile.runner.ForkServer`.
It imports the CLI once and does nothing else before forking, so that a child
starts like a fresh ``csqcfs-deploy`` whose imports are already done (no OpenMP
pool to inherit: torch runs nothing in the worker). Each request is one JSON line
on stdin, each reply one JSON line on the protocol stream (the worker's original
stdout; anything the worker itself prints goes to its stderr).

A child runs in its own process group, with stdin from /dev/null, stdout and
stderr into files, an address-space limit (``mem_bytes``: a memory bomb becomes a
MemoryError, not a machine out of memory), no core files, Python's default
warning filters and the request's cwd and environment. It is killed (the whole
group) after ``timeout_s``. Replies carry ``returncode`` (negative: the signal
that ended it), ``stdout``, ``stderr``, ``seconds`` and ``timed_out``.

Requests: ``{"argv": [...]}`` runs ``csqcfs_deploy.cli.main(argv)``;
``{"load": "model" | "netx" | "ifg", "path": ...}`` runs that loader and exits
0 (loaded), the CsqcfsError's exit code (printed as ``error: ...``) or 70 (any
other exception, with its traceback).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

OTHER_EXCEPTION_EXIT = 70
OUTPUT_CHARS = 20_000
POLL_S = 0.01


def _default_warning_filters() -> None:
    """Python's own filters (as without -W), whatever the worker inherited."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning,
                     DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]


def _load(kind: str, path: str) -> None:
    if kind == "model":
        from csqcfs_deploy.cli.model_io import load_model
        load_model(path)
    elif kind == "netx":
        from csqcfs_deploy.exporters.netx import read_netx_plan
        read_netx_plan(path)
    elif kind == "ifg":
        from csqcfs_deploy.ir import load_graph
        load_graph(path)
    else:
        raise ValueError(f"unknown loader {kind!r}")


def _run_load(kind: str, path: str) -> int:
    from csqcfs_deploy.errors import CsqcfsError

    try:
        _load(kind, path)
    except CsqcfsError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except Exception:  # what the fuzzer looks for: reported, with the traceback
        traceback.print_exc()
        return OTHER_EXCEPTION_EXIT
    return 0


def _run_main(argv: list[str]) -> int:
    from csqcfs_deploy.cli import main

    try:
        return int(main(argv))
    except SystemExit as exc:  # argparse, --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # main() let something through: show it as a user would see it
        traceback.print_exc()
        return 1


def _redirect(out_path: Path, err_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _child(request: dict[str, Any], out_path: Path, err_path: Path, proto_fd: int) -> None:
    """In the forked child: set up like a fresh process, run the request, exit."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.close(proto_fd)
        mem = int(request.get("mem_bytes", 0))
        if mem > 0:
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _redirect(out_path, err_path)
        os.chdir(request.get("cwd") or ".")
        os.environ.update(request.get("env") or {})
        _default_warning_filters()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if "argv" in request:
            code = _run_main([str(a) for a in request["argv"]])
        else:
            code = _run_load(str(request["load"]), str(request["path"]))
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


def _wait(pid: int, timeout_s: float) -> tuple[int, bool]:
    """Wait for ``pid``; kill its group after ``timeout_s``. (returncode, timed_out)."""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(POLL_S)
    if not timed_out:  # what it started (Lava workers) does not outlive it
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), timed_out
    return os.WEXITSTATUS(status), timed_out


def _read(path: Path) -> str:
    text = path.read_bytes().decode("utf-8", "replace")
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS // 2] + "\n...\n" + \
        text[-OUTPUT_CHARS // 2:]


def serve(scratch: Path, proto: Any) -> None:
    """Answer requests from stdin until it closes."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(request, out_path, err_path, proto.fileno())
        returncode, timed_out = _wait(pid, float(request.get("timeout_s", 60)))
        reply = {"returncode": returncode, "timed_out": timed_out,
                 "seconds": round(time.monotonic() - started, 3),
                 "stdout": _read(out_path), "stderr": _read(err_path)}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


#: imported once before any fork (a command imports them lazily): the CLI and the
#: readers of its files. Not Lava or Norse: their import-time noise must show in a child.
PRELOAD = ("csqcfs_deploy.cli.main", "csqcfs_deploy.cli.model_io",
           "csqcfs_deploy.exporters.nir", "csqcfs_deploy.simulators.integer.backend")


def start() -> None:
    """Keep the protocol on the original stdout, import the CLI, then serve."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for module in PRELOAD:
        importlib.import_module(module)

    proto.write(json.dumps({"ready": True}) + "\n")
    proto.flush()
    with tempfile.TemporaryDirectory(prefix="csqcfs-forkserver-") as scratch:
        serve(Path(scratch), proto)


if __name__ == "__main__":
    start()
