"""Checks of a NIR graph before it is read: the raw file, node types, acyclicity, metadata
and values.

:func:`check_raw_graph` checks the file's content as h5py reads it (nested dicts of
arrays), before NIR builds its nodes from it: the node types, and every field NIR
computes with (:data:`RAW_NODES`: weights real and finite of the right rank, kernel,
stride and dilation ``1..MAX_WINDOW``, padding ``0..MAX_WINDOW``, ``groups`` one
integer, shapes of positive sizes within the IF graph's limits), so that a hostile
value is refused naming its node instead of failing inside NIR.

Every refusal names the node (or edge) and says why: a :class:`GraphError` for a
graph csqcfs-deploy cannot run, an :class:`InputFileError` for a csqcfs-deploy
file whose metadata is missing or contradicts itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nir
import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.ir.fields import (
    MAX_LAYER_NEURONS,
    MAX_SHAPE_DIMS,
    MAX_WINDOW,
    check_neurons,
)
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
    if (arr.size != 2 or arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr))
            or np.any(arr != np.round(arr))):
        raise GraphError(f"node {node_name}: {what} must be one or two integers, got "
                         f"{_clip(value)}")
    return int(arr[0]), int(arr[1])


def shape_of(node_name: str, value: Any) -> tuple[int, ...]:
    """A NIR shape (positive integers, batch excluded) as a tuple."""
    if value is None:
        raise GraphError(f"node {node_name}: shape is not given")
    arr = np.asarray(value).reshape(-1)
    if (not 1 <= arr.size <= MAX_SHAPE_DIMS or arr.dtype.kind not in "iu" or np.any(arr < 1)
            or np.any(arr > MAX_LAYER_NEURONS)):
        raise GraphError(f"node {node_name}: invalid shape {_clip(value)}")
    check_neurons(math.prod(int(d) for d in arr), f"node {node_name}: shape")
    return tuple(int(d) for d in arr)


def _clip(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- the raw file

#: Flatten's start_dim and end_dim lie in -MAX_FLATTEN_DIM..MAX_FLATTEN_DIM.
MAX_FLATTEN_DIM = 8

RawCheck = Callable[[str, str, Any], None]


def _raw_numbers(ndim: int | None = None, infinite: bool = False) -> RawCheck:
    """A real, finite numeric array (``ndim`` dimensions when given; ``infinite``: +inf
    allowed, as a LIF's tau = inf, no leak, is written)."""
    def check(node_name: str, what: str, value: Any) -> None:
        if isinstance(value, dict):
            raise GraphError(f"node {node_name}: {what} is a group, not an array")
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf" or arr.dtype.fields is not None:
            raise GraphError(f"node {node_name}: {what} must be real numbers, got dtype "
                             f"{arr.dtype}")
        bad = (np.isnan(arr) | (arr == -np.inf)) if infinite else ~np.isfinite(arr)
        if arr.dtype.kind == "f" and np.any(bad):
            raise GraphError(f"node {node_name}: {what} contains NaN or infinity")
        if ndim is not None and arr.ndim != ndim:
            raise GraphError(f"node {node_name}: {what} must be {ndim}-D, got shape "
                             f"{arr.shape}")
    return check


def _raw_window(lo: int) -> RawCheck:
    """One or two integers in ``lo..MAX_WINDOW`` (a kernel, stride, dilation, padding)."""
    def check(node_name: str, what: str, value: Any) -> None:
        a, b = pair(node_name, what, value)
        if not (lo <= a <= MAX_WINDOW and lo <= b <= MAX_WINDOW):
            raise GraphError(f"node {node_name}: {what} must be in {lo}..{MAX_WINDOW}, got "
                             f"{(a, b)}")
    return check


def _raw_padding(node_name: str, what: str, value: Any) -> None:
    if isinstance(value, (str, bytes)):
        return  # "same" or "valid"; anything else is refused when the node is read
    _raw_window(0)(node_name, what, value)


def _raw_int(lo: int, hi: int) -> RawCheck:
    """One integer (a 0-d array or a number) in ``lo..hi``."""
    def check(node_name: str, what: str, value: Any) -> None:
        arr = np.asarray(value) if not isinstance(value, dict) else np.asarray("group")
        if (arr.ndim != 0 or arr.dtype.kind not in "iuf" or not np.isfinite(arr)
                or arr != np.round(arr) or not lo <= arr <= hi):
            raise GraphError(f"node {node_name}: {what} must be one integer in {lo}..{hi}, "
                             f"got {_clip(value)}")
    return check


def _raw_shape(node_name: str, what: str, value: Any) -> None:
    shape_of(node_name, value)


def _raw_pair_shape(node_name: str, what: str, value: Any) -> None:
    a, b = pair(node_name, what, value)
    if min(a, b) < 1 or max(a, b) > MAX_LAYER_NEURONS:
        raise GraphError(f"node {node_name}: {what} must be two positive sizes, got {(a, b)}")


@dataclass(frozen=True)
class RawNode:
    """The fields of one NIR node type that NIR computes with when it builds the node."""

    required: Mapping[str, RawCheck]
    optional: Mapping[str, RawCheck] = dataclasses.field(default_factory=dict)


_WINDOWS = {"kernel_size": _raw_window(1), "stride": _raw_window(1), "padding": _raw_window(0)}
RAW_NODES: dict[str, RawNode] = {
    "Input": RawNode({"shape": _raw_shape}),
    "Output": RawNode({"shape": _raw_shape}),
    "IF": RawNode({"r": _raw_numbers(), "v_threshold": _raw_numbers()},
                  {"v_reset": _raw_numbers()}),
    "Conv2d": RawNode({"weight": _raw_numbers(4), "bias": _raw_numbers(),
                       "stride": _raw_window(1), "dilation": _raw_window(1),
                       "padding": _raw_padding, "groups": _raw_int(1, 2**20)},
                      {"input_shape": _raw_pair_shape}),
    "SumPool2d": RawNode(_WINDOWS),
    "Affine": RawNode({"weight": _raw_numbers(2), "bias": _raw_numbers()}),
    "Linear": RawNode({"weight": _raw_numbers(2)}),
    "Flatten": RawNode({"start_dim": _raw_int(-MAX_FLATTEN_DIM, MAX_FLATTEN_DIM),
                        "end_dim": _raw_int(-MAX_FLATTEN_DIM, MAX_FLATTEN_DIM)},
                       {"input_type": _raw_shape}),
}
#: The node types a float (third-party) NIR graph may add, read by
#: :mod:`csqcfs_deploy.exporters.nir.float_import` (which rewrites them away or refuses
#: them naming the node).
RAW_FLOAT_NODES: dict[str, RawNode] = {
    "LIF": RawNode({"tau": _raw_numbers(infinite=True), "r": _raw_numbers(infinite=True),
                    "v_leak": _raw_numbers(), "v_threshold": _raw_numbers()},
                   {"v_reset": _raw_numbers()}),
    "CubaLIF": RawNode({"tau_syn": _raw_numbers(infinite=True),
                        "tau_mem": _raw_numbers(infinite=True),
                        "r": _raw_numbers(infinite=True), "v_leak": _raw_numbers(),
                        "v_threshold": _raw_numbers()},
                       {"v_reset": _raw_numbers(), "w_in": _raw_numbers()}),
    "AvgPool2d": RawNode(_WINDOWS),
    "Scale": RawNode({"scale": _raw_numbers()}),
}
_NIR_TYPE_NAMES: dict[str, type] = {cls.__name__: cls for cls in _UNSUPPORTED}


def _refuse_type(node_name: str, type_name: Any) -> None:
    """GraphError for a node type we do not read (naming NIR's types by what they are)."""
    cls = _NIR_TYPE_NAMES.get(type_name) if isinstance(type_name, str) else None
    reason = _UNSUPPORTED[cls] if cls else f"an unsupported NIR node type {_clip(type_name)}"
    raise GraphError(f"node {node_name}: {reason} cannot run in csqcfs-deploy")


def check_raw_node(node_name: str, record: Any, foreign: bool = False) -> None:
    """One node as read from the file (a dict of its datasets), before NIR builds it;
    ``foreign``: the node types of a float graph (:data:`RAW_FLOAT_NODES`) too."""
    if not isinstance(record, dict):
        raise InputFileError(f"node {node_name}: is a dataset, not a NIR node group")
    type_name = record.get("type")
    if type_name is None:
        raise InputFileError(f"node {node_name}: has no type")
    spec = RAW_NODES.get(type_name) if isinstance(type_name, str) else None
    if spec is None and foreign and isinstance(type_name, str):
        spec = RAW_FLOAT_NODES.get(type_name)
    if spec is None:
        _refuse_type(node_name, type_name)
        return
    for key, check in spec.required.items():
        if key not in record:
            raise InputFileError(f"node {node_name}: a {type_name} node lacks {key!r}")
        check(node_name, key, record[key])
    for key, check in spec.optional.items():
        if key in record:
            check(node_name, key, record[key])


def _check_raw_edges(edges: Any) -> None:
    arr = np.asarray(edges) if not isinstance(edges, dict) else np.zeros(0)
    if arr.size and (arr.ndim != 2 or arr.shape[1] != 2 or not all(
            isinstance(e, (bytes, str)) for e in arr.reshape(-1).tolist())):
        raise InputFileError(f"graph edges must be pairs of node names, got {_clip(edges)}")


def check_raw_graph(record: Any, foreign: bool = False) -> None:
    """The file's ``node`` group as read (nested dicts of arrays), before NIR builds it:
    a NIR graph with a ``nodes`` group and an ``edges`` list; each node of a type we
    read, with the fields NIR computes with present and of the right type and range
    (:data:`RAW_NODES`; ``foreign``: also :data:`RAW_FLOAT_NODES`). A refusal names
    the node."""
    if not isinstance(record, dict) or record.get("type") != "NIRGraph":
        raise InputFileError("the file's node group is not a NIR graph")
    nodes = record.get("nodes")
    if not isinstance(nodes, dict):
        raise InputFileError("the NIR graph has no nodes group")
    if "edges" not in record:
        raise InputFileError("the NIR graph has no edges")
    _check_raw_edges(record["edges"])
    for name, node in nodes.items():
        check_raw_node(name, node, foreign)
