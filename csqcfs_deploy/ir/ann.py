"""The captured ANN graph (SPEC section 1): a DAG of :class:`AnnNode` s, one operation each.

Each node holds one operation with float64 numpy parameters and its output
shape (without the batch dimension). :func:`capture` (in ``convert``) builds it
from a torch model; the fold passes rewrite it; :func:`evaluate_ann` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import GraphError

# --------------------------------------------------------------------------- ops


@dataclass(frozen=True, eq=False)
class InputOp:
    pass


@dataclass(frozen=True, eq=False)
class ConvOp:
    """y = conv2d(x, weight, bias), weight (O, I/groups, kH, kW)."""

    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


@dataclass(frozen=True, eq=False)
class LinearOp:
    """y = x @ weight.T + bias, weight (O, F)."""

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True, eq=False)
class IdentityOp:
    """y[c] = weight[c] * x[c] (an explicit shortcut synapse), weight (C,)."""

    weight: np.ndarray


@dataclass(frozen=True, eq=False)
class BatchNormOp:
    """y = x * scale[c] + shift[c] (eval-mode statistics already applied)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True, eq=False)
class ActOp:
    """CS-QCFS activation: per-channel threshold (C,), L levels, shift phi.

    ``threshold`` is the current scale of the neuron's input (1 after threshold
    scaling); ``real_threshold`` stays the trained ``lambda_c``.
    """

    threshold: np.ndarray
    levels: int
    phi: float
    real_threshold: np.ndarray


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
    pass


@dataclass(frozen=True, eq=False)
class AddOp:
    pass


@dataclass(frozen=True, eq=False)
class DropoutOp:
    pass


Op = (InputOp | ConvOp | LinearOp | IdentityOp | BatchNormOp | ActOp | AvgPoolOp | SumPoolOp
      | FlattenOp | AddOp | DropoutOp)
WEIGHTED = (ConvOp, LinearOp, IdentityOp)


@dataclass(frozen=True, eq=False)
class AnnNode:
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


def evaluate_ann(graph: AnnGraph, x: torch.Tensor) -> torch.Tensor:
    """Run an AnnGraph in float64 on real inputs x (N, *input_shape); returns the output."""
    values: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        args = [values[i] for i in n.inputs]
        op = n.op
        if isinstance(op, InputOp):
            out = x.to(torch.float64)
        elif isinstance(op, ConvOp):
            out = F.conv2d(args[0], torch.from_numpy(op.weight),
                           None if op.bias is None else torch.from_numpy(op.bias),
                           op.stride, op.padding, 1, op.groups)
        elif isinstance(op, LinearOp):
            out = F.linear(args[0], torch.from_numpy(op.weight),
                           None if op.bias is None else torch.from_numpy(op.bias))
        elif isinstance(op, IdentityOp):
            out = args[0] * _per_channel(torch.from_numpy(op.weight), args[0])
        elif isinstance(op, BatchNormOp):
            out = (args[0] * _per_channel(torch.from_numpy(op.scale), args[0])
                   + _per_channel(torch.from_numpy(op.shift), args[0]))
        elif isinstance(op, ActOp):
            lam = _per_channel(torch.from_numpy(op.threshold), args[0])
            y = torch.clamp(args[0] / lam, 0.0, 1.0)
            out = torch.floor(y * op.levels + op.phi) / op.levels * lam
        elif isinstance(op, AvgPoolOp):
            out = F.avg_pool2d(args[0], op.kernel, op.stride, op.padding, count_include_pad=True)
        elif isinstance(op, SumPoolOp):
            k = op.kernel[0] * op.kernel[1]
            out = F.avg_pool2d(args[0], op.kernel, op.stride, op.padding,
                               count_include_pad=True) * k
        elif isinstance(op, FlattenOp):
            out = args[0].flatten(1)
        elif isinstance(op, AddOp):
            out = args[0] + args[1]
        elif isinstance(op, DropoutOp):
            out = args[0]
        else:  # pragma: no cover - every op is handled above
            raise GraphError(f"cannot evaluate op {type(op).__name__}")
        values[n.name] = out
    return values[graph.output]


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))
