"""The fold passes: small named rewrites of the captured ANN graph (SPEC section 3).

Each pass has a ``match(graph, node)`` and a ``transform(graph, node)``;
:func:`run_passes` applies them in the declared order :data:`FOLD_PASSES`, each
until nothing matches any more:

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

Scaling a synapse's inputs or outputs is a kind-generic operation
(:func:`~csqcfs_deploy.ir.kinds.scale_op_inputs`,
:func:`~csqcfs_deploy.ir.kinds.scale_op_outputs`): no pass knows the kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.ann import (
    ActOp,
    AddOp,
    AnnGraph,
    AnnNode,
    AvgPoolOp,
    BatchNormOp,
    DropoutOp,
    FlattenOp,
    IdentityOp,
    InputOp,
    SumPoolOp,
)
from csqcfs_deploy.ir.kinds import (
    WEIGHTED_OPS,
    BiasedOp,
    FloatArray,
    WeightedOp,
    scale_op_inputs,
    scale_op_outputs,
)


class FoldPass(Protocol):
    """A named rewrite: ``transform`` runs on a node ``match`` accepts."""

    @property
    def name(self) -> str: ...

    def match(self, graph: AnnGraph, node: AnnNode) -> bool: ...

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph: ...


# --------------------------------------------------------------------------- helpers


def _params(op: object) -> dict[str, FloatArray]:
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
    if isinstance(node.op, WeightedOp):
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
            if isinstance(c.op, WeightedOp):
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


def _synapse_op(node: AnnNode) -> WeightedOp:
    if not isinstance(node.op, WeightedOp):
        raise GraphError(f"node '{node.name}' is not a synapse")
    return node.op


def _with_synapse(node: AnnNode, op: WeightedOp) -> AnnNode:
    if not isinstance(op, WEIGHTED_OPS):
        raise GraphError(f"node '{node.name}': {type(op).__name__} is not a synapse kind")
    return replace(node, op=op)


def _scale_inputs(node: AnnNode, factor: FloatArray, seen_shape: tuple[int, ...]) -> AnnNode:
    """Multiply the synapses of ``node`` from input channel c by ``factor[c]``."""
    op = scale_op_inputs(_synapse_op(node), factor, seen_shape, node.name)
    return _with_synapse(node, op)


def _scale_outputs(node: AnnNode, factor: FloatArray) -> AnnNode:
    """Multiply the output channel c of ``node`` (weights and bias) by ``factor[c]``."""
    return _with_synapse(node, scale_op_outputs(_synapse_op(node), factor))


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
        if not isinstance(node.op, ActOp):  # pragma: no cover - match() ensures it
            raise GraphError(f"node '{node.name}' is not an activation")
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
    """``BN(W x + b) = (scale * W) x + (scale * b + shift)``, per output channel."""

    name: str = "merge-batchnorm"

    def match(self, graph: AnnGraph, node: AnnNode) -> bool:
        return isinstance(node.op, BatchNormOp)

    def transform(self, graph: AnnGraph, node: AnnNode) -> AnnGraph:
        if not isinstance(node.op, BatchNormOp):  # pragma: no cover - match() ensures it
            raise GraphError(f"node '{node.name}' is not a BatchNorm")
        prev = graph.node(node.inputs[0])
        if not isinstance(prev.op, BiasedOp):
            raise GraphError(f"BatchNorm node '{node.name}' ({node.origin}) follows "
                             f"'{prev.name}' ({type(prev.op).__name__}); only Conv2d/Linear -> "
                             "BatchNorm can be merged")
        if len(graph.consumers(prev.name)) != 1:
            raise GraphError(f"BatchNorm node '{node.name}': '{prev.name}' has other consumers")
        scale, shift = node.op.scale, node.op.shift
        bias = np.zeros(prev.op.weight.shape[0]) if prev.op.bias is None else prev.op.bias
        scaled = scale_op_outputs(replace(prev.op, bias=bias), scale)
        merged = replace(prev, op=replace(scaled, bias=bias * scale + shift))
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
        if src is None:  # pragma: no cover - match() ensures it
            raise GraphError(f"node '{node.name}' needs no shortcut")
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
        if not isinstance(node.op, AvgPoolOp):  # pragma: no cover - match() ensures it
            raise GraphError(f"node '{node.name}' is not an average pool")
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
        if not isinstance(node.op, ActOp):  # pragma: no cover - match() ensures it
            raise GraphError(f"node '{node.name}' is not an activation")
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
