"""train / convert from the command line, and bad input: one line, non-zero exit, no file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.ir import load_graph

USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from csqcfs_deploy.train.activations import CSQCFS, QCFS


    class Good(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.act = CSQCFS(4, 1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


    class MaxPooled(Good):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


    class Sigmoid(Good):
        def forward(self, x):
            return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


    class NegativeQCFS(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.act = QCFS(1, init_threshold=-0.5)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).flatten(1))


    class HugeWeight(Good):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.act.up.fill_(-5.0)          # threshold ~ 0.0067
                self.conv.weight.fill_(100.0)    # ~900 thresholds per input unit


    def good(): return Good()
    def maxpooled(): return MaxPooled()
    def sigmoid(): return Sigmoid()
    def negative(): return NegativeQCFS()
    def huge(): return HugeWeight()
''')


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "usermodels_csqcfs.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(pkg))
    return pkg


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_and_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "m.pt"
    code, out, _ = run_cli(["train", "--dataset", "digits", "--epochs", "1", "--seed", "1",
                            "--json", "-o", str(ckpt)], capsys)
    assert code == 0
    data = json.loads(out)
    assert {"test_accuracy", "train_accuracy", "seconds", "epochs", "seed"} <= set(data)
    assert 0.0 <= data["test_accuracy"] <= 1.0 and data["epochs"] == 1
    assert torch.load(ckpt, weights_only=True)["format"] == "csqcfs-deploy-checkpoint"


def test_cifar_without_local_copy_is_a_clear_error(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                            "-o", str(tmp_path / "c.pt")], capsys)
    assert code != 0
    assert err.startswith("error: CIFAR-10 not found in") and err.count("\n") == 1
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("profile", ["loihi2", "int8", "int16"])
def test_convert_writes_graph_and_table(digits_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], profile: str) -> None:
    out_file = tmp_path / "m.ifg"
    # 8-bit weights lose a little on this small network at T = 1 (see test_calibration
    # for the gate's exit 9); the figure is checked here instead
    gate = ["--min-agreement", "95"]
    code, out, _ = run_cli(["convert", str(digits_checkpoint), "--profile", profile, "--json",
                            "-o", str(out_file), *gate], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["fidelity"]["quantization_fidelity"] >= 0.95
    assert data["profile"] == profile
    assert [la["kind"] for la in data["layers"]] == ["conv", "conv", "conv", "dense", "readout"]
    for la in data["layers"]:
        assert {"weight_bits_used", "threshold_min", "scale", "quant_error"} <= set(la)
    assert data["check"]["agreement"] >= 0.97
    assert load_graph(out_file).meta.profile == profile
    code, out, _ = run_cli(["convert", str(digits_checkpoint), "--profile", profile,
                            "-o", str(out_file), *gate], capsys)
    assert code == 0 and "quant error" in out and "agreement with the source model" in out


def test_user_model_converts(user_models: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.pth"
    import usermodels_csqcfs  # type: ignore[import-not-found]

    torch.save(usermodels_csqcfs.good().state_dict(), weights)
    out_file = tmp_path / "u.ifg"
    code, _, err = run_cli(["convert", "--model", "usermodels_csqcfs:good", "--weights",
                            str(weights), "--dataset", "digits", "--no-check",
                            "-o", str(out_file)], capsys)
    assert code == 0, err
    assert len(load_graph(out_file).if_layers) == 1


def _bad_inputs(tmp: Path, ckpt: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    text = tmp / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    plain = tmp / "plain.pt"
    torch.save({"a": torch.zeros(2)}, plain)
    nan = tmp / "nan.pt"
    payload = torch.load(ckpt, weights_only=True)
    payload["state_dict"]["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(payload, nan)
    return {
        "missing": ([str(tmp / "nope.pt")], "error: model file not found"),
        "truncated": ([str(truncated)], "error: "),
        "not a checkpoint": ([str(text)], "is not a PyTorch checkpoint"),
        "plain dict": ([str(plain)], "is not a csqcfs-deploy checkpoint"),
        "nan": ([str(nan)], "contains a non-finite value (nan)"),
        "maxpool": (["--model", "usermodels_csqcfs:maxpooled"],
                    "node 'pool' (MaxPool2d 'pool') is not supported"),
        "function": (["--model", "usermodels_csqcfs:sigmoid"],
                     "node 'sigmoid' (function sigmoid) is not supported"),
        "threshold": (["--model", "usermodels_csqcfs:negative"], "non-positive threshold -0.5"),
        "range": (["--model", "usermodels_csqcfs:huge", "--profile", "int8"],
                  "needs more than the 8-bit weights of profile int8"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not a checkpoint", "plain dict", "nan",
                                  "maxpool", "function", "threshold", "range"])
def test_bad_input_one_line_nonzero_no_output(case: str, digits_checkpoint: Path, tmp_path: Path,
                                              user_models: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args, needle = _bad_inputs(tmp_path, digits_checkpoint)[case]
    out_file = tmp_path / "out.ifg"
    code, _, err = run_cli(["convert", *args, "--no-check", "-o", str(out_file)], capsys)
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.ifg")]


def write_fake_cifar(root: Path, per_batch: int, seed: int) -> None:
    """CIFAR-10's python batches (the real format: pickled dicts of bytes keys)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_from_a_local_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from csqcfs_deploy.train.datasets import load_dataset

    write_fake_cifar(tmp_path, 8, 0)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (8, 3, 32, 32)
    x_int = ds.encoding.to_int(ds.x_test)
    assert x_int.min() >= -127 and x_int.max() <= 127
    ckpt = tmp_path / "r20.pt"
    code, out, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                              "--arch", "resnet20", "--levels", "2", "--epochs", "1",
                              "--batch-size", "16", "--json", "-o", str(ckpt)], capsys)
    assert code == 0, err
    assert json.loads(out)["test_samples"] == 8
    code, _, err = run_cli(["convert", str(ckpt), "--profile", "int8", "--data-dir",
                            str(tmp_path), "-o", str(tmp_path / "r20.ifg")], capsys)
    assert code == 0, err


def test_cifar_batches_are_unpickled_safely(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import pickle

    write_fake_cifar(tmp_path, 2, 1)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    code, _, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                            "--epochs", "1", "-o", str(tmp_path / "x.pt")], capsys)
    assert code != 0 and "refusing to load" in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()
