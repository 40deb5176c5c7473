"""The node rewrites of a float NIR import: LIF/CubaLIF -> IF, AvgPool2d -> SumPool2d, Scale folded.

:func:`rewrite` returns new node and edge collections (the input graph is not changed) in
which every neuron is a ``nir.IF`` (``r`` = its input gain), every pool a ``SumPool2d``
and no ``Scale`` is left; what each rule accepts and refuses is in
:mod:`csqcfs_deploy.exporters.nir.float_import`. A refusal names the node and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nir
import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.exporters.nir.validate import pair, real_values

WEIGHTED = (nir.Conv2d, nir.Affine, nir.Linear)
#: Nodes a pool's or a Scale's factor may pass through on the way to the next weights.
PASS_THROUGH = (nir.Flatten, nir.SumPool2d, nir.AvgPool2d, nir.Scale)

Nodes = dict[str, Any]
Edges = list[tuple[str, str]]


def _succs(edges: Edges, name: str) -> list[str]:
    return [b for a, b in edges if a == name]


def _preds(edges: Edges, name: str) -> list[str]:
    return [a for a, b in edges if b == name]


def _values(name: str, what: str, value: Any) -> npt.NDArray[np.float64]:
    """A field as float64, NaN refused (+inf allowed: tau and r may be infinite)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or np.any(np.isnan(arr)) or np.any(arr == -np.inf):
        raise GraphError(f"node {name}: {what} must be numbers (NaN and -inf refused)")
    return arr.astype(np.float64)


def _if_node(name: str, node: Any, gain: npt.NDArray[np.float64]) -> nir.IF:
    """An IF node of ``gain``'s shape with the node's threshold and reset."""
    shape = gain.shape
    v_reset = getattr(node, "v_reset", None)
    v_reset = np.zeros(shape) if v_reset is None else np.broadcast_to(
        real_values(name, "v_reset", v_reset), shape).copy()
    theta = np.broadcast_to(real_values(name, "v_threshold", node.v_threshold), shape).copy()
    return nir.IF(r=gain, v_threshold=theta, v_reset=v_reset)


def _no_leak_gain(name: str, tau_name: str, tau: npt.NDArray[np.float64],
                  r: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Gain 1 where ``tau = inf`` and ``r = inf`` (snnTorch's beta = 1); else refused."""
    if np.any(np.isfinite(tau)):
        raise GraphError(f"node {name}: {tau_name} = {float(tau[np.isfinite(tau)].min()):g} "
                         "is a real leak; only tau = inf (no leak) runs as an IF neuron")
    if np.any(np.isfinite(r)):
        raise GraphError(f"node {name}: {tau_name} = inf with a finite r never integrates "
                         "its input (r * I / tau = 0); an IF without leak is written with "
                         "r = inf too (snnTorch: r = tau / dt)")
    return np.ones(np.broadcast_shapes(tau.shape, r.shape))


def _lif(name: str, node: nir.LIF) -> nir.IF:
    gain = _no_leak_gain(name, "tau", _values(name, "tau", node.tau),
                         _values(name, "r", node.r))
    return _if_node(name, node, gain)


def _cuba_lif(name: str, node: nir.CubaLIF) -> nir.IF:
    tau_syn = _values(name, "tau_syn", node.tau_syn)
    if np.any(tau_syn != 1):
        raise GraphError(f"node {name}: a CubaLIF reduces to IF only with tau_syn = 1 (= dt: "
                         "the synaptic current lasts one step); it has tau_syn "
                         f"{float(tau_syn.reshape(-1)[0]):g}")
    ones = _no_leak_gain(name, "tau_mem", _values(name, "tau_mem", node.tau_mem),
                         _values(name, "r", node.r))
    w_in = real_values(name, "w_in", node.w_in)
    return _if_node(name, node, np.broadcast_to(w_in, ones.shape) * ones)


def _plain_if(name: str, node: nir.IF) -> nir.IF:
    r = real_values(name, "r", node.r)
    return _if_node(name, node, r.astype(np.float64))


# --------------------------------------------------------------------------- folds


def _next_weighted(nodes: Nodes, edges: Edges, start: str, why: str) -> str:
    """The Conv2d/Affine/Linear that ``start`` feeds through pass-through nodes only."""
    cur = start
    while True:
        nxt = _succs(edges, cur)
        if len(nxt) != 1 or not isinstance(nodes[nxt[0]], WEIGHTED + PASS_THROUGH):
            raise GraphError(f"node {start}: {why} must feed one Conv2d, Affine or Linear "
                             "(through Flatten or pools) before the next neuron group")
        cur = nxt[0]
        if isinstance(nodes[cur], WEIGHTED):
            return cur


def _times(node: Any, factor: npt.NDArray[np.float64], output_side: bool) -> Any:
    """``node`` with its weight scaled: per output channel (and the bias) or uniformly."""
    w = np.asarray(node.weight, dtype=np.float64)
    if not output_side:
        return dataclasses.replace(node, weight=w * float(factor.reshape(-1)[0]))
    f = factor.reshape((-1,) + (1,) * (w.ndim - 1))
    if isinstance(node, nir.Linear):
        return dataclasses.replace(node, weight=w * f)
    return dataclasses.replace(node, weight=w * f,
                               bias=np.asarray(node.bias, dtype=np.float64) * factor)


def _fold_avgpool(nodes: Nodes, edges: Edges, name: str) -> None:
    node = nodes[name]
    k = pair(name, "kernel_size", node.kernel_size)
    target = _next_weighted(nodes, edges, name, "an AvgPool2d (its 1/k^2 is folded into "
                            "the next weights)")
    nodes[target] = _times(nodes[target], np.array([1.0 / (k[0] * k[1])]), False)
    nodes[name] = nir.SumPool2d(kernel_size=np.asarray(k), stride=np.asarray(
        pair(name, "stride", node.stride)), padding=np.asarray(pair(name, "padding",
                                                                     node.padding)))


def _fold_scale(nodes: Nodes, edges: Edges, name: str) -> None:
    """Into the weighted node before it (per output channel) or, uniform, the next one."""
    s = real_values(name, "scale", nodes[name].scale)
    before, succ = _preds(edges, name), _succs(edges, name)
    if len(before) != 1 or len(succ) != 1:
        raise GraphError(f"node {name}: a Scale needs one edge in and one out")
    if isinstance(nodes[before[0]], WEIGHTED) and len(_succs(edges, before[0])) == 1:
        c = int(np.asarray(nodes[before[0]].weight).shape[0])
        rows = s.reshape(1, 1) if s.size == 1 else s.reshape(c, -1) if s.size % c == 0 \
            else None
        if rows is None or np.any(rows != rows[:, :1]):
            raise GraphError(f"node {name}: a Scale after {before[0]} must be one value per "
                             "output channel")
        per_c = np.broadcast_to(rows[:, 0], (c,)).astype(np.float64)
        nodes[before[0]] = _times(nodes[before[0]], per_c, True)
    else:
        if np.any(s != s.reshape(-1)[0]):
            raise GraphError(f"node {name}: a Scale not directly after a Conv2d, Affine or "
                             "Linear must be uniform to fold into the next weights")
        target = _next_weighted(nodes, edges, name, "a Scale")
        nodes[target] = _times(nodes[target], s.reshape(-1)[:1], False)
    edges[:] = [e for e in edges if name not in e] + [(before[0], succ[0])]
    del nodes[name]


_NEURONS = {nir.LIF: _lif, nir.CubaLIF: _cuba_lif, nir.IF: _plain_if}


def rewrite(ng: nir.NIRGraph) -> tuple[Nodes, Edges, dict[str, int]]:
    """Nodes and edges with IF neurons only, SumPool2d for AvgPool2d and no Scale, and
    the counts of each rewrite (for the output)."""
    nodes: Nodes = dict(ng.nodes)
    edges: Edges = [(str(a), str(b)) for a, b in ng.edges]
    counts: dict[str, int] = {}

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    for name in list(nodes):
        node = nodes[name]
        convert = _NEURONS.get(type(node))
        if convert is not None:
            nodes[name] = convert(name, node)
            if not isinstance(node, nir.IF):
                count(f"{type(node).__name__} as IF")
    for name in [n for n, v in nodes.items() if isinstance(v, nir.AvgPool2d)]:
        _fold_avgpool(nodes, edges, name)
        count("AvgPool2d as SumPool2d with 1/k^2")
    for name in [n for n, v in nodes.items() if isinstance(v, nir.Scale)]:
        _fold_scale(nodes, edges, name)
        count("Scale into the weights")
    return nodes, edges, counts
