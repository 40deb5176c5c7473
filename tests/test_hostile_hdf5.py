"""Hostile HDF5 files (NIR, netx) cannot crash, hang or exhaust the process.

From a real exported ``.nir`` (the toy graph of test_nir, every node type) and a netx
file: bit-flipped copies, a copy known to segfault libhdf5 and one that hangs it, a
truncated, an empty and a random file, a chunk bomb (391 GiB declared in 330 KB), and
content edits (``groups`` an array or NaN, stride 0, paddings, weights of the wrong
dtype, NaN thresholds). Each goes through the real command line: a non-zero exit, one
``error:`` line naming the file, no traceback, never a signal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.hdf5_probe import Hdf5Limits, probe_hdf5, probed_hdf5
from csqcfs_deploy.exporters.netx import NetxLayer, NetxPlan, _write
from csqcfs_deploy.exporters.netx_file import NETX_ATTR, read_netx_plan
from csqcfs_deploy.exporters.nir import read_nir_graph, write_nir_graph

from .test_nir import toy_graph

NODES = "node/nodes"
#: Seeds of :func:`flip_structure` on the toy file: a crash and a hang of bare h5py
#: (found by a sweep; with other library versions they may just be corrupt files).
CRASH_SEED = 171
HANG_SEED = 1261
#: Seeds the reader refuses quickly (other seeds may flip harmless bytes and read fine).
QUICK_SEEDS = (4,)
#: The content cases the default run takes through ``run``; all of them go through
#: every command under the slow marker.
QUICK_CONTENT = ("groups-array", "groups-nan", "stride-0", "weight-complex")
COMMANDS = ("run", "verify", "convert")

H5Edit = Callable[[h5py.File], object]


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def good_nir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy graph (int8) as a native .nir: the same bytes on every run."""
    return write_nir_graph(toy_graph("int8"), tmp_path_factory.mktemp("nir") / "good.nir")


def structure_offsets(path: Path) -> np.ndarray:
    """Byte offsets outside every dataset's raw data: the HDF5 structure (headers,
    B-trees, heaps), where a flipped bit reaches libhdf5's parser."""
    mask = np.ones(path.stat().st_size, dtype=bool)

    def visit(_: str, obj: object) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        offset = obj.id.get_offset()
        if offset is not None:
            mask[offset:offset + obj.id.get_storage_size()] = False
        for i in range(obj.id.get_num_chunks() if obj.chunks else 0):
            info = obj.id.get_chunk_info(i)
            mask[info.byte_offset:info.byte_offset + info.size] = False

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return np.flatnonzero(mask)


def flip_structure(src: Path, dst: Path, seed: int, bits: int = 16) -> Path:
    """``src`` with ``bits`` random bits flipped in its HDF5 structure (seeded)."""
    where = structure_offsets(src)
    rng = np.random.default_rng(seed)
    data = bytearray(src.read_bytes())
    for i in rng.integers(0, len(where), size=bits):
        data[int(where[i])] ^= 1 << int(rng.integers(0, 8))
    dst.write_bytes(bytes(data))
    return dst


def edited(src: Path, dst: Path, edit: H5Edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def put(name: str, data: object) -> H5Edit:
    def edit(f: h5py.File) -> None:
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def chunk_bomb(f: h5py.File) -> None:
    """c1's weight declared as 400,000 x 131,072 int64 (391 GiB) in gzip chunks of 8 MiB,
    one chunk stored."""
    name = f"{NODES}/c1/weight"
    del f[name]
    ds = f.create_dataset(name, shape=(400_000, 131_072), dtype="int64", chunks=(1024, 1024),
                          compression="gzip", fillvalue=0)
    ds[0:1024, 0:1024] = 1


CONTENT: dict[str, tuple[H5Edit, int, str]] = {
    "groups-array": (put(f"{NODES}/c2/groups", [1, 3]), GraphError.exit_code,
                     "node c2: groups must be one integer"),
    "groups-nan": (put(f"{NODES}/c2/groups", np.nan), GraphError.exit_code,
                   "node c2: groups must be one integer"),
    "stride-0": (put(f"{NODES}/c1/stride", [0, 0]), GraphError.exit_code,
                 "node c1: stride must be in 1..4096"),
    "padding-negative": (put(f"{NODES}/c1/padding", [-3, 1]), GraphError.exit_code,
                         "node c1: padding must be in 0..4096"),
    "padding-huge": (put(f"{NODES}/c1/padding", [20000, 20000]), GraphError.exit_code,
                     "node c1: padding must be in 0..4096"),
    "weight-complex": (put(f"{NODES}/fc1/weight", np.zeros((5, 54), np.complex128)),
                       GraphError.exit_code, "node fc1: weight must be real numbers"),
    "weight-strings": (put(f"{NODES}/fc1/weight", np.full((5, 54), b"w")),
                       GraphError.exit_code, "node fc1: weight must be real numbers"),
    "weight-objects": (lambda f: (f.__delitem__(f"{NODES}/fc1/weight"), f.create_dataset(
        f"{NODES}/fc1/weight", data=np.array([b"a", b"bc"], dtype=object),
        dtype=h5py.string_dtype())), GraphError.exit_code, "node fc1: weight must be real"),
    "threshold-nan": (put(f"{NODES}/d/v_threshold", np.full(5, np.nan)), GraphError.exit_code,
                      "node d: v_threshold contains NaN"),
    "type-unknown": (put(f"{NODES}/d/type", b"EvilNode"), GraphError.exit_code,
                     "node d: an unsupported NIR node type 'EvilNode'"),
}


# --------------------------------------------------------------------------- the CLI


def cli_argv(command: str, model: Path, tmp_path: Path) -> list[str]:
    return {"run": ["run", str(model), "--backend", "int", "--samples", "2"],
            "verify": ["verify", str(model), "--backends", "int", "--samples", "2"],
            "convert": ["convert", str(model), "-o", str(tmp_path / "out.ifg")]}[command]


def refused_in_process(argv: list[str], capsys: pytest.CaptureFixture[str], code: int,
                       *words: str) -> str:
    """``main(argv)`` exits ``code`` with one ``error:`` line holding ``words``."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def refused_in_subprocess(argv: list[str], code: int, *words: str) -> str:
    """The real ``csqcfs-deploy`` in a child: exit ``code`` (a signal would be negative),
    one ``error:`` line holding ``words``."""
    code_line = "import sys; from csqcfs_deploy.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code_line, *argv],
                          capture_output=True, text=True, timeout=300, check=False)
    err = done.stderr.strip()
    assert done.returncode == code, (done.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    return err


# --------------------------------------------------------------------------- tests: NIR


def test_a_file_that_crashes_libhdf5_is_one_error_line(good_nir: Path, tmp_path: Path) -> None:
    """The real CLI in a child process, so a segfault would show as a negative status."""
    bad = flip_structure(good_nir, tmp_path / "crash.nir", CRASH_SEED)
    bare = subprocess.run([sys.executable, "-c", "import sys, nir; nir.read(sys.argv[1])",
                           str(bad)], capture_output=True, timeout=120, check=False)
    err = refused_in_subprocess(cli_argv("run", bad, tmp_path), InputFileError.exit_code,
                                "crash.nir")
    if bare.returncode < 0:  # bare nir.read crashed (SIGSEGV, h5py 3.16 / HDF5 2.0); the
        assert "crash.nir: corrupt HDF5 file (" in err, err  # probe crashed or erred first


@pytest.mark.parametrize("seed", QUICK_SEEDS)
def test_bit_flipped_nir_files_are_refused(good_nir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], seed: int) -> None:
    bad = flip_structure(good_nir, tmp_path / f"flip{seed}.nir", seed)
    refused_in_process(cli_argv("run", bad, tmp_path), capsys, InputFileError.exit_code,
                       f"flip{seed}.nir: corrupt HDF5 file (")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_bit_flip_sweep(good_nir: Path, tmp_path: Path, seed: int) -> None:
    """Each copy either reads (the flips hit harmless bytes) or is refused naming the file,
    and the reader never dies: run in a child, so a crash would show."""
    bad = flip_structure(good_nir, tmp_path / f"flip{seed}.nir", seed)
    script = ("import sys\nfrom csqcfs_deploy.errors import CsqcfsError\n"
              "from csqcfs_deploy.exporters.nir import read_nir_graph\n"
              "try:\n    read_nir_graph(sys.argv[1])\nexcept CsqcfsError as exc:\n"
              "    sys.exit(f'error: {exc}')\n")
    done = subprocess.run([sys.executable, "-c", script, str(bad)], capture_output=True,
                          text=True, timeout=300, check=False)
    err = done.stderr.strip()
    assert done.returncode in (0, 1), (done.returncode, err[-2000:])
    if done.returncode:
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {bad}"), err


@pytest.mark.parametrize("command", COMMANDS)
def test_files_that_are_not_nir(good_nir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], command: str) -> None:
    empty = tmp_path / "empty.nir"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.nir"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = [(empty, ("empty.nir is not an HDF5/NIR file", "empty")),
             (noise, ("noise.nir is not an HDF5/NIR file",))]
    if command == "run":  # an HDF5 signature, cut short: the probe says so
        cut = tmp_path / "cut.nir"
        cut.write_bytes(good_nir.read_bytes()[:50_000])
        cases.append((cut, ("cut.nir is not a readable NIR file", "truncated")))
    for path, words in cases:
        err = refused_in_process(cli_argv(command, path, tmp_path), capsys,
                                 InputFileError.exit_code, *words)
        assert "checkpoint" not in err
    assert not (tmp_path / "out.ifg").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_chunk_bomb_is_refused_before_reading(good_nir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                command: str) -> None:
    bomb = edited(good_nir, tmp_path / "bomb.nir", chunk_bomb)
    assert bomb.stat().st_size < 2**20
    refused_in_process(cli_argv(command, bomb, tmp_path), capsys, InputFileError.exit_code,
                       "bomb.nir: refused before reading", "/node/nodes/c1/weight",
                       "391 GiB", "over the limit of 2 GiB per dataset")


@pytest.mark.parametrize("case", QUICK_CONTENT)
def test_hostile_content_is_refused_naming_the_node(good_nir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    case: str) -> None:
    edit, code, words = CONTENT[case]
    bad = edited(good_nir, tmp_path / f"{case}.nir", edit)
    refused_in_process(cli_argv("run", bad, tmp_path), capsys, code, f"{case}.nir", words)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(CONTENT))
def test_hostile_content_in_every_command(good_nir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], case: str,
                                          command: str) -> None:
    edit, code, words = CONTENT[case]
    bad = edited(good_nir, tmp_path / f"{case}.nir", edit)
    refused_in_process(cli_argv(command, bad, tmp_path), capsys, code, f"{case}.nir", words)
    assert not (tmp_path / "out.ifg").exists()


def test_the_good_file_still_reads(good_nir: Path) -> None:
    assert read_nir_graph(good_nir).equals(toy_graph("int8"))
    report = probe_hdf5(good_nir, "NIR")
    assert report.datasets > 50 and 0 < report.declared_bytes < good_nir.stat().st_size


# --------------------------------------------------------------------------- tests: the probe


def test_a_file_that_hangs_libhdf5_times_out(good_nir: Path, tmp_path: Path) -> None:
    """A bit-flipped copy on which bare ``nir.read`` spins for minutes."""
    bad = flip_structure(good_nir, tmp_path / "hang.nir", HANG_SEED)
    with pytest.raises(InputFileError, match="hang.nir: corrupt HDF5 file"):
        probe_hdf5(bad, "NIR", Hdf5Limits(timeout_s=3.0, timeout_s_per_mib=0.0))


@pytest.mark.parametrize(("limits", "words"), [
    (Hdf5Limits(dataset_bytes=200), "over the limit of 0.000191 MiB per dataset"),
    pytest.param(Hdf5Limits(total_bytes=2000), "more than 0.00191 MiB of data in all",
                 marks=pytest.mark.slow),
    pytest.param(Hdf5Limits(objects=40), "more than 40 HDF5 objects", marks=pytest.mark.slow),
    (Hdf5Limits(depth=2), "nested deeper than 2 groups"),
])
def test_the_probe_limits(good_nir: Path, limits: Hdf5Limits, words: str) -> None:
    with pytest.raises(InputFileError, match="good.nir: refused before reading") as info:
        probe_hdf5(good_nir, "NIR", limits)
    assert words in str(info.value)


def test_links_out_of_the_file_are_refused(good_nir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def soft(f: h5py.File) -> None:
        f[f"{NODES}/loop"] = h5py.SoftLink("/node")

    def external(f: h5py.File) -> None:
        f[f"{NODES}/c1/outside"] = h5py.ExternalLink(str(good_nir), "/node")

    for name, edit, kind in (("soft.nir", soft, "SoftLink"),
                             ("external.nir", external, "ExternalLink")):
        bad = edited(good_nir, tmp_path / name, edit)
        refused_in_process(cli_argv("run", bad, tmp_path), capsys, InputFileError.exit_code,
                           name, f"is a {kind} (only hard links are allowed)")


def test_the_probed_file_is_the_one_read(good_nir: Path, tmp_path: Path) -> None:
    """A file replaced (renamed over) after the probe is not read: the reader opens the
    probed inode."""
    target = tmp_path / "model.nir"
    shutil.copy(good_nir, target)
    bomb = edited(good_nir, tmp_path / "bomb.nir", chunk_bomb)
    with probed_hdf5(target, "NIR") as pinned:
        os.replace(bomb, target)
        # HDF5 2.0 refuses to open a deleted file (OSError); either way not the bomb
        with contextlib.suppress(OSError), h5py.File(pinned, "r") as f:
            assert f[f"{NODES}/c1/weight"].shape == (3, 2, 3, 3)
    with pytest.raises(InputFileError, match="refused before reading"):
        read_nir_graph(target)


# --------------------------------------------------------------------------- tests: netx


def netx_plan() -> NetxPlan:
    """A conv -> dense -> readout netx plan (seeded), written without lava-dl."""
    rng = np.random.default_rng(3)
    conv = NetxLayer("a", "conv", (2, 4, 4), rng.integers(-8, 9, (2, 1, 3, 3)), 40,
                     np.zeros(2, np.int64), padding=(1, 1))
    dense = NetxLayer("d", "dense", (6,), rng.integers(-8, 9, (6, 32)), 40,
                      np.zeros(6, np.int64), flatten_before=True)
    readout = NetxLayer("out", "dense", (3,), rng.integers(-8, 9, (3, 6)), 2**17 - 1,
                        np.zeros(3, np.int64))
    return NetxPlan((1, 4, 4), 8, (conv, dense, readout), np.zeros(3, np.int64), "chain")


@pytest.fixture(scope="module")
def good_netx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("netx") / "good.net"
    _write(path, netx_plan())
    return path


def _description(text: str) -> H5Edit:
    return lambda f: f.attrs.__setitem__(NETX_ATTR, text)


def _netx_bomb(f: h5py.File) -> None:
    del f["layer/1/weight"]
    f["layer/1"].create_dataset("weight", shape=(2**20, 2**20), dtype="int64",
                                chunks=(256, 256), compression="gzip")


NETX_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "json": (lambda src, dst: edited(src, dst, _description("{not json")),
             f"the {NETX_ATTR} attribute is not JSON"),
    "layers": (lambda src, dst: edited(src, dst, put("layer/3/shape", [7])),
               "the file's layer groups"),
    "bomb": (lambda src, dst: edited(src, dst, _netx_bomb),
             "over the limit of 2 GiB per dataset"),
    "deep": (lambda src, dst: edited(src, dst, _description("[" * 100_000)),
             f"the {NETX_ATTR} attribute is not JSON"),
    "flip": (lambda src, dst: flip_structure(src, dst, CRASH_SEED), "corrupt HDF5 file"),
    "cut": (lambda src, dst: (dst.write_bytes(src.read_bytes()[:3000]), dst)[1],
            "is not a readable netx file"),
}


def test_the_good_netx_file_reads(good_netx: Path) -> None:
    meta = read_netx_plan(good_netx)
    assert [la["shape"] for la in meta["layers"]] == [[2, 4, 4], [6], [3]]


@pytest.mark.parametrize("case", [
    "json", "layers", "bomb",
    *(pytest.param(c, marks=pytest.mark.slow) for c in ("deep", "flip", "cut"))])
def test_hostile_netx_files_are_refused(good_netx: Path, tmp_path: Path, case: str) -> None:
    make, words = NETX_CASES[case]
    bad = make(good_netx, tmp_path / f"{case}.net")
    with pytest.raises(InputFileError) as info:
        read_netx_plan(bad)
    assert str(info.value).startswith(str(bad)) and words in str(info.value), str(info.value)


@pytest.mark.slow
def test_lava_dl_errors_on_a_netx_file_are_one_error(good_netx: Path, tmp_path: Path) -> None:
    """A file whose description checks out but whose layer lacks its neuron group: lava-dl's
    own exception becomes an InputFileError naming the file."""
    import torch

    from csqcfs_deploy.simulators.lava.netx import run_netx

    bad = edited(good_netx, tmp_path / "noneuron.net", lambda f: f.__delitem__("layer/1/neuron"))
    with pytest.raises(InputFileError, match="noneuron.net: lava-dl netx cannot build"):
        run_netx(bad, torch.zeros((1, 1, 4, 4), dtype=torch.int64))
