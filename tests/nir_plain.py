"""A plain-NIR-semantics simulator over ``nir.NIRGraph`` nodes, for the tests.

This is a deliberate, independent copy of NIR's semantics: it uses neither our IF
graph, our reader nor our simulator, only the NIR nodes (numpy values) and torch's
float64 operators, so that a portable file that agrees with it agrees with what NIR
says the file means, not with what we meant to write.

Semantics (dt = 1, synchronous): each step, every node in topological order reads the
values its sources produced in the *same* step; several edges into one node are
summed. Nodes:

* ``Input``: the step's input (a batch ``(N, *shape)``).
* ``Conv2d``, ``Affine``, ``Linear``: ``W (*) x + b`` (``Linear`` without ``b``).
* ``SumPool2d`` / ``AvgPool2d``: window sum / window mean (zero padding counted).
* ``Flatten``: NIR shapes exclude the batch, so ``start_dim``/``end_dim`` are shifted
  by one.
* ``IF``: ``v += r * I``; spike where ``v > v_threshold``; there ``v <- v_reset``;
  ``v`` starts at 0. Its output is the spike (0/1).
* ``LIF`` only with ``tau = inf`` and ``v_leak = 0`` (no leak): treated as ``IF``
  with ``v += r * I`` (the convention exporters use for a non-leaky LIF).
* ``Output``: its summed input, accumulated over the steps, is the readout.

Anything else raises ``ValueError`` naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nir
import numpy as np
import torch
import torch.nn.functional as F


def _pair(value: Any) -> tuple[int, int]:
    arr = np.asarray(value).reshape(-1)
    return (int(arr[0]), int(arr[0])) if arr.size == 1 else (int(arr[0]), int(arr[1]))


def _t(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def topological_order(graph: nir.NIRGraph) -> list[str]:
    """Kahn's algorithm over the NIR graph's nodes, ties by name; a cycle raises."""
    indeg = dict.fromkeys(graph.nodes, 0)
    for _, b in graph.edges:
        indeg[b] += 1
    ready = sorted(n for n, d in indeg.items() if d == 0)
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for a, b in graph.edges:
            if a == n:
                indeg[b] -= 1
                if indeg[b] == 0:
                    ready.append(b)
                    ready.sort()
    if len(out) != len(graph.nodes):
        raise ValueError("the NIR graph has a cycle")
    return out


@dataclass
class PlainNIR:
    """Run a NIR graph with plain NIR semantics on a batch; ``run(x, steps)`` gives the
    Output node's input summed over ``steps`` (the readout, ``(N, classes)``)."""

    graph: nir.NIRGraph
    order: list[str] = field(init=False)
    sources: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.order = topological_order(self.graph)
        self.sources = {n: [a for a, b in self.graph.edges if b == n] for n in self.graph.nodes}

    def _stateless(self, name: str, node: Any, x: torch.Tensor) -> torch.Tensor:
        if isinstance(node, nir.Conv2d):
            pad = node.padding if isinstance(node.padding, str) else _pair(node.padding)
            return F.conv2d(x, _t(node.weight), _t(node.bias), stride=_pair(node.stride),
                            padding=pad, dilation=_pair(node.dilation), groups=int(node.groups))
        if isinstance(node, nir.Affine):
            return x @ _t(node.weight).T + _t(node.bias)
        if isinstance(node, nir.Linear):
            return x @ _t(node.weight).T
        if isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
            k = _pair(node.kernel_size)
            mean = F.avg_pool2d(x, k, _pair(node.stride), _pair(node.padding),
                                count_include_pad=True)
            return mean * (k[0] * k[1]) if isinstance(node, nir.SumPool2d) else mean
        if isinstance(node, nir.Flatten):
            end = int(node.end_dim)
            return torch.flatten(x, int(node.start_dim) + 1, end + 1 if end >= 0 else end)
        raise ValueError(f"node {name}: {type(node).__name__} is not simulated here")

    @staticmethod
    def _neuron(name: str, node: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r, v_threshold, v_reset) of an IF node, or of a LIF with tau = inf, no leak."""
        if isinstance(node, nir.LIF):
            if np.any(np.isfinite(node.tau)) or np.any(np.asarray(node.v_leak) != 0):
                raise ValueError(f"node {name}: only a LIF with tau = inf and no leak is IF")
        elif not isinstance(node, nir.IF):
            raise ValueError(f"node {name}: {type(node).__name__} is not a neuron")
        return _t(node.r), _t(node.v_threshold), _t(node.v_reset)

    def run(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The readout: the Output node's input summed over ``steps`` from a fresh state."""
        nodes = self.graph.nodes
        v: dict[str, torch.Tensor] = {}
        readout: torch.Tensor | None = None
        for _ in range(steps):
            value: dict[str, torch.Tensor] = {}
            for name in self.order:
                node = nodes[name]
                if isinstance(node, nir.Input):
                    value[name] = x.to(torch.float64)
                    continue
                total = sum(value[s] for s in self.sources[name])
                if not isinstance(total, torch.Tensor):
                    raise ValueError(f"node {name} has no input")
                if isinstance(node, nir.Output):
                    readout = total if readout is None else readout + total
                    value[name] = total
                elif isinstance(node, (nir.IF, nir.LIF)):
                    r, theta, reset = self._neuron(name, node)
                    mem = v.get(name, torch.zeros_like(total)) + r * total
                    spike = mem > theta
                    v[name] = torch.where(spike, reset.expand_as(mem), mem)
                    value[name] = spike.to(torch.float64)
                else:
                    value[name] = self._stateless(name, node, total)
        if readout is None:
            raise ValueError("the NIR graph has no Output node")
        return readout
