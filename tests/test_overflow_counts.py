"""Wrap and saturation counters of the integer simulator (issue 12, item 4).

Every run counts, per IF layer and the readout, the neuron-steps whose current
wrapped (``profile.current`` changed ``acc << act_shift``) and whose membrane
saturated (``v + current + bias`` outside the voltage range), over all steps and
samples. Checked by hand on tiny graphs, against the plain reference
(:func:`reference_simulate`, which counts step by step) on random graphs that
really wrap and saturate, in both schedules and with pre-simulation, and through
:func:`evaluate` into the JSON every command prints.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.evaluation import EvalSummary, add_counts, evaluate
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer import reference_simulate, simulate

from .conftest import PROFILE_NAMES

H = 2**23  # loihi2: half of the 24-bit current / voltage range
SAT_BIAS = 4095 << 7  # loihi2's largest bias: 16 steps fit below 2**23 - 1, 17 do not


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread avoids OpenMP hand-offs on the shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def meta(profile: str) -> GraphMeta:
    return GraphMeta(levels=1, phi=0.5, profile=profile)


def vector_input(features: int, bits: int = 8) -> InputLayer:
    return InputLayer("input", (features,), 1.0, 255.0, (0.0,) * features, (1.0,) * features,
                      bits)


def readout_only(profile: str, weights: list[int], bias: int = 0) -> IFGraph:
    """input (k,) -> dense -> readout: the readout sees the current stage directly."""
    return IFGraph(
        (vector_input(len(weights)), ReadoutLayer("out", (1,), [bias], 1.0)),
        (DenseProjection("w", "input", "out", np.array([weights])),),
        meta(profile))


def one_neuron(profile: str, weights: list[int], v_th: int, v_init: int, bias: int
               ) -> IFGraph:
    """input (k,) -> dense -> one IF neuron ``a`` -> readout (weight 0: stays quiet)."""
    return IFGraph(
        (vector_input(len(weights)), IFLayer("a", (1,), [v_th], [v_init], [bias], [1.0]),
         ReadoutLayer("out", (1,), [0], 1.0)),
        (DenseProjection("w", "input", "a", np.array([weights])),
         DenseProjection("r", "a", "out", np.array([[0]]))),
        meta(profile))


def counts(result: RunResult) -> tuple[dict[str, int], dict[str, int]]:
    assert result.wrapped is not None and result.saturated is not None
    return result.wrapped, result.saturated


def assert_counts_match_reference(graph: IFGraph, x: torch.Tensor, cfg: RunConfig,
                                  kernel: str = "auto") -> tuple[dict[str, int], dict[str, int]]:
    """The simulator's counts equal the reference's (and so do the readouts); returns them."""
    fast = simulate(graph, x, cfg, kernel=kernel)  # type: ignore[arg-type]
    ref = reference_simulate(graph, x, cfg)
    assert torch.equal(fast.readout, ref.readout)
    expected = {la.name for la in graph.if_layers} | {graph.readout.name}
    assert set(counts(fast)[0]) == set(counts(fast)[1]) == expected
    assert counts(fast) == counts(ref), (counts(fast), counts(ref))
    return counts(fast)


# --------------------------------------------------------------------------- by hand


def test_readout_wraps_and_saturates_by_hand() -> None:
    # 254 * 255 * 2 + 254 * 6 + 2 * 4 = 2**17: u = acc << 6 = 2**23 exactly
    g = readout_only("loihi2", [254, 254, 254, 2])
    x = torch.tensor([[255, 255, 6, 5],    # u = 2**23 + 128 wraps to -2**23 + 128 every step;
                      [255, 255, 6, 4],    # v: -8388480, then saturates (steps 2, 3)
                      [0, 0, 0, 0]])       # u = 2**23: no wrap, v saturates every step
    for cfg in (RunConfig(3), RunConfig(3, schedule="pipelined")):
        wrapped, saturated = assert_counts_match_reference(g, x, cfg)
        assert wrapped == {"out": 3} and saturated == {"out": 2 + 3}
    # the negative edge: u = -2**23 wraps to +2**23, which then saturates
    neg = readout_only("loihi2", [-254, -254, -254, -2])
    wrapped, saturated = assert_counts_match_reference(neg, x[1:2], RunConfig(4))
    assert wrapped == {"out": 4} and saturated == {"out": 4}
    # u = -2**23 + 128: neither
    wrapped, saturated = assert_counts_match_reference(neg, torch.tensor([[255, 255, 6, 3]]),
                                                      RunConfig(1))
    assert wrapped == saturated == {"out": 0}


def test_readout_bias_saturates_after_16_steps_presim_and_fill_steps_count() -> None:
    g = readout_only("loihi2", [0], bias=SAT_BIAS)
    x = torch.zeros((3, 1), dtype=torch.int64)
    assert counts(simulate(g, x, RunConfig(16)))[1] == {"out": 0}
    # steps 17..20 saturate, in each of the 3 samples
    assert assert_counts_match_reference(g, x, RunConfig(20))[1] == {"out": 3 * 4}
    # pipelined: one fill step (v = bias), then the clear, then 20 steps: again 17..20
    assert counts(simulate(g, x, RunConfig(20, schedule="pipelined")))[1] == {"out": 12}
    # P = 20, T = 3: the pre-simulation steps 17..20 saturate, the counted window does not
    res = simulate(g, x, RunConfig(3, presim=20))
    assert counts(res)[1] == {"out": 12} and int(res.readout[0]) == 3 * SAT_BIAS
    assert counts(reference_simulate(g, x, RunConfig(3, presim=20)))[1] == {"out": 12}
    neg = readout_only("loihi2", [0], bias=-SAT_BIAS)
    assert assert_counts_match_reference(neg, x[:1], RunConfig(18))[1] == {"out": 2}


def test_if_current_wraps_exactly_k_times_in_t_steps() -> None:
    """``a`` (600 neurons) fires at every even step; each spike volley gives ``b`` the
    sum 600 * 254 = 152400, u = 9753600 > 2**23, which wraps to -7023616: ``b`` wraps
    once per volley, and saturates at -(2**23 - 1) from the second wrap on."""
    width = 600
    g = IFGraph(
        (vector_input(1),
         IFLayer("a", (width,), [256] * width, [1] * width, [0] * width, [1.0] * width),
         IFLayer("b", (1,), [640], [0], [0], [1.0]),
         ReadoutLayer("out", (1,), [0], 1.0)),
        (DenseProjection("w", "input", "a", np.full((width, 1), 2)),   # u = 128 per step
         DenseProjection("ab", "a", "b", np.full((1, width), 254)),
         DenseProjection("r", "b", "out", np.array([[2]]))),
        meta("loihi2"))
    assert 254 * width * 64 - 2**24 == -7023616 and -2 * 7023616 < -(H - 1)
    x = torch.tensor([[1], [0]])  # the second sample never drives a
    for t in (1, 2, 5, 6):
        wrapped, saturated = assert_counts_match_reference(g, x, RunConfig(t))
        volleys = t // 2
        assert wrapped == {"a": 0, "b": volleys, "out": 0}
        assert saturated == {"a": 0, "b": max(volleys - 1, 0), "out": 0}
    # pipelined: the run is the synchronous one shifted by depth; b sees the volleys of
    # a's synchronous steps 2, 4, 6 within its 6 + 3 - 2 = 7 shifted steps
    wrapped, saturated = assert_counts_match_reference(g, x, RunConfig(6, schedule="pipelined"))
    assert wrapped["b"] == 3 and saturated["b"] == 2
    # P = 2, T = 4: b is masked after step 2 (v < 0) and re-initialised; masked neurons
    # keep integrating, so the wraps at steps 4 and 6 count, and the saturation at 6
    res = simulate(g, x, RunConfig(4, presim=2))
    assert res.masks is not None and not bool(res.masks["b"][0, 0])
    assert counts(res) == ({"a": 0, "b": 3, "out": 0}, {"a": 0, "b": 1, "out": 0})
    assert counts(reference_simulate(g, x, RunConfig(4, presim=2))) == counts(res)


def test_if_membrane_saturation_by_hand() -> None:
    # loihi2: v_th = 2**23 - 64, bias = SAT_BIAS: v saturates at step 17 (and fires)
    g = one_neuron("loihi2", [0], H - 64, 0, SAT_BIAS)
    x = torch.zeros((1, 1), dtype=torch.int64)
    assert assert_counts_match_reference(g, x, RunConfig(16))[1]["a"] == 0
    assert assert_counts_match_reference(g, x, RunConfig(20))[1]["a"] == 1
    # in the pre-simulation (P = 17) only: counted all the same
    assert assert_counts_match_reference(g, x, RunConfig(3, presim=17))[1]["a"] == 1
    # a masked neuron (negative membrane after P = 1) saturates at its steps 17..20 of T
    neg = one_neuron("loihi2", [0], 640, 0, -SAT_BIAS)
    res = simulate(neg, x, RunConfig(20, presim=1))
    assert res.masks is not None and not bool(res.masks["a"][0, 0])
    assert counts(res)[1]["a"] == 4
    assert counts(reference_simulate(neg, x, RunConfig(20, presim=1)))[1]["a"] == 4
    # int8 (32-bit membrane, v >= v_th): 2**30 -> 2**31 saturates to 2**31 - 1 and fires
    # (-> 0) at steps 2, 4, 6; no current stage, so nothing ever wraps
    g8 = one_neuron("int8", [0], 2**31 - 1, 0, 2**30)
    wrapped, saturated = assert_counts_match_reference(g8, x, RunConfig(6))
    assert wrapped == {"a": 0, "out": 0} and saturated == {"a": 3, "out": 0}


def test_one_step_run_counts_saturation_without_a_wrap() -> None:
    # acc = 2**17 - 2: u = 2**23 - 128 does not wrap; v = 321 + u = 2**23 + 193 saturates
    # (the one-step closed form decides the spike; the count still sees the membrane)
    g = one_neuron("loihi2", [254, 254, 254, 2], 640, 321, 0)
    x = torch.tensor([[255, 255, 6, 3], [0, 0, 0, 0], [255, 255, 6, 3]])
    for kernel in ("auto", "int8"):
        wrapped, saturated = assert_counts_match_reference(g, x, RunConfig(1), kernel)
        assert wrapped == {"a": 0, "out": 0} and saturated == {"a": 2, "out": 0}
    # one more unit of input: u = 2**23 + 128 wraps to a negative current (no spike)
    res = simulate(g, torch.tensor([[255, 255, 6, 5]]), RunConfig(1, record=True))
    assert counts(res) == ({"a": 1, "out": 0}, {"a": 0, "out": 0})
    assert res.spikes is not None and not bool(res.spikes["a"].any())


# --------------------------------------------------------------------------- random graphs


def full_weights(rng: np.random.Generator, shape: tuple[int, ...], profile: str,
                 scale: float) -> np.ndarray:
    prof = get_profile(profile)
    top = max(1, int(prof.weight_max // prof.weight_step * scale))
    return rng.integers(-top, top + 1, shape) * prof.weight_step


def wide_layer(rng: np.random.Generator, name: str, shape: tuple[int, ...], profile: str
               ) -> IFLayer:
    """Thresholds from tiny to the profile's largest, biases up to its limit."""
    prof = get_profile(profile)
    c = shape[0]
    top = min(prof.threshold_mant_max, 2**20)
    v_th = rng.integers(1, top + 1, c) * prof.threshold_unit
    v_init = rng.integers(-v_th // 2, v_th + 1)
    limit = min(prof.bias_max, 2**30)
    bias = np.array([prof.round_bias(float(b)) for b in rng.integers(-limit, limit + 1, c)],
                    dtype=np.int64)
    return IFLayer(name, shape, v_th, v_init, bias, np.ones(c),
                   "subtract" if rng.random() < 0.7 else "zero")


def overflow_graph(seed: int, profile: str, conv: bool) -> IFGraph:
    """A small graph with full-range weights, inputs and biases: it wraps (loihi2) and
    saturates; input projections join hidden ones into ``b`` and the readout (constant
    and per-step sums in one layer)."""
    rng = np.random.default_rng(seed)
    prof = get_profile(profile)
    scale = float(rng.choice([0.3, 1.0]))
    layers: list[object]
    projs: list[ProjectionT]
    if conv:
        cin, c = int(rng.integers(1, 3)), int(rng.integers(2, 4))
        inp = InputLayer("input", (cin, 4, 4), 1.0, 255.0, (0.0,) * cin, (1.0,) * cin,
                         prof.input_bits)
        layers = [inp, wide_layer(rng, "a", (c, 4, 4), profile),
                  wide_layer(rng, "b", (c, 2, 2), profile)]
        projs = [ConvProjection("p_a", "input", "a",
                                full_weights(rng, (c, cin, 3, 3), profile, scale),
                                padding=(1, 1)),
                 ConvProjection("p_b", "a", "b", full_weights(rng, (c, c, 3, 3), profile, scale),
                                SumPool((2, 2), (2, 2)), padding=(1, 1)),
                 IdentityProjection("skip", "a", "b", full_weights(rng, (c,), profile, scale),
                                    SumPool((2, 2), (2, 2)))]
        flat, n_in = c * 4, cin * 16
    else:
        fin, f1, f2 = (int(v) for v in rng.integers(2, 8, 3))
        layers = [vector_input(fin, prof.input_bits), wide_layer(rng, "a", (f1,), profile),
                  wide_layer(rng, "b", (f2,), profile)]
        projs = [DenseProjection("p_a", "input", "a", full_weights(rng, (f1, fin), profile,
                                                                   scale)),
                 DenseProjection("p_b", "a", "b", full_weights(rng, (f2, f1), profile, scale)),
                 DenseProjection("p_x", "input", "b", full_weights(rng, (f2, fin), profile,
                                                                   scale))]
        flat, n_in = f2, fin
    limit = min(prof.bias_max, 2**30)
    rb = [prof.round_bias(float(v)) for v in rng.integers(-limit, limit + 1, 3)]
    layers.append(ReadoutLayer("out", (3,), rb, 0.01))
    projs += [DenseProjection("p_out", "b", "out", full_weights(rng, (3, flat), profile, 1.0)),
              DenseProjection("p_in", "input", "out", full_weights(rng, (3, n_in), profile,
                                                                  scale))]
    return IFGraph(tuple(layers), tuple(projs), meta(profile))  # type: ignore[arg-type]


def overflow_input(graph: IFGraph, n: int, seed: int) -> torch.Tensor:
    bits = get_profile(str(graph.meta.profile)).input_bits
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 2**bits, (n, *graph.input.shape)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), profile=st.sampled_from(PROFILE_NAMES),
       conv=st.booleans(), timesteps=st.integers(1, 4), presim=st.sampled_from([0, 1, 3]),
       schedule=st.sampled_from(["synchronous", "pipelined"]),
       kernel=st.sampled_from(["auto", "int8"]))
def test_fast_counts_equal_the_reference(seed: int, profile: str, conv: bool, timesteps: int,
                                         presim: int, schedule: str, kernel: str) -> None:
    graph = overflow_graph(seed, profile, conv)
    x = overflow_input(graph, 3, seed + 1)
    assert_counts_match_reference(graph, x, RunConfig(timesteps, presim, schedule),  # type: ignore[arg-type]
                                  kernel)


def test_random_graphs_really_wrap_and_saturate() -> None:
    """The graphs above are not vacuous: hidden layers and readouts wrap (loihi2) and
    saturate, in both schedules and with pre-simulation; int profiles never wrap."""
    seen: dict[tuple[str, str, str], int] = {}
    for seed in range(6):
        for profile in ("loihi2", "int8"):
            for conv in (False, True):
                g = overflow_graph(seed, profile, conv)
                x = overflow_input(g, 3, seed)
                for cfg in (RunConfig(3), RunConfig(2, 2, "pipelined")):
                    wrapped, saturated = assert_counts_match_reference(g, x, cfg)
                    for name in wrapped:
                        kind = "out" if name == "out" else "hidden"
                        for what, c in (("wrapped", wrapped), ("saturated", saturated)):
                            key = (profile, kind, what)
                            seen[key] = seen.get(key, 0) + c[name]
    for kind in ("hidden", "out"):
        assert seen[("loihi2", kind, "wrapped")] > 0, seen
        assert seen[("loihi2", kind, "saturated")] > 0, seen
        assert seen[("int8", kind, "saturated")] > 0, seen
        assert seen[("int8", kind, "wrapped")] == 0, seen


def test_counts_are_zero_where_the_layer_proof_excludes_them() -> None:
    # small weights and inputs: every layer's arithmetic proves no wrap and no clamp
    rng = np.random.default_rng(3)
    g = IFGraph(
        (vector_input(4), IFLayer("a", (5,), [640] * 5, [321] * 5, [128] * 5, [1.0] * 5),
         ReadoutLayer("out", (2,), [64, -64], 1.0)),
        (DenseProjection("w", "input", "a", rng.integers(-3, 4, (5, 4)) * 2),
         DenseProjection("r", "a", "out", rng.integers(-3, 4, (2, 5)) * 2)),
        meta("loihi2"))
    x = torch.from_numpy(rng.integers(0, 256, (8, 4)))
    for cfg in (RunConfig(1), RunConfig(4, 2), RunConfig(3, 1, "pipelined")):
        wrapped, saturated = assert_counts_match_reference(g, x, cfg)
        assert wrapped == saturated == {"a": 0, "out": 0}


# --------------------------------------------------------------------------- evaluate / JSON


def test_evaluate_sums_counts_over_batches_into_the_json() -> None:
    g = IFGraph(
        (vector_input(1), IFLayer("a", (2,), [H - 64] * 2, [0] * 2, [SAT_BIAS] * 2, [1.0] * 2),
         ReadoutLayer("out", (2,), [SAT_BIAS, 0], 1.0)),
        (DenseProjection("w", "input", "a", np.zeros((2, 1), dtype=np.int64)),
         DenseProjection("r", "a", "out", np.zeros((2, 2), dtype=np.int64))),
        meta("loihi2"))
    raw = np.zeros((5, 1), dtype=np.float32)
    labels = np.zeros(5, dtype=np.int64)
    summary = evaluate("int", g, raw, labels, RunConfig(18), batch_size=2, progress=False)
    # per sample: a saturates at step 17 in both neurons; the readout's first neuron
    # at steps 17 and 18
    assert summary.layer_wrapped == {"a": 0, "out": 0}
    assert summary.layer_saturated == {"a": 5 * 2, "out": 5 * 2}
    data = summary.to_json()
    assert data["layers"] == {"a": {"neurons": 2, "spikes": 10, "firing_rate": 10 / (2 * 18 * 5),
                                    "wrapped": 0, "saturated": 10}}
    assert data["readout"] == {"name": "out", "neurons": 2, "wrapped": 0, "saturated": 10}
    assert (data["wrapped_total"], data["saturated_total"], data["readout_saturated"]) \
        == (0, 20, 10)


def test_a_back_end_that_does_not_count_gives_null() -> None:
    summary = EvalSummary(
        backend="lava", schedule="pipelined", samples=0, accuracy=0.0, timesteps=1,
        presim=0, latency_steps=2, pipeline_depth=1, firing_rate=0.0, seconds=0.0,
        predictions=np.zeros(0, dtype=np.int64), layer_spikes={"a": 0}, layer_neurons={"a": 4},
        layer_wrapped=None, layer_saturated=None, readout="out", readout_neurons=3)
    data = summary.to_json()
    assert data["layers"]["a"]["wrapped"] is None  # type: ignore[index]
    assert data["layers"]["a"]["saturated"] is None  # type: ignore[index]
    assert data["readout"] == {"name": "out", "neurons": 3, "wrapped": None,
                               "saturated": None}
    assert data["wrapped_total"] is data["saturated_total"] is data["readout_saturated"] is None
    assert add_counts({"a": 1, "out": 2}, {"a": 3, "out": 0}) == {"a": 4, "out": 2}
    assert add_counts({"a": 1}, None) is None and add_counts(None, {"a": 1}) is None
