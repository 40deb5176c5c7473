"""Checks of a NIR graph before it is read: node types, acyclicity, metadata and values.

Every refusal names the node (or edge) and says why: a :class:`GraphError` for a
graph csqcfs-deploy cannot run, an :class:`InputFileError` for a csqcfs-deploy
file whose metadata is missing or contradicts itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nir
import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.ir.neuron import exact_float_bound

#: NIR node types that become IF graph layers.
NEURON_NODES: tuple[type, ...] = (nir.Input, nir.IF, nir.Output)
#: NIR node types that make up a projection chain (prefix nodes, then one weighted node).
SYNAPSE_NODES: tuple[type, ...] = (nir.SumPool2d, nir.Flatten, nir.Conv2d, nir.Affine,
                                   nir.Linear)
_UNSUPPORTED: dict[type, str] = {
    nir.LIF: "a leaky LIF neuron (csqcfs-deploy runs non-leaky IF neurons)",
    nir.CubaLIF: "a current-based leaky LIF neuron (csqcfs-deploy runs non-leaky IF neurons)",
    nir.LI: "a leaky integrator (the readout is the Output node)",
    nir.CubaLI: "a current-based leaky integrator (the readout is the Output node)",
    nir.I: "an integrator node (the readout is the Output node)",
    nir.AvgPool2d: "an average pool (integer graphs use SumPool2d)",
    nir.Delay: "a delay node",
    nir.Scale: "a Scale node (use a 1x1 depthwise Conv2d)",
    nir.Threshold: "a Threshold node",
    nir.Conv1d: "a 1-D convolution",
    nir.NIRGraph: "a nested NIR graph",
}


# --------------------------------------------------------------------------- graph structure


def check_node_types(ng: nir.NIRGraph) -> None:
    """Refuse a node that is neither a neuron nor a synapse node we read, naming it."""
    for name, node in ng.nodes.items():
        if isinstance(node, NEURON_NODES + SYNAPSE_NODES):
            continue
        reason = _UNSUPPORTED.get(type(node), f"an unsupported NIR node {type(node).__name__}")
        raise GraphError(f"node {name}: {reason} cannot run in csqcfs-deploy")


def _successors(nodes: Mapping[str, Any], edges: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Successor lists, refusing an edge to a missing node and a self loop."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a not in nodes or b not in nodes:
            missing = a if a not in nodes else b
            raise GraphError(f"edge {a} -> {b} names a node {missing!r} that does not exist")
        if a == b:
            raise GraphError(f"node {a}: recurrent edge {a} -> {b} (csqcfs-deploy runs "
                             "feed-forward graphs only)")
        succ[a].append(b)
    return succ


def check_acyclic(nodes: Mapping[str, Any], edges: list[tuple[str, str]]) -> None:
    """Refuse a recurrent edge, naming it (iterative DFS, nodes in sorted order)."""
    succ = _successors(nodes, edges)
    state = dict.fromkeys(nodes, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(nodes):
        if state[root]:
            continue
        stack = [(root, iter(sorted(succ[root])))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state[nxt] == 1:
                raise GraphError(f"node {nxt}: recurrent edge {node} -> {nxt} (csqcfs-deploy "
                                 "runs feed-forward graphs only)")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(succ[nxt]))))


# --------------------------------------------------------------------------- metadata


def md_kind(node: nir.NIRNode) -> str:
    """A node's metadata ``kind`` ("" when it has none)."""
    return str(node.metadata.get("kind", "")) if isinstance(node.metadata, dict) else ""


def _md(node_name: str, node: Any, key: str) -> Any:
    md = node.metadata if isinstance(node.metadata, dict) else {}
    if key not in md:
        raise InputFileError(f"node {node_name}: csqcfs-deploy metadata lacks {key!r}")
    return md[key]


def md_int(node_name: str, node: Any, key: str) -> int:
    """Metadata ``key`` of ``node`` (or of the graph) as an int; InputFileError otherwise."""
    value = _md(node_name, node, key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputFileError(f"node {node_name}: metadata {key} must be an integer, got "
                             f"{value!r}")
    return int(value)


def md_float(node_name: str, node: Any, key: str) -> float:
    """Metadata ``key`` as a float (an int or float value); InputFileError otherwise."""
    value = _md(node_name, node, key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise InputFileError(f"node {node_name}: metadata {key} must be a number, got {value!r}")
    return float(value)


def md_str(node_name: str, node: Any, key: str) -> str:
    """Metadata ``key`` as a str (bytes are decoded as UTF-8); InputFileError otherwise."""
    value = _md(node_name, node, key)
    if isinstance(value, bytes):
        value = value.decode("utf8")
    if not isinstance(value, str):
        raise InputFileError(f"node {node_name}: metadata {key} must be a string, got {value!r}")
    return value


def md_array(node_name: str, node: Any, key: str, kind: str) -> npt.NDArray[Any]:
    """Metadata ``key`` as a 1-D int64 (``kind`` "i") or float64 ("f") array."""
    value = np.asarray(_md(node_name, node, key))
    if value.ndim != 1 or value.dtype.kind not in ("iu" if kind == "i" else "iuf"):
        raise InputFileError(f"node {node_name}: metadata {key} must be a 1-D "
                             f"{'integer' if kind == 'i' else 'numeric'} array")
    return value.astype(np.int64 if kind == "i" else np.float64)


# --------------------------------------------------------------------------- values


def int_values(node_name: str, what: str, values: Any) -> npt.NDArray[Any]:
    """``values`` as int64, refusing anything that is not integer-valued.

    A float array must hold finite integers of magnitude at most
    ``exact_float_bound(float64)`` (2**53), beyond which a float is not one integer.
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise GraphError(f"node {node_name}: {what} is not integer-valued; csqcfs-deploy runs "
                         "integer graphs (quantize the network first)")
    if arr.size and np.abs(arr).max() > exact_float_bound(torch.float64):
        raise GraphError(f"node {node_name}: {what} exceeds the exact integer range")
    return arr.astype(np.int64)


def real_values(node_name: str, what: str, values: Any) -> npt.NDArray[Any]:
    """``values`` as float64, refusing non-numeric or non-finite values."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
        raise GraphError(f"node {node_name}: {what} must be finite numbers")
    return arr.astype(np.float64)


def pair(node_name: str, what: str, value: Any) -> tuple[int, int]:
    """One or two integers (a kernel, stride, padding or dilation) as a pair."""
    arr = np.asarray(value).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or arr.dtype.kind not in "iuf" or np.any(arr != np.round(arr)):
        raise GraphError(f"node {node_name}: {what} must be one or two integers, got {value!r}")
    return int(arr[0]), int(arr[1])


def shape_of(node_name: str, value: Any) -> tuple[int, ...]:
    """A NIR shape (positive integers, batch excluded) as a tuple."""
    if value is None:
        raise GraphError(f"node {node_name}: shape is not given")
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or arr.dtype.kind not in "iu" or np.any(arr < 1):
        raise GraphError(f"node {node_name}: invalid shape {value!r}")
    return tuple(int(d) for d in arr)
