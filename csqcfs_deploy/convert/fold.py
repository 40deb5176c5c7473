"""Folding: small named passes that turn a captured ANN into the float IF graph.

SPEC section 3. Each pass has a ``match(graph, node)`` and a
``transform(graph, node)``; :func:`run_passes` applies them in the declared
order :data:`FOLD_PASSES`, each until nothing matches any more:

1. ``reject-non-finite``       NaN / inf parameters are an error naming the node
2. ``reject-bad-threshold``    a non-positive activation threshold is an error
3. ``remove-dropout``          Dropout is the identity at inference
4. ``merge-batchnorm``         Conv/Linear -> BN becomes one Conv/Linear
5. ``explicit-shortcuts``      an identity shortcut (or any path without weights
                               into a neuron) gets a diagonal synapse, weight 1
6. ``absorb-avgpool``          AvgPool k -> sum pool; 1/k^2 moves into the next weights
7. ``scale-thresholds``        w_ji -> w_ji * lambda_i / lambda_j, b_j -> b_j / lambda_j,
                               every threshold becomes 1 (through pooling, flatten
                               and residual adds)

:func:`build_float_graph` then groups the result into neuron groups and
projections: an :class:`~csqcfs_deploy.ir.graph.IFGraph` with ``v_th = 1`` and
``v_init = phi`` that, evaluated in ANN mode, reproduces the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from torch import nn

from csqcfs_deploy.convert.capture import capture
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputEncoding,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)
from csqcfs_deploy.ir.ann import (
    WEIGHTED,
    ActOp,
    AddOp,
    AnnGraph,
    AnnNode,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    DropoutOp,
    FlattenOp,
    IdentityOp,
    InputOp,
    LinearOp,
    SumPoolOp,
)


class FoldPass(Protocol):
    name: str

    def match(self, graph: AnnGraph, node: AnnNode) -> bool: ...

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph: ...


# --------------------------------------------------------------------------- helpers


def _params(op: object) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(op).items() if isinstance(v, np.ndarray)}


def _upstream_source(graph: AnnGraph, name: str) -> AnnNode:
    """Walk up through pools and flatten to the node that feeds them."""
    node = graph.node(name)
    while isinstance(node.op, (AvgPoolOp, SumPoolOp, FlattenOp)):
        node = graph.node(node.inputs[0])
    return node


def _weighted_into(graph: AnnGraph, name: str) -> list[AnnNode]:
    """The weighted ops whose outputs are summed into node ``name`` (through adds)."""
    node = graph.node(name)
    if isinstance(node.op, WEIGHTED):
        return [node]
    if isinstance(node.op, AddOp):
        return [w for i in node.inputs for w in _weighted_into(graph, i)]
    raise GraphError(
        f"node '{node.name}' ({type(node.op).__name__}) sits between a synapse and a neuron; "
        "only residual + may (pooling after a Conv, before its activation, is not supported)"
    )


def _weighted_from(graph: AnnGraph, name: str) -> list[tuple[AnnNode, tuple[int, ...]]]:
    """Weighted ops fed by node ``name`` through pools/flatten, with the shape they see.

    The shape is the (C, H, W) shape just before flattening (or the 1-D shape).
    """
    found: list[tuple[AnnNode, tuple[int, ...]]] = []
    shape = graph.node(name).shape

    def walk(n: str, seen_shape: tuple[int, ...]) -> None:
        for c in graph.consumers(n):
            if isinstance(c.op, WEIGHTED):
                found.append((c, seen_shape))
            elif isinstance(c.op, (AvgPoolOp, SumPoolOp)):
                walk(c.name, c.shape)
            elif isinstance(c.op, FlattenOp):
                walk(c.name, seen_shape)
            else:
                raise GraphError(
                    f"node '{c.name}' ({type(c.op).__name__}) takes the output of '{name}' "
                    "without a synapse in between"
                )

    walk(name, shape)
    return found


def _scale_inputs(node: AnnNode, factor: np.ndarray, seen_shape: tuple[int, ...]) -> AnnNode:
    """Multiply the synapses of ``node`` from input channel c by ``factor[c]``."""
    op = node.op
    if isinstance(op, ConvOp):
        groups = op.groups
        cin_g = op.weight.shape[1]
        out_per_g = op.weight.shape[0] // groups
        f = factor.reshape(groups, cin_g)  # channel c = g * cin_g + i
        f = np.repeat(f, out_per_g, axis=0)  # (O, cin_g)
        return replace(node, op=replace(op, weight=op.weight * f[:, :, None, None]))
    if isinstance(op, LinearOp):
        per_feature = factor if len(seen_shape) == 1 else np.repeat(
            factor, int(np.prod(seen_shape[1:])))
        if per_feature.shape[0] != op.weight.shape[1]:
            raise GraphError(f"node '{node.name}': cannot map {factor.shape[0]} channels onto "
                             f"{op.weight.shape[1]} inputs")
        return replace(node, op=replace(op, weight=op.weight * per_feature[None, :]))
    if isinstance(op, IdentityOp):
        return replace(node, op=replace(op, weight=op.weight * factor))
    raise GraphError(f"node '{node.name}' is not a synapse")  # pragma: no cover


def _scale_outputs(node: AnnNode, factor: np.ndarray) -> AnnNode:
    """Multiply the output channel c of ``node`` (weights and bias) by ``factor[c]``."""
    op = node.op
    bias = None if getattr(op, "bias", None) is None else op.bias * factor  # type: ignore[union-attr]
    if isinstance(op, ConvOp):
        return replace(node, op=replace(op, weight=op.weight * factor[:, None, None, None],
                                        bias=bias))
    if isinstance(op, LinearOp):
        return replace(node, op=replace(op, weight=op.weight * factor[:, None], bias=bias))
    if isinstance(op, IdentityOp):
        return replace(node, op=replace(op, weight=op.weight * factor))
    raise GraphError(f"node '{node.name}' is not a synapse")  # pragma: no cover


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class RejectNonFinite:
    name: str = "reject-non-finite"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return any(not np.all(np.isfinite(v)) for v in _params(node.op).values())

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        bad = next(k for k, v in _params(node.op).items() if not np.all(np.isfinite(v)))
        raise GraphError(f"node '{node.name}' ({node.origin}): {bad} contains NaN or inf")


@dataclass(frozen=True)
class RejectBadThreshold:
    name: str = "reject-bad-threshold"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, ActOp) and bool(np.any(node.op.real_threshold <= 0))

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        assert isinstance(node.op, ActOp)
        lam = node.op.real_threshold
        c = int(np.argmin(lam))
        raise GraphError(
            f"activation '{node.origin}' (node '{node.name}') has a non-positive threshold "
            f"{lam[c]:.4g} in channel {c}; a converted neuron needs threshold > 0 "
            "(CS-QCFS's softplus threshold avoids this)"
        )


@dataclass(frozen=True)
class RemoveDropout:
    name: str = "remove-dropout"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, DropoutOp)

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        return graph.remove_node(node.name)


@dataclass(frozen=True)
class MergeBatchNorm:
    name: str = "merge-batchnorm"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, BatchNormOp)

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        assert isinstance(node.op, BatchNormOp)
        prev = graph.node(node.inputs[0])
        if not isinstance(prev.op, (ConvOp, LinearOp)):
            raise GraphError(f"BatchNorm node '{node.name}' ({node.origin}) follows "
                             f"'{prev.name}' ({type(prev.op).__name__}); only Conv2d/Linear -> "
                             "BatchNorm can be merged")
        if len(graph.consumers(prev.name)) != 1:
            raise GraphError(f"BatchNorm node '{node.name}': '{prev.name}' has other consumers")
        scale, shift = node.op.scale, node.op.shift
        bias = np.zeros(prev.op.weight.shape[0]) if prev.op.bias is None else prev.op.bias
        merged = _scale_outputs(replace(prev, op=replace(prev.op, bias=bias)), scale)
        merged = replace(merged, op=replace(merged.op, bias=merged.op.bias + shift))
        return graph.replace_node(merged).remove_node(node.name)


@dataclass(frozen=True)
class ExplicitShortcuts:
    """Give every weightless path into a neuron (or a residual add) a diagonal synapse."""

    name: str = "explicit-shortcuts"

    def _needs(self, graph: AnnGraph, node: AnnNode) -> str | None:
        """The input of ``node`` that reaches it without a synapse, if any."""
        if isinstance(node.op, (AddOp, ActOp)):
            for i in node.inputs:
                src = _upstream_source(graph, i)
                if isinstance(src.op, (ActOp, InputOp)):
                    return i
        return None

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return self._needs(graph, node) is not None

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        src = self._needs(graph, node)
        assert src is not None
        shape = graph.node(src).shape
        ident = AnnNode(graph.unique_name(f"{node.name}_shortcut"),
                        IdentityOp(np.ones(shape[0])), (src,), shape, "identity shortcut")
        return graph.insert_after(src, ident, only_for=node.name)


@dataclass(frozen=True)
class AbsorbAvgPool:
    name: str = "absorb-avgpool"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, AvgPoolOp)

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        assert isinstance(node.op, AvgPoolOp)
        k = node.op.kernel[0] * node.op.kernel[1]
        for consumer, seen in _weighted_from(graph, node.name):
            graph = graph.replace_node(_scale_inputs(
                consumer, np.full(seen[0], 1.0 / k), seen))
        op = SumPoolOp(node.op.kernel, node.op.stride, node.op.padding)
        return graph.replace_node(replace(node, op=op))


@dataclass(frozen=True)
class ScaleThresholds:
    name: str = "scale-thresholds"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, ActOp) and not np.all(node.op.threshold == 1.0)

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        assert isinstance(node.op, ActOp)
        lam = node.op.threshold
        for w in _weighted_into(graph, node.inputs[0]):
            graph = graph.replace_node(_scale_outputs(graph.node(w.name), 1.0 / lam))
        for consumer, seen in _weighted_from(graph, node.name):
            graph = graph.replace_node(_scale_inputs(graph.node(consumer.name), lam, seen))
        return graph.replace_node(replace(node, op=replace(node.op,
                                                           threshold=np.ones_like(lam))))


FOLD_PASSES: tuple[FoldPass, ...] = (
    RejectNonFinite(),
    RejectBadThreshold(),
    RemoveDropout(),
    MergeBatchNorm(),
    ExplicitShortcuts(),
    AbsorbAvgPool(),
    ScaleThresholds(),
)


@dataclass(frozen=True)
class FoldLog:
    """Which pass touched which node, in order."""

    applied: tuple[tuple[str, str], ...]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pass_name, _ in self.applied:
            out[pass_name] = out.get(pass_name, 0) + 1
        return out


def run_passes(graph: AnnGraph, passes: Sequence[FoldPass] = FOLD_PASSES
               ) -> tuple[AnnGraph, FoldLog]:
    """Apply each pass, in order, until it matches no node."""
    applied: list[tuple[str, str]] = []
    for p in passes:
        for _ in range(10 * len(graph.nodes) + 10):
            hit = next((n for n in graph.nodes if p.match(graph, n)), None)
            if hit is None:
                break
            applied.append((p.name, hit.name))
            graph = p.transform(graph, hit)
        else:  # pragma: no cover - a pass that keeps matching is a bug
            raise GraphError(f"fold pass {p.name} did not converge")
    return graph, FoldLog(tuple(applied))


# --------------------------------------------------------------------------- build


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
    acts = [n for n in graph.nodes if isinstance(n.op, ActOp)]
    if not acts:
        raise GraphError("the network has no CS-QCFS/QCFS activation to convert")
    levels = {n.op.levels for n in acts}  # type: ignore[union-attr]
    phis = {n.op.phi for n in acts}  # type: ignore[union-attr]
    if len(levels) != 1 or len(phis) != 1:
        raise GraphError(f"all activations must share one level count and phi; found L in "
                         f"{sorted(levels)}, phi in {sorted(phis)}")
    out_node = graph.node(graph.output)
    readout_name = graph.unique_name("readout")
    inp = next(n for n in graph.nodes if isinstance(n.op, InputOp))
    layer_name = {inp.name: "input", out_node.name: readout_name}
    layer_name.update({a.name: a.name for a in acts})

    projections: list[ProjectionT] = []
    bias_into: dict[str, np.ndarray] = {}
    for w in (n for n in graph.nodes if isinstance(n.op, WEIGHTED)):
        src, pool = _projection_source(graph, w)
        dst = _projection_target(graph, w)
        op = w.op
        bias = getattr(op, "bias", None)
        if bias is not None:
            key = layer_name[dst.name]
            bias_into[key] = bias_into.get(key, 0.0) + bias
        name = w.name if w.name != readout_name else f"{w.name}_syn"
        common = {"name": name, "src": layer_name[src.name], "dst": layer_name[dst.name],
                  "pool": pool}
        if isinstance(op, ConvOp):
            projections.append(ConvProjection(weight=op.weight, stride=op.stride,
                                              padding=op.padding, groups=op.groups, **common))
        elif isinstance(op, LinearOp):
            projections.append(DenseProjection(weight=op.weight, **common))
        else:
            assert isinstance(op, IdentityOp)
            projections.append(IdentityProjection(weight=op.weight, **common))

    level, phi = levels.pop(), phis.pop()
    layers: list[InputLayer | IFLayer | ReadoutLayer] = [
        InputLayer("input", inp.shape, 1.0, encoding.raw_max, encoding.mean, encoding.std,
                   encoding.bits)
    ]
    for a in acts:
        assert isinstance(a.op, ActOp)
        c = a.shape[0]
        layers.append(IFLayer(
            name=a.name, shape=a.shape, v_th=np.ones(c), v_init=np.full(c, phi),
            bias=bias_into.get(a.name, np.zeros(c)), threshold_real=a.op.real_threshold,
        ))
    layers.append(ReadoutLayer(readout_name, out_node.shape,
                               bias_into.get(readout_name, np.zeros(out_node.shape[0])), 1.0))
    meta = GraphMeta(levels=level, phi=phi, profile=None, arch=arch, num_classes=num_classes)
    return IFGraph(layers=tuple(layers), projections=tuple(projections), meta=meta)


@dataclass(frozen=True)
class FoldResult:
    ann: AnnGraph
    folded: AnnGraph
    graph: IFGraph
    log: FoldLog


def fold(model: nn.Module, input_shape: tuple[int, ...], encoding: InputEncoding,
         arch: str = "", num_classes: int = 0) -> FoldResult:
    """Capture, fold and group ``model`` into a float IF graph."""
    ann = capture(model, input_shape)
    folded, log = run_passes(ann)
    graph = build_float_graph(folded, encoding, arch=arch, num_classes=num_classes)
    return FoldResult(ann, folded, graph, log)
