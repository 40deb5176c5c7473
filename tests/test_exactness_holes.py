"""The two exactness holes of issue 13, closed by refusing what Lava or netx would compute
differently from the integer simulator.

1. Lava's neuron models shift one step's synaptic input into the current as
   ``a_in << 6`` in int32: a summed input of 2**25 or more overflows (stock
   Lava's LIF gives u = -2130706432 where the simulator's arithmetic gives
   +2130706432, then saturates). The Lava back end (and the netx exporter,
   whose CUBA neurons are Lava's LIF) refuses a graph whose worst-case summed
   input into a neuron group can reach that.
2. netx's readout is a CUBA neuron with ``vThMant = 131071``: it fires, and is
   reset to 0, when ``v > 131071 << 6 = 8388544``. A readout whose worst case
   one step can reach that (or wrap, or saturate) is refused at export.

Each bound is checked on both sides of its edge, against Lava's own models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from csqcfs_deploy.errors import QuantizationError, TargetError
from csqcfs_deploy.exporters.netx import THETA_MAX, plan_netx, write_netx
from csqcfs_deploy.ir import DenseProjection, GraphMeta, IFGraph, IFLayer, InputLayer, ReadoutLayer
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import open_backend
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.simulators.lava import processes as lava_processes
from csqcfs_deploy.simulators.lava.layout import (
    CURRENT_EXACT,
    check_lava_graph,
    lava_projection,
    source_range,
    synaptic_input_range,
)
from csqcfs_deploy.simulators.lava.netx import check_netx

W_MAX, W_MIN, X_MAX = 254, -256, 255     # loihi2 weights, 8-bit unsigned input
CUBA_THRESHOLD = THETA_MAX << 6          # 8388544


def vector_input(features: int) -> InputLayer:
    """(features,) integers 0..255, used as they are."""
    return InputLayer("input", (features,), 1.0, 255.0, (0.0,) * features, (1.0,) * features, 8)


def readout_graph(rows: list[list[int]], bias: list[int] | None = None,
                  weight_exp: int = 0) -> IFGraph:
    """input (k,) -> dense -> readout (len(rows),)."""
    w = np.array(rows, dtype=np.int64)
    return IFGraph(
        (vector_input(w.shape[1]), ReadoutLayer("out", (w.shape[0],), bias or [0] * len(rows),
                                                1.0)),
        (DenseProjection("w", "input", "out", w, weight_exp=weight_exp),),
        GraphMeta(levels=1, phi=0.5, profile="loihi2"))


def lava_lif(a_in: list[int], bias_mant: int = 0, bias_exp: int = 0, vth: int = THETA_MAX
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of stock Lava's PyLifModelBitAcc (du 4095, dv 0: netx's CUBA) from u = v = 0
    on an int32 input (what Dense sends): (u, v, spikes)."""
    from lava.proc.lif.models import PyLifModelBitAcc

    n = len(a_in)
    model = PyLifModelBitAcc({})
    model.u, model.v = np.zeros(n, np.int32), np.zeros(n, np.int32)
    model.du, model.dv, model.vth = 4095, 0, vth
    model.bias_mant = np.full(n, bias_mant, np.int16)
    model.bias_exp = np.full(n, bias_exp, np.int16)
    model.scale_bias()
    model.scale_threshold()
    model.subthr_dynamics(np.array(a_in, dtype=np.int32))
    spikes = model.spiking_activation()
    u = model.u.copy()
    model.reset_voltage(spikes)
    return u, model.v.copy(), spikes


# --------------------------------------------------------------------------- hole 1


def test_lavas_int32_shift_overflows_from_2_25_where_our_arithmetic_does_not() -> None:
    inside = [CURRENT_EXACT - 1, -CURRENT_EXACT]
    u, _, _ = lava_lif(inside)
    assert np.array_equal(u, lava_processes.loihi2_current(np.array(inside)))
    u, _, _ = lava_lif([CURRENT_EXACT])
    ours = lava_processes.loihi2_current(np.array([CURRENT_EXACT]))
    assert int(u[0]) == -2130706432 and int(ours[0]) == 2130706432


def test_a_dense_sum_reaching_2_25_is_refused_and_one_below_runs() -> None:
    k = CURRENT_EXACT // (W_MAX * X_MAX)          # 518 inputs: 254 * 255 * 518 < 2**25
    check_lava_graph(readout_graph([[W_MAX] * k]))
    over = readout_graph([[W_MAX] * (k + 1)])     # 254 * 255 * 519 >= 2**25
    with pytest.raises(TargetError) as info:
        check_lava_graph(over)
    message = str(info.value)
    assert "projection w" in message and str(W_MAX * X_MAX * (k + 1)) in message
    assert "33554431" in message and "a_in << 6" in message and "\n" not in message
    # what the simulator makes of it (Lava would have overflowed): a saturated readout
    x = torch.full((1, k + 1), X_MAX, dtype=torch.int64)
    assert int(simulate(over, x, RunConfig(1)).readout[0, 0]) == 2**23 - 1
    with pytest.raises(TargetError, match="a_in << 6"):   # the back end refuses it too
        with open_backend("lava", over, RunConfig(1, schedule="pipelined")):
            pass


def test_the_negative_edge_is_exact_at_minus_2_25() -> None:
    k = CURRENT_EXACT // (-W_MIN * X_MAX)         # 514: -256 * 255 * 514 >= -2**25
    check_lava_graph(readout_graph([[W_MIN] * k, [W_MAX] * k]))
    with pytest.raises(TargetError, match=f"-{-W_MIN * X_MAX * (k + 1)}"):
        check_lava_graph(readout_graph([[W_MIN] * (k + 1), [W_MAX] * (k + 1)]))


def test_the_weight_exponent_and_every_projection_into_a_layer_count() -> None:
    # 254 * 255 * 5 = 323850 fits; << 7 = 41452800 does not
    check_lava_graph(readout_graph([[W_MAX] * 5]))
    with pytest.raises(TargetError, match="41452800"):
        check_lava_graph(readout_graph([[W_MAX] * 5], weight_exp=7))
    # two projections into one IF layer, each within range, together beyond it
    k = 300                                       # 254 * 255 * 300 = 19431000 each
    w = np.full((1, k), W_MAX, dtype=np.int64)
    graph = IFGraph(
        (vector_input(k), IFLayer("a", (1,), [64], [33], [0], [1.0]),
         ReadoutLayer("out", (1,), [0], 1.0)),
        (DenseProjection("w1", "input", "a", w), DenseProjection("w2", "input", "a", w),
         DenseProjection("r", "a", "out", np.array([[2]]))),
        GraphMeta(levels=1, phi=0.5, profile="loihi2"))
    with pytest.raises(TargetError, match=r"projection w1 \+ w2 \(into a\).*38862000"):
        check_lava_graph(graph)


def test_calibrated_digits_graph_is_far_from_the_limit(digits_graphs: dict[str, IFGraph]
                                                       ) -> None:
    graph = digits_graphs["loihi2"]
    check_lava_graph(graph)
    worst = 0
    for p in graph.projections:
        q = lava_projection(p, graph.layer(p.src).shape)
        worst = max(worst, *(abs(v) for v in synaptic_input_range(
            q, *source_range(graph, p.src))))
    assert 0 < worst < CURRENT_EXACT / 100


# --------------------------------------------------------------------------- hole 2


def test_a_cuba_readout_fires_and_reads_0_past_8388544() -> None:
    """Stock Lava's LIF with netx's readout settings (vThMant 131071, bias << 6)."""
    _, v, spikes = lava_lif([THETA_MAX - 100], bias_mant=100, bias_exp=6)
    assert not spikes.any() and int(v[0]) == CUBA_THRESHOLD
    _, v, spikes = lava_lif([THETA_MAX - 99], bias_mant=100, bias_exp=6)
    assert spikes.all() and int(v[0]) == 0


def _edge_rows(total: int) -> list[int]:
    """Readout weights whose largest one-step input (all inputs at 255) is ``total``."""
    full, rest = divmod(total, W_MAX * X_MAX)
    assert rest % X_MAX == 0 and rest // X_MAX <= W_MAX and (rest // X_MAX) % 2 == 0
    return [W_MAX] * full + ([rest // X_MAX] if rest else [])


def test_a_readout_that_can_reach_the_cuba_threshold_is_refused() -> None:
    top = W_MAX * X_MAX * 2                       # 129540; beta = 1531: 131071 exactly
    plan_netx(readout_graph([_edge_rows(top)], bias=[1531 << 6]))
    with pytest.raises(QuantizationError) as info:  # beta = 1532: 131072 fires
        plan_netx(readout_graph([_edge_rows(top)], bias=[1532 * 64]))
    message = str(info.value)
    assert "readout out" in message and str(CUBA_THRESHOLD) in message
    assert str(CUBA_THRESHOLD + 64) in message and "--calibration-margin" in message
    assert "\n" not in message
    with pytest.raises(QuantizationError, match="wrap"):   # 131580 x 64 > 2**23 wraps
        plan_netx(readout_graph([_edge_rows(top + 8 * X_MAX)]))
    low = [-W_MAX, -W_MAX, -6]                    # -131070; beta -1: -131071 is the edge
    plan_netx(readout_graph([low], bias=[-64]))
    with pytest.raises(QuantizationError, match=f"-{CUBA_THRESHOLD + 64}"):  # saturates
        plan_netx(readout_graph([low], bias=[-128]))


def test_the_readout_at_the_edge_runs_exactly_on_netx(tmp_path: Path) -> None:
    """The largest accepted readout: netx on Lava equals the simulator at T = 1."""
    graph = readout_graph([_edge_rows(W_MAX * X_MAX * 2), [W_MIN, W_MAX]],
                          bias=[1531 << 6, -5])
    path = tmp_path / "edge.net"
    write_netx(graph, path)
    x = torch.tensor([[X_MAX, X_MAX], [X_MAX, 0], [0, X_MAX], [0, 0]], dtype=torch.int64)
    check = check_netx(graph, path, x)
    assert check.readout_equal and check.predictions_equal
    assert int(simulate(graph, x, RunConfig(1, schedule="pipelined")).readout[0, 0]) \
        == CUBA_THRESHOLD
