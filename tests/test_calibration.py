"""Calibrated quantization, the float SNN reference, the fidelity figures and their gates.

Each stage is checked against something independent: the float SNN against the
ANN closed form at T = 1 (L = 1) and against a plain per-sample loop; the
calibrated scales against the integer simulator's own overflow counters (the
weight-only scales of the same network wrap and saturate); the gates against
the exit codes of the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.cli.main import main
from csqcfs_deploy.convert.calibrate import float_run, integer_input, real_input
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import ScaleOptions, quantize
from csqcfs_deploy.convert.rounding import gptq_round
from csqcfs_deploy.errors import FidelityGateFailed, QuantizationError
from csqcfs_deploy.ir import IFGraph, InputEncoding, load_graph, save_graph
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.calibration import CalibrationPlan, calibrated_quantize
from csqcfs_deploy.run.evaluation import evaluate
from csqcfs_deploy.run.fidelity import Gates, measure
from csqcfs_deploy.run.reference import ann_forward, input_units
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.datasets import Dataset

PIXELS = InputEncoding(raw_max=255.0, mean=(0.0,) * 3, std=(1.0,) * 3, bits=8)


def pixel_net(seed: int = 0) -> tuple[FoldResult, np.ndarray]:
    """A (3, 6, 6) 8-bit-pixel network: conv 3x3 -> CS-QCFS -> linear readout with
    all-positive weights, and 64 random images. On loihi2, its weight-only scales make
    the first layer's current wrap (27 pixels of up to 255) and the readout saturate."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CSQCFS(4, levels=1, init_threshold=2.0),
                          nn.Flatten(), nn.Linear(4 * 36, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand_like(model[0].weight) * 2.0)
        model[0].bias.fill_(-0.2)
        model[3].weight.copy_(torch.rand_like(model[3].weight) + 0.5)
    model.eval()
    raw = np.random.default_rng(seed).integers(0, 256, size=(64, 3, 6, 6)).astype(np.float32)
    return fold(model, (3, 6, 6), PIXELS, num_classes=3), raw


def overflow(graph: IFGraph, raw: np.ndarray, cfg: RunConfig) -> tuple[int, int]:
    s = evaluate("int", graph, raw, np.zeros(len(raw), np.int64), cfg, progress=False)
    assert s.layer_wrapped is not None and s.layer_saturated is not None
    return sum(s.layer_wrapped.values()), s.layer_saturated[graph.readout.name]


# --------------------------------------------------------------------------- float SNN


def test_float_run_is_the_ann_at_one_step(digits_fold: FoldResult, digits: Dataset) -> None:
    g = digits_fold.graph
    assert g.meta.levels == 1
    x = real_input(g, digits.x_test[:100])
    run = float_run(g, x, RunConfig(1), batch=37)
    ann = ann_forward(g, input_units(g, digits.x_test[:100]), levels=1)
    assert torch.allclose(run.logits, ann.logits, atol=1e-9)
    assert np.array_equal(run.predictions, ann.predictions)


def test_float_run_masks_and_counts_like_a_plain_loop() -> None:
    """One IF neuron, input a per step, P = 2, T = 3, by hand: v starts at 0.5."""
    fr, _ = pixel_net()
    g = fr.graph
    raw = np.full((1, 3, 6, 6), 30.0, np.float32)
    x = integer_input(g, raw)
    cfg = RunConfig(3, presim=2)
    run = float_run(g, x, cfg)
    # the plain loop, per neuron of the one IF layer
    layer = g.if_layers[0]
    (p_in,) = g.incoming(layer.name)
    a = torch.nn.functional.conv2d(x, torch.from_numpy(p_in.weight), padding=1)
    a = a + torch.from_numpy(np.asarray(layer.bias)).view(1, -1, 1, 1)
    v = torch.full_like(a, 0.5)
    out = []
    for t in range(5):
        v = v + a
        s = (v >= 1).double()
        v = v - s
        if t == 1:
            mask = (v > 0).double()
            v = torch.full_like(a, 0.5)
        if t >= 2:
            out.append(s * mask)
    (p_ro,) = g.incoming(g.readout.name)
    r = sum(torch.from_numpy(p_ro.weight) @ o.flatten() for o in out) + 3 * torch.from_numpy(
        np.asarray(g.readout.bias))
    assert torch.allclose(run.logits[0], r * g.readout.scale / 3, atol=1e-9)
    lr = run.ranges.layers[layer.name]
    assert np.allclose(lr.step_input, a.sub(torch.from_numpy(np.asarray(layer.bias)).view(
        1, -1, 1, 1)).abs().amax(dim=(0, 2, 3)).numpy())


# --------------------------------------------------------------------------- calibrated scales


def test_calibrated_scales_do_not_wrap_or_saturate_where_weight_scales_do() -> None:
    fr, raw = pixel_net()
    prof = get_profile("loihi2")
    cfg = RunConfig(16)
    plain, _ = quantize(fr.graph, prof)
    wrapped, sat = overflow(plain, raw, cfg)
    assert wrapped > 0 and sat > 0  # the problem is real on this network
    graph, report, cal = calibrated_quantize(fr.graph, prof, None, raw, "random pixels",
                                             CalibrationPlan(timesteps=16))
    assert overflow(graph, raw, cfg) == (0, 0)
    assert cal.wrapped and not any(cal.wrapped.values())
    assert report.scales == "calibrated"
    assert {la.name: la.bound for la in report.layers}[graph.readout.name] in (
        "voltage", "current")
    assert graph.meta.calibration is None  # the CLI records it (see the .ifg test)
    # and it keeps the float SNN's predictions on those samples
    assert cal.fidelity >= 0.9


def test_unfittable_network_is_refused_naming_layer_and_quantity() -> None:
    fr, raw = pixel_net()
    ranges = float_run(fr.graph, integer_input(fr.graph, raw), RunConfig(4)).ranges
    huge = {k: type(r)(r.step_input * 1e6, r.v_max, r.v_min) for k, r in ranges.layers.items()}
    opts = ScaleOptions(ranges=type(ranges)(4, 0, 64, "test", huge))
    with pytest.raises(QuantizationError) as info:
        quantize(fr.graph, "loihi2", None, opts)
    msg = str(info.value)
    assert "one step's synaptic input" in msg and "24-bit current" in msg
    assert fr.graph.if_layers[0].name in msg


def test_gptq_rounding_lowers_the_output_error() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((4000, 64)) < 0.3).astype(np.float64)
    w = rng.normal(0, 20, size=(16, 64))
    h = x.T @ x / len(x)
    q = gptq_round(w, h, -128, 127)
    near = np.clip(np.rint(w), -128, 127)
    err_g = np.mean(((q - w) @ x.T) ** 2)
    err_n = np.mean(((near - w) @ x.T) ** 2)
    assert q.dtype == np.int64 and q.min() >= -128 and q.max() <= 127
    assert err_g < 0.7 * err_n


# --------------------------------------------------------------------------- fidelity, gates, CLI


def test_fidelity_gate_fails_with_its_reason() -> None:
    fr, raw = pixel_net()
    graph, _, _ = calibrated_quantize(fr.graph, get_profile("int8"), None, raw, "pixels",
                                      CalibrationPlan(timesteps=2))
    labels = np.zeros(len(raw), np.int64)
    fid = measure(graph, raw, labels, RunConfig(2), float_graph=fr.graph,
                  gates=Gates(min_agreement=100.0))
    assert fid.quantization_fidelity is not None
    if fid.quantization_fidelity < 1.0:
        with pytest.raises(FidelityGateFailed, match="below --min-agreement 100"):
            fid.check()
    ok = measure(graph, raw, labels, RunConfig(2), float_graph=fr.graph, gates=Gates(0.0))
    ok.check()
    assert ok.to_json()["gates"] == {"min_agreement": 0.0, "min_source_agreement": None,
                                     "passed": True, "failures": []}


def test_cli_gates_exit_9_and_record_the_calibration(
        digits_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.ifg"
    code = main(["convert", str(digits_checkpoint), "-o", str(out), "-T", "2",
                 "--min-agreement", "0", "--min-source-agreement", "0", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    fid = data["fidelity"]
    assert list(data)[0] == "fidelity"
    assert fid["timesteps"] == 2 and fid["samples"] == 360
    assert fid["readout_saturated"] == 0 and fid["gates"]["passed"]
    graph = load_graph(out)
    rec = graph.meta.calibration
    assert rec is not None and (rec.timesteps, rec.presim, rec.samples) == (2, 0, 256)
    # an impossible gate: exit 9, one error line, no file
    code = main(["convert", str(digits_checkpoint), "-o", str(tmp_path / "x.ifg"),
                 "--min-source-agreement", "100.0"])
    err = capsys.readouterr().err.strip().splitlines()
    if code != 0:
        assert code == 9 and err[-1].startswith("error: agreement with the source model")
        assert not (tmp_path / "x.ifg").exists()
    # a source gate cannot hold on an .ifg (no source model): exit 9
    code = main(["run", str(out), "--dataset", "digits", "--samples", "20",
                 "--min-source-agreement", "50"])
    assert code == 9
    assert "cannot be measured" in capsys.readouterr().err


def test_verify_is_not_verified_when_a_gate_fails(digits_checkpoint: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(digits_checkpoint), "--backends", "int", "--samples", "8",
                 "-T", "3", "--min-source-agreement", "100", "--calibration-samples", "64"])
    out = capsys.readouterr().out
    if code == 9:
        assert "NOT VERIFIED: the back ends agree spike for spike, but agreement" in out
    else:
        assert code == 0 and "IDENTICAL: every compared spike agrees, and the fidelity" in out


def test_calibration_record_survives_ifg_and_nir(digits_checkpoint: Path,
                                                 tmp_path: Path) -> None:
    from csqcfs_deploy.exporters.nir import read_nir_graph, write_nir_graph

    assert main(["convert", str(digits_checkpoint), "-o", str(tmp_path / "d.ifg"), "-T", "4",
                 "-P", "1", "--min-agreement", "0", "--no-check"]) == 0
    g = load_graph(tmp_path / "d.ifg")
    assert g.meta.calibration is not None and g.meta.calibration.steps == 5
    back = read_nir_graph(write_nir_graph(g, tmp_path / "d.nir", "native"))
    assert back.equals(g)
    save_graph(back, tmp_path / "again.ifg")
    assert load_graph(tmp_path / "again.ifg").equals(g)


def test_netx_fit_lowers_scales_until_bias_mantissas_fit(tmp_path: Path) -> None:
    """Biases spread over -3..3 thresholds: per-channel scales chosen for loihi2 alone
    need netx bias mantissas beyond 13 bits; fitted for netx, the file is written and
    the Lava netx run equals the integer simulator at T = 1."""
    from csqcfs_deploy.exporters.netx import write_netx
    from csqcfs_deploy.simulators.lava.netx import check_netx

    fr, raw = pixel_net()
    layer = fr.graph.if_layers[0]
    spread = dataclasses.replace(layer, bias=np.linspace(-3.0, 3.0, layer.channels))
    g = fr.graph.replace(layers=tuple(spread if la.name == layer.name else la
                                      for la in fr.graph.layers))
    plain, _ = quantize(g, "loihi2")
    with pytest.raises(QuantizationError, match="beyond netx's 13-bit range"):
        write_netx(plain, tmp_path / "plain.net")
    fitted, report, _ = calibrated_quantize(g, get_profile("loihi2"), None, raw, "pixels",
                                            CalibrationPlan(timesteps=1, netx=True))
    assert any("netx" in n for la in report.layers for n in la.notes)
    path = tmp_path / "fit.net"
    write_netx(fitted, path)
    check = check_netx(fitted, path, input_units(fitted, raw[:3]))
    assert check.mismatches == 0 and check.readout_equal


def test_optimize_tries_candidates_and_keeps_one_per_layer(
        digits_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(digits_checkpoint), "-o", str(tmp_path / "o.ifg"), "-T", "2",
                 "--optimize", "--calibration-samples", "48", "--samples", "60",
                 "--min-agreement", "0", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    trials = data["calibrated"]["trials"]
    layers = [la["name"] for la in data["layers"]]
    assert sorted({t["layer"] for t in trials}) == sorted(layers)
    for name in layers:
        mine = [t for t in trials if t["layer"] == name]
        assert len(mine) >= 2 and sum(t["kept"] for t in mine) == 1
        kept = next(t for t in mine if t["kept"])
        assert all(0.0 <= t["fidelity"] <= 1.0 for t in mine)
        assert kept["fidelity"] >= max(t["fidelity"] for t in mine
                                       if t["wrapped"] + t["readout_saturated"] == 0) - 1e-12
