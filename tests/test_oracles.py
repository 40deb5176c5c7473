"""The package against independent oracles (tests/oracles.py) and hand-worked numbers.

* the simulator, both schedules, with pre-simulation, against a step-by-step integer IF
  loop on enumerated synapse matrices (no code shared with the simulator); the quantized
  ANN (``ann_forward``) against the same matrices in ANN mode;
* the closed forms of ``csqcfs_deploy.ir.neuron`` against brute force: ``first_step_cut``
  against enumerating every integer input, ``if_count`` against stepping a neuron ``L``
  times and, on a float graph, against the CS-QCFS torch activation itself;
* SOPs, MACs, firing rate and energy of a network small enough to count by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csqcfs_deploy.ir import DenseProjection, GraphMeta, IFGraph, IFLayer, InputLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import first_step_cut, if_count
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.report.energy import BUILTIN_ENERGY, estimate
from csqcfs_deploy.report.sops import ActivityCounter
from csqcfs_deploy.run.reference import ann_forward
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.activations import CSQCFS

from .conftest import PROFILE_NAMES
from .oracles import ARITHMETIC, ann_oracle, if_loop
from .test_quantize_graph import tiny_graph_with_every_node
from .test_simulator import random_graph, random_input

# --------------------------------------------------------------------------- simulator


def assert_matches_loop(graph: IFGraph, x: torch.Tensor, timesteps: int, presim: int,
                        schedule: str) -> None:
    """Every output spike at every step, the counts, masks and readout of the simulator
    equal the step-by-step loop's."""
    cfg = RunConfig(timesteps, presim, schedule, record=True)  # type: ignore[arg-type]
    got = simulate(graph, x, cfg)
    want = if_loop(graph, x.numpy(), timesteps, presim, schedule)
    assert got.steps == want.steps
    assert got.spikes is not None
    assert set(got.spikes) == set(want.spikes)
    for name, rec in want.spikes.items():
        assert np.array_equal(got.spikes[name].numpy(), rec), name
        assert np.array_equal(got.spike_counts[name].numpy(), rec.sum(0)), name
        assert np.array_equal(got.window_counts[name].numpy(), want.window[name]), name
    assert (got.masks is None) == (want.masks is None)
    if got.masks is not None and want.masks is not None:
        for name, m in want.masks.items():
            assert np.array_equal(got.masks[name].numpy(), m), name
    assert np.array_equal(got.readout.numpy(), want.readout)


@pytest.mark.parametrize("schedule", ["synchronous", "pipelined"])
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulator_equals_the_step_by_step_loop(seed: int, profile: str, conv: bool,
                                                schedule: str) -> None:
    """Random graphs (residual shortcut, pools, groups, zero and subtract resets; odd seeds
    drive wraps, saturation and wide sums) at a few (T, P)."""
    big = seed % 2 == 1
    graph = random_graph(seed, profile, True, big, conv)
    x = random_input(graph, 3, seed, big)
    timesteps, presim = ((1, 0), (3, 2), (2, 1))[seed]
    assert_matches_loop(graph, x, timesteps, presim, schedule)


@pytest.mark.parametrize("schedule", ["synchronous", "pipelined"])
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_node_type_equals_the_step_by_step_loop(profile: str, schedule: str) -> None:
    """Padded sum pool before a conv, grouped conv, identity, zero reset, dense readout."""
    graph = tiny_graph_with_every_node(profile)
    x = torch.from_numpy(np.random.default_rng(5).integers(0, 17, size=(4, 2, 6, 6)))
    assert_matches_loop(graph, x, 4, 2, schedule)
    spikes = if_loop(graph, x.numpy(), 4, 2, schedule).spikes
    assert all(0 < int(s.sum()) < s.size for s in spikes.values())  # not vacuous


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("levels", [1, 4])
def test_quantized_ann_of_random_graphs_equals_the_oracle(levels: int, profile: str,
                                                          conv: bool) -> None:
    """ANN mode on graphs whose every layer is active, against enumerated synapses."""
    graph = random_graph(levels, profile, True, False, conv)
    x = random_input(graph, 4, levels, False)
    out = ann_forward(graph, x, levels=levels)
    want = ann_oracle(graph, x.numpy(), levels)
    for name, c in want.counts.items():
        assert torch.equal(out.counts[name], torch.from_numpy(c).double()), name
        assert 0 < int(c.max()), name  # not vacuous
    assert torch.equal(out.readout, torch.from_numpy(want.readout))


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_first_step_cut_equals_enumerating_every_input(profile: str) -> None:
    """One step from v_init fires exactly for the integer sums above the cut (tried one by
    one over a range that holds the edge, far from any wrap or saturation)."""
    ar = ARITHMETIC[profile]
    unit = 1 << ar.act_shift
    rng = np.random.default_rng(3)
    v_th = rng.integers(1, 40, 16) * unit
    v_init = rng.integers(-40, 40, 16) * unit + rng.integers(0, 2, 16)
    bias = rng.integers(-60, 60, 16) * unit
    cut = first_step_cut(torch.from_numpy(v_th), torch.from_numpy(v_init),
                         torch.from_numpy(bias), get_profile(profile)).numpy()
    acc = np.arange(-300, 300)[:, None]
    fires = ar.fires(v_init + ar.current(acc) + bias, v_th)
    assert fires.any(0).all() and (~fires).any(0).all()  # the edge lies in the range
    assert np.array_equal(fires, acc > cut)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("levels", [1, 2, 5, 8])
def test_if_count_equals_stepping_a_neuron_l_times(profile: str, levels: int) -> None:
    """SPEC section 2: a subtract-reset IF neuron driven by the same current ``a`` for
    ``L`` steps from ``v_init`` fires ``if_count(v_init + L * a)`` times; the loop is plain
    Python, one step at a time."""
    ar = ARITHMETIC[profile]
    rng = np.random.default_rng(levels)
    delta = 1 if ar.strict else 0
    v_th = rng.integers(1, 50, 300)
    v_init = np.array([int(rng.integers(delta, t + delta)) for t in v_th])
    drive = np.array([int(rng.integers(-2 * t, 3 * t + 1)) for t in v_th])
    spikes = []
    for th, v, a in zip(v_th.tolist(), v_init.tolist(), drive.tolist(), strict=True):
        count = 0
        for _ in range(levels):
            v += a
            if v > th or (v == th and not ar.strict):
                count += 1
                v -= th
        spikes.append(count)
    z = torch.from_numpy(v_init + levels * drive)
    got = if_count(z, torch.from_numpy(v_th), levels, get_profile(profile))
    assert got.tolist() == spikes
    assert 0 < sum(spikes) < levels * len(spikes) and levels in spikes  # not vacuous


@pytest.mark.parametrize("levels", [1, 3, 8])
def test_float_if_count_is_the_csqcfs_activation(levels: int) -> None:
    """On a float graph (v_th = 1, v_init = phi, input x / lambda per step) the closed form
    counts what the CS-QCFS torch module outputs, in units of lambda / L."""
    torch.manual_seed(0)
    act = CSQCFS(3, levels, phi=0.5).double()
    with torch.no_grad():
        act.up.copy_(torch.tensor([-0.5, 0.3, 2.0]))
    x = torch.randn(64, 3, dtype=torch.float64) * 3
    lam = act.threshold().detach()
    with torch.no_grad():
        module_counts = torch.round(act(x) * levels / lam)
    z = 0.5 + levels * x / lam
    got = if_count(z, torch.ones_like(z), levels, None)
    assert torch.equal(got, module_counts)
    assert set(got.unique().tolist()) == set(range(levels + 1))  # every level occurs


# --------------------------------------------------------------------------- energy by hand


def hand_graph() -> IFGraph:
    """input (2,) -> dense [[5, 0], [0, 0], [5, 5]] -> IF a (3,) -> dense (2, 3) -> readout."""
    return IFGraph(
        (InputLayer("input", (2,), 1.0, 255.0, (0.0, 0.0), (1.0, 1.0), 8),
         IFLayer("a", (3,), [10] * 3, [5] * 3, [0] * 3, [1.0] * 3),
         ReadoutLayer("out", (2,), [0, 0], 0.125)),
        (DenseProjection("w", "input", "a", np.array([[5, 0], [0, 0], [5, 5]])),
         DenseProjection("r", "a", "out", np.array([[1, 2, 3], [0, 0, -1]]))),
        GraphMeta(levels=1, phi=0.5, profile="int8"))


def test_energy_of_a_hand_worked_network() -> None:
    # int8 (v >= v_th), v_th = 10, v_init = 5, T = 2, two samples.
    # sample [1, 1]: drives 5, 0, 10 per step
    #   n0: 5 -> 10 s -> 0 -> 5      (1 spike)    n1: 5 -> 5 -> 5 (0)
    #   n2: 5 -> 15 s -> 5 -> 15 s -> 5 (2 spikes)
    # sample [0, 2]: drives 0, 0, 10: n0 and n1 silent, n2 2 spikes
    # readout (bias 0): [1, 2, 3] . (1, 0, 2) = 7, [0, 0, -1] . (1, 0, 2) = -2; then 6 and -2
    graph = hand_graph()
    x = torch.tensor([[1, 1], [0, 2]])
    result = simulate(graph, x, RunConfig(2))
    assert result.spike_counts["a"].tolist() == [[1, 0, 2], [0, 0, 2]]
    assert result.readout.tolist() == [[7, -2], [6, -2]]
    # logits = readout * scale / T = readout * 0.125 / 2
    assert result.logits.tolist() == [[0.4375, -0.125], [0.375, -0.125]]
    counter = ActivityCounter(graph, result.steps)
    counter.add(result.spike_counts, x)
    act = counter.activity()
    a, out = act.layers
    # 5 spikes over 3 neurons x 2 steps x 2 samples = 12 neuron-steps
    assert (a.neurons, a.spikes, a.firing_rate) == (3, 5, 5 / 12)
    # every spike of a reaches both readout features: 5 x 2 = 10 SOPs
    assert (a.sops, out.sops, out.neurons, out.spikes) == (0, 10, 2, 0)
    # input MACs: the 3 x 2 dense layer every step of every sample: 6 x 2 x 2 = 24;
    # as graded spikes: (2 + 1) non-zero inputs x fan-out 3 x 2 steps = 18
    assert (a.input_macs, a.input_graded_sops, out.input_macs) == (24, 18, 0)
    # ANN MACs per sample: 3 x 2 + 2 x 3 = 12
    assert (a.ann_macs, out.ann_macs) == (6, 6)
    assert (act.neuron_steps, act.ann_macs) == (12, 24)
    # cmos45 (4.6 pJ MAC, 0.9 pJ AC): SNN (4.6 x 24 + 0.9 x 10) / 2 = 59.7, ANN 4.6 x 12 = 55.2
    cmos = estimate(act, BUILTIN_ENERGY["cmos45"])
    assert cmos.snn_pj == pytest.approx(59.7) and cmos.ann_pj == pytest.approx(55.2)
    assert cmos.ratio == pytest.approx(55.2 / 59.7)
    # loihi (23.6 pJ per synaptic op, 81 / 52 pJ per active / inactive neuron update):
    # (23.6 x (18 + 10) + 81 x 5 + 52 x 7) / 2 = (660.8 + 405 + 364) / 2 = 714.9
    loihi = estimate(act, BUILTIN_ENERGY["loihi"])
    assert loihi.snn_pj == pytest.approx(714.9) and loihi.ann_pj is None
