"""The fold check: the folded float graph against the user's own model, on every path.

A correctly converted network matches its model exactly (float64); a conversion
that went wrong in one place (a threshold read wrongly, a synapse scaled wrongly,
a readout bias lost) is caught and named, and the commands fail on it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.check import TOLERANCES, FoldCheck, check_fold
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.group import build_float_graph
from csqcfs_deploy.convert.passes import run_passes
from csqcfs_deploy.errors import FoldMismatch, GraphError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.ann import ActOp
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.checkpoint import ModelConfig, save_checkpoint
from csqcfs_deploy.train.datasets import DIGITS_ENCODING, Dataset
from csqcfs_deploy.train.zoo import randomize_batchnorm
from tests.refnets import CONVENTIONS, RefResNet, RefVGG, randomize

N = 96  # calibration samples in these tests


@pytest.fixture(scope="module")
def calib(digits: Dataset) -> np.ndarray:
    return DIGITS_ENCODING.normalize(digits.x_train[:N])


def _refold(result: FoldResult, layer: str, factor: float) -> FoldResult:
    """The fold of ``result`` had the capture read activation ``layer``'s threshold
    as ``factor`` times its value (what a misrecognised activation does)."""
    node = result.ann.node(layer)
    assert isinstance(node.op, ActOp)
    op = replace(node.op, threshold=node.op.threshold * factor,
                 real_threshold=node.op.real_threshold * factor)
    ann = result.ann.replace_node(replace(node, op=op))
    folded, log = run_passes(ann)
    return FoldResult(ann, folded, build_float_graph(folded, result.graph.input.encoding), log)


def _with_graph(result: FoldResult, graph: IFGraph) -> FoldResult:
    return FoldResult(result.ann, result.folded, graph, result.log)


# --------------------------------------------------------------------------- the check


def test_trained_digits_network_matches_its_model(digits_model: tuple[nn.Module, ModelConfig],
                                                  digits_fold: FoldResult,
                                                  calib: np.ndarray) -> None:
    model, _ = digits_model
    check = check_fold(model, digits_fold, calib, source="digits training split")
    assert check.dtype == "float64" and check.samples == N
    assert check.matches_model == 1.0
    assert check.first_divergence is None and check.diverging_layers == ()
    graph = digits_fold.graph
    assert [la.name for la in check.layers] == [la.name for la in graph.if_layers]
    for la, layer in zip(check.layers, graph.if_layers, strict=True):
        assert la.observed, la.note  # every activation's module was hooked
        assert la.elements == N * layer.neurons
        assert la.differing == 0 and la.max_levels <= TOLERANCES["float64"].levels
    assert check.readout.max_rel_diff < 1e-9
    assert check.summary().startswith(
        f"folded graph vs model: 100.00 % agreement on {N} calibration samples (float64, "
        "digits training split), max deviation 0 levels")


def test_misread_threshold_is_named(digits_model: tuple[nn.Module, ModelConfig],
                                    digits_fold: FoldResult, calib: np.ndarray) -> None:
    model, _ = digits_model
    names = [la.name for la in digits_fold.graph.if_layers]
    bad = names[1]
    wrong = _refold(digits_fold, bad, 0.6)
    with pytest.raises(FoldMismatch) as info:
        check_fold(model, wrong, calib)
    msg = str(info.value)
    origin = digits_fold.ann.node(bad).origin
    assert msg.startswith(f"folded graph does not match the model: first divergence at layer "
                          f"'{bad}' (module '{origin}'): ")
    assert "% of outputs differ" in msg and "\n" not in msg
    check = info.value.check
    assert isinstance(check, FoldCheck) and check.first_divergence == bad
    # teacher forcing keeps the error where it is: the layers around it are clean
    rows = {la.name: la for la in check.layers}
    assert rows[bad].share > 0.01
    assert not rows[names[0]].diverges and not rows[names[2]].diverges
    assert isinstance(info.value, GraphError) and info.value.exit_code == 3


def test_misscaled_synapse_is_named_at_its_target(digits_model: tuple[nn.Module, ModelConfig],
                                                  digits_fold: FoldResult,
                                                  calib: np.ndarray) -> None:
    model, _ = digits_model
    graph = digits_fold.graph
    target = graph.if_layers[2].name
    proj = graph.incoming(target)[0]
    tampered = replace(proj, weight=proj.weight * 1.25)
    bad = graph.replace(projections=tuple(tampered if p.name == proj.name else p
                                          for p in graph.projections))
    check = check_fold(model, _with_graph(digits_fold, bad), calib, raise_on_mismatch=False)
    assert check.first_divergence == target
    assert [la.name for la in check.layers if la.diverges] == [target]


def test_lost_readout_bias_is_named(digits_model: tuple[nn.Module, ModelConfig],
                                    digits_fold: FoldResult, calib: np.ndarray) -> None:
    model, _ = digits_model
    graph = digits_fold.graph
    readout = replace(graph.readout, bias=np.zeros_like(graph.readout.bias))
    bad = graph.replace(layers=tuple(readout if la.name == readout.name else la
                                     for la in graph.layers))
    with pytest.raises(FoldMismatch, match=rf"first divergence at layer '{readout.name}' "
                       r".*logits differ by up to"):
        check_fold(model, _with_graph(digits_fold, bad), calib)


def test_only_float_graphs_are_checked(digits_model: tuple[nn.Module, ModelConfig],
                                       digits_fold: FoldResult,
                                       digits_graphs: dict[str, IFGraph],
                                       calib: np.ndarray) -> None:
    model, _ = digits_model
    with pytest.raises(GraphError, match="float IF graph"):
        check_fold(model, _with_graph(digits_fold, digits_graphs["int16"]), calib)
    with pytest.raises(GraphError, match=r"shape \(1, 4, 4\)"):
        check_fold(model, digits_fold, calib[:, :, :4, :4])


class _Locked(nn.Module):
    """A network holding a lock (it cannot be deep-copied): checked as it is, float32."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = CSQCFS(6, 2, init_threshold=0.8)
        self.fc = nn.Linear(6 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


def test_a_model_that_cannot_run_in_float64_is_checked_in_float32(calib: np.ndarray) -> None:
    torch.manual_seed(3)
    model = randomize_batchnorm(_Locked(), 3)
    result = fold(model, (1, 8, 8), DIGITS_ENCODING)
    check = check_fold(model, result, calib)
    assert check.dtype == "float32" and check.matches_model >= 0.99
    assert check.first_divergence is None and check.layers[0].observed
    # the check notices a wrong threshold in float32 as well
    with pytest.raises(FoldMismatch, match="first divergence at layer 'act' \\(module 'act'\\)"):
        check_fold(model, _refold(result, "act", 0.7), calib)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
@pytest.mark.parametrize("net", [RefVGG, RefResNet])
def test_reference_conventions_match_layer_by_layer(convention: str, net: type[nn.Module],
                                                    calib: np.ndarray) -> None:
    torch.manual_seed(1)
    model = randomize(net(CONVENTIONS[convention]), 1)  # type: ignore[call-arg]
    result = fold(model, (1, 8, 8), DIGITS_ENCODING)
    check = check_fold(model, result, calib[:32])
    assert check.matches_model == 1.0 and check.first_divergence is None
    assert all(la.observed for la in check.layers), [la.note for la in check.layers]
    assert len({la.origin for la in check.layers}) == len(check.layers)


# --------------------------------------------------------------------------- the commands


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_prints_the_fold_check_first(digits_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "m.ifg"
    code, out, err = _cli(["convert", str(digits_checkpoint), "--no-check",
                           "--calibration-samples", "64", "-o", str(out_file)], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == ("folded graph vs model: 100.00 % agreement on 64 "
                                   "calibration samples (float64, digits training split), "
                                   "max deviation 0 levels")
    code, out, err = _cli(["convert", str(digits_checkpoint), "--json", "-o", str(out_file)],
                          capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["fold_check"]["samples"] == 256 and data["fold_check"]["matches_model"] == 1.0
    assert data["check"]["folded_matches_model"] == 1.0
    assert data["fold_check"]["first_divergence"] is None


def test_run_and_verify_show_the_fold_check(digits_checkpoint: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    line = "folded graph vs model: 100.00 % agreement on 32 calibration samples"
    for cmd in (["run", "--samples", "8"], ["verify", "--backends", "int", "--samples", "4"]):
        code, out, err = _cli([*cmd, str(digits_checkpoint), "--calibration-samples", "32"],
                              capsys)
        assert code == 0, err
        assert out.startswith("fidelity on "), out  # the fidelity figures come first
        assert f"\n{line}" in out, out
        code, out, err = _cli([*cmd, str(digits_checkpoint), "--calibration-samples", "32",
                               "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["fold_check"]["matches_model"] == 1.0


def test_no_fold_check_warns_loudly(digits_checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["convert", str(digits_checkpoint), "--no-fold-check", "--no-check",
                           "--json", "-o", str(tmp_path / "m.ifg")], capsys)
    assert code == 0
    assert json.loads(out)["fold_check"] is None
    assert err.startswith("warning: --no-fold-check: the folded graph is NOT checked")
    with pytest.raises(SystemExit) as info:  # argparse's usage error (cli.arg_types)
        _cli(["convert", str(digits_checkpoint), "--calibration-samples", "0",
              "-o", str(tmp_path / "m.ifg")], capsys)
    err = capsys.readouterr().err
    assert info.value.code in (2, 8) and \
        "argument --calibration-samples: must be an integer >= 1" in err


def test_without_data_the_check_runs_on_random_inputs(digits_model: tuple[nn.Module,
                                                                          ModelConfig],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    model, config = digits_model
    gone = tmp_path / "gone.npz"  # the data it was trained on is not at hand any more
    ckpt = save_checkpoint(tmp_path / "m.pt", model, replace(config, dataset=f"data:{gone}"))
    code, out, err = _cli(["convert", str(ckpt), "--calibration-samples", "16",
                           "-o", str(tmp_path / "m.ifg")], capsys)
    # no test data either: the fidelity gate cannot hold, so nothing is written
    assert code == 9 and "the gates cannot hold without test data" in err
    assert not (tmp_path / "m.ifg").exists()
    code, out, err = _cli(["convert", str(ckpt), "--calibration-samples", "16",
                           "--min-agreement", "0", "-o", str(tmp_path / "m.ifg")], capsys)
    assert code == 0, err
    assert "warning: fidelity not measured" in err
    assert "warning: no calibration data" in err and "random inputs" in err
    assert out.startswith("folded graph vs model: 100.00 % agreement on 16 calibration "
                          "samples (float64, random inputs; no data: ")
    # data the user names must be there: no silent fallback then
    code, _, err = _cli(["convert", str(ckpt), "--data", str(gone), "-o",
                         str(tmp_path / "m.ifg")], capsys)
    assert code == 7 and err.startswith("error: ") and err.count("\n") == 1


def test_calibration_data_of_the_wrong_shape_is_one_line(digits_checkpoint: Path,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    data = tmp_path / "big.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, size=(8, 3, 16, 16)).astype(np.uint8),
             y=rng.integers(0, 10, size=8))
    code, _, err = _cli(["convert", str(digits_checkpoint), "--data", str(data), "-o",
                         str(tmp_path / "m.ifg")], capsys)
    assert code == 7 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "the model takes inputs of shape (1, 8, 8) but data:" in err
    assert "has (3, 16, 16); pick the dataset with --dataset or --data" in err
    assert not (tmp_path / "m.ifg").exists()



def test_convert_fails_on_data_with_other_classes(digits_checkpoint: Path, digits: Dataset,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    keep = digits.y_train < 5
    data = tmp_path / "five.npz"
    np.savez(data, x=digits.x_train[keep][:40], y=digits.y_train[keep][:40])
    code, _, err = _cli(["convert", str(digits_checkpoint), "--data", str(data), "--classes",
                         "5", "-o", str(tmp_path / "m.ifg")], capsys)
    assert code == 7 and err.count("\n") == 1, err
    assert "the model has 10 outputs but data:" in err and "has 5 classes" in err
    assert not (tmp_path / "m.ifg").exists()
