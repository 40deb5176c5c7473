"""SOP/MAC counting against brute force, verify's fault detection, the report schema, demo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)
from csqcfs_deploy.ir.kinds import projection_macs
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.ir.synapses import sum_pool
from csqcfs_deploy.report.energy import BUILTIN_ENERGY, EnergyConstants, estimate
from csqcfs_deploy.report.sops import ActivityCounter
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.verify import verify
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING
from csqcfs_deploy.train.zoo import build_model

from .conftest import random_integer_input, randomize_batchnorm

# --------------------------------------------------------------------------- brute force


def brute_fanout(p: ProjectionT, src_shape: tuple[int, ...]) -> np.ndarray:
    """Enumerate every explicit synapse path source -> (pool window) -> target."""
    counts = np.zeros(src_shape, dtype=np.int64)
    if isinstance(p, DenseProjection):
        counts += p.weight.shape[0] if p.pool is None else 0
        if p.pool is None:
            return counts
    if isinstance(p, IdentityProjection) and p.pool is None:
        return counts + 1
    c_in = src_shape[0]
    # pooled map positions and which source neurons each one sums
    if p.pool is not None:
        kh, kw = p.pool.kernel
        sh, sw = p.pool.stride
        ph, pw = p.pool.padding
        pooled = p.pool.out_shape(src_shape)
        members = {}
        for py in range(pooled[1]):
            for px in range(pooled[2]):
                cells = [(py * sh - ph + a, px * sw - pw + b) for a in range(kh) for b in range(kw)]
                members[(py, px)] = [(y, x) for y, x in cells
                                     if 0 <= y < src_shape[1] and 0 <= x < src_shape[2]]
        pooled_shape = pooled
    else:
        pooled_shape = src_shape
        members = {(y, x): [(y, x)] for y in range(src_shape[1]) for x in range(src_shape[2])}
    pooled_fan = np.zeros(pooled_shape, dtype=np.int64)
    if isinstance(p, ConvProjection):
        o_total, cin_g, kh, kw = p.weight.shape
        out_per_g = o_total // p.groups
        out = p.out_shape(src_shape)
        for o in range(o_total):
            g = o // out_per_g
            for y in range(out[1]):
                for x in range(out[2]):
                    for i in range(cin_g):
                        for a in range(kh):
                            for b in range(kw):
                                iy = y * p.stride[0] - p.padding[0] + a
                                ix = x * p.stride[1] - p.padding[1] + b
                                if 0 <= iy < pooled_shape[1] and 0 <= ix < pooled_shape[2]:
                                    pooled_fan[g * cin_g + i, iy, ix] += 1
    elif isinstance(p, DenseProjection):
        pooled_fan += p.weight.shape[0]
    else:
        pooled_fan += 1
    for (py, px), cells in members.items():
        for c in range(c_in):
            for y, x in cells:
                counts[c, y, x] += pooled_fan[c, py, px]
    return counts


def random_graph(seed: int, pool: bool, groups: int) -> IFGraph:
    rng = np.random.default_rng(seed)
    c0, c1, c2 = 2, 2 * groups, 2 * groups

    def w(*shape: int) -> np.ndarray:
        return rng.integers(-60, 61, size=shape).astype(np.int64)

    size = 6
    mid = size // 2 if pool else size
    layers = (
        InputLayer("input", (c0, size, size), 1 / 16, 16.0, (0.0,) * c0, (1.0,) * c0, 8),
        IFLayer("a", (c1, size, size), np.full(c1, 50), np.full(c1, 25), w(c1) // 4,
                np.ones(c1)),
        IFLayer("b", (c2, mid, mid), np.full(c2, 70), np.full(c2, 35), w(c2) // 4, np.ones(c2)),
        ReadoutLayer("out", (3,), w(3), 1.0),
    )
    stride = int(rng.integers(1, 3))
    out_hw = (mid + 2 - 3) // stride + 1
    layers = (*layers[:2], dataclasses.replace(layers[2], shape=(c2, out_hw, out_hw)), layers[3])
    projections = (
        ConvProjection("c1", "input", "a", w(c1, c0, 3, 3), padding=(1, 1)),
        ConvProjection("c2", "a", "b", w(c2, c1 // groups, 3, 3),
                       SumPool((2, 2), (2, 2)) if pool else None, stride=(stride, stride),
                       padding=(1, 1), groups=groups),
        DenseProjection("fc", "b", "out", w(3, c2 * out_hw * out_hw)),
    )
    return IFGraph(layers, projections, GraphMeta(levels=1, phi=0.5, profile="int16"))


def sops_brute(graph: IFGraph, spikes: dict[str, torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in graph.topological_order()[1:]:
        total = 0
        for p in graph.incoming(name):
            if p.src == graph.input.name:
                continue
            fan = brute_fanout(p, graph.node(p.src).shape)
            rec = spikes[p.src].numpy()  # (steps, N, *shape)
            for step_sample in rec.reshape(-1, *rec.shape[2:]):
                total += int((step_sample * fan).sum())
        out[name] = total
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), pool=st.booleans(), groups=st.sampled_from([1, 2]),
       steps=st.integers(1, 4))
def test_sops_equal_brute_force_on_random_graphs(seed: int, pool: bool, groups: int,
                                                  steps: int) -> None:
    graph = random_graph(seed, pool, groups)
    x = random_integer_input(graph, 3, seed)
    result = simulate(graph, x, RunConfig(steps, record=True))
    counter = ActivityCounter(graph, result.steps)
    counter.add(result.spike_counts, x)
    activity = counter.activity()
    assert result.spikes is not None
    expected = sops_brute(graph, result.spikes)
    got = {la.name: la.sops for la in activity.layers}
    assert got == expected
    assert sum(expected.values()) > 0


def test_sops_equal_brute_force_on_digits(digits_graphs, digits) -> None:  # type: ignore[no-untyped-def]
    graph = digits_graphs["loihi2"]
    x = input_units(graph, digits.x_test[:4])
    result = simulate(graph, x, RunConfig(2, record=True))
    counter = ActivityCounter(graph, result.steps)
    counter.add(result.spike_counts, x)
    got = {la.name: la.sops for la in counter.activity().layers}
    assert result.spikes is not None
    assert got == sops_brute(graph, result.spikes)


def test_vgg16_macs_equal_an_independent_count() -> None:
    model = randomize_batchnorm(build_model("vgg16", 2), 0)
    graph = fold(model, (3, 32, 32), CIFAR10_ENCODING).graph
    macs: list[int] = []

    def hook(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            macs.append(out[0].numel() * m.in_channels // m.groups * m.kernel_size[0]
                        * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            macs.append(m.in_features * m.out_features)

    for m in model.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    ours = sum(projection_macs(p, graph.node(p.src).shape) for p in graph.projections)
    assert ours == sum(macs) and len(macs) == 16


def test_energy_formula() -> None:
    """SPEC section 7's energy from counts taken without ActivityCounter: spikes and
    neuron-steps from the recorded spikes, SOPs and graded input SOPs from brute_fanout's
    synapse enumeration, MACs from the kernel taps; the cited constants written out."""
    graph = random_graph(0, True, 1)
    x = random_integer_input(graph, 2, 0)
    result = simulate(graph, x, RunConfig(3, record=True))
    counter = ActivityCounter(graph, result.steps)
    counter.add(result.spike_counts, x)
    act = counter.activity()
    assert result.spikes is not None
    samples, steps = 2, 3
    spikes = sum(int(s.sum()) for s in result.spikes.values())
    neuron_steps = sum(s[0, 0].numel() for s in result.spikes.values()) * steps * samples
    sops = sum(sops_brute(graph, result.spikes).values())
    c1 = graph.projection("c1")  # input (2, 6, 6) -> a (2, 6, 6), 3x3, padding 1
    graded = int(((x != 0).numpy() * brute_fanout(c1, graph.input.shape)).sum()) * steps
    b_neurons = int(np.prod(graph.layer("b").shape))
    # every kernel tap is a MAC, padded or not: outputs x (inputs / groups) x 3 x 3
    macs = {"c1": 2 * 6 * 6 * 2 * 9, "c2": b_neurons * 2 * 9, "fc": 3 * b_neurons}
    assert 0 < spikes < neuron_steps and sops > 0 and graded > 0  # not vacuous
    cmos = estimate(act, BUILTIN_ENERGY["cmos45"])  # 4.6 pJ per MAC, 0.9 pJ per AC
    assert cmos.snn_pj == pytest.approx((4.6 * macs["c1"] * steps * samples + 0.9 * sops) / 2)
    assert cmos.ann_pj == pytest.approx(4.6 * sum(macs.values()))
    loihi = estimate(act, BUILTIN_ENERGY["loihi"])  # 23.6 pJ per op, 81 / 52 pJ per update
    assert loihi.snn_pj == pytest.approx(
        (23.6 * (graded + sops) + 81 * spikes + 52 * (neuron_steps - spikes)) / 2)
    assert loihi.ann_pj is None


# --------------------------------------------------------------------------- verify


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """(step, sample, neuron) of the earliest differing spike, scanning step, sample, neuron."""
    diff = (a != b).numpy()
    step = int(np.argmax(diff.reshape(diff.shape[0], -1).any(1)))
    sample = int(np.argmax(diff[step].reshape(diff.shape[1], -1).any(1)))
    flat = int(np.argmax(diff[step, sample].reshape(-1)))
    return step + 1, sample, tuple(int(i) for i in np.unravel_index(flat, diff.shape[2:]))


def _with_layer(graph: IFGraph, name: str, **changes: object) -> IFGraph:
    return graph.replace(layers=tuple(dataclasses.replace(la, **changes) if la.name == name
                                      else la for la in graph.layers))


def test_verify_finds_a_one_lsb_threshold_fault(digits_graphs, digits) -> None:  # type: ignore[no-untyped-def]
    """Norse gets a graph whose threshold differs by one LSB in one neuron of act14."""
    graph = digits_graphs["loihi2"]
    x = input_units(graph, digits.x_test)
    cfg = RunConfig(1, record=True)
    base = simulate(graph, x, cfg)
    layer = graph.node("act14")
    assert base.spikes is not None
    found = None
    for neuron in range(layer.channels):
        for delta in (-64, 64):  # one LSB of the 17-bit threshold mantissa (<< 6)
            v_th = layer.v_th.copy()
            v_th[neuron] += delta
            faulty = _with_layer(graph, "act14", v_th=v_th)
            alt = simulate(faulty, x, cfg)
            assert alt.spikes is not None
            if not torch.equal(alt.spikes["act14"], base.spikes["act14"]):
                found = (neuron, faulty, alt)
                break
        if found:
            break
    assert found is not None, "no one-LSB threshold change altered a spike"
    neuron, faulty, alt = found
    step, sample, idx = _first_difference(base.spikes["act14"], alt.spikes["act14"])
    assert idx == (neuron,)
    result = verify(graph, x, 1, 0, ["int", "norse"], batch_size=128, progress=False,
                    graphs={"norse": faulty})
    assert not result.identical
    first = result.first_mismatch
    assert first is not None
    assert (first.backend, first.layer, first.neuron, first.step, first.sample) == (
        "norse", "act14", (neuron,), step, sample)
    assert (first.expected, first.got) == (int(base.spikes["act14"][step - 1, sample, neuron]),
                                           int(alt.spikes["act14"][step - 1, sample, neuron]))
    # every other comparison still agrees
    assert all(c.total_mismatches == 0 for c in result.comparisons if c.backend != "norse")


def test_verify_finds_a_one_lsb_weight_fault_in_lava(digits_graphs, digits) -> None:  # type: ignore[no-untyped-def]
    """Lava gets a graph with one weight into one neuron of act14 changed by one LSB."""
    graph = digits_graphs["loihi2"]
    x = input_units(graph, digits.x_test)
    sync = RunConfig(1, record=True)
    base = simulate(graph, x, sync)
    assert base.spikes is not None
    proj = next(p for p in graph.projections if p.dst == "act14")
    src = base.spikes[proj.src]
    src = src.reshape(-1, *src.shape[2:]).to(torch.float32)
    pooled = sum_pool(src, proj.pool) if proj.pool is not None else src
    busiest = int(pooled.flatten(1).sum(0).argmax())  # the input feature that is most active
    found = None
    for neuron in range(proj.weight.shape[0]):
        for delta in (2, -2):  # one LSB of a loihi2 weight (stored as 2 * mantissa)
            w = proj.weight.copy()
            if not -256 <= w[neuron, busiest] + delta <= 254:
                continue
            w[neuron, busiest] += delta
            faulty = graph.replace(projections=tuple(
                dataclasses.replace(p, weight=w) if p is proj else p for p in graph.projections))
            alt = simulate(faulty, x, sync)
            assert alt.spikes is not None
            if not torch.equal(alt.spikes["act14"], base.spikes["act14"]):
                found = (neuron, faulty, alt)
                break
        if found:
            break
    assert found is not None, "no one-LSB weight change altered a spike"
    neuron, faulty, alt = found
    _, sample, _ = _first_difference(base.spikes["act14"], alt.spikes["act14"])
    # Lava is slow: run it on the first sample that shows the fault and the one after
    xs = x[sample : sample + 2]
    pipe = RunConfig(1, record=True, schedule="pipelined")
    b, a = simulate(graph, xs, pipe).spikes, simulate(faulty, xs, pipe).spikes
    assert b is not None and a is not None
    step, s0, idx = _first_difference(b["act14"], a["act14"])
    result = verify(graph, xs, 1, 0, ["int", "lava"], batch_size=2, progress=False,
                    graphs={"lava": faulty})
    first = result.first_mismatch
    assert first is not None and not result.identical
    assert (first.backend, first.layer, first.neuron, first.step, first.sample) == (
        "lava", "act14", (neuron,), step, s0)
    assert idx == (neuron,) and s0 == 0 and step == 1 + graph.depths()["act14"]


def test_verify_cli_json(digits_checkpoint: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(digits_checkpoint), "--backends", "int,norse", "--timesteps",
                 "2", "--presim", "2", "--samples", "16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["identical"] is True and data["first_mismatch"] is None
    assert set(data["compared"]) == {"norse", "int-pipelined"}
    assert data["compared"]["norse"]["compared"] > 0


# --------------------------------------------------------------------------- report


REPORT_LAYER_KEYS = {"name", "kind", "neurons", "spikes", "firing_rate", "sops", "input_macs",
                     "input_graded_sops", "ann_macs"}


def test_report_json_schema_and_plot(digits_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"name": "mychip", "source": "datasheet v1, table 3",
                                  "sop_pj": 2.0, "mac_pj": 10.0}))
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["report", str(digits_checkpoint), "--timesteps", "2", "--samples", "30",
                 "--energy", f"cmos45,loihi,{custom}", "--json", str(out_json),
                 "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Horowitz" in printed and "Davies" in printed and "datasheet v1" in printed
    report = json.loads(out_json.read_text())
    assert report["schema"] == "csqcfs-deploy-report/1"
    assert {"model", "profile", "dataset", "samples", "timesteps", "presim", "schedule",
            "latency_steps", "steps_simulated", "accuracy", "layers", "totals",
            "energy"} <= set(report)
    assert report["samples"] == 30 and report["latency_steps"] == 2
    for la in report["layers"]:
        assert set(la) == REPORT_LAYER_KEYS
        assert 0.0 <= la["firing_rate"] <= 1.0
    assert report["layers"][0]["sops"] == 0 and report["layers"][0]["input_macs"] > 0
    assert report["totals"]["sops"] == sum(la["sops"] for la in report["layers"])
    names = [e["name"] for e in report["energy"]]
    assert names == ["cmos45", "loihi", "mychip"]
    mine = report["energy"][2]
    assert mine["snn_pj_per_sample"] == pytest.approx(
        (10.0 * report["totals"]["input_macs"] + 2.0 * report["totals"]["sops"]) / 30)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_energy_file(digits_checkpoint: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "sop_pj": 1.0}))
    code = main(["report", str(digits_checkpoint), "--energy", str(bad), "--samples", "4",
                 "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code != 0 and "missing keys ['source']" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(Exception, match="finite number"):
        EnergyConstants("x", "y", sop_pj=float("nan"))


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # two epochs train a weak network: its fidelity is reported, not gated here
    code = main(["demo", "--output-dir", str(tmp_path / "d"), "--epochs", "2",
                 "--lava-samples", "3", "--min-agreement", "0", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["identical"] is True
    fid = summary["fidelity"]
    assert fid["samples"] == 360 and 0.5 <= fid["quantization_fidelity"] <= 1.0
    assert fid["readout_saturated"] == 0
    assert set(summary["snn_accuracy"]) == {"int", "norse", "lava"}
    assert summary["snn_samples"]["int"] == 360 and summary["snn_samples"]["lava"] == 3
    for f in summary["files"]:
        assert Path(f).is_file()
    assert {Path(f).name for f in summary["files"]} >= {
        "digits-cnn.pt", "digits-cnn.ifg", "digits-cnn.nir", "report.json", "report.png"}
