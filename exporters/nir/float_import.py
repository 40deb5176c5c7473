"""A third-party (float) NIR graph -> the float IF graph, quantized afterwards like a checkpoint.

Networks exported by norse, snnTorch, spikingjelly or sinabs carry float weights and
thresholds, and neurons written as ``IF``, ``LIF`` or ``CubaLIF``. :func:`import_float_nir`
rewrites such a graph into the float IF graph (SPEC section 3: ``v_th = 1``, ``v_init =
0``, weights and biases in units of the destination's threshold) that
:func:`~csqcfs_deploy.convert.quantize.quantize` and the calibrated scales take, so a
NIR file is quantized exactly as a folded checkpoint is (there is no second quantizer).
The time step is ``dt = 1`` (one NIR step per IF step).

What is folded, node by node (:func:`rewrite`; anything else is refused naming the node):

* ``IF``: ``v += r * I`` -> ``r`` folded into the incoming weights and biases (one ``r``
  and one ``v_threshold`` per channel);
* ``LIF`` with ``tau = inf`` everywhere (no leak): an IF neuron. Its input term
  ``r * I / tau`` is read as ``I`` when ``r = inf`` too: that is how snnTorch writes a
  ``Leaky`` with ``beta = 1`` (``tau = dt / (1 - beta)``, ``r = tau / dt``). A finite
  ``r`` with ``tau = inf`` never integrates its input (refused), a finite ``tau`` is a
  real leak (refused);
* ``CubaLIF`` reduces to IF exactly when the synaptic current lasts one step and the
  membrane does not leak: ``tau_syn = 1`` (= dt: the forward-Euler step gives
  ``I_t = w_in * S_t``), ``tau_mem = inf`` and ``r = inf`` (as for LIF); it is then an
  IF neuron with input gain ``w_in``. Any other CubaLIF is refused, naming the field;
* ``AvgPool2d(k)`` -> ``SumPool2d(k)`` with ``1 / k^2`` folded into the weights of the
  next Conv2d/Affine/Linear (through Flatten, pools and Scale nodes only);
* ``Scale`` -> folded into the weights (and bias) of the Conv2d/Affine/Linear before it
  (per output channel), or, a uniform scale, into the next one's weights.

The neuron rule each library's IF stands for (``--source-semantics``,
:data:`SOURCE_SEMANTICS`, from REFERENCES.md "NIR's IF and how readers interpret it"):
reset to ``v_reset`` (which must be 0: IF graphs reset to 0) or by subtraction, and the
comparison. Every one starts at ``v = 0`` and emits at most one spike per step; sinabs's
default ``MultiSpike`` (``floor(v / threshold)`` spikes in one step) cannot be
represented and is refused. The comparison (``>`` or ``>=``) differs only on a membrane
exactly at the threshold, which real-valued weights reach with probability 0; the
integer graph compares with its profile's rule (``v_init + 1`` on strict profiles, SPEC
section 3). The float IF graph (the reference of the fidelity figures) runs these
semantics; :class:`SourceNetwork` is that graph as the "source model".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import nir
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from csqcfs_deploy.convert.calibrate import float_run
from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.exporters.nir.flavors import FOREIGN_PROFILE
from csqcfs_deploy.exporters.nir.float_rewrite import rewrite
from csqcfs_deploy.exporters.nir.projections import read_projection
from csqcfs_deploy.exporters.nir.reader import NEURON_NODES_READ
from csqcfs_deploy.exporters.nir.semantics import (
    Semantics,
    chains,
    order,
    per_channel_threshold,
)
from csqcfs_deploy.exporters.nir.validate import check_acyclic, check_node_types, real_values
from csqcfs_deploy.ir import (
    GraphMeta,
    IFGraph,
    IFLayer,
    InputEncoding,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig

LayerT = InputLayer | IFLayer | ReadoutLayer


@dataclass(frozen=True)
class SourceSemantics:
    """One library's IF rule: ``reset`` "zero" (to ``v_reset`` = 0) or "subtract",
    ``comparison`` ">" or ">=", and what the library's neuron is; ``refusal``: why it
    cannot be represented (None: it can)."""

    name: str
    reset: str
    comparison: str
    neuron: str
    refusal: str | None = None

    def describe(self) -> str:
        """One line for the output: the rule and how the IF graph holds it."""
        reset = "to 0" if self.reset == "zero" else "by subtraction"
        return (f"source semantics {self.name}: {self.neuron}; as an IF graph: v starts at "
                f"0, one spike per step, reset {reset}, comparison {self.comparison} (the "
                "integer graph uses its profile's; they differ only on a membrane exactly "
                "at the threshold)")


SOURCE_SEMANTICS: dict[str, SourceSemantics] = {s.name: s for s in (
    SourceSemantics("nir", "zero", ">", "NIR's IF: v += r * I, spike when v > v_threshold, "
                    "v <- v_reset"),
    SourceSemantics("norse", "zero", ">", "norse IAFCell (from_nir): spike when v > v_th, "
                    "v <- v_reset (norse's reader ignores r; here r is folded as NIR "
                    "defines it)"),
    SourceSemantics("snntorch", "subtract", ">", "snnTorch Leaky (beta = 1, reset "
                    "subtract): spike when mem > threshold, mem -= threshold"),
    SourceSemantics("spikingjelly", "zero", ">=", "spikingjelly IFNode (from_nir, dt = 1): "
                    "spike when v >= v_threshold, v <- v_reset, v starts at v_reset"),
    SourceSemantics("sinabs", "subtract", ">=", "sinabs IAF with spike_fn=SingleSpike and "
                    "min_v_mem=None: spike when v >= threshold, v -= threshold"),
    SourceSemantics("sinabs-multispike", "subtract", ">=", "sinabs IAF (from_nir defaults)",
                    refusal="sinabs's default MultiSpike emits floor(v / threshold) spikes "
                    "in one step and its min_v_mem floors the membrane; an IF neuron emits "
                    "at most one spike per step (--source-semantics sinabs is its "
                    "SingleSpike, min_v_mem=None form)"),
)}
SOURCE_CHOICES = tuple(SOURCE_SEMANTICS)


def source_semantics(name: str) -> SourceSemantics:
    """The :class:`SourceSemantics` of ``--source-semantics NAME`` (UsageError if refused)."""
    sem = SOURCE_SEMANTICS.get(name)
    if sem is None:
        raise UsageError(f"--source-semantics must be one of {', '.join(SOURCE_CHOICES)}, "
                         f"got {name!r}")
    if sem.refusal is not None:
        raise UsageError(f"--source-semantics {name} cannot be represented: {sem.refusal}")
    return sem


@dataclass(frozen=True)
class NirImport:
    """The float IF graph of a float NIR graph, the semantics it was read with, and what
    was folded (rewrite -> count)."""

    graph: IFGraph
    semantics: SourceSemantics
    folded: dict[str, int]

    def notes(self) -> list[str]:
        """What the command line says about the import."""
        folded = ", ".join(f"{k} x{v}" for k, v in self.folded.items()) or "nothing"
        return [self.semantics.describe(), f"folded from the NIR graph: {folded}"]

    def to_json(self) -> dict[str, object]:
        return {"source_semantics": self.semantics.name, "reset": self.semantics.reset,
                "comparison": self.semantics.comparison, "folded": dict(self.folded)}


# --------------------------------------------------------------------------- neurons


def _channel_values(name: str, what: str, values: Any, shape: tuple[int, ...]
                    ) -> npt.NDArray[np.float64]:
    """A per-neuron field (scalar or of ``shape``) as one value per channel (C,)."""
    arr = real_values(name, what, values)
    if arr.size == 1:
        return np.full(shape[0], float(arr.reshape(-1)[0]))
    if arr.shape != shape:
        raise GraphError(f"node {name}: {what} has shape {arr.shape}, the node {shape}")
    flat = arr.reshape(shape[0], -1)
    if np.any(flat != flat[:, :1]):
        raise GraphError(f"node {name}: {what} varies within a channel; the IF graph has "
                         "one value per channel")
    return flat[:, 0].copy()


@dataclass(frozen=True)
class _Neuron:
    """An IF node of the rewritten graph: threshold and input gain per channel (C,)."""

    theta: npt.NDArray[np.float64]
    gain: npt.NDArray[np.float64]


def _neuron(name: str, node: Any, shape: tuple[int, ...], sem: SourceSemantics) -> _Neuron:
    theta = per_channel_threshold(name, np.broadcast_to(
        real_values(name, "v_threshold", node.v_threshold), shape))
    if np.any(theta <= 0):
        raise GraphError(f"node {name}: v_threshold {float(theta.min()):g} <= 0 cannot be "
                         "expressed (IF graph thresholds are positive)")
    gain = _channel_values(name, "r", node.r, shape)
    if np.any(~np.isfinite(gain)) or np.any(gain <= 0):
        raise GraphError(f"node {name}: r must be finite and > 0 (v += r * I), got "
                         f"{float(gain.min()):g}")
    if sem.reset == "zero":
        v_reset = real_values(name, "v_reset", node.v_reset)
        if np.any(v_reset != 0):
            raise GraphError(f"node {name}: v_reset {float(np.abs(v_reset).max()):g} != 0 "
                             f"under --source-semantics {sem.name} (an IF graph resets to 0)")
    return _Neuron(theta, gain)


# --------------------------------------------------------------------------- the graph


def _scaled(proj: ProjectionT, bias: npt.NDArray[Any], factor: npt.NDArray[np.float64]
            ) -> tuple[ProjectionT, npt.NDArray[np.float64]]:
    """Multiply a projection's weights and its bias by ``factor`` per output channel."""
    w = np.asarray(proj.weight, dtype=np.float64)
    f = factor.reshape((-1,) + (1,) * (w.ndim - 1))
    return (dataclasses.replace(proj, weight=w * f),
            np.asarray(bias, dtype=np.float64) * factor)


def _input_layer(name: str, shape: tuple[int, ...], enc: InputEncoding) -> InputLayer:
    """The data's encoding on the NIR input (one mean/std broadcast over the channels)."""
    c = shape[0]
    mean, std = enc.mean, enc.std
    if len(mean) != c:
        if len(set(mean)) != 1 or len(set(std)) != 1:
            raise UsageError(f"node {name}: the NIR input has {c} channels, the data's "
                             f"encoding {len(mean)}; pick the dataset with --dataset or "
                             "--data")
        mean, std = (mean[0],) * c, (std[0],) * c
    return InputLayer(name, shape, 1.0, enc.raw_max, mean, std, enc.bits)


def import_float_nir(ng: nir.NIRGraph, source: str, encoding: InputEncoding,
                     arch: str = "") -> NirImport:
    """The float IF graph of a float NIR graph read with ``--source-semantics source``
    (see the module docstring); GraphError naming the node for what cannot be said."""
    sem = source_semantics(source)
    check_acyclic(ng.nodes, list(ng.edges))
    nodes, edges, folded = rewrite(ng)
    rewritten = nir.NIRGraph(nodes=nodes, edges=edges, metadata={}, type_check=False)
    check_node_types(rewritten)
    how = Semantics(False, "plain", get_profile(FOREIGN_PROFILE), 0, real=True)
    neurons, found, _ = chains(rewritten, how)
    layer_names, chain_order = order(rewritten, how, neurons, found)
    shapes = {n: NEURON_NODES_READ.lookup(nodes[n]).shape(n, nodes[n]) for n in layer_names}
    cells = {n: _neuron(n, nodes[n], shapes[n], sem) for n in layer_names
             if isinstance(nodes[n], nir.IF)}
    if any(np.any(c.gain != 1) for c in cells.values()):
        folded = {**folded, "r into the weights": sum(bool(np.any(c.gain != 1))
                                                     for c in cells.values())}
    projections: list[ProjectionT] = []
    bias: dict[str, npt.NDArray[np.float64]] = {}
    for chain in chain_order:
        proj, b = read_projection(rewritten, how, chain, shapes)
        cell = cells.get(chain.dst)
        factor = (cell.gain / cell.theta if cell is not None
                  else np.ones(shapes[chain.dst][0]))
        proj, b = _scaled(proj, b, factor)
        projections.append(proj)
        bias[chain.dst] = bias[chain.dst] + b if chain.dst in bias else b
    layers = [_layer(n, nodes[n], shapes[n], cells.get(n), bias, sem, encoding)
              for n in layer_names]
    readout = next(la for la in layers if isinstance(la, ReadoutLayer))
    meta = GraphMeta(levels=1, phi=0.0, profile=None, arch=arch,
                     num_classes=readout.channels,
                     notes=f"imported from a float NIR graph ({sem.describe()})")
    graph = IFGraph(layers=tuple(layers), projections=tuple(projections), meta=meta)
    return NirImport(graph, sem, folded)


def _layer(name: str, node: Any, shape: tuple[int, ...], cell: _Neuron | None,
           bias: dict[str, npt.NDArray[np.float64]], sem: SourceSemantics,
           enc: InputEncoding) -> LayerT:
    c = shape[0]
    b = bias.get(name, np.zeros(c))
    if isinstance(node, nir.Input):
        return _input_layer(name, shape, enc)
    if cell is None:
        return ReadoutLayer(name, shape, b, 1.0)
    return IFLayer(name, shape, v_th=np.ones(c), v_init=np.zeros(c), bias=b,
                   threshold_real=cell.theta, reset=sem.reset)


# --------------------------------------------------------------------------- the source


class SourceNetwork(nn.Module):
    """The float NIR network as the "source model" of the fidelity figures: its float IF
    graph run for ``timesteps`` steps (float64) on the normalised input; returns logits."""

    def __init__(self, graph: IFGraph, timesteps: int = 1) -> None:
        super().__init__()
        self.graph = graph
        self.timesteps = int(timesteps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = float_run(self.graph, x.to(torch.float64), RunConfig(self.timesteps))
        return run.logits.to(torch.float32)

