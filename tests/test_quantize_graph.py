"""Quantization to profiles, the quantized ANN, and the IF graph file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import check_profile, quantize
from csqcfs_deploy.errors import GraphError, InputFileError, QuantizationError
from csqcfs_deploy.ir import (
    NODE_TYPES,
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ReadoutLayer,
    SumPool,
    graph_from_bytes,
    graph_to_bytes,
    load_graph,
    save_graph,
)
from csqcfs_deploy.ir.nodes import CalibrationRecord
from csqcfs_deploy.ir.profiles import PROFILES
from csqcfs_deploy.run.reference import ann_forward, input_units
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING
from csqcfs_deploy.train.zoo import build_model

from .conftest import randomize_batchnorm
from .oracles import ann_oracle


def agreement(float_graph: IFGraph, qgraph: IFGraph, raw: np.ndarray) -> float:
    f = ann_forward(float_graph, input_units(float_graph, raw)).predictions
    q = ann_forward(qgraph, input_units(qgraph, raw)).predictions
    return float((f == q).mean())


def test_int16_agrees_with_float_network(digits_fold, digits_graphs, digits) -> None:  # type: ignore[no-untyped-def]
    rates = {name: agreement(digits_fold.graph, g, digits.x_test)
             for name, g in digits_graphs.items()}
    print("float-vs-quantized agreement on the digits test split:", rates)
    assert rates["int16"] >= 0.995
    assert rates["loihi2"] >= 0.97 and rates["int8"] >= 0.97


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_quantized_graph_fits_profile(digits_graphs, profile: str) -> None:  # type: ignore[no-untyped-def]
    g = digits_graphs[profile]
    prof = PROFILES[profile]
    check_profile(g)
    for p in g.projections:
        assert p.weight.dtype == np.int64
        assert prof.weight_min <= p.weight.min() and p.weight.max() <= prof.weight_max
        assert np.all(p.weight % prof.weight_step == 0)
    for la in g.if_layers:
        assert np.all(la.v_th % prof.threshold_unit == 0)
        # v_init = round(phi * v_th) (+1 on strict profiles)
        expect = np.rint(0.5 * la.v_th).astype(np.int64) + (1 if prof.strict else 0)
        assert np.array_equal(la.v_init, expect)
    assert g.meta.profile == profile


def test_per_layer_thresholds(digits_fold) -> None:  # type: ignore[no-untyped-def]
    g, report = quantize(digits_fold.graph, "loihi2", per_channel=False)
    assert not report.per_channel
    for la in g.if_layers:
        assert np.all(la.v_th == la.v_th[0])


def test_weight_that_needs_more_bits_is_a_quantization_error(digits_fold) -> None:  # type: ignore[no-untyped-def]
    g = digits_fold.graph
    p = g.projections[1]
    w = p.weight.copy()
    w.flat[0] = 1000.0  # 1000 thresholds per spike: cannot fit 8-bit weights at threshold >= 1
    bad = g.replace(projections=tuple(dataclasses.replace(q, weight=w) if q is p else q
                                      for q in g.projections))
    with pytest.raises(QuantizationError, match=rf"layer {p.dst}: weight 1000 .* of {p.name}"):
        quantize(bad, "int8")
    # int16 has the room: the same graph quantizes
    quantize(bad, "int16")


def test_bias_limit_lowers_the_threshold_and_says_so(digits_fold) -> None:  # type: ignore[no-untyped-def]
    g = digits_fold.graph
    layer = g.if_layers[0]
    bias = layer.bias.copy()
    bias[0] = 50.0  # 50 thresholds per step: needs a small threshold to fit loihi2's bias
    bad = g.replace(layers=tuple(dataclasses.replace(la, bias=bias) if la is layer else la
                                 for la in g.layers))
    qg, report = quantize(bad, "loihi2")
    row = next(r for r in report.layers if r.name == layer.name)
    assert any("bias fits" in n for n in row.notes)
    q_layer = qg.node(layer.name)
    assert abs(q_layer.bias[0] - 50 * q_layer.v_th[0]) <= q_layer.v_th[0] * 0.01
    check_profile(qg)


def test_check_profile_rejects_out_of_range_values(digits_graphs) -> None:  # type: ignore[no-untyped-def]
    g = digits_graphs["int8"]
    p = g.projections[0]
    w = p.weight.copy()
    w.flat[0] = 300
    bad = g.replace(projections=(dataclasses.replace(p, weight=w), *g.projections[1:]))
    with pytest.raises(QuantizationError, match=f"projection {p.name}: weight 300 outside"):
        check_profile(bad)


# --------------------------------------------------------------------------- graph file


def tiny_graph_with_every_node(profile: str | None) -> IFGraph:
    """input -> pool+conv -> IF(subtract) -> identity + conv -> IF(zero) -> dense -> readout."""
    rng = np.random.default_rng(0)
    integer = profile is not None

    def arr(shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
        a = rng.integers(lo, hi, size=shape)
        return (a * 2 if profile == "loihi2" else a) if integer else a / 7.0

    unit = 64 if profile == "loihi2" else 1
    th = np.full(3, 40 * unit) if integer else np.ones(3)
    layers = (
        InputLayer("input", (2, 6, 6), 1 / 16, 16.0, (0.0, 0.0), (1.0, 1.0), 8),
        IFLayer("a", (3, 3, 3), th, th // 2 + (1 if profile == "loihi2" else 0)
                if integer else th * 0.5, arr((3,), -5, 5) * (unit if integer else 1),
                np.array([0.5, 1.0, 2.0])),
        IFLayer("b", (3, 3, 3), th, np.zeros(3, dtype=np.int64) if integer else np.zeros(3),
                arr((3,), -5, 5) * (unit if integer else 1), np.ones(3), reset="zero"),
        ReadoutLayer("out", (4,), arr((4,), -9, 9), 0.125),
    )
    projections = (
        ConvProjection("c1", "input", "a", arr((3, 2, 3, 3), -9, 9), SumPool((2, 2), (2, 2)),
                       stride=(1, 1), padding=(1, 1)),
        IdentityProjection("sc", "a", "b", arr((3,), 1, 5)),
        ConvProjection("c2", "a", "b", arr((3, 1, 3, 3), -9, 9), groups=3, padding=(1, 1)),
        DenseProjection("fc", "b", "out", arr((4, 27), -9, 9)),
    )
    return IFGraph(layers, projections, GraphMeta(levels=2, phi=0.5, profile=profile))


@pytest.mark.parametrize("profile", [None, "loihi2", "int8", "int16"])
def test_save_load_round_trip_of_every_node_type(tmp_path, profile) -> None:  # type: ignore[no-untyped-def]
    g = tiny_graph_with_every_node(profile)
    g = g.replace(meta=dataclasses.replace(g.meta, calibration=CalibrationRecord(
        4, 1, 16, "test inputs", 0.995)))
    used = {type(n).__name__ for n in (*g.layers, *g.projections, g.meta,
                                       g.meta.calibration)} | {"SumPool"}
    assert used == set(NODE_TYPES)
    path = save_graph(g, tmp_path / "g.ifg")
    back = load_graph(path)
    assert back.equals(g)
    for a, b in zip(g.projections, back.projections, strict=True):
        assert a.weight.dtype == b.weight.dtype
    # and a changed tensor is noticed
    other = g.replace(projections=(dataclasses.replace(g.projections[0],
                                                       weight=g.projections[0].weight + 2),
                                   *g.projections[1:]))
    assert not back.equals(other)


def test_zoo_graphs_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = randomize_batchnorm(build_model("resnet20", 2, init_threshold=1.0), 0)
    float_graph = fold(model, (3, 32, 32), CIFAR10_ENCODING).graph
    for g in (float_graph, quantize(float_graph, "int8")[0]):
        assert graph_from_bytes(graph_to_bytes(g)).equals(g)


def test_bad_graph_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputFileError, match="not found"):
        load_graph(tmp_path / "missing.ifg")
    junk = tmp_path / "junk.ifg"
    junk.write_bytes(b"not a graph at all")
    with pytest.raises(InputFileError, match="not an IF graph file"):
        load_graph(junk)
    good = graph_to_bytes(tiny_graph_with_every_node("int8"))
    cut = tmp_path / "cut.ifg"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputFileError):
        load_graph(cut)


def test_save_is_atomic(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    g = tiny_graph_with_every_node("int8")
    target = tmp_path / "g.ifg"

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_bytes", boom)
    with pytest.raises(OSError):
        save_graph(g, target)
    assert list(tmp_path.iterdir()) == []


def test_graph_validation_names_the_problem() -> None:
    g = tiny_graph_with_every_node("int8")
    with pytest.raises(GraphError, match="fc: weight expects 26 inputs, source gives 27"):
        g.replace(projections=(*g.projections[:3], DenseProjection(
            "fc", "b", "out", np.ones((4, 26), dtype=np.int64))))
    with pytest.raises(GraphError, match="non-positive threshold"):
        dataclasses.replace(g.if_layers[0], v_th=np.zeros(3, dtype=np.int64))
    with pytest.raises(GraphError, match="cycle"):
        g.replace(projections=(*g.projections, IdentityProjection(
            "back", "b", "a", np.ones(3, dtype=np.int64))))


# --------------------------------------------------------------------------- quantized ANN


@settings(max_examples=20, deadline=None)
@given(levels=st.integers(1, 8), seed=st.integers(0, 2**16),
       profile=st.sampled_from(["loihi2", "int8", "int16"]))
def test_quantized_ann_equals_the_per_synapse_oracle(levels: int, seed: int,
                                                     profile: str) -> None:
    """ANN mode against tests/oracles.py: every synapse enumerated in plain loops (pool
    windows, padding, groups), a count is the number of threshold multiples k = 1 .. L the
    L-step total reaches (no floor, no clip)."""
    g = tiny_graph_with_every_node(profile)
    g = g.replace(meta=dataclasses.replace(g.meta, levels=levels))
    raw = np.random.default_rng(seed).integers(0, 17, size=(5, 2, 6, 6))
    out = ann_forward(g, torch.from_numpy(raw))
    want = ann_oracle(g, raw, levels)
    assert set(out.counts) == {"input", *want.counts}
    for name, c in want.counts.items():
        assert torch.equal(out.counts[name], torch.from_numpy(c).double()), name
    assert torch.equal(out.readout, torch.from_numpy(want.readout))
    assert np.array_equal(out.predictions, want.readout.argmax(1))
