"""The captured ANN graph (SPEC section 1): a DAG of :class:`AnnNode` s, one operation each.

Each node holds one operation with float64 numpy parameters and its output
shape (without the batch dimension). :func:`capture` (in ``convert``) builds it
from a torch model; the fold passes rewrite it; :func:`evaluate_ann` runs it.

The synapse ops (:data:`WEIGHTED`: ``ConvOp``, ``LinearOp``, ``IdentityOp``) are
defined with their kinds in :mod:`csqcfs_deploy.ir.kinds`; the others here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.kinds import (
    WEIGHTED_OPS,
    ConvOp,
    FloatArray,
    IdentityOp,
    KindTable,
    LinearOp,
    WeightedOpT,
    op_forward,
    per_channel_view,
)

# --------------------------------------------------------------------------- ops


@dataclass(frozen=True, eq=False)
class InputOp:
    """The network's input x (N, *input_shape)."""


@dataclass(frozen=True, eq=False)
class BatchNormOp:
    """y = x * scale[c] + shift[c] (eval-mode statistics already applied)."""

    scale: FloatArray
    shift: FloatArray


@dataclass(frozen=True, eq=False)
class ActOp:
    """CS-QCFS activation: per-channel threshold (C,), L levels, shift phi.

    ``threshold`` is the current scale of the neuron's input (1 after threshold
    scaling); ``real_threshold`` stays the trained ``lambda_c``.
    """

    threshold: FloatArray
    levels: int
    phi: float
    real_threshold: FloatArray


@dataclass(frozen=True, eq=False)
class AvgPoolOp:
    """Average pool with zero padding counted in the divisor (count_include_pad)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, eq=False)
class SumPoolOp:
    """Sum pool (an average pool whose 1/k^2 moved into the next weights)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, eq=False)
class FlattenOp:
    """(N, C, H, W) -> (N, C*H*W), C-major."""


@dataclass(frozen=True, eq=False)
class AddOp:
    """y = x0 + x1 (a residual sum)."""


@dataclass(frozen=True, eq=False)
class DropoutOp:
    """The identity at inference."""


#: Every op of the captured graph (the synapse kinds: :data:`~csqcfs_deploy.ir.kinds.WeightedOpT`).
Op = (InputOp | WeightedOpT | BatchNormOp | ActOp | AvgPoolOp | SumPoolOp | FlattenOp | AddOp
      | DropoutOp)
WEIGHTED = WEIGHTED_OPS


@dataclass(frozen=True, eq=False)
class AnnNode:
    """One op of the captured graph, its input node names and output shape (no batch dim)."""

    name: str
    op: Op
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    origin: str = ""  # the module path or function in the user's model


@dataclass(frozen=True, eq=False)
class AnnGraph:
    """Nodes in topological order; ``output`` names the node whose value is returned."""

    nodes: tuple[AnnNode, ...]
    output: str

    def node(self, name: str) -> AnnNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"no node named {name!r}")

    def consumers(self, name: str) -> tuple[AnnNode, ...]:
        return tuple(n for n in self.nodes if name in n.inputs)

    def replace_node(self, node: AnnNode) -> AnnGraph:
        return AnnGraph(tuple(node if n.name == node.name else n for n in self.nodes), self.output)

    def remove_node(self, name: str) -> AnnGraph:
        """Drop a single-input node, rewiring its consumers (and the output) to its input."""
        node = self.node(name)
        if len(node.inputs) != 1:
            raise GraphError(f"cannot bypass node {name} with {len(node.inputs)} inputs")
        src = node.inputs[0]
        nodes = tuple(
            replace(n, inputs=tuple(src if i == name else i for i in n.inputs))
            for n in self.nodes if n.name != name
        )
        return AnnGraph(nodes, src if self.output == name else self.output)

    def insert_after(self, src: str, new: AnnNode, only_for: str | None = None) -> AnnGraph:
        """Insert ``new`` (whose input is ``src``) between ``src`` and its consumers.

        With ``only_for``, only that consumer is rewired.
        """
        nodes: list[AnnNode] = []
        for n in self.nodes:
            if n.name != src and (only_for is None or n.name == only_for):
                n = replace(n, inputs=tuple(new.name if i == src else i for i in n.inputs))
            nodes.append(n)
            if n.name == src:
                nodes.append(new)
        return AnnGraph(tuple(nodes), self.output)

    def unique_name(self, base: str) -> str:
        names = {n.name for n in self.nodes}
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        return name


# --------------------------------------------------------------------------- evaluate

#: How each op computes its output from its inputs (N, ...) float64 and the network input x.
Evaluator = Callable[[Any, list[torch.Tensor], torch.Tensor], torch.Tensor]
_EVALUATE: KindTable[Evaluator] = KindTable("evaluate_ann")


@_EVALUATE.register(*WEIGHTED_OPS)
def _weighted(op: WeightedOpT, args: list[torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    return op_forward(op, args[0])


@_EVALUATE.register(InputOp)
def _input(op: InputOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


@_EVALUATE.register(BatchNormOp)
def _batchnorm(op: BatchNormOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (args[0] * per_channel_view(torch.from_numpy(op.scale), args[0])
            + per_channel_view(torch.from_numpy(op.shift), args[0]))


@_EVALUATE.register(ActOp)
def _act(op: ActOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``floor(clip(z / lam, 0, 1) * L + phi) / L * lam`` per channel."""
    lam = per_channel_view(torch.from_numpy(op.threshold), args[0])
    y = torch.clamp(args[0] / lam, 0.0, 1.0)
    return torch.floor(y * op.levels + op.phi) / op.levels * lam


@_EVALUATE.register(AvgPoolOp)
def _avgpool(op: AvgPoolOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(args[0], op.kernel, op.stride, op.padding, count_include_pad=True)


@_EVALUATE.register(SumPoolOp)
def _sumpool(op: SumPoolOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    k = op.kernel[0] * op.kernel[1]
    return F.avg_pool2d(args[0], op.kernel, op.stride, op.padding, count_include_pad=True) * k


@_EVALUATE.register(FlattenOp)
def _flatten(op: FlattenOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return args[0].flatten(1)


@_EVALUATE.register(AddOp)
def _add(op: AddOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return args[0] + args[1]


@_EVALUATE.register(DropoutOp)
def _dropout(op: DropoutOp, args: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return args[0]


def evaluate_ann(graph: AnnGraph, x: torch.Tensor) -> torch.Tensor:
    """Run an AnnGraph in float64 on real inputs x (N, *input_shape); returns the output."""
    values: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        args = [values[i] for i in n.inputs]
        values[n.name] = _EVALUATE.lookup(n.op)(n.op, args, x)
    return values[graph.output]


__all__ = [
    "WEIGHTED",
    "ActOp",
    "AddOp",
    "AnnGraph",
    "AnnNode",
    "AvgPoolOp",
    "BatchNormOp",
    "ConvOp",
    "DropoutOp",
    "FlattenOp",
    "IdentityOp",
    "InputOp",
    "LinearOp",
    "Op",
    "SumPoolOp",
    "evaluate_ann",
]
