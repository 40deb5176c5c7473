"""Outputs are checked before the work; SIGINT, SIGTERM and SIGHUP leave no temporary file,
also in the middle of an HDF5 write; stale temporary files of ours are swept."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import nir
import numpy as np
import pytest

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import InputFileError
from csqcfs_deploy.exporters.h5write import write_array
from csqcfs_deploy.exporters.nir import graph_to_nir, write_nir_graph
from csqcfs_deploy.exporters.nir.writer import write_nir_file
from csqcfs_deploy.files import (
    STALE_AFTER_S,
    check_directory_writable,
    check_output,
    sweep_stale_temps,
    write_text_atomic,
)
from csqcfs_deploy.interrupts import (
    Terminated,
    check_signals,
    deferred_signals,
    signals_as_exceptions,
)
from csqcfs_deploy.ir import (
    DenseProjection,
    GraphMeta,
    IFGraph,
    IFLayer,
    InputLayer,
    ReadoutLayer,
)
from csqcfs_deploy.ir.profiles import get_profile

from .test_nir import toy_graph

CLI = Path(sys.executable).with_name("csqcfs-deploy")


def big_graph(hidden: int, side: int = 64) -> IFGraph:
    """input (1, side, side) -> dense -> IF (hidden,) -> dense -> readout (10,), loihi2,
    random weights: ``hidden * side**2 * 8`` bytes of NIR weights to write."""
    prof = get_profile("loihi2")
    rng = np.random.default_rng(0)
    v_th = np.full(hidden, 50, dtype=np.int64) * prof.threshold_unit
    v_init = np.rint(0.5 * v_th).astype(np.int64) + (1 if prof.strict else 0)
    layers = (InputLayer("input", (1, side, side), 1 / 16, 16.0, (0.0,), (1.0,), 8),
              IFLayer("h", (hidden,), v_th, v_init, np.zeros(hidden, dtype=np.int64),
                      np.ones(hidden), "subtract"),
              ReadoutLayer("out", (10,), np.zeros(10, dtype=np.int64), 0.125))

    def w(*shape: int) -> np.ndarray:
        return rng.integers(-40, 41, size=shape).astype(np.int64) * prof.weight_step

    projections = (DenseProjection("fc1", "input", "h", w(hidden, side * side)),
                   DenseProjection("fc2", "h", "out", w(10, hidden)))
    return IFGraph(layers, projections, GraphMeta(levels=1, phi=0.5, profile="loihi2",
                                                  arch="big", num_classes=10, notes=""))


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- outputs first


SPOTS = {  # an output that cannot be written -> what the one line says
    "missing": "output directory does not exist", "under_file": "is not a directory",
    "directory": "it is a directory", "proc": "/proc is a kernel interface",
    "device": "not a regular file"}


def spot_path(tmp_path: Path, spot: str, suffix: str = "") -> str:
    """A missing folder, a path under a file, an existing directory, /proc, a device."""
    (tmp_path / "a_file").write_text("x")
    if spot == "directory":
        (tmp_path / f"a_dir{suffix}").mkdir()
    return {"missing": f"{tmp_path}/missing/out{suffix}",
            "under_file": f"{tmp_path}/a_file/out{suffix}",
            "directory": f"{tmp_path}/a_dir{suffix}", "proc": f"/proc/xyz{suffix}",
            "device": "/dev/null"}[spot]


#: Each command with its output option (and the suffix it needs); MODEL does not exist, so
#: an output error (not "model file not found") shows the output was checked first.
COMMANDS: dict[str, tuple[list[str], str]] = {
    "convert": (["convert", "{model}", "-o", "{out}"], ""),
    "export": (["export", "{model}", "-o", "{out}"], ""),
    "report-json": (["report", "{model}", "--json", "{out}"], ""),
    "report-plot": (["report", "{model}", "--plot", "{out}"], ".png"),
    "sweep": (["sweep", "{model}", "--timesteps", "1", "--plot", "{out}"], ".png"),
    "train": (["train", "--data", "{model}", "--epochs", "1", "-o", "{out}"], ""),
}


@pytest.mark.parametrize("spot", sorted(SPOTS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_output_fails_first_with_one_line(command: str, spot: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    template, suffix = COMMANDS[command]
    if spot == "device" and suffix:
        pytest.skip("no device is named *.png")
    out = spot_path(tmp_path, spot, suffix)
    argv = [a.format(model=tmp_path / "no-such-model.pt", out=out) for a in template]
    start = time.perf_counter()
    code = main(argv)
    elapsed_s = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == InputFileError.exit_code, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert SPOTS[spot] in err and "no-such-model" not in err, err
    assert elapsed_s < 5.0
    assert temps(tmp_path) == [] and not (tmp_path / "missing").exists()


def test_demo_checks_its_output_dir_before_training(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code = main(["demo", "--output-dir", spot_path(tmp_path, "under_file")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "a_file/out" in err, err
    assert time.perf_counter() - start < 5.0   # the demo trains for longer than that
    code = main(["demo", "--output-dir", "/proc/demo"])
    assert code == 2 and "kernel interface" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_the_write_probe_catches_what_os_access_does_not() -> None:
    """sysfs takes no new files, even from root, whatever ``os.access`` says."""
    with pytest.raises(InputFileError, match="/sys/kernel"):
        check_directory_writable(Path("/sys/kernel"))
    assert not any(p.name.endswith(".tmp") for p in Path("/sys/kernel").iterdir())


def test_check_output_passes_a_writable_file_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("{}")
    assert check_output(tmp_path / "old.json") == tmp_path / "old.json"
    assert check_output(tmp_path / "new.json") == tmp_path / "new.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


# --------------------------------------------------------------------------- stale temps


def test_stale_temp_files_of_ours_are_swept_on_the_next_write(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead, alive = child.pid, os.getppid()
    stale = tmp_path / f".m.nir.{dead}.abcd_123.tmp"
    live = tmp_path / f".m.nir.{alive}.efgh_456.tmp"
    old_style_old = tmp_path / ".m.nir.ijkl_789.tmp"
    old_style_new = tmp_path / ".m.nir.mnop_012.tmp"
    other_target = tmp_path / f".other.nir.{dead}.qrst_345.tmp"
    for p in (stale, live, old_style_old, old_style_new, other_target):
        p.write_bytes(b"x" * 100)
    hours_ago = time.time() - STALE_AFTER_S - 60
    os.utime(old_style_old, (hours_ago, hours_ago))

    write_text_atomic(tmp_path / "m.nir", "new\n")
    assert (tmp_path / "m.nir").read_text() == "new\n"
    left = {p.name for p in temps(tmp_path)}
    assert left == {live.name, old_style_new.name, other_target.name}
    # a live writer's file goes too once it is older than STALE_AFTER_S (its pid reused)
    removed = sweep_stale_temps(tmp_path / "m.nir", now_s=time.time() + STALE_AFTER_S + 60)
    assert {p.name for p in removed} == {live.name, old_style_new.name}


# --------------------------------------------------------------------------- signals


def test_deferred_signals_are_raised_at_the_checks() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)                     # the handler has run: it only recorded
        reached = True
        check_signals()
    assert reached
    # SIGHUP (SIGTERM where SIGHUP is ignored on purpose, e.g. under nohup)
    hup = signal.SIGHUP if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL else signal.SIGTERM
    before = signal.getsignal(hup)
    with signals_as_exceptions():
        with pytest.raises(Terminated) as info, deferred_signals():
            os.kill(os.getpid(), hup)
            time.sleep(0.01)                 # raised when the block ends
        assert info.value.exit_code == 128 + hup
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(hup) is before


def test_a_forked_worker_still_dies_of_sigterm() -> None:
    """Lava's workers are forked while the handlers are installed: SIGTERM ends them."""
    with signals_as_exceptions():
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.2)
        worker.terminate()
        worker.join(10)
    assert worker.exitcode == -signal.SIGTERM


def test_sliced_nir_file_is_nir_writes_file(tmp_path: Path) -> None:
    """Same datasets, dtypes and values as ``nir.write``; big arrays read back whole."""
    # portable: a native file stores its IF nodes with our own type on purpose
    ng = graph_to_nir(toy_graph("loihi2", per_layer=True, weight_exp=0), "portable")
    nir.write(tmp_path / "theirs.nir", ng)
    write_nir_file(tmp_path / "ours.nir", ng)

    def contents(path: Path) -> dict[str, tuple[str, object]]:
        found: dict[str, tuple[str, object]] = {}

        def add(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                value = np.asarray(obj[()])
                found[name] = (str(obj.dtype), value.tolist() if value.dtype == object
                               else value.tobytes())

        with h5py.File(path, "r") as f:
            f.visititems(add)
        return found

    assert contents(tmp_path / "ours.nir") == contents(tmp_path / "theirs.nir")
    data = np.arange(300_000, dtype=np.int64).reshape(3000, 100)
    with h5py.File(tmp_path / "big.h5", "w") as f, deferred_signals():
        ds = write_array(f, "w", data, "gzip", slice_bytes=64 * 1024)
        assert ds.chunks == (81, 100)
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert np.array_equal(f["w"][()], data)


def _has_data(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _wait_for_temp(folder: Path, done: Callable[[], bool], timeout_s: float = 120.0) -> bool:
    """True once a temporary file with HDF5 data in it is beside the output (the write is
    under way); False when ``done()`` first (the writer ended) or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done():
        if any(_has_data(p) for p in temps(folder)):
            return True
        time.sleep(0.002)
    return False


def test_ctrl_c_in_the_middle_of_a_nir_write_is_honoured_at_once(tmp_path: Path) -> None:
    """h5py used to drop the KeyboardInterrupt; now it comes between two slices."""
    graph = big_graph(512)                  # 16 MB of weights: ~0.5 s of gzip
    sent_s: list[float] = []
    finished = threading.Event()

    def interrupt() -> None:
        if _wait_for_temp(tmp_path, finished.is_set, timeout_s=60):
            sent_s.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            write_nir_graph(graph, tmp_path / "big.nir")
        finally:
            raised_s = time.perf_counter()
            finished.set()
    watcher.join(5)
    assert sent_s, "the write ended before its temporary file was seen"
    assert raised_s - sent_s[0] < 1.0
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_export_leaves_no_temp_file(tmp_path: Path) -> None:
    """The real command line in a fresh interpreter: SIGTERM while the NIR file is
    written ends it with 128 + 15 and one line, the temporary file removed."""
    source = tmp_path / "big-in.nir"        # uncompressed: quick to write here, read there
    write_nir_file(source, graph_to_nir(big_graph(1024)), compression=None)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([str(CLI), "export", str(source), "-o", str(out_dir / "big.nir")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        seen = _wait_for_temp(out_dir, lambda: proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen, f"export ended before its temporary file was seen: {err}"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: terminated by SIGTERM", err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []
