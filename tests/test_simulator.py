"""The integer simulator: ANN equivalence, hand-worked trajectories, schedules,
pre-simulation, the fast path against the plain reference, and the run/sweep CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import GraphError, UsageError
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
    save_graph,
)
from csqcfs_deploy.ir.neuron import IFParams, if_step
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig, recording_bytes
from csqcfs_deploy.run import memory
from csqcfs_deploy.run.memory import check_recording_memory
from csqcfs_deploy.run.reference import ann_forward, input_units
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer import (
    LayerArithmetic,
    Simulator,
    reference_simulate,
    simulate,
    sum_dtype_for,
)
from csqcfs_deploy.simulators.integer.fast import IFConstants, if_fire_final, if_fire_reset_
from csqcfs_deploy.train.datasets import Dataset

from .conftest import PROFILE_NAMES

H = 2**23  # loihi2: half of the 24-bit current / voltage range


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread avoids OpenMP hand-offs on the shared 2-core machine
    (per test, so the session's shared fixtures are built with the usual threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def assert_same(a: RunResult, b: RunResult) -> None:
    """Readout, counts, masks and (when both recorded) every spike identical."""
    assert a.steps == b.steps
    assert torch.equal(a.readout, b.readout)
    assert a.spike_counts.keys() == b.spike_counts.keys()
    for name in b.spike_counts:
        assert torch.equal(a.spike_counts[name], b.spike_counts[name]), name
        assert torch.equal(a.window_counts[name], b.window_counts[name]), name
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None and b.masks is not None:
        for name in b.masks:
            assert torch.equal(a.masks[name], b.masks[name]), name
    if a.spikes is not None and b.spikes is not None:
        for name in b.spikes:
            assert a.spikes[name].dtype == b.spikes[name].dtype == torch.bool
            assert torch.equal(a.spikes[name], b.spikes[name]), name


def meta(profile: str, levels: int = 1) -> GraphMeta:
    return GraphMeta(levels=levels, phi=0.5, profile=profile)


def vector_input(features: int, bits: int = 8) -> InputLayer:
    return InputLayer("input", (features,), 1.0, 255.0, (0.0,) * features, (1.0,) * features,
                      bits)


def image_input(shape: tuple[int, int, int], bits: int = 8) -> InputLayer:
    return InputLayer("input", shape, 1.0, 255.0, (0.0,) * shape[0], (1.0,) * shape[0], bits)


def one_neuron(profile: str, weight: int, v_th: int, v_init: int, bias: int,
               reset: str = "subtract", inputs: int = 1, weight_exp: int = 0) -> IFGraph:
    """input (inputs,) -> dense [weight]*inputs -> one IF neuron -> readout (weight 1)."""
    return IFGraph(
        (vector_input(inputs),
         IFLayer("a", (1,), [v_th], [v_init], [bias], [1.0], reset),
         ReadoutLayer("out", (1,), [0], 1.0)),
        (DenseProjection("w", "input", "a", np.full((1, inputs), weight), weight_exp=weight_exp),
         DenseProjection("r", "a", "out", np.array([[1]]))),
        meta(profile))


def readout_only(profile: str, weights: list[int], bias: int = 0, weight_exp: int = 0
                 ) -> IFGraph:
    """input (k,) -> dense -> readout: the readout shows the current stage directly.

    (A graph needs no IF layer; the readout accumulates ``sat(v + current(acc) + bias)``.)
    """
    return IFGraph(
        (vector_input(len(weights)), ReadoutLayer("out", (1,), [bias], 1.0)),
        (DenseProjection("w", "input", "out", np.array([weights]), weight_exp=weight_exp),),
        meta(profile))


def spikes_of(graph: IFGraph, x: list[int], cfg: RunConfig, layer: str = "a") -> list[int]:
    result = simulate(graph, torch.tensor([x]), RunConfig(cfg.timesteps, cfg.presim,
                                                          cfg.schedule, record=True))
    assert result.spikes is not None
    return [int(s) for s in result.spikes[layer][:, 0].reshape(result.steps, -1)[:, 0]]


# --------------------------------------------------------------------------- must-holds


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_digits_t1_equals_quantized_ann_on_every_test_sample(
        digits_graphs: dict[str, IFGraph], digits: Dataset, profile: str) -> None:
    graph = digits_graphs[profile]
    x = input_units(graph, digits.x_test)
    ann = ann_forward(graph, x, levels=1)
    result = simulate(graph, x, RunConfig(1, record=True))
    assert len(x) == 360
    assert np.array_equal(result.predictions, ann.predictions)
    assert torch.equal(result.readout, ann.readout)
    assert result.spikes is not None
    assert set(result.spikes) == {la.name for la in graph.if_layers}
    for name, s in result.spikes.items():
        counts = ann.counts[name]
        assert set(torch.unique(counts).tolist()) <= {0.0, 1.0}
        assert torch.equal(s[0], counts.bool()), name
        assert 0 < int(s.sum()) < s.numel(), name  # not vacuous
    # the int8 kernel path gives the same
    again = simulate(graph, x[:40], RunConfig(1), kernel="int8")
    assert np.array_equal(again.predictions, ann.predictions[:40])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(PROFILE_NAMES), levels=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), strict_phi=st.floats(0.0, 0.99))
def test_single_layer_constant_input_at_t_equal_l_is_the_quantized_ann(
        profile: str, levels: int, seed: int, strict_phi: float) -> None:
    """SPEC section 2: with a constant input for T = L steps the spike counts are
    clip(floor((v_init + T * drive - delta) / v_th), 0, T): the ANN at L levels."""
    prof = get_profile(profile)
    rng = np.random.default_rng(seed)
    unit, step = prof.threshold_unit, prof.weight_step
    fin, fout = 5, 7
    v_th = rng.integers(1, 60, fout) * unit
    v_init = np.rint(strict_phi * v_th).astype(np.int64) + (1 if prof.strict else 0)
    bias = np.array([prof.round_bias(b) for b in rng.integers(-v_th, v_th)], dtype=np.int64)
    weight = rng.integers(-20, 21, (fout, fin)) * step
    graph = IFGraph(
        (vector_input(fin), IFLayer("a", (fout,), v_th, v_init, bias, np.ones(fout)),
         ReadoutLayer("out", (3,), [prof.round_bias(b) for b in rng.integers(-99, 99, 3)], 1.0)),
        (DenseProjection("w", "input", "a", weight),
         DenseProjection("r", "a", "out", rng.integers(-20, 21, (3, fout)) * step)),
        meta(profile, levels))
    x = torch.from_numpy(rng.integers(0, 30, (16, fin)))
    ann = ann_forward(graph, x, levels=levels)
    result = simulate(graph, x, RunConfig(levels))
    counts = result.window_counts["a"].to(torch.float64)
    assert torch.equal(counts, ann.counts["a"])
    assert torch.equal(result.readout, ann.readout)


# --------------------------------------------------------------------------- golden trajectories


@pytest.mark.parametrize(("profile", "unit"), [("int8", 1), ("int16", 1), ("loihi2", 64)])
def test_subtract_and_zero_reset_trajectories_by_hand(profile: str, unit: int) -> None:
    # v_th = 10, v_init = 5, bias = 2, synaptic drive 2 * 2 = 4 per step (in units of 1/unit):
    # subtract: v = 5 -> 11 s -> 1 -> 7 -> 13 s -> 3 -> 9 -> 15 s -> 5 -> 11 s -> 1
    # zero:     v = 5 -> 11 s -> 0 -> 6 -> 12 s -> 0 -> 6 -> 12 s -> 0 -> 6
    # (loihi2: the same times 64; its current is acc << 6, the bias 128 = 1 << 7)
    w = 2
    g = one_neuron(profile, w, 10 * unit, 5 * unit, 2 * unit)
    assert spikes_of(g, [2], RunConfig(6)) == [1, 0, 1, 0, 1, 1]
    g = one_neuron(profile, w, 10 * unit, 5 * unit, 2 * unit, reset="zero")
    assert spikes_of(g, [2], RunConfig(6)) == [1, 0, 1, 0, 1, 0]


def test_strict_versus_non_strict_comparison_by_hand() -> None:
    # v reaches exactly v_th at step 1: int8/int16 (v >= v_th) fire, loihi2 (v > v_th) not.
    # ideal: v = 4 + 6 = 10 = v_th -> spike, v = 0 -> 6 -> 12 spike -> 2 -> 8 -> 14 spike
    for profile in ("int8", "int16"):
        assert spikes_of(one_neuron(profile, 3, 10, 4, 0), [2], RunConfig(5)) == [1, 0, 1, 0, 1]
    # loihi2: drive 2 * 3 << 6 = 384; v = 256 + 384 = 640 = v_th -> no spike; 1024 -> spike
    # -> 384 -> 768 spike -> 128 -> 512 -> 896 spike
    g = one_neuron("loihi2", 2, 640, 256, 0)
    assert spikes_of(g, [3], RunConfig(6)) == [0, 1, 1, 0, 1, 0]


def test_loihi2_current_wraps_once_at_24_bits_with_the_asymmetric_edge() -> None:
    # 254 * 255 * 2 + 254 * 6 + 2 * 4 = 131072 = 2**17, so acc << 6 = 2**23 exactly
    w = [254, 254, 254, 2]
    assert 254 * 255 * 2 + 254 * 6 + 2 * 4 == 2**17
    g = readout_only("loihi2", w)
    r = simulate(g, torch.tensor([[255, 255, 6, 4]]), RunConfig(1)).readout
    assert int(r) == H - 1          # u = 2**23 is not wrapped (u > 2**23 is); v saturates
    r = simulate(g, torch.tensor([[255, 255, 6, 5]]), RunConfig(1)).readout
    assert int(r) == 2**23 + 128 - 2**24   # acc = 2**17 + 2: u = 2**23 + 128 wraps to -2**23 + 128
    neg = readout_only("loihi2", [-254, -254, -254, -2])
    r = simulate(neg, torch.tensor([[255, 255, 6, 4]]), RunConfig(1)).readout
    assert int(r) == H - 1          # u = -2**23 wraps to +2**23, which saturates to 2**23 - 1
    r = simulate(neg, torch.tensor([[255, 255, 6, 3]]), RunConfig(1)).readout
    assert int(r) == -(H - 128)     # u = -2**23 + 128: no wrap
    # beyond 3 * 2**23 one wrap is not enough: u - 2**24 is still > 2**23 and saturates
    big = readout_only("loihi2", [254] * 8)
    acc = 254 * 255 * 7 + 254 * 61  # = 468884: u = 30008576 > 3 * 2**23
    assert acc * 64 == 30008576 > 3 * H
    # one wrap: 30008576 - 2**24 = 13231360, still above 2**23 - 1 = 8388607, so v saturates
    # (a modular wrap would give 30008576 - 2 * 2**24 = -3545856)
    r = simulate(big, torch.tensor([[255] * 7 + [61]]), RunConfig(1)).readout
    assert int(r) == H - 1
    # an IF neuron driven far above threshold spikes only while the current does not wrap
    g = IFGraph(
        (vector_input(4), IFLayer("a", (1,), [640], [321], [0], [1.0]),
         ReadoutLayer("out", (1,), [0], 1.0)),
        (DenseProjection("w", "input", "a", np.array([w])),
         DenseProjection("r", "a", "out", np.array([[2]]))),
        meta("loihi2"))
    assert spikes_of(g, [255, 255, 6, 4], RunConfig(3)) == [1, 1, 1]   # u = +2**23
    assert spikes_of(g, [255, 255, 6, 5], RunConfig(3)) == [0, 0, 0]   # wrapped: negative


def test_voltage_saturation_by_hand() -> None:
    # loihi2 saturates symmetrically at +-(2**23 - 1): bias 4095 << 7 = 524160 per step
    g = readout_only("loihi2", [0], bias=4095 << 7)
    assert int(simulate(g, torch.tensor([[0]]), RunConfig(15)).readout) == 15 * 524160
    assert int(simulate(g, torch.tensor([[0]]), RunConfig(17)).readout) == H - 1
    g = readout_only("loihi2", [0], bias=-(4095 << 7))
    assert int(simulate(g, torch.tensor([[0]]), RunConfig(17)).readout) == -(H - 1)
    # the ideal profiles use the full 32-bit two's-complement range
    for profile in ("int8", "int16"):
        up = readout_only(profile, [0], bias=2**30)
        assert int(simulate(up, torch.tensor([[0]]), RunConfig(1)).readout) == 2**30
        assert int(simulate(up, torch.tensor([[0]]), RunConfig(3)).readout) == 2**31 - 1
        down = readout_only(profile, [0], bias=-(2**30))
        assert int(simulate(down, torch.tensor([[0]]), RunConfig(2)).readout) == -(2**31)
        assert int(simulate(down, torch.tensor([[0]]), RunConfig(3)).readout) == -(2**31)
    # a saturated IF membrane: int8, v_th = 2**31 - 1 can never be passed by more than
    # the saturation allows; bias 2**30: v = 2**30 -> 2**31 - 1 (fires: v >= v_th) -> 0 ...
    g = one_neuron("int8", 0, 2**31 - 1, 0, 2**30)
    assert spikes_of(g, [0], RunConfig(6)) == [0, 1, 0, 1, 0, 1]
    # loihi2 strict: v_th = 2**23 - 64 < v_max: saturation at 2**23 - 1 still fires
    g = one_neuron("loihi2", 0, H - 64, 0, 4095 << 7)
    assert spikes_of(g, [0], RunConfig(17)) == [0] * 16 + [1]


def test_weight_exponent_shifts_and_floors_by_hand() -> None:
    # acc = -3; weight_exp -1: floor(-3 / 2) = -2; weight_exp +2: -12
    assert int(simulate(readout_only("int8", [-1], weight_exp=-1), torch.tensor([[3]]),
                        RunConfig(1)).readout) == -2
    assert int(simulate(readout_only("int8", [-1], weight_exp=2), torch.tensor([[3]]),
                        RunConfig(1)).readout) == -12
    # loihi2: the shift applies to the sum before << 6: floor(-6 / 4) = -2, << 6 = -128
    assert int(simulate(readout_only("loihi2", [-2], weight_exp=-2), torch.tensor([[3]]),
                        RunConfig(1)).readout) == -128


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_step_functions_by_hand_and_fast_forms_agree(profile: str) -> None:
    prof = get_profile(profile)
    params = IFParams(v_th=torch.tensor([[100]]), v_init=torch.tensor([[0]]),
                      bias=torch.tensor([[5]]), reset="subtract", profile=prof)
    v = torch.tensor([[90], [95], [200], [prof.voltage_max - 1], [-5]])
    cur = torch.tensor([[0], [0], [0], [10], [0]])
    s, v2 = if_step(cur, v, params)
    # 95 -> no spike (>= only on ideal); 100 -> spike on ideal, not on loihi2 (strict)
    expect_s = [False, not prof.strict, True, True, False]
    assert s[:, 0].tolist() == expect_s
    sat = prof.voltage_max
    assert v2[:, 0].tolist() == [95, 0 if not prof.strict else 100, 105, sat - 100, 0]
    zero = IFParams(params.v_th, params.v_init, params.bias, "zero", prof)
    s, v3 = if_step(cur, v, zero)
    assert v3[:, 0].tolist() == [95, 0 if not prof.strict else 100, 0, 0, 0]
    # the in-place forms, in every dtype that holds these values
    gen = torch.Generator().manual_seed(1)
    for reset in ("subtract", "zero"):
        p = IFParams(torch.randint(1, 50, (1, 4), generator=gen),
                     torch.randint(0, 50, (1, 4), generator=gen),
                     torch.randint(-9, 9, (1, 4), generator=gen), reset, prof)
        v0 = torch.randint(-60, 60, (32, 4), generator=gen)
        drive = torch.randint(-40, 40, (32, 4), generator=gen)
        s_ref, v_ref = if_step(drive, v0, p)
        for dtype in (torch.int32, torch.int64, torch.float32, torch.float64):
            c = IFConstants.build(p, dtype, clamp=True)
            vv = (v0 + drive + p.bias).to(dtype)
            out = torch.empty(vv.shape, dtype=torch.bool)
            if_fire_reset_(vv, c, out)
            assert torch.equal(out, s_ref) and torch.equal(vv.to(torch.int64), v_ref)
            last = torch.empty(vv.shape, dtype=torch.bool)
            if_fire_final((v0 + drive + p.bias).to(dtype), c, last)
            assert c.final_exact and torch.equal(last, s_ref)


def test_final_step_shortcut_is_refused_when_saturation_could_hide_a_spike() -> None:
    prof = get_profile("loihi2")
    p = IFParams(torch.tensor([[prof.voltage_max]]), torch.tensor([[0]]), torch.tensor([[0]]),
                 "subtract", prof)
    assert not IFConstants.build(p, torch.int64, clamp=True).final_exact
    assert IFConstants.build(p, torch.int64, clamp=False).final_exact


# --------------------------------------------------------------------------- pre-simulation


def test_presimulation_masks_and_reinitialises_by_hand() -> None:
    # int8, v_th = 10, v_init = 5, P = 2, T = 3; drives (bias 0) per neuron: +4, -6, +5
    #  n0: 5 -> 9 -> 13 s -> 3 | mask (3 > 0) | re-init 5 -> 9 -> 13 s -> 3 -> 7
    #  n1: 5 -> -1 -> -7      | masked        | 5 -> -1 -> -7 -> -13
    #  n2: 5 -> 10 s -> 0 -> 5 | mask (5 > 0) | 5 -> 10 s -> 0 -> 5
    # at P = 1: n0 9 | mask | 5 -> 9 -> 13 s -> 3 -> 7; n2 10 s -> 0 | masked | 5 -> 10
    # (fires, output zeroed) -> 0 -> 5 -> 10 (fires, zeroed); n1 masked
    g = IFGraph(
        (vector_input(3), IFLayer("a", (3,), [10] * 3, [5] * 3, [0] * 3, [1.0] * 3),
         ReadoutLayer("out", (1,), [1], 1.0)),
        (DenseProjection("w", "input", "a", np.diag([4, -6, 5])),
         DenseProjection("r", "a", "out", np.array([[1, 1, 1]]))),
        meta("int8"))
    res = simulate(g, torch.tensor([[1, 1, 1]]), RunConfig(3, presim=2, record=True))
    assert res.steps == 5 and res.spikes is not None and res.masks is not None
    assert res.masks["a"][0].tolist() == [True, False, True]
    assert res.spikes["a"][:, 0].int().tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 1],
                                                    [1, 0, 0], [0, 0, 1]]
    assert res.window_counts["a"][0].tolist() == [1, 0, 2]
    assert res.spike_counts["a"][0].tolist() == [2, 0, 3]
    # the readout is reset at the boundary: it counts steps 3..5 only (bias 1 + 1 spike each)
    assert int(res.readout) == 3 * (1 + 1)
    res = simulate(g, torch.tensor([[1, 1, 1]]), RunConfig(3, presim=1, record=True))
    assert res.masks is not None and res.masks["a"][0].tolist() == [True, False, False]
    assert res.spikes is not None
    assert res.spikes["a"][:, 0].int().tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0],
                                                    [0, 0, 0]]
    assert int(res.readout) == 3 * 1 + 1
    assert_same(res, reference_simulate(g, torch.tensor([[1, 1, 1]]),
                                        RunConfig(3, presim=1, record=True)))


# --------------------------------------------------------------------------- random graphs


def random_weights(rng: np.random.Generator, shape: tuple[int, ...], profile: str,
                   scale: float) -> np.ndarray:
    prof = get_profile(profile)
    top = max(1, int(prof.weight_max // prof.weight_step * scale))
    return rng.integers(-top, top + 1, shape) * prof.weight_step


def random_layer(rng: np.random.Generator, name: str, shape: tuple[int, ...], profile: str,
                 biases: bool, big: bool) -> IFLayer:
    prof = get_profile(profile)
    c = shape[0]
    top = prof.threshold_mant_max if big else 400
    v_th = rng.integers(1, top + 1, c) * prof.threshold_unit
    v_init = (rng.integers(0, v_th + 1) if rng.random() < 0.7
              else rng.integers(-v_th, v_th + 1))
    if biases:
        raw = rng.integers(-4, 5, c) * (v_th // 3 + 1) * (50 if big else 1)
        bias = np.array([prof.round_bias(min(max(float(b), -prof.bias_max), prof.bias_max))
                         for b in raw], dtype=np.int64)
    else:
        bias = np.zeros(c, dtype=np.int64)
    return IFLayer(name, shape, v_th, v_init, bias, np.ones(c),
                   "subtract" if rng.random() < 0.7 else "zero")


def random_graph(seed: int, profile: str, biases: bool, big: bool, conv: bool) -> IFGraph:
    """A small random graph: conv or dense layers, pooling, a delay-matched residual
    shortcut, zero and subtract resets; ``big`` drives wraps, saturation and wide sums."""
    rng = np.random.default_rng(seed)
    scale = 1.0 if big else 0.15
    layers: list[object] = []
    projs: list[ProjectionT] = []
    in_bits = get_profile(profile).input_bits
    if conv:
        cin = int(rng.integers(1, 3))
        inp = image_input((cin, 6, 6), in_bits)
        c1, c2 = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        a = random_layer(rng, "a", (c1, 6, 6), profile, biases, big)
        b = random_layer(rng, "b", (c1, 3, 3), profile, biases, big)
        c = random_layer(rng, "c", (c1, 3, 3), profile, biases, big)
        groups = c1 if rng.random() < 0.3 else 1
        projs += [
            ConvProjection("p_a", "input", "a", random_weights(rng, (c1, cin, 3, 3), profile,
                                                                scale), padding=(1, 1)),
            ConvProjection("p_b", "a", "b", random_weights(rng, (c1, c1 // groups, 3, 3),
                                                           profile, scale),
                           SumPool((2, 2), (2, 2)), padding=(1, 1), groups=groups),
            ConvProjection("p_c", "b", "c", random_weights(rng, (c1, c1, 3, 3), profile,
                                                           scale), SumPool((3, 3), (1, 1),
                                                                           (1, 1)),
                           padding=(1, 1)),
            IdentityProjection("skip", "a", "c", random_weights(rng, (c1,), profile, scale),
                               SumPool((2, 2), (2, 2))),
        ]
        d = random_layer(rng, "d", (c2,), profile, biases, big)
        projs.append(DenseProjection("p_d", "c", "d", random_weights(rng, (c2, c1 * 9),
                                                                     profile, scale)))
        layers += [inp, a, b, c, d]
        last, width = "d", c2
    else:
        fin = int(rng.integers(2, 9))
        inp = vector_input(fin, in_bits)
        f1, f2 = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        a = random_layer(rng, "a", (f1,), profile, biases, big)
        b = random_layer(rng, "b", (f2,), profile, biases, big)
        c = random_layer(rng, "c", (f2,), profile, biases, big)
        projs += [
            DenseProjection("p_a", "input", "a", random_weights(rng, (f1, fin), profile, scale)),
            DenseProjection("p_b", "a", "b", random_weights(rng, (f2, f1), profile, scale),
                            weight_exp=int(rng.integers(-1, 2)) if profile != "loihi2" else 0),
            DenseProjection("p_c", "b", "c", random_weights(rng, (f2, f2), profile, scale)),
            IdentityProjection("skip", "b", "c", random_weights(rng, (f2,), profile, scale)),
            DenseProjection("p_x", "input", "c", random_weights(rng, (f2, fin), profile,
                                                                scale)),
        ]
        layers += [inp, a, b, c]
        last, width = "c", f2
    prof = get_profile(profile)
    rb = [prof.round_bias(float(v)) for v in rng.integers(-500, 500, 3)] if biases else [0] * 3
    layers.append(ReadoutLayer("out", (3,), rb, 0.01))
    projs.append(DenseProjection("p_out", last, "out",
                                 random_weights(rng, (3, width), profile, scale)))
    return IFGraph(tuple(layers), tuple(projs), meta(profile))  # type: ignore[arg-type]


def random_input(graph: IFGraph, n: int, seed: int, big: bool) -> torch.Tensor:
    bits = get_profile(str(graph.meta.profile)).input_bits
    hi = 2**bits - 1 if big else 20
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, hi + 1, (n, *graph.input.shape)))


graph_args = {
    "seed": st.integers(0, 2**31 - 1), "profile": st.sampled_from(PROFILE_NAMES),
    "big": st.booleans(), "conv": st.booleans(),
    "timesteps": st.integers(1, 3), "presim": st.sampled_from([0, 0, 1, 3]),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(biases=st.booleans(), **graph_args)
def test_pipelined_is_synchronous_shifted_by_depth(seed: int, profile: str, big: bool,
                                                   conv: bool, timesteps: int, presim: int,
                                                   biases: bool) -> None:
    """Bias-free graphs (the issue's must-hold) and, thanks to the fill reset, biased ones."""
    graph = random_graph(seed, profile, biases, big, conv)
    x = random_input(graph, 3, seed, big)
    sync = simulate(graph, x, RunConfig(timesteps, presim, "synchronous", record=True))
    pipe = simulate(graph, x, RunConfig(timesteps, presim, "pipelined", record=True))
    depth = graph.depths()
    assert pipe.steps == sync.steps + depth["out"]
    assert sync.spikes is not None and pipe.spikes is not None
    for la in graph.if_layers:
        d = depth[la.name]
        assert torch.equal(pipe.spikes[la.name][d:d + sync.steps], sync.spikes[la.name]), la.name
        assert torch.equal(pipe.window_counts[la.name], sync.window_counts[la.name])
    assert torch.equal(pipe.readout, sync.readout)
    if presim:
        assert pipe.masks is not None and sync.masks is not None
        for name, m in sync.masks.items():
            assert torch.equal(pipe.masks[name], m)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.sampled_from(["synchronous", "pipelined"]), record=st.booleans(),
       kernel=st.sampled_from(["auto", "int8"]), **graph_args)
def test_fast_path_equals_the_plain_reference(seed: int, profile: str, big: bool, conv: bool,
                                              timesteps: int, presim: int, schedule: str,
                                              record: bool, kernel: str) -> None:
    graph = random_graph(seed, profile, True, big, conv)
    x = random_input(graph, 4, seed + 1, big)
    cfg = RunConfig(timesteps, presim, schedule, record)  # type: ignore[arg-type]
    assert_same(simulate(graph, x, cfg, kernel=kernel),  # type: ignore[arg-type]
                reference_simulate(graph, x, RunConfig(timesteps, presim, schedule, True)))


def test_random_graphs_reach_every_fallback() -> None:
    """The random graphs above are not all easy: they wrap, saturate, need float64 sums
    and int64 membranes (checked on the per-layer proofs the simulator derives)."""
    seen: set[str] = set()
    original = LayerArithmetic.derive.__func__  # type: ignore[attr-defined]

    def spy(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        a = original(cls, *args, **kwargs)
        seen.update({"wraps"} if a.wraps else set())
        seen.update({"clamp"} if a.clamp else set())
        seen.add(f"sum:{a.sum_dtype}")
        seen.add(f"state:{a.state_dtype}")
        return a

    mp = pytest.MonkeyPatch()
    mp.setattr(LayerArithmetic, "derive", classmethod(spy))
    try:
        for seed in range(4):
            for profile in PROFILE_NAMES:
                for conv in (False, True):
                    g = random_graph(seed, profile, True, True, conv)
                    x = random_input(g, 3, seed, True)
                    for cfg in (RunConfig(1), RunConfig(3, 1)):
                        assert_same(simulate(g, x, cfg), reference_simulate(g, x, cfg))
    finally:
        mp.undo()
    assert {"wraps", "clamp", "sum:torch.float32", "sum:torch.float64", "state:torch.float32",
            "state:torch.int32", "state:torch.int64"} <= seen, seen


def test_sums_use_float64_when_pytorch_lowers_float32_precision() -> None:
    bounds = [(1000.0, 0)]
    assert sum_dtype_for("a", bounds) == torch.float32
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert sum_dtype_for("a", bounds) == torch.float64
        g = random_graph(3, "int8", True, False, True)
        x = random_input(g, 2, 3, False)
        assert_same(simulate(g, x, RunConfig(2)), reference_simulate(g, x, RunConfig(2)))
    finally:
        torch.set_float32_matmul_precision(before)
    assert sum_dtype_for("a", [(2.0**24, 0)]) == torch.float64
    assert sum_dtype_for("a", [(2.0**23, 0), (2.0**23, 0)]) == torch.float64
    assert sum_dtype_for("a", [(2.0**22, 1)]) == torch.float32   # shifted left: 2**23
    assert sum_dtype_for("a", [(2.0**23, 1)]) == torch.float64   # shifted left: 2**24
    with pytest.raises(GraphError, match="beyond exact float64"):
        sum_dtype_for("a", [(2.0**53, 0)])


def test_layer_arithmetic_edges() -> None:
    loihi = get_profile("loihi2")
    ok = LayerArithmetic.derive(2**17 - 1, torch.float32, loihi, 0, 0, 0, 1)
    assert not ok.wraps and ok.current_bound == (2**17 - 1) * 64
    edge = LayerArithmetic.derive(2**17, torch.float32, loihi, 0, 0, 0, 1)
    assert edge.wraps and edge.current_bound == H  # u = 2**23 stays, larger values wrap
    assert LayerArithmetic.derive(100, torch.float32, loihi, 0, 10, 640, 4).state_dtype \
        == torch.float32
    int8 = get_profile("int8")
    wide = LayerArithmetic.derive(2**20, torch.float32, int8, 2**30, 0, 2**31 - 1, 8)
    assert wide.clamp and wide.state_dtype == torch.int64
    small = LayerArithmetic.derive(2**20, torch.float32, int8, 0, 0, 2**22, 8)
    assert not small.clamp and small.state_dtype == torch.float32  # all below 2**24
    mid = LayerArithmetic.derive(2**20, torch.float32, int8, 0, 0, 2**24, 8)
    assert not mid.clamp and mid.state_dtype == torch.int32


# --------------------------------------------------------------------------- recording memory


def test_recording_memory_is_checked_and_named(digits_graphs: dict[str, IFGraph],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    g = digits_graphs["int8"]
    cfg = RunConfig(4, 4, record=True)
    need = recording_bytes(g, cfg, 100)
    peak = memory.recording_run_bytes(g, cfg, 100)  # the recording and the working tensors
    assert check_recording_memory(g, cfg, 100) == peak > need
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: peak)
    with pytest.raises(UsageError, match=r"needs up to .* MiB.*smaller batch"):
        simulate(g, torch.zeros((100, 1, 8, 8), dtype=torch.int64), cfg)
    tenth = simulate(g, torch.zeros((10, 1, 8, 8), dtype=torch.int64), cfg)  # a tenth fits
    # the estimate is what a recording really holds: measure the 10-sample one (P + T = 8)
    assert tenth.spikes is not None and tenth.steps == 8
    held = sum(s.numel() * s.element_size() for s in tenth.spikes.values())
    assert need == 10 * held


def test_bad_inputs_are_one_clear_error(digits_graphs: dict[str, IFGraph], digits_fold) -> None:  # type: ignore[no-untyped-def]
    g = digits_graphs["int8"]
    with pytest.raises(GraphError, match=r"input has shape \(1, 4, 4\)"):
        simulate(g, torch.zeros((2, 1, 4, 4), dtype=torch.int64), RunConfig(1))
    with pytest.raises(GraphError, match="integer inputs"):
        simulate(g, torch.full((2, 1, 8, 8), 0.5), RunConfig(1))
    with pytest.raises(GraphError, match="quantized graphs"):
        Simulator(digits_fold.graph)
    with pytest.raises(UsageError, match="kernel must be one of"):
        Simulator(g, kernel="fp8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def digits_ifg(tmp_path_factory: pytest.TempPathFactory,
               digits_graphs: dict[str, IFGraph]) -> Path:
    return save_graph(digits_graphs["loihi2"], tmp_path_factory.mktemp("sim") / "d.ifg")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_run_json(digits_ifg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", str(digits_ifg), "--dataset", "digits",
                           "--timesteps", "2", "--presim", "1", "--schedule", "pipelined",
                           "--samples", "50", "--batch-size", "20", "--json")
    assert code == 0
    data = json.loads(out)
    assert {"backend", "accuracy", "samples", "timesteps", "presim", "latency_steps",
            "firing_rate", "pipeline_depth", "throughput", "recording_bytes_per_batch"} <= set(data)
    assert data["backend"] == "int" and data["samples"] == 50
    assert data["latency_steps"] == 1 + 2 + data["pipeline_depth"] and data["pipeline_depth"] == 5
    assert 0.5 < data["accuracy"] <= 1.0 and 0.0 < data["firing_rate"] < 1.0
    assert data["recording_bytes_per_batch"] == 8 * 20 * sum(
        la["neurons"] for la in data["layers"].values())
    code, out, _ = run_cli(capsys, "run", str(digits_ifg), "--samples", "30")
    assert code == 0 and "latency steps" in out and "per batch of 30" in out


def test_cli_sweep_json_table_and_plot(digits_checkpoint: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sweep.png"
    code, out, _ = run_cli(capsys, "sweep", str(digits_checkpoint), "--dataset", "digits",
                           "--timesteps", "1,2", "--presim", "0,2", "--samples", "60",
                           "--plot", str(png), "--json")
    assert code == 0
    data = json.loads(out)
    assert {"float_ann_accuracy", "quantized_ann_accuracy", "rows", "levels", "profile",
            "samples", "schedule"} <= set(data)
    assert data["levels"] == 1 and data["samples"] == 60
    assert [(r["timesteps"], r["presim"], r["latency_steps"]) for r in data["rows"]] == [
        (1, 0, 1), (2, 0, 2), (1, 2, 3), (2, 2, 4)]
    # at T = 1, L = 1 the SNN is the quantized ANN exactly
    assert data["rows"][0]["accuracy"] == data["quantized_ann_accuracy"]
    assert data["float_ann_accuracy"] is not None and data["float_ann_accuracy"] > 0.8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "sweep", str(digits_checkpoint), "--timesteps", "1",
                           "--samples", "20", "--profile", "int8")
    assert code == 0 and "quantized ANN (L=1) %" in out and "SNN %" in out


def test_cli_sweep_of_a_graph_file_has_no_float_ann(digits_ifg: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "sweep", str(digits_ifg), "--timesteps", "1",
                           "--samples", "20", "--json")
    assert code == 0 and json.loads(out)["float_ann_accuracy"] is None


@pytest.mark.parametrize(("argv", "message", "code"), [
    (["sweep", "{ifg}", "--plot", "{tmp}/a.pdf"], "give a .png file name", 8),
    (["sweep", "{ifg}", "--plot", "{tmp}/missing/a.png", "--samples", "5", "--timesteps",
      "1"], "output directory does not exist", 2),
    (["sweep", "{tmp}/nothing.pt"], "model file not found", 2),
    (["run", "{ifg}", "--profile", "int8"], "quantized for profile loihi2", 8),
])
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(
        digits_ifg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        argv: list[str], message: str, code: int) -> None:
    args = [a.format(ifg=digits_ifg, tmp=tmp_path) for a in argv]
    got, out, err = run_cli(capsys, *args)
    assert got == code
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
