"""Grouping: a folded ANN graph becomes the float IF graph (SPEC section 3).

Every activation is a neuron group (an :class:`~csqcfs_deploy.ir.IFLayer`), the input
and the final Linear are the input and readout layers, and every synapse op becomes
one projection (:func:`~csqcfs_deploy.ir.kinds.to_projection`, per kind) from the
activation (or input) it reads, through at most one sum pool and flattens, to the
neuron group it feeds (through residual adds). The result has ``v_th = 1``,
``v_init = phi`` and, evaluated in ANN mode, reproduces the network.
"""

from __future__ import annotations

import numpy as np

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import (
    GraphMeta,
    IFGraph,
    IFLayer,
    InputEncoding,
    InputLayer,
    Layer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)
from csqcfs_deploy.ir.ann import (
    ActOp,
    AddOp,
    AnnGraph,
    AnnNode,
    AvgPoolOp,
    FlattenOp,
    InputOp,
    SumPoolOp,
)
from csqcfs_deploy.ir.kinds import BiasedOp, FloatArray, WeightedOp, Wiring, to_projection


def _projection_source(graph: AnnGraph, w: AnnNode) -> tuple[AnnNode, SumPool | None]:
    node = graph.node(w.inputs[0])
    pool: SumPool | None = None
    while isinstance(node.op, (SumPoolOp, FlattenOp, AvgPoolOp)):
        if isinstance(node.op, AvgPoolOp):  # pragma: no cover - absorbed by then
            raise GraphError(f"average pool '{node.name}' was not absorbed")
        if isinstance(node.op, SumPoolOp):
            if pool is not None:
                raise GraphError(f"two pooling layers in a row before '{w.name}' are not "
                                 "supported")
            pool = SumPool(node.op.kernel, node.op.stride, node.op.padding)
        node = graph.node(node.inputs[0])
    if not isinstance(node.op, (ActOp, InputOp)):
        raise GraphError(f"synapse '{w.name}' ({w.origin}) takes the output of '{node.name}' "
                         f"({type(node.op).__name__}) directly: two synaptic layers without an "
                         "activation in between are not supported")
    return node, pool


def _projection_target(graph: AnnGraph, w: AnnNode) -> AnnNode:
    if w.name == graph.output:
        return w
    node = w
    while True:
        consumers = graph.consumers(node.name)
        if len(consumers) != 1:
            raise GraphError(f"synapse output '{node.name}' is used {len(consumers)} times; "
                             "it must feed exactly one neuron group")
        node = consumers[0]
        if isinstance(node.op, ActOp):
            return node
        if not isinstance(node.op, AddOp):
            raise GraphError(f"synapse '{w.name}' feeds '{node.name}' "
                             f"({type(node.op).__name__}); only + may sit before a neuron")
        if node.name == graph.output:
            raise GraphError("the network must end in a Linear readout, not a sum")


def build_float_graph(graph: AnnGraph, encoding: InputEncoding, arch: str = "",
                      num_classes: int = 0) -> IFGraph:
    """Group a folded AnnGraph into neuron groups and projections (float units)."""
    acts = [(n, n.op) for n in graph.nodes if isinstance(n.op, ActOp)]
    if not acts:
        raise GraphError("the network has no CS-QCFS/QCFS activation to convert")
    levels = {op.levels for _, op in acts}
    phis = {op.phi for _, op in acts}
    if len(levels) != 1 or len(phis) != 1:
        raise GraphError(f"all activations must share one level count and phi; found L in "
                         f"{sorted(levels)}, phi in {sorted(phis)}")
    out_node = graph.node(graph.output)
    readout_name = graph.unique_name("readout")
    inp = next(n for n in graph.nodes if isinstance(n.op, InputOp))
    layer_name = {inp.name: "input", out_node.name: readout_name}
    layer_name.update({a.name: a.name for a, _ in acts})

    projections: list[ProjectionT] = []
    bias_into: dict[str, FloatArray] = {}
    for w, op in ((n, n.op) for n in graph.nodes if isinstance(n.op, WeightedOp)):
        src, pool = _projection_source(graph, w)
        dst = _projection_target(graph, w)
        bias = op.bias if isinstance(op, BiasedOp) else None
        if bias is not None:
            key = layer_name[dst.name]
            bias_into[key] = (bias_into[key] if key in bias_into else 0.0) + bias
        name = w.name if w.name != readout_name else f"{w.name}_syn"
        wiring = Wiring(name=name, src=layer_name[src.name], dst=layer_name[dst.name],
                        pool=pool)
        projections.append(to_projection(op, wiring))

    level, phi = levels.pop(), phis.pop()
    layers: list[Layer] = [
        InputLayer("input", inp.shape, 1.0, encoding.raw_max, encoding.mean, encoding.std,
                   encoding.bits)
    ]
    for a, act in acts:
        c = a.shape[0]
        layers.append(IFLayer(
            name=a.name, shape=a.shape, v_th=np.ones(c), v_init=np.full(c, phi),
            bias=bias_into.get(a.name, np.zeros(c)), threshold_real=act.real_threshold,
        ))
    layers.append(ReadoutLayer(readout_name, out_node.shape,
                               bias_into.get(readout_name, np.zeros(out_node.shape[0])), 1.0))
    meta = GraphMeta(levels=level, phi=phi, profile=None, arch=arch, num_classes=num_classes)
    return IFGraph(layers=tuple(layers), projections=tuple(projections), meta=meta)
