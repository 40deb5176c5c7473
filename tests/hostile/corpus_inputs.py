"""The rest of the bad-input corpus: ``.nir`` files, own data, CIFAR folders, energy
files, output paths, option values and targets that cannot take the graph."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from tests.hostile import mutate as mu
from tests.hostile.cases import Argv, CorpusBuilder

MARKER = "PAYLOAD-RAN"
NODES = "node/nodes"

# --------------------------------------------------------------------------- .nir

H5Edit = Callable[[h5py.File], object]


def _put(name: str, data: Any) -> H5Edit:
    return lambda f: mu.replace_dataset(f, name, np.asarray(data))


def _chunk_bomb(f: h5py.File) -> None:
    """conv0's weight declared as 400,000 x 131,072 int64 (390 GiB) in 1024 x 1024
    gzip chunks; only one chunk is stored."""
    name = f"{NODES}/conv0/weight"
    mu.replace_dataset(f, name, shape=(400_000, 131_072), dtype="int64", chunks=(1024, 1024),
                       compression="gzip", fillvalue=0)
    f[name][0:1024, 0:1024] = 1


def _edges(extra: list[tuple[bytes, bytes]]) -> H5Edit:
    def edit(f: h5py.File) -> None:
        edges = [tuple(e) for e in f["node/edges"][()]] + extra
        mu.replace_dataset(f, "node/edges", np.array(edges, dtype=object),
                           dtype=h5py.string_dtype())
    return edit


def _nan_weight(f: h5py.File) -> None:
    w = f[f"{NODES}/conv0/weight"][()].astype(np.float64)
    w.flat[0] = np.nan
    mu.replace_dataset(f, f"{NODES}/conv0/weight", w)


NIR_EDITS: dict[str, H5Edit] = {
    "groups-array": _put(f"{NODES}/conv0/groups", [1, 1]),
    "groups-nan": _put(f"{NODES}/conv0/groups", np.nan),
    "groups-0": _put(f"{NODES}/conv0/groups", 0),
    "stride-0": _put(f"{NODES}/conv0/stride", [0, 0]),
    "padding-20000": _put(f"{NODES}/conv0/padding", [20000, 20000]),
    "input-shape-negative": _put(f"{NODES}/conv0/input_shape", [-8, 8]),
    "chunk-bomb": _chunk_bomb,
    "weight-nan": _nan_weight,
    "weight-complex": lambda f: mu.replace_dataset(
        f, f"{NODES}/conv0/weight", f[f"{NODES}/conv0/weight"][()].astype(np.complex128)),
    "weight-strings": _put(f"{NODES}/conv0/weight", np.array([b"abc", b"def"])),
    "weight-flat": lambda f: mu.replace_dataset(
        f, f"{NODES}/conv0/weight", f[f"{NODES}/conv0/weight"][()].reshape(-1)),
    "type-unknown": lambda f: mu.replace_dataset(f, f"{NODES}/act2/type", b"EvilNode"),
    "edge-to-missing-node": _edges([(b"act2", b"ghost")]),
    "edge-cycle": _edges([(b"act5", b"conv0")]),
    "edges-int": _put("node/edges", np.arange(6).reshape(3, 2)),
    "format-version-99": _put("node/metadata/format_version", 99),
    "v-threshold-0": lambda f: mu.replace_dataset(
        f, f"{NODES}/act2/v_threshold", np.zeros_like(f[f"{NODES}/act2/v_threshold"][()])),
    "v-threshold-2**62": lambda f: mu.replace_dataset(
        f, f"{NODES}/act2/v_threshold",
        np.full_like(f[f"{NODES}/act2/v_threshold"][()], 2**62)),
    "kind-unknown": lambda f: mu.replace_dataset(f, f"{NODES}/act2/metadata/kind", b"alien"),
    "input-shape-huge": _put(f"{NODES}/input/shape", [1, 2**31, 2**31]),
    "readout-missing": lambda f: f.__delitem__(f"{NODES}/readout"),
}


def add_nir(c: CorpusBuilder) -> None:
    """Each .nir corruption (HDF5 structure intact, content hostile)."""
    src = c.root / c.base.nir
    for name, edit in NIR_EDITS.items():
        c.model_file("nir", name, mu.edit_hdf5(src, c.root / f"nir-{name}.nir", edit).name)


# --------------------------------------------------------------------------- own data


def _data_runs(f: str, ifg: str) -> tuple[Argv, ...]:
    return (("run", ifg, "--backend", "int", "--data", f, "--samples", "4"),
            ("train", "--data", f, "--classes", "10", "--epochs", "1", "-o", "out.pt"),
            ("report", ifg, "--data", f, "--samples", "4"),
            ("verify", ifg, "--backends", "int", "--data", f, "--samples", "4"),
            ("sweep", ifg, "-T", "1", "--data", f, "--samples", "4"))


def add_data(c: CorpusBuilder) -> None:
    """``--data FILE.npz`` with NaN, Inf, labels out of range, no samples, wrong types."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 17, size=(16, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=16)
    marker = c.root / MARKER

    def nan(a: np.ndarray) -> np.ndarray:
        out = a.copy()
        out.flat[3] = np.nan
        return out

    def inf(a: np.ndarray) -> np.ndarray:
        out = a.copy()
        out.flat[3] = np.inf
        return out

    sets: dict[str, dict[str, Any]] = {
        "x-nan": {"x": nan(x), "y": y},
        "x-inf": {"x": inf(x), "y": y},
        "labels-99": {"x": x, "y": np.where(np.arange(16) == 2, 99, y)},
        "labels-negative": {"x": x, "y": np.where(np.arange(16) == 2, -1, y)},
        "labels-fraction": {"x": x, "y": y + 0.5},
        "empty": {"x": x[:0], "y": y[:0]},
        "complex": {"x": x.astype(np.complex64) + 1j, "y": y},
        "strings": {"x": x.astype("<U3"), "y": y},
        "wrong-shape": {"x": np.zeros((16, 3, 8, 8), np.float32), "y": y},
        "length-mismatch": {"x": x, "y": y[:5]},
        "missing-y": {"x": x},
        "x-scalar": {"x": np.float32(3.0), "y": y},
    }
    for name, arrays in sets.items():
        np.savez(c.root / f"data-{name}.npz", **arrays)
        c.add("data", name, _data_runs(f"data-{name}.npz", c.base.ifg),
              names=(f"data-{name}.npz",))
    np.savez(c.root / "data-pickled.npz", x=np.array([mu.ShellPayload(
        mu.touch_command(marker))], dtype=object), y=y)
    c.add("data", "pickled", _data_runs("data-pickled.npz", c.base.ifg),
          names=("data-pickled.npz",), markers=(marker,))


# --------------------------------------------------------------------------- CIFAR


def _cifar_runs(folder: str) -> tuple[Argv, ...]:
    return (("train", "--dataset", "cifar10", "--data-dir", folder, "--epochs", "1",
             "--batch-size", "4", "-o", "out.pt"),)


def add_cifar(c: CorpusBuilder) -> None:
    """CIFAR-10 folders with NaN data, labels 99 / -1, an empty test batch, pickled code."""
    from tests.hostile.corpus import write_cifar

    marker = c.root / MARKER

    def only(batch_name: str, change: Callable[[dict[bytes, Any]], None]
             ) -> Callable[[str, dict[bytes, Any]], None]:
        def edit(name: str, batch: dict[bytes, Any]) -> None:
            if name == batch_name:
                change(batch)
        return edit

    def nan_data(batch: dict[bytes, Any]) -> None:
        data = batch[b"data"].astype(np.float64)
        data[0, 0] = np.nan
        batch[b"data"] = data

    edits: dict[str, Callable[[str, dict[bytes, Any]], None]] = {
        "data-nan": only("data_batch_1", nan_data),
        "labels-99": only("data_batch_2", lambda b: b[b"labels"].__setitem__(0, 99)),
        "labels-negative": only("test_batch", lambda b: b[b"labels"].__setitem__(0, -1)),
        "empty-test-batch": only("test_batch", lambda b: b.update(
            {b"data": np.zeros((0, 3072), np.uint8), b"labels": []})),
        "row-3071-values": only("data_batch_3", lambda b: b.update(
            {b"data": b[b"data"][:, :3071]})),
        "labels-missing": only("data_batch_4", lambda b: b.pop(b"labels")),
        "pickled-code": only("data_batch_5", lambda b: b.update(
            {b"labels": mu.ShellPayload(mu.touch_command(marker))})),
    }
    for name, edit in edits.items():
        folder = f"cifar-{name}"
        write_cifar(c.root / folder / "cifar-10-batches-py", edit=edit)
        c.add("cifar", name, _cifar_runs(folder), names=(folder,), markers=(marker,),
              timeout_s=120.0)
    truncated = c.root / "cifar-truncated" / "cifar-10-batches-py"
    write_cifar(truncated)
    batch = truncated / "test_batch"
    batch.write_bytes(batch.read_bytes()[:200])
    c.add("cifar", "truncated-batch", _cifar_runs("cifar-truncated"),
          names=("cifar-truncated",), timeout_s=120.0)
    missing = c.root / "cifar-missing" / "cifar-10-batches-py"
    write_cifar(missing)
    (missing / "data_batch_3").unlink()
    c.add("cifar", "missing-batch", _cifar_runs("cifar-missing"), names=("cifar-missing",),
          timeout_s=120.0)


# --------------------------------------------------------------------------- energy


def add_energy(c: CorpusBuilder) -> None:
    """``report --energy FILE``: wrong JSON types, deep nesting, non-finite numbers."""
    good = {"name": "mine", "source": "a test", "sop_pj": 1.0}
    texts: dict[str, str] = {
        "source-int": json.dumps({**good, "source": 5}),
        "sop-bool": json.dumps({**good, "sop_pj": True}),
        "sop-string": json.dumps({**good, "sop_pj": "1"}),
        "mac-bool": json.dumps({**good, "mac_pj": True}),
        "name-list": json.dumps({**good, "name": ["a"]}),
        "sop-nan": json.dumps({**good, "sop_pj": float("nan")}),
        "sop-1e400": json.dumps(good).replace("1.0", "1e400"),
        "sop-negative": json.dumps({**good, "sop_pj": -1}),
        "unknown-key": json.dumps({**good, "evil": 1}),
        "missing-key": json.dumps({"name": "mine"}),
        "top-level-list": json.dumps([good]),
        "deep-list": "[" * 100_000 + "]" * 100_000,
        "not-json": "{sop_pj: 1",
        "empty": "",
    }
    for name, text in texts.items():
        path = c.root / f"energy-{name}.json"
        path.write_text(text)
        c.add("energy", name, [("report", c.base.ifg, "--samples", "4", "--energy", path.name)],
              names=(path.name,))
    (c.root / "energy-binary.json").write_bytes(b"\xff\xfe\x00\x01")
    c.add("energy", "binary", [("report", c.base.ifg, "--samples", "4", "--energy",
                                "energy-binary.json")], names=("energy-binary.json",))


# --------------------------------------------------------------------------- outputs


def _read_only_dir(c: CorpusBuilder) -> str:
    """A directory nobody may write to: a chmod 0555 folder, or /sys when running as
    root (root writes through permission bits; sysfs takes no new files)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = c.root / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder.name


def _output_runs(b: Any, path: Callable[[str], str]) -> list[Argv]:
    """Every command that writes a file, writing to ``path(suffix)``."""
    return [("export", b.ifg, "-o", path(".nir")),
            ("convert", b.checkpoint, "-o", path(".ifg"), "--samples", "4",
             "--min-agreement", "0"),
            ("train", "--epochs", "1", "-o", path(".pt")),
            ("report", b.ifg, "--samples", "4", "--json", path(".json")),
            ("report", b.ifg, "--samples", "4", "--plot", path(".png")),
            ("sweep", b.ifg, "-T", "1", "--samples", "4", "--plot", path(".png")),
            ("export", b.checkpoint, "--target", "lava-netx", "-o", path(".net"))]


def add_output(c: CorpusBuilder) -> None:
    """Outputs that cannot be written: read-only, a directory, /proc, no parent."""
    (c.root / "existing-dir").mkdir()
    ro = _read_only_dir(c)
    targets: dict[str, tuple[Callable[[str], str], str]] = {
        "read-only": (lambda ext: f"{ro}/x{ext}", ro),
        "proc": (lambda ext: f"/proc/csqcfs-hostile/x{ext}", "/proc"),
        "existing-dir": (lambda ext: "existing-dir", "existing-dir"),
        "missing-parent": (lambda ext: f"no-such-dir/x{ext}", "no-such-dir"),
    }
    for name, (path, named) in targets.items():
        c.add("output", name, _output_runs(c.base, path), names=(named,), timeout_s=120.0)


# --------------------------------------------------------------------------- options


def add_option(c: CorpusBuilder) -> None:
    """Option values out of range or of the wrong type."""
    ifg, pt = c.base.ifg, c.base.checkpoint
    run = ("run", ifg, "--backend", "int", "--samples", "4")
    cases: dict[str, Argv] = {
        "report-batch-size-0": ("report", ifg, "--samples", "4", "--batch-size", "0"),
        "run-batch-size--1": (*run, "--batch-size", "-1"),
        "train-batch-size-0": ("train", "--batch-size", "0", "--epochs", "1", "-o", "o.pt"),
        "train-lr-nan": ("train", "--lr", "nan", "--epochs", "1", "-o", "o.pt"),
        "train-lr-inf": ("train", "--lr", "inf", "--epochs", "1", "-o", "o.pt"),
        "train-levels-0": ("train", "--levels", "0", "--epochs", "1", "-o", "o.pt"),
        "train-phi-nan": ("train", "--phi", "nan", "--epochs", "1", "-o", "o.pt"),
        "train-epochs--1": ("train", "--epochs", "-1", "-o", "o.pt"),
        "model-os-system": ("run", "--model", "os:system"),
        "model-builtins-eval": ("run", "--model", "builtins:eval", "--model-args",
                                '{"source": "1"}'),
        "timesteps-1e6-string": (*run, "--timesteps", "1e6"),
        "timesteps-1000000": (*run, "--timesteps", "1000000"),
        "timesteps-0": (*run, "--timesteps", "0"),
        "timesteps--1": (*run, "--timesteps", "-1"),
        "presim--1": (*run, "--presim", "-1"),
        "presim-1000000": (*run, "--presim", "1000000"),
        "samples-0": ("run", ifg, "--backend", "int", "--samples", "0"),
        "samples--5": ("run", ifg, "--backend", "int", "--samples", "-5"),
        "calibration-margin-nan": ("convert", pt, "-o", "o.ifg", "--samples", "4",
                                   "--calibration-margin", "nan"),
        "min-agreement-nan": ("convert", pt, "-o", "o.ifg", "--samples", "4",
                              "--min-agreement", "nan"),
        "min-agreement-200": ("convert", pt, "-o", "o.ifg", "--samples", "4",
                              "--min-agreement", "200"),
        "std-0": ("convert", pt, "-o", "o.ifg", "--samples", "4", "--std", "0"),
        "mean-nan": ("convert", pt, "-o", "o.ifg", "--samples", "4", "--mean", "nan"),
        "input-bits-0": ("convert", pt, "-o", "o.ifg", "--samples", "4", "--input-bits", "0"),
        "raw-max-0": ("convert", pt, "-o", "o.ifg", "--samples", "4", "--raw-max", "0"),
        "calibration-samples-0": ("convert", pt, "-o", "o.ifg", "--calibration-samples", "0"),
        "classes-0": ("run", ifg, "--backend", "int", "--data", c.base.data, "--classes", "0"),
        "sweep-timesteps-x": ("sweep", ifg, "-T", "1,x", "--samples", "4"),
        "sweep-timesteps-empty": ("sweep", ifg, "-T", "", "--samples", "4"),
        "sweep-timesteps-0": ("sweep", ifg, "-T", "0", "--samples", "4"),
        "backends-unknown": ("verify", ifg, "--backends", "int,foo", "--samples", "4"),
        "backend-unknown-choice": ("run", ifg, "--backend", "tpu"),
        "model-args-without-model": (*run, "--model-args", "{}"),
        "model-args-not-json": ("run", "--model", "torch.nn:Linear", "--model-args", "{"),
        "energy-unknown-name": ("report", ifg, "--samples", "4", "--energy", "fusion"),
        "flavor-unknown": ("export", ifg, "-o", "o.nir", "--flavor", "wide"),
        "demo-epochs-0": ("demo", "--epochs", "0", "--output-dir", "demo-out"),
    }
    for name, argv in cases.items():
        c.add("option", name, [argv], timeout_s=120.0)


# --------------------------------------------------------------------------- targets


def add_target(c: CorpusBuilder) -> None:
    """A graph a target or back end cannot take (and its import noise must not show)."""
    b = c.base
    c.add("target", "netx-int16-profile", [("export", b.checkpoint, "--profile", "int16",
                                            "--target", "lava-netx", "-o", "o.net")])
    c.add("target", "netx-from-int16-flag", [("export", b.nir, "--profile", "int16",
                                              "--target", "lava-netx", "-o", "o.net")])
    c.add("target", "norse-on-cuda", [("run", b.ifg, "--backend", "norse", "--device", "cuda",
                                       "--samples", "4")])
    c.add("target", "norse-on-missing-gpu", [("verify", b.ifg, "--backends", "int,norse",
                                              "--device", "cuda:7", "--samples", "4")])
