"""The lava-dl netx file: loads with netx.hdf5.Network, runs on Loihi2SimCfg and, at T = 1,
equals the integer simulator (hard reset, pipelined) in every layer's counted step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import GraphError, QuantizationError
from csqcfs_deploy.exporters.netx import _check_dense_weights, read_netx_plan, write_netx
from csqcfs_deploy.ir import IFGraph, IFLayer, save_graph
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.simulators.lava.netx import check_netx, hard_reset
from csqcfs_deploy.train.datasets import DIGITS_ENCODING, Dataset

from .conftest import randomize_batchnorm
from .test_lava import TinyResNet

SAMPLES = 20


@pytest.fixture(scope="module")
def per_layer_graph(digits_fold: FoldResult) -> IFGraph:
    return quantize(digits_fold.graph, "loihi2", per_channel=False)[0]


def test_netx_file_of_digits_cnn_equals_the_simulator_at_t1(per_layer_graph: IFGraph,
                                                           digits: Dataset,
                                                           tmp_path: Path) -> None:
    graph = per_layer_graph
    path = tmp_path / "digits.net"
    export = write_netx(graph, path)
    x = input_units(graph, digits.x_test[:SAMPLES])
    check = check_netx(graph, path, x)
    neurons = sum(la.neurons for la in graph.if_layers)
    assert check.samples == SAMPLES and check.layers == 4
    assert check.compared == SAMPLES * neurons
    assert check.mismatches == 0
    assert check.readout_equal and check.predictions_equal
    assert len(export.plan.layers) == 5  # 4 IF layers + the readout


def test_netx_file_layout(per_layer_graph: IFGraph, tmp_path: Path) -> None:
    path = write_netx(per_layer_graph, tmp_path / "d.net").path
    with h5py.File(path, "r") as f:
        layers = f["layer"]
        types = [layers[str(i)]["type"][0].decode() for i in range(len(layers))]
        assert types == ["input", "conv", "conv", "conv", "flatten", "dense", "dense"]
        assert list(layers["0"]["shape"][()]) == [1, 8, 8]
        for i in (1, 2, 3, 5, 6):
            neuron = layers[str(i)]["neuron"]
            assert neuron["type"][0] == b"CUBA"
            assert int(neuron["iDecay"][()]) == 4096 and int(neuron["vDecay"][()]) == 0
            assert 0 <= int(neuron["vThMant"][()]) < 2**17
            bias = layers[str(i)]["bias"][()]
            assert bias.min() >= -(2**12) and bias.max() < 2**12
        conv = layers["3"]  # the pooled conv: pool folded into a 6x6 stride-2 kernel
        assert conv["weight"].shape[2:] == (6, 6)
        assert list(conv["stride"][()]) == [2, 2]
    meta = read_netx_plan(path)
    assert meta["load_kwargs"] == {"input_message_bits": 8, "reset_interval": 6,
                                   "reset_offset": 1}


@pytest.mark.parametrize("high", [254, 100, 30])
def test_dense_weights_survive_netx_weight_optimisation(high: int) -> None:
    rng = np.random.default_rng(high)
    w = rng.integers(-high // 2, high // 2 + 1, (20, 30)) * 2
    w[0, 0] = high  # the range that decides netx's exponent
    _check_dense_weights("x", w)            # raises when a weight would change
    _check_dense_weights("x", np.abs(w))    # excitatory sign mode too


def test_per_channel_thresholds_fit_or_are_refused(digits_graphs: dict[str, IFGraph],
                                                   digits: Dataset, tmp_path: Path) -> None:
    """Per-channel thresholds become per-channel bias mantissas at T = 1 when they fit
    (checked on a few samples); a spread beyond 13 bits points to --per-layer-thresholds."""
    graph = digits_graphs["loihi2"]
    path = tmp_path / "pc.net"
    write_netx(graph, path)
    check = check_netx(graph, path, input_units(graph, digits.x_test[:4]))
    assert check.mismatches == 0 and check.readout_equal
    first = graph.if_layers[0]
    v_th = np.where(np.arange(first.channels) % 2 == 0, 64, 64 * (2**17 - 1)).astype(np.int64)
    wide = dataclasses.replace(first, v_th=v_th, v_init=v_th // 2 + 1)
    bad = graph.replace(layers=tuple(wide if la.name == first.name else la
                                     for la in graph.layers))
    with pytest.raises(QuantizationError, match="--per-layer-thresholds"):
        write_netx(bad, tmp_path / "bad.net")
    assert not (tmp_path / "bad.net").exists()


def test_residual_and_other_profiles_are_refused(digits_graphs: dict[str, IFGraph],
                                                 tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyResNet(), seed=1)
    residual = quantize(fold(model, (1, 8, 8), DIGITS_ENCODING).graph, "loihi2")[0]
    with pytest.raises(GraphError, match="feed-forward chain"):
        write_netx(residual, tmp_path / "r.net")
    with pytest.raises(GraphError, match="loihi2 profile only"):
        write_netx(digits_graphs["int16"], tmp_path / "i.net")


def test_hard_reset_copy_changes_only_the_reset(per_layer_graph: IFGraph) -> None:
    copy = hard_reset(per_layer_graph)
    assert all(la.reset == "zero" for la in copy.if_layers)
    assert all(la.reset == "subtract" for la in per_layer_graph.if_layers)
    for a, b in zip(copy.layers, per_layer_graph.layers, strict=True):
        if isinstance(a, IFLayer):
            assert np.array_equal(a.v_th, b.v_th) and np.array_equal(a.bias, b.bias)


def test_cli_export_says_where_the_file_is_exact(per_layer_graph: IFGraph, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ifg = save_graph(per_layer_graph, tmp_path / "d.ifg")
    out = tmp_path / "d.net"
    assert main(["export", str(ifg), "--target", "lava-netx", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exact at T = 1" in text and "reset_interval=6" in text
    assert out.is_file()
