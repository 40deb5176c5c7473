"""SpikingJelly 2.0's float multi-step IF network of a float IF graph, against our simulator.

The peer of ``bench_scale.py``'s row 2: :class:`SJGraphNet` builds, from the folded
float IF graph (weights in threshold units, ``v_th`` and ``v_init`` per layer), the
network a SpikingJelly user would write: per IF layer the sum of its projections in
``layer.SeqToANNContainer`` (T*N at once), the bias, and
``neuron.IFNode(step_mode='m', v_reset=None)`` (soft reset) whose membrane resets to
the layer's initial membrane. :func:`sj_row` times it against the integer simulator at
the same T, interleaved in one process, and reports how far its predictions agree
with ours and with our float64 float-IF-graph run (the float SNN is not bit-exact).

SpikingJelly is not a dependency: :func:`load_spikingjelly` finds it in the scratch
folder ``benchmarks/sj_env.sh`` makes (default /tmp/sjenv).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_simulator import Case, firing_rate, timed  # noqa: E402
from csqcfs_deploy.convert.calibrate import float_run  # noqa: E402
from csqcfs_deploy.convert.fold import fold  # noqa: E402
from csqcfs_deploy.errors import GraphError  # noqa: E402
from csqcfs_deploy.ir import IFGraph, IFLayer  # noqa: E402
from csqcfs_deploy.ir.kinds.conv import ConvProjection  # noqa: E402
from csqcfs_deploy.ir.kinds.dense import DenseProjection  # noqa: E402
from csqcfs_deploy.ir.kinds.identity import IdentityProjection  # noqa: E402
from csqcfs_deploy.ir.schedule import RunConfig  # noqa: E402
from csqcfs_deploy.simulators.integer import Simulator  # noqa: E402
from csqcfs_deploy.train.zoo import arch_spec  # noqa: E402

SJ_DEFAULT = Path("/tmp/sjenv")
SJ_HINT = "bash benchmarks/sj_env.sh /tmp/sjenv"
#: samples on which SpikingJelly is also compared with our float64 float IF graph run
FLOAT_CHECK_SAMPLES = 16


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_spikingjelly(path: str | None) -> tuple[Any, str]:
    """(spikingjelly.activation_based, version), or (None, why not). ``path`` (or
    /tmp/sjenv when it exists) is appended to sys.path, after the venv's packages."""
    folder = Path(path) if path else (SJ_DEFAULT if SJ_DEFAULT.is_dir() else None)
    if folder is not None and str(folder) not in sys.path:
        sys.path.append(str(folder))
    try:
        sj = importlib.import_module("spikingjelly.activation_based")
        for part in ("neuron", "layer", "functional"):
            importlib.import_module(f"spikingjelly.activation_based.{part}")
    except ImportError as exc:
        where = f" in {folder}" if folder is not None else ""
        return None, f"not installed{where} ({exc}); create it with: {SJ_HINT}"
    return sj, package_version("spikingjelly")


class ChannelScale(nn.Module):
    """An identity projection: ``x[:, c] * weight[c]``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


def synapse_module(p: object) -> nn.Module:
    """A projection of the float IF graph as plain torch modules (sum pool, then weights)."""
    w = torch.from_numpy(np.asarray(p.weight, np.float32))  # type: ignore[attr-defined]
    if isinstance(p, ConvProjection):
        core: nn.Module = nn.Conv2d(w.shape[1] * p.groups, w.shape[0], p.kernel, p.stride,
                                    p.padding, groups=p.groups, bias=False)
        core.weight.data.copy_(w)
    elif isinstance(p, DenseProjection):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        core = nn.Sequential(nn.Flatten(), linear)
    elif isinstance(p, IdentityProjection):
        core = ChannelScale(w)
    else:
        raise GraphError(f"projection {getattr(p, 'name', p)}: kind {type(p).__name__} has no "
                         "SpikingJelly counterpart here")
    if p.pool is None:  # type: ignore[attr-defined]
        return core
    pool = p.pool  # type: ignore[attr-defined]
    return nn.Sequential(nn.AvgPool2d(pool.kernel, pool.stride, pool.padding,
                                      count_include_pad=True, divisor_override=1), core)


def uniform(values: np.ndarray, what: str) -> float:
    """The one value of a per-channel array (a SpikingJelly layer has one)."""
    if not np.all(values == values.flat[0]):
        raise GraphError(f"{what} differs between channels; IFNode takes one value")
    return float(values.flat[0])


class SJGraphNet(nn.Module):
    """The float IF graph as a SpikingJelly multi-step network at ``timesteps`` T.

    Per IF layer: the sum of its projections (``SeqToANNContainer``: T*N at once),
    plus the bias, into ``IFNode(v_threshold, v_reset=None, step_mode='m')`` whose
    membrane resets to the layer's initial membrane. A projection from the input runs
    once (the input is the same every step) and is broadcast over T. The readout sums
    its input over the T steps. ``count_spikes``: also count the output spikes.
    """

    def __init__(self, graph: IFGraph, sj: Any, timesteps: int) -> None:
        super().__init__()
        self.graph, self.timesteps, self.count_spikes, self.spikes = graph, timesteps, False, 0
        self.order = graph.topological_order()[1:]
        self.synapses = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for name in self.order:
            layer = graph.neuron_group(name)
            self.register_buffer(f"bias_{name}", torch.from_numpy(
                np.asarray(layer.bias, np.float32)).view(-1, *([1] * (len(layer.shape) - 1))))
            for p in graph.incoming(name):
                mod = synapse_module(p)
                self.synapses[p.name] = (mod if p.src == graph.input.name
                                         else sj.layer.SeqToANNContainer(mod))
            if isinstance(layer, IFLayer):
                node = sj.neuron.IFNode(
                    v_threshold=uniform(layer.v_th, f"layer {name} threshold"),
                    v_reset=None if layer.reset == "subtract" else 0.0, step_mode="m")
                node.set_reset_value("v", uniform(layer.v_init, f"layer {name} v_init"))
                self.nodes[name] = node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) summed over T for inputs ``x`` (N, *input_shape)."""
        g, t = self.graph, self.timesteps
        out: dict[str, torch.Tensor] = {}
        pending = Counter(p.src for p in g.projections)
        total = x
        for name in self.order:
            parts = []
            for p in g.incoming(name):
                if p.src == g.input.name:
                    y = self.synapses[p.name](x)
                    parts.append(y.unsqueeze(0).expand(t, *y.shape))
                else:
                    parts.append(self.synapses[p.name](out[p.src]))
                    pending[p.src] -= 1
                    if pending[p.src] == 0:
                        del out[p.src]
            total = parts[0] + getattr(self, f"bias_{name}")
            for part in parts[1:]:
                total = total + part
            if name in self.nodes:
                out[name] = self.nodes[name](total)
                if self.count_spikes:
                    self.spikes += int(out[name].sum())
        return total.sum(0)


@dataclass(frozen=True)
class SJRow:
    arch: str
    status: str                          # "measured", or why not
    version: str = ""
    batch: int = 0
    timesteps: int = 4
    sj_ms: float | None = None
    sim_ms: float | None = None
    ratio: float | None = None           # median over reps of SJ(T) / simulator(T)
    agree_with_ours: float | None = None        # SJ predictions == integer simulator's
    agree_with_float_if: float | None = None    # SJ == our float64 float IF graph run,
    #                                             on the first FLOAT_CHECK_SAMPLES samples
    rate_sj: float | None = None
    rate_ours: float | None = None


def float_graph_of(case: Case) -> IFGraph:
    """The folded float IF graph of the case's (calibrated) model."""
    enc = next(iter(case.graphs.values())).input.encoding
    return fold(case.model, arch_spec(case.arch).input_shape, enc, arch=case.arch,
                num_classes=10).graph


def sj_row(case: Case, profile: str, sj: Any, version: str, reps: int,
           timesteps: int = 4) -> SJRow:
    """SpikingJelly at T / our simulator at T, interleaved: s0 j0 s1 j1 ... s_reps;
    rep i's ratio is j_i / mean(s_i, s_i+1). Both see the same integer input (SJ its
    real value ``x_int * scale``)."""
    graph, fgraph = case.graphs[profile], float_graph_of(case)
    net = SJGraphNet(fgraph, sj, timesteps).eval()
    x_real = case.x_int.to(torch.float64) * fgraph.input.encoding.scale
    x_sj = x_real.to(torch.float32)
    sim, cfg, n = Simulator(graph), RunConfig(timesteps), len(case.x_int)

    def run_sj() -> torch.Tensor:
        sj.functional.reset_net(net)
        with torch.no_grad():
            return net(x_sj)

    ours = sim.run(case.x_int, cfg)
    net.count_spikes = True
    sj_pred = run_sj().argmax(1).numpy()
    net.count_spikes = False
    checked = min(n, FLOAT_CHECK_SAMPLES)
    ref = float_run(fgraph, x_real[:checked], cfg).predictions
    neurons = sum(la.neurons for la in fgraph.if_layers)
    sims = [timed(lambda: sim.run(case.x_int, cfg))]
    sjs = []
    for _ in range(reps):
        sjs.append(timed(run_sj))
        sims.append(timed(lambda: sim.run(case.x_int, cfg)))
    ratios = [j / ((a + b) / 2) for j, a, b in zip(sjs, sims, sims[1:], strict=False)]
    return SJRow(case.arch, "measured", version, n, timesteps, 1e3 * statistics.median(sjs),
                 1e3 * statistics.median(sims), statistics.median(ratios),
                 float(np.mean(sj_pred == ours.predictions)),
                 float(np.mean(sj_pred[:checked] == ref)),
                 net.spikes / (neurons * timesteps * n), firing_rate(graph, ours, timesteps, n))
