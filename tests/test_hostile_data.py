"""Hostile and malformed inputs to checkpoints, datasets, energy files and numeric options
are refused with one line naming the problem; the verify memory guard counts real sizes.

Every case is a real CLI call (``main([...])`` in process): a bad file ends in a
non-zero exit and one ``error: ...`` line on stderr, no traceback and no output
file; a bad numeric option is the parser's usage error naming the option
(:mod:`csqcfs_deploy.cli.arg_types`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import textwrap
import weakref
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, total_steps
from csqcfs_deploy.run.memory import recording_run_bytes
from csqcfs_deploy.simulators.integer.simulator import Simulator
from csqcfs_deploy.train.checkpoint import ModelConfig, save_checkpoint
from csqcfs_deploy.train.datasets import DIGITS_ENCODING
from csqcfs_deploy.train.zoo import build_model, randomize_batchnorm
from tests.refnets import CONVENTIONS, RefResNet, randomize


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the CLI; assert a non-zero exit and one ``error:`` line without a traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code != 0, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return code, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; assert the parser's usage error (a non-zero exit from the parser,
    whichever code main.py gives it); return its last stderr line."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err
    assert info.value.code not in (0, None) and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- checkpoints


class _System:
    """Pickles as a call of os.system (what a hostile checkpoint holds)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained digits-cnn checkpoint (nothing in these tests needs it trained)."""
    torch.manual_seed(0)
    model = build_model("digits-cnn", 1)
    config = ModelConfig("digits-cnn", 1, 0.5, 10, (1, 8, 8), DIGITS_ENCODING, "digits")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.pt", model, config)


def _variant(base: Path, path: Path, config: dict[str, object] | None = None,
             text: str | None = None, complex_weights: bool = False) -> Path:
    payload = torch.load(base, weights_only=True)
    if config is not None:
        payload["config"] = json.dumps({**json.loads(payload["config"]), **config})
    if text is not None:
        payload["config"] = text
    if complex_weights:
        payload["state_dict"] = {k: v.to(torch.complex64) if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
    torch.save(payload, path)
    return path


CHECKPOINT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "levels 0": ({"config": {"levels": 0}}, "field 'levels' must be an integer in 1..1024"),
    "levels -3": ({"config": {"levels": -3}}, "field 'levels'"),
    "levels true": ({"config": {"levels": True}}, "field 'levels' must be an integer"),
    "levels text": ({"config": {"levels": "4"}}, "field 'levels'"),
    "phi nan": ({"config": {"phi": float("nan")}}, "field 'phi' must be a number in [0, 1), "
                                                    "got NaN"),
    "phi inf": ({"config": {"phi": float("inf")}}, "field 'phi'"),
    "classes 0": ({"config": {"num_classes": 0}}, "field 'num_classes'"),
    "huge input": ({"config": {"input_shape": [1, 10**5, 10**5]}}, "field 'input_shape'"),
    "arch int": ({"config": {"arch": 5}}, "field 'arch'"),
    "encoding": ({"config": {"encoding": {"raw_max": 16, "mean": ["x"], "std": [1]}}},
                 "field 'encoding.mean'"),
    "deep json": ({"text": "[" * 100_000}, "config is not valid JSON"),
    "complex": ({"complex_weights": True}, "is complex (torch.complex64)"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_config_or_weights_name_file_and_field(
        case: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    kwargs, needle = CHECKPOINT_CASES[case]
    bad = _variant(checkpoint, tmp_path / "m.pt", **kwargs)
    out = tmp_path / "out.ifg"
    code, err = one_line_error(capsys, "convert", str(bad), "--no-check", "-o", str(out))
    assert code in (2, 3) and f"{bad}" in err and needle in err, err
    assert not out.exists()


def test_hostile_pickles_are_refused_and_never_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pt",
             "plain": tmp_path / "plain.pt"}
    torch.save({"x": _System(command)}, files["zip"])
    torch.save({"x": _System(command)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["plain"].write_bytes(pickle.dumps(_System(command), protocol=0))
    (tmp_path / "x.py").write_text("from torch import nn\n\n\ndef f():\n"
                                   "    return nn.Linear(64, 10)\n")
    runs = [(["convert", str(path)], path) for path in files.values()]
    runs.append((["convert", "--model", f"{tmp_path}/x.py:f", "--weights", str(files["zip"])],
                 files["zip"]))
    for argv, path in runs:
        code, err = one_line_error(capsys, *argv, "--no-check", "-o", str(tmp_path / "o.ifg"))
        assert code == 2 and err.startswith(f"error: {path}: refused to load: ")
        assert "asks to import posix.system" in err and "weights_only=True" in err, err
    assert not marker.exists()


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "empty"),
    (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
     "is not a PyTorch checkpoint ("),
    (b"not a checkpoint\n", "is not a PyTorch checkpoint ("),
])
def test_empty_or_random_files_are_not_checkpoints(content: bytes, needle: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    code, err = one_line_error(capsys, "convert", str(path), "--no-check", "-o",
                               str(tmp_path / "o.ifg"))
    assert code == 2 and err.startswith(f"error: {path} ") and needle in err, err


# --------------------------------------------------------------------------- datasets


def _cifar(root: Path, bad: dict[str, object] | None = None, n: int = 4) -> Path:
    """CIFAR-10's python batches (pickled dicts of bytes keys) with ``test_batch``'s
    entries replaced by ``bad``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch: dict[bytes, object] = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=n).tolist()}
        if name == "test_batch" and bad:
            batch.update({k.encode(): v for k, v in bad.items()})
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _nan_images() -> np.ndarray:
    data = np.full((4, 3072), 7.0)
    data[1, 5] = np.nan
    return data


CIFAR_CASES: dict[str, tuple[dict[str, object], str]] = {
    "nan data": ({"data": _nan_images()}, "data contains NaN or infinite values"),
    "inf data": ({"data": np.full((4, 3072), np.inf)}, "NaN or infinite"),
    "label 99": ({"labels": [0, 1, 99, 2]}, "labels must lie in 0..9, found 99"),
    "label -1": ({"labels": [0, -1, 3, 2]}, "labels must lie in 0..9, found -1"),
    "float labels": ({"labels": [0.5, 1.0, 2.0, 3.0]}, "labels must be integers"),
    "text labels": ({"labels": ["a", "b", "c", "d"]}, "labels must be integers"),
    "empty test": ({"data": np.zeros((0, 3072), np.uint8), "labels": []},
                   "expected (N, 3072) with N >= 1 images"),
    "wrong shape": ({"data": np.zeros((4, 100), np.uint8)}, "data has shape (4, 100)"),
    "pixel 300": ({"data": np.full((4, 3072), 300, np.int64)}, "whole pixel values in 0..255"),
    "text data": ({"data": "images"}, "data must be a numeric array"),
    "label count": ({"labels": [1, 2]}, "4 images but labels has shape (2,)"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_CASES))
def test_bad_cifar_batches_are_refused(case: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad, needle = CIFAR_CASES[case]
    folder = _cifar(tmp_path / "data", bad)
    out = tmp_path / "m.pt"
    code, err = one_line_error(capsys, "train", "--dataset", "cifar10", "--data-dir",
                               str(folder), "--epochs", "1", "-o", str(out))
    assert code == 7 and str(folder / "test_batch") in err and needle in err, err
    assert not out.exists()


def _lying_npz(path: Path) -> Path:
    """x.npy declares 10**6 8x8 float32 images but holds one."""
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 8, 8)})
            fh.write(np.zeros(64, np.float32).tobytes())
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(10**6, np.int64))
    return path


OWN_CASES: dict[str, tuple[dict[str, np.ndarray], list[str], str]] = {
    "label 99": ({"x": np.ones((4, 8, 8)), "y": np.array([0, 1, 99, 2])}, ["--classes", "10"],
                 "y must lie in 0..9, found 99"),
    "label -1": ({"x": np.ones((4, 8, 8)), "y": np.array([0, -1, 1, 2])}, [],
                 "y must be labels >= 0, found -1"),
    "nan": ({"x": np.full((4, 8, 8), np.nan), "y": np.zeros(4, int)}, [], "NaN or infinite"),
    "empty": ({"x": np.zeros((0, 8, 8)), "y": np.zeros(0, int)}, [], "x holds no samples"),
    "empty train": ({"x": np.ones((4, 8, 8)), "y": np.zeros(4, int),
                     "x_train": np.zeros((0, 8, 8)), "y_train": np.zeros(0, int)}, [],
                    "x_train holds no samples"),
    "complex": ({"x": np.ones((4, 8, 8), complex), "y": np.zeros(4, int)}, [],
                "x has dtype complex128"),
    "float labels": ({"x": np.ones((4, 8, 8)), "y": np.zeros(4)}, [], "expected integer labels"),
}


@pytest.mark.parametrize("case", [*sorted(OWN_CASES), "lying header"])
def test_bad_own_data_is_refused(case: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.npz"
    if case == "lying header":
        _lying_npz(path)
        extra, needle = [], "declares 256000000 bytes of float32 (1000000, 1, 8, 8) but holds"
    else:
        arrays, extra, needle = OWN_CASES[case]
        np.savez(path, **arrays)  # type: ignore[arg-type]
    out = tmp_path / "m.pt"
    code, err = one_line_error(capsys, "train", "--data", str(path), *extra, "--epochs", "1",
                               "-o", str(out))
    assert code == 7 and str(path) in err and needle in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- energy files


ENERGY_CASES: dict[str, tuple[str, str]] = {
    "source int": ('{"name": "e", "source": 5, "sop_pj": 1}', "source must be a non-empty "
                                                              "string, got 5"),
    "sop bool": ('{"name": "e", "source": "s", "sop_pj": true}', "sop_pj must be a finite "
                                                                 "number >= 0 (pJ), got true"),
    "sop text": ('{"name": "e", "source": "s", "sop_pj": "0.9"}', 'sop_pj must be a finite'),
    "sop nan": ('{"name": "e", "source": "s", "sop_pj": NaN}', "got NaN"),
    "sop inf": ('{"name": "e", "source": "s", "sop_pj": 1e999}', "got Infinity"),
    "sop negative": ('{"name": "e", "source": "s", "sop_pj": -1}', "got -1"),
    "sop huge int": ('{"name": "e", "source": "s", "sop_pj": 1' + "0" * 400 + "}",
                     "sop_pj must be a finite"),
    "mac list": ('{"name": "e", "source": "s", "sop_pj": 1, "mac_pj": [1]}', "mac_pj must be"),
    "name null": ('{"name": null, "source": "s", "sop_pj": 1}', "name must be a non-empty"),
    "deep list": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "list": ("[1, 2]", "expected a JSON object"),
    "not json": ("{name: e}", "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(ENERGY_CASES))
def test_bad_energy_files_name_the_file(case: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    text, needle = ENERGY_CASES[case]
    path = tmp_path / "e.json"
    path.write_text(text)
    code, err = one_line_error(capsys, "report", str(tmp_path / "m.ifg"), "--energy",
                               f"cmos45,{path}")
    assert code == 2 and str(path) in err and needle in err, err


def test_a_good_energy_file_still_loads(tmp_path: Path) -> None:
    from csqcfs_deploy.report.energy import resolve_energy

    path = tmp_path / "e.json"
    path.write_text('{"name": "e", "source": "a paper", "sop_pj": 1, "mac_pj": null, '
                    '"neuron_active_pj": 0.5}')
    (e,) = resolve_energy(str(path))
    assert (e.sop_pj, e.mac_pj, e.neuron_active_pj, e.neuron_inactive_pj) == (1.0, None, 0.5, 0)
    assert isinstance(e.sop_pj, float)


# --------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize(("argv", "needle"), [
    (["report", "m.ifg", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["run", "m.ifg", "--batch-size", "-4"], "argument --batch-size: must be an integer >= 1"),
    (["sweep", "m.ifg", "--batch-size", "0"], "argument --batch-size: must be an integer"),
    (["train", "-o", "m.pt", "--batch-size", "0"], "argument --batch-size: must be an integer"),
    (["train", "-o", "m.pt", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["train", "-o", "m.pt", "--lr", "0"], "argument --lr: must be a number > 0"),
    (["train", "-o", "m.pt", "--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
    (["train", "-o", "m.pt", "--levels", "0"], "argument --levels: must be an integer >= 1"),
    (["train", "-o", "m.pt", "--phi", "1.5"], "argument --phi: must be a number in [0, 1)"),
    (["train", "-o", "m.pt", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["train", "-o", "m.pt", "--classes", "0"], "argument --classes: must be an integer >= 1"),
    (["run", "m.ifg", "--timesteps", "1e6"], "argument --timesteps/-T: must be an integer"),
    (["run", "m.ifg", "--timesteps", "1000000"], "must be an integer <= 4096"),
    (["run", "m.ifg", "--timesteps", "0"], "argument --timesteps/-T: must be an integer >= 1"),
    (["verify", "m.ifg", "--presim", "-2"], "argument --presim/-P: must be an integer >= 0"),
    (["report", "m.ifg", "--presim", "5000"], "must be an integer <= 4096"),
    (["run", "m.ifg", "--samples", "0"], "argument --samples: must be an integer >= 1"),
    (["report", "m.ifg", "--samples", "-5"], "argument --samples: must be an integer >= 1"),
    (["sweep", "m.ifg", "--timesteps", "1,100000"], "must be an integer <= 4096"),
    (["sweep", "m.ifg", "--timesteps", "1,x"], "argument --timesteps/-T: must be an integer"),
    (["sweep", "m.ifg", "--timesteps", "0,1"], "must be an integer >= 1, got '0'"),
    (["sweep", "m.ifg", "--presim", "-1"], "argument --presim/-P: must be an integer >= 0"),
    (["sweep", "m.ifg", "--timesteps", "1,,2"], "must be comma-separated integers"),
    (["demo", "--lava-samples", "0"], "argument --lava-samples: must be an integer >= 1"),
    (["demo", "--timesteps", "99999"], "must be an integer <= 4096"),
    (["convert", "m.pt", "-o", "x.ifg", "--calibration-samples", "0"],
     "argument --calibration-samples: must be an integer >= 1"),
    (["convert", "m.pt", "-o", "x.ifg", "--calibration-margin", "nan"],
     "argument --calibration-margin: must be a finite number"),
    (["run", "m.ifg", "--min-agreement", "101"], "argument --min-agreement: must be a number "
                                                 "<= 100"),
])
def test_bad_numeric_options_are_usage_errors(argv: list[str], needle: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    last = usage_error(capsys, *argv)
    assert "error: " in last and needle in last, last


def test_good_numeric_options_parse() -> None:
    from csqcfs_deploy.cli.main import build_parser

    args = build_parser().parse_args(["sweep", "m.ifg", "-T", "1, 2,2,4096", "-P", "0,3"])
    assert args.timesteps == (1, 2, 4096) and args.presim == (0, 3)
    args = build_parser().parse_args(["sweep", "m.ifg"])  # the defaults go through the type
    assert args.timesteps == (1, 2, 4, 8) and args.presim == (0,)
    args = build_parser().parse_args(["train", "-o", "m.pt", "--lr", "1e-3", "--phi", "0"])
    assert (args.lr, args.phi, args.levels, args.batch_size) == (1e-3, 0.0, 1, 64)


# --------------------------------------------------------------------------- --model


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd holding a user module that re-exports os.system and defines a non-Module
    class; the marker file shows whether anything ran."""
    (tmp_path / "trap_a2mod.py").write_text(textwrap.dedent('''
        from os import system
        from shutil import rmtree


        class Builder:
            def __init__(self, *args):
                open("built", "w").close()
    '''))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("spec", "needle"), [
    ("os:system('touch ran')", "os is a module of the Python standard library"),
    ("subprocess:run(['touch', 'ran'])", "subprocess is a module of the Python standard"),
    ("shutil:rmtree('.')", "shutil is a module of the Python standard library"),
    ("builtins:exec('open(\"ran\", \"w\")')", "builtins is a module of the Python standard"),
    ("trap_a2mod:system('touch ran')", "a builtin_function_or_method, not a class or a Python "
                                       "function"),
    ("trap_a2mod:rmtree('.')", "shutil.rmtree, a function of the Python standard library"),
    ("trap_a2mod:Builder", "a class (trap_a2mod.Builder) that is not a torch.nn.Module"),
])
def test_model_factories_outside_the_rule_are_never_called(
        spec: str, needle: str, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = one_line_error(capsys, "convert", "--model", spec, "--no-check", "-o",
                               str(model_dir / "o.ifg"))
    assert code == 8 and needle in err, err
    assert sorted(p.name for p in model_dir.iterdir() if p.suffix != ".py"
                  and p.name != "__pycache__") == []


# --------------------------------------------------------------------------- memory guard


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among tensors made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, references]
        self.now = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                storage = t.untyped_storage()
                entry = self.live.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
                if entry[1] == 0:
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._release, storage.data_ptr())
        return out


@pytest.fixture(scope="module")
def small_graphs() -> dict[str, IFGraph]:
    """An untrained digits-cnn (chain) and a small residual network, quantized."""
    torch.manual_seed(1)
    chain = randomize_batchnorm(build_model("digits-cnn", 1), 0)
    resnet = randomize(RefResNet(CONVENTIONS["thresh-if"]), 1)  # type: ignore[no-untyped-call]
    return {"chain int16": quantize(fold(chain, (1, 8, 8), DIGITS_ENCODING).graph, "int16")[0],
            "resnet loihi2": quantize(fold(resnet, (1, 8, 8), DIGITS_ENCODING).graph,
                                      "loihi2")[0]}


@pytest.mark.parametrize(("n", "cfg"), [
    (10, RunConfig(4, 4, "pipelined", record=True)),
    (32, RunConfig(1, 0, "synchronous", record=True)),
    (4, RunConfig(16, 0, "pipelined", record=True)),
])
def test_memory_guard_bounds_the_tensors_of_a_real_run(
        n: int, cfg: RunConfig, small_graphs: dict[str, IFGraph]) -> None:
    for name, graph in small_graphs.items():
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 17, (n, 1, 8, 8)))
        sim = Simulator(graph)
        with PeakTensorBytes() as peak:
            result = sim.run(x, cfg)
        assert result.spikes is not None
        recorded = sum(s.numel() * s.element_size() for s in result.spikes.values())
        estimate = recording_run_bytes(graph, cfg, n)
        # the recording alone is 1 byte per neuron-step; the run holds several times that
        neuron_steps = total_steps(graph, cfg) * n * sum(la.neurons for la in graph.if_layers)
        assert recorded == neuron_steps and peak.peak > 3 * recorded, name
        assert peak.peak <= estimate <= 3 * peak.peak, (name, peak.peak, estimate)
        assert math.isfinite(estimate / neuron_steps)
