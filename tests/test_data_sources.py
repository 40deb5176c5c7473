"""Data sources: CIFAR-100 from a local copy, --mean/--std/--raw-max, your own --data
FILE.npz, and the check that the model's outputs and the dataset's classes agree."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import DatasetError, UsageError
from csqcfs_deploy.ir import InputEncoding, load_graph
from csqcfs_deploy.train.checkpoint import load_checkpoint
from csqcfs_deploy.train.datasets import (
    CIFAR100_ENCODING,
    DATASETS,
    EncodingOverride,
    load_dataset,
)
from csqcfs_deploy.train.owndata import default_raw_max

CLI = Path(sys.executable).with_name("csqcfs-deploy")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter."""
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert needle in err, err


# --------------------------------------------------------------------------- CIFAR-100


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """``cifar-100-python/{train,test}`` as the real files are: protocol-2 pickles of
    dicts with bytes keys, the images a uint8 array, the labels lists of ints."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = (np.arange(n) % 100).tolist()  # every class present
        batch = {b"batch_label": f"{name}ing batch 1 of 1".encode(),
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


def write_cifar10(root: Path, per_batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar100_from_a_local_copy_end_to_end(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_cifar100(tmp_path, 60, 12, seed=0)
    assert "cifar100" in DATASETS
    ds = load_dataset("cifar100", tmp_path)
    assert ds.classes == 100 and ds.encoding == CIFAR100_ENCODING
    assert ds.x_train.shape == (60, 3, 32, 32) and ds.x_test.shape == (12, 3, 32, 32)
    assert sorted(set(ds.y_train.tolist())) == list(range(60))
    raw = pickle.loads((folder / "test").read_bytes(), encoding="bytes")[b"data"]
    assert np.array_equal(ds.x_test[7], raw[7].reshape(3, 32, 32))  # channel-major rows
    assert load_dataset("cifar100", folder).x_test.shape == (12, 3, 32, 32)
    assert ds.describe() == ("cifar100 (test split, 12 samples, mean 0.5071,0.4865,0.4409 "
                             "std 0.2673,0.2564,0.2762)")

    ckpt, ifg = tmp_path / "r20.pt", tmp_path / "r20.ifg"
    code, out, err = run_cli(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path),
                              "--levels", "2", "--epochs", "1", "--batch-size", "30",
                              "--json", "-o", str(ckpt)], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["arch"] == "resnet20" and summary["classes"] == 100
    _, config = load_checkpoint(ckpt)
    assert config.dataset == "cifar100" and config.num_classes == 100
    assert config.encoding == CIFAR100_ENCODING
    code, out, err = run_cli(["convert", str(ckpt), "--profile", "int16", "--data-dir",
                              str(tmp_path), "--json", "-o", str(ifg)], capsys)
    assert code == 0, err
    check = json.loads(out)["check"]
    assert isinstance(check, dict) and check["samples"] == 12, check
    graph = load_graph(ifg)
    assert graph.readout.shape == (100,) and graph.input.encoding == CIFAR100_ENCODING
    code, out, err = run_cli(["run", str(ifg), "--dataset", "cifar100", "--data-dir",
                              str(tmp_path), "--samples", "10", "--json"], capsys)
    assert code == 0, err
    run = json.loads(out)
    assert run["dataset"] == "cifar100" and run["samples"] == 10

    # a 100-output model on a 10-class dataset is refused, naming both
    write_cifar10(tmp_path, 4, seed=1)
    for cmd in (["run", str(ifg)], ["verify", str(ifg), "--backends", "int"]):
        code, _, err = run_cli([*cmd, "--dataset", "cifar10", "--data-dir", str(tmp_path)],
                               capsys)
        one_line_error(code, err, "the model has 100 outputs but cifar10 has 10 classes")
        assert code == DatasetError.exit_code


def test_cifar100_missing_and_hostile_files(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", "--dataset", "cifar100", "-o", str(tmp_path / "a.pt")],
                           capsys)
    one_line_error(code, err, "cifar100 needs --data-dir")
    folder = write_cifar100(tmp_path, 2, 2, seed=0)
    (folder / "test").unlink()
    code, _, err = run_cli(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path),
                            "-o", str(tmp_path / "a.pt")], capsys)
    one_line_error(code, err, f"CIFAR-100 not found in {folder}: missing test")

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    (folder / "test").write_bytes(pickle.dumps(Evil(), protocol=2))
    code, out, err = run_cli(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path),
                              "-o", str(tmp_path / "a.pt")], capsys)
    one_line_error(code, err, "refusing to load")
    assert "pwned" not in out and not (tmp_path / "a.pt").exists()
    with (folder / "test").open("wb") as fh:  # a CIFAR-10 batch where CIFAR-100 belongs
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, fh, 2)
    with pytest.raises(DatasetError, match="not a CIFAR-100 python pickle"):
        load_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------- --mean/--std


def test_encoding_override_values() -> None:
    base = InputEncoding(255.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    enc = EncodingOverride.parse(std="0.2023,0.1994,0.2010", raw_max="1").apply(base)
    assert enc == InputEncoding(1.0, (0.5, 0.5, 0.5), (0.2023, 0.1994, 0.2010))
    assert EncodingOverride.parse(mean="0.1", bits=10).apply(base) == InputEncoding(
        255.0, (0.1, 0.1, 0.1), (0.25, 0.25, 0.25), bits=10)
    assert EncodingOverride.parse().empty and EncodingOverride.parse().apply(base) == base
    for kwargs, needle in [({"mean": "0.1,0.2"}, "--mean has 2 values but the input has 3"),
                           ({"std": "0"}, "--std must be > 0"),
                           ({"std": "-1,1,1"}, "--std must be > 0"),
                           ({"mean": "nan"}, "finite"), ({"std": "inf"}, "finite"),
                           ({"std": "a,b"}, "one number or one per channel"),
                           ({"raw_max": "0"}, "--raw-max must be one number > 0"),
                           ({"bits": "1"}, "--input-bits must be in 2..24")]:
        with pytest.raises(UsageError, match=needle):
            EncodingOverride.parse(**kwargs).apply(base)  # type: ignore[arg-type]


@pytest.mark.parametrize("flags,needle", [
    (["--mean", "0.1,0.2"], "--mean has 2 values but the input has 1 channel (give one value)"),
    (["--std", "0"], "--std must be > 0"),
    (["--std", "nan"], "--std must be finite numbers"),
    (["--classes", "10"], "--classes applies to --data"),
    (["--data", "x.npz", "--dataset", "digits"], "either --dataset or --data"),
])
def test_bad_encoding_flags_are_one_line(flags: list[str], needle: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", *flags, "--epochs", "1", "-o", str(tmp_path / "a.pt")],
                           capsys)
    one_line_error(code, err, needle)
    assert code == UsageError.exit_code and not (tmp_path / "a.pt").exists()


def test_std_changes_float_accuracy_and_is_recorded(digits_checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    def convert(*flags: str) -> dict[str, Any]:
        code, out, err = run_cli(["convert", str(digits_checkpoint), "--profile", "int16",
                                  "--json", "-o", str(tmp_path / "m.ifg"), *flags], capsys)
        assert code == 0, err
        check: dict[str, Any] = json.loads(out)["check"]
        return check

    trained = convert()
    skewed = convert("--std", "0.2")  # the network was trained with std 1
    assert trained["float_accuracy"] > 0.85
    assert skewed["float_accuracy"] < trained["float_accuracy"] - 0.2
    assert load_graph(tmp_path / "m.ifg").input.std == (0.2,)
    # an .ifg keeps the encoding it was converted with: the flags cannot change it ...
    code, _, err = run_cli(["run", str(tmp_path / "m.ifg"), "--std", "1"], capsys)
    one_line_error(code, err, "was built for input raw max 16, mean 0 std 0.2")
    # ... and it is used by default (the same value repeated is no change)
    code, out, err = run_cli(["run", str(tmp_path / "m.ifg"), "--std", "0.2", "--json"],
                             capsys)
    assert code == 0, err

    # train records the encoding it used; the checkpoint keeps it as its default
    x, y = _digits_subset(200, 0)
    np.savez(tmp_path / "small.npz", x=x.astype(np.uint8), y=y)
    ckpt = tmp_path / "std.pt"
    code, out, err = run_cli(["train", "--data", str(tmp_path / "small.npz"), "--raw-max", "16",
                              "--mean", "0.25", "--std", "0.5", "--epochs", "1", "--json",
                              "-o", str(ckpt)], capsys)
    assert code == 0, err
    assert json.loads(out)["encoding"] == {"raw_max": 16.0, "mean": [0.25], "std": [0.5],
                                           "bits": 8}
    _, config = load_checkpoint(ckpt)
    assert config.encoding == InputEncoding(16.0, (0.25,), (0.5,))
    assert config.dataset == f"data:{tmp_path / 'small.npz'}" and config.num_classes == 10
    code, out, err = run_cli(["convert", str(ckpt), "--dataset", "digits", "--json", "-o",
                              str(tmp_path / "std.ifg")], capsys)
    assert code == 0, err
    assert load_graph(tmp_path / "std.ifg").input.encoding == config.encoding


# --------------------------------------------------------------------------- --data FILE.npz


def _digits_subset(n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of the digits test split (raw 0..16, shape (n, 8, 8))."""
    ds = load_dataset("digits")
    return ds.x_test[start:start + n, 0], ds.y_test[start:start + n]


def test_default_raw_max() -> None:
    assert default_raw_max(0.7) == 1.0 and default_raw_max(1.0) == 1.0
    assert default_raw_max(16) == 255.0 and default_raw_max(255) == 255.0
    assert default_raw_max(1000.2) == 1001.0


def test_own_data_runs_convert_run_verify_report(digits_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _digits_subset(48, 0)
    np.savez(tmp_path / "x.npz", x=x.astype(np.uint8), y=y.astype(np.int32))
    ds = load_dataset(f"data:{tmp_path / 'x.npz'}")
    assert ds.x_test.shape == (48, 1, 8, 8) and ds.classes == int(y.max()) + 1
    assert ds.encoding == InputEncoding(255.0, (0.0,), (1.0,))  # the checkpoint's replaces it

    done = cli(["convert", str(digits_checkpoint), "--data", "x.npz", "--profile", "int16",
                "--json", "-o", "m.ifg"], tmp_path)
    assert done.returncode == 0, done.stderr
    check = json.loads(done.stdout)["check"]
    assert isinstance(check, dict) and check["samples"] == 48, check
    done = cli(["run", "m.ifg", "--data", "x.npz", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["dataset"] == "data:x.npz" and run["samples"] == 48
    # the same samples from the embedded dataset score the same
    code, out, err = run_cli(["run", str(tmp_path / "m.ifg"), "--samples", "48", "--json"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == run["accuracy"] > 0.7
    done = cli(["verify", "m.ifg", "--data", "x.npz", "--backends", "int", "--samples", "8",
                "--timesteps", "2"], tmp_path)
    assert done.returncode == 0 and "IDENTICAL" in done.stdout, done.stderr
    done = cli(["report", "m.ifg", "--data", "x.npz", "--timesteps", "2", "--json", "r.json"],
               tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"] == "data:x.npz" and report["samples"] == 48
    assert report["accuracy"] == run["accuracy"]


def _hostile(tmp_path: Path, kind: str) -> Path:
    x, y = _digits_subset(12, 0)
    path = tmp_path / f"{kind}.npz"
    arrays: dict[str, Any] = {"x": x, "y": y}
    if kind == "object":
        arrays["x"] = np.array([x[0], "text", None], dtype=object)
    elif kind == "nan":
        arrays["x"] = x.copy()
        arrays["x"][3, 2, 2] = np.nan
    elif kind == "shape":
        arrays["x"] = x.reshape(12, 64)
    elif kind == "negative-label":
        arrays["y"] = np.where(np.arange(12) == 5, -1, y)
    elif kind == "label-count":
        arrays["y"] = y[:11]
    elif kind == "float-labels":
        arrays["y"] = y.astype(np.float32)
    elif kind == "no-y":
        del arrays["y"]
    elif kind == "empty":
        arrays = {"x": x[:0], "y": y[:0]}
    elif kind == "half-train":
        arrays["x_train"] = x
    elif kind == "train-shape":
        arrays.update(x_train=x[:, :4, :4], y_train=y)
    elif kind == "too-bright":
        arrays["x"] = x * 16.0
    elif kind == "fractional":
        arrays["x"] = x * 0.5 + 0.25
    elif kind == "label-too-big":
        arrays["y"] = np.where(np.arange(12) == 0, 12, y)
    elif kind == "strings":
        arrays["x"] = np.array(["a", "b"])
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"x": x, "y": y}))
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), x)
        path = path.with_suffix(".npy")
    else:
        np.savez(path, **arrays)
    return path


HOSTILE = [
    ("object", "cannot be read without pickle"),
    ("pickle", "is not a readable .npz archive"),
    ("npy", "is a single .npy array, not an .npz archive"),
    ("nan", "x contains NaN or infinite values"),
    ("shape", "x has shape (12, 64); expected (N, C, H, W) or (N, H, W)"),
    ("negative-label", "y must be labels >= 0, found -1"),
    ("label-count", "y has shape (11,); expected (12,)"),
    ("float-labels", "expected integer labels"),
    ("no-y", "the archive has no array 'y'"),
    ("empty", "x holds no samples"),
    ("half-train", "give both x_train and y_train, or neither"),
    ("train-shape", "x_train samples have shape (1, 4, 4) but x samples (1, 8, 8)"),
    ("too-bright", "outside 0..16"),
    ("fractional", "not whole numbers"),
    ("label-too-big", "the model has 10 outputs but data:"),
    ("strings", "expected real numbers"),
]


@pytest.fixture(scope="module")
def digits_ifg(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ifg") / "digits.ifg"
    assert main(["convert", str(digits_checkpoint), "--profile", "int16", "--no-check",
                 "--json", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("kind,needle", HOSTILE, ids=[k for k, _ in HOSTILE])
def test_hostile_data_files_are_one_line_errors(kind: str, needle: str, digits_ifg: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    path = _hostile(tmp_path, kind)
    code, out, err = run_cli(["run", str(digits_ifg), "--data", str(path)], capsys)
    one_line_error(code, err, needle)
    assert code == DatasetError.exit_code and out == ""


def test_classes_of_own_data(digits_ifg: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _digits_subset(40, 0)
    keep = y < 8  # labels 0..7 only: still fits a 10-output model
    np.savez(tmp_path / "few.npz", x=x[keep], y=y[keep])
    code, out, err = run_cli(["run", str(digits_ifg), "--data", str(tmp_path / "few.npz"),
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["samples"] == int(keep.sum())
    code, _, err = run_cli(["run", str(digits_ifg), "--data", str(tmp_path / "few.npz"),
                            "--classes", "8"], capsys)
    one_line_error(code, err, "the model has 10 outputs but data:")
    assert "has 8 classes" in err
    code, _, err = run_cli(["run", str(digits_ifg), "--data", str(tmp_path / "few.npz"),
                            "--classes", "5"], capsys)
    one_line_error(code, err, "y must lie in 0..4, found")
    # a model for another input shape names both shapes
    write_cifar100(tmp_path, 2, 2, seed=0)
    code, _, err = run_cli(["run", str(digits_ifg), "--dataset", "cifar100", "--data-dir",
                            str(tmp_path)], capsys)
    one_line_error(code, err, "the model takes inputs of shape (1, 8, 8) but cifar100 has "
                   "(3, 32, 32)")
