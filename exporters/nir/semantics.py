"""How a NIR graph's nodes map onto IF graph layers and projections.

:func:`semantics` decides between *ours* (a csqcfs-deploy file: the graph metadata
names :data:`NIR_FORMAT`, values are restored from the metadata) and *plain NIR*
(no metadata: NIR's own IF semantics). :func:`chains` reads the neuron nodes and
one :class:`Chain` of synapse nodes per projection; :func:`order` puts them in the
IF graph's order.

Plain NIR semantics (NIR's IF node, integer membranes): ``v`` starts at 0,
``v += I``, spike when ``v > v_threshold``, ``v <- v_reset = 0``. On integer
``v``, ``v > theta`` is ``v >= floor(theta) + 1``, so a plain IF node becomes an
``int16`` layer (``v >= v_th``) with ``v_th = floor(v_threshold) + 1``,
``v_init = 0``, ``reset = "zero"`` and real scales 1; a direct edge between two
neuron groups of one shape is an identity synapse of weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nir
import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.nir.flavors import (
    FLAVORS,
    FOREIGN_PROFILE,
    NIR_FORMAT,
    NIR_FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
)
from csqcfs_deploy.exporters.nir.validate import (
    NEURON_NODES,
    SYNAPSE_NODES,
    md_int,
    md_kind,
    md_str,
    real_values,
)
from csqcfs_deploy.ir import GraphMeta, IdentityProjection, IFLayer, InputLayer
from csqcfs_deploy.ir.profiles import Profile, get_profile

PLAIN_NOTES = ("read from a NIR graph without csqcfs-deploy metadata "
               "(NIR IF semantics: v > v_threshold, hard reset, v starts at 0)")


@dataclass(frozen=True)
class Semantics:
    """How NIR values map to the IF graph: ours (metadata) or plain NIR (none);
    ``real``: a float graph being imported (weights and biases read as real numbers, see
    :mod:`csqcfs_deploy.exporters.nir.float_import`)."""

    ours: bool
    flavor: str
    profile: Profile
    weight_shift: int
    real: bool = False


@dataclass
class Chain:
    """One projection read off the NIR graph: source neuron node -> synapse nodes -> dst."""

    src: str
    dst: str
    nodes: list[str] = field(default_factory=list)


def graph_metadata(ng: nir.NIRGraph) -> dict[str, Any]:
    """The NIR graph's metadata ({} when it has none)."""
    return ng.metadata if isinstance(ng.metadata, dict) else {}


def semantics(ng: nir.NIRGraph) -> Semantics:
    """Ours (checking format, version, flavour, profile and weight shift) or plain NIR."""
    md = graph_metadata(ng)
    fmt = md.get("format")
    if fmt is None:
        return Semantics(False, "plain", get_profile(FOREIGN_PROFILE), 0)
    if fmt != NIR_FORMAT:
        raise InputFileError(f"graph metadata names format {fmt!r}, not {NIR_FORMAT!r}")
    version = md.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise InputFileError(f"csqcfs-deploy NIR format version {version!r} is not supported "
                             f"(this tool reads versions 1..{NIR_FORMAT_VERSION})")
    flavor = md_str("(graph)", ng, "flavor")
    if flavor not in FLAVORS:
        raise InputFileError(f"graph metadata names an unknown flavour {flavor!r}")
    profile = get_profile(md_str("(graph)", ng, "profile"))
    shift = md_int("(graph)", ng, "weight_shift")
    if shift != profile.act_shift:
        raise InputFileError(f"graph metadata weight_shift {shift} contradicts profile "
                             f"{profile.name} (act_shift {profile.act_shift})")
    return Semantics(True, flavor, profile, shift)


# --------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class _Adjacency:
    preds: dict[str, list[str]]
    succs: dict[str, list[str]]

    @classmethod
    def of(cls, ng: nir.NIRGraph) -> _Adjacency:
        preds: dict[str, list[str]] = {n: [] for n in ng.nodes}
        succs: dict[str, list[str]] = {n: [] for n in ng.nodes}
        for a, b in ng.edges:
            preds[b].append(a)
            succs[a].append(b)
        return cls(preds, succs)


def _is_auxiliary_output(ng: nir.NIRGraph, sem: Semantics, adj: _Adjacency, name: str) -> bool:
    """NIR's type inference adds an Output after a layer without projections: not ours."""
    node = ng.nodes[name]
    if not (isinstance(node, nir.Output) and sem.ours and md_kind(node) != "readout"):
        return False
    src = adj.preds[name]
    return len(src) == 1 and isinstance(ng.nodes[src[0]], nir.IF)


def _check_edges(name: str, node: Any, adj: _Adjacency) -> None:
    """Synapse nodes have one edge in and one out; Input has none in, Output none out."""
    preds, succs = adj.preds[name], adj.succs[name]
    if isinstance(node, SYNAPSE_NODES):
        if len(preds) != 1:
            raise GraphError(f"node {name}: a {type(node).__name__} needs exactly one "
                             f"incoming edge, has {len(preds)}")
        if len(succs) != 1:
            raise GraphError(f"node {name}: a {type(node).__name__} needs exactly one "
                             f"outgoing edge, has {len(succs)} (connect each neuron "
                             "group through its own synapse nodes)")
    elif isinstance(node, nir.Input) and preds:
        raise GraphError(f"node {name}: an Input node cannot have incoming edges")
    elif isinstance(node, nir.Output) and succs:
        raise GraphError(f"node {name}: an Output node cannot have outgoing edges")


def _check_one_each(ng: nir.NIRGraph, neurons: list[str]) -> None:
    """Exactly one Input node and one Output node (the readout)."""
    inputs = [n for n in neurons if isinstance(ng.nodes[n], nir.Input)]
    outputs = [n for n in neurons if isinstance(ng.nodes[n], nir.Output)]
    if len(inputs) != 1:
        raise GraphError(f"the NIR graph needs exactly one Input node, has {len(inputs)}"
                         + (f" ({', '.join(sorted(inputs))})" if inputs else ""))
    if len(outputs) != 1:
        raise GraphError(f"the NIR graph needs exactly one Output node (the readout), has "
                         f"{len(outputs)}" + (f" ({', '.join(sorted(outputs))})"
                                              if outputs else ""))


def _trace(ng: nir.NIRGraph, adj: _Adjacency, dst: str, first: str) -> Chain:
    """The chain that ends in ``dst`` through its predecessor ``first``, walked backwards."""
    chain = Chain(src="", dst=dst)
    cur = first
    while isinstance(ng.nodes[cur], SYNAPSE_NODES):
        chain.nodes.insert(0, cur)
        cur = adj.preds[cur][0]
    if isinstance(ng.nodes[cur], nir.Output):
        raise GraphError(f"node {cur}: an Output node feeds node {dst}")
    chain.src = cur
    return chain


def chains(ng: nir.NIRGraph, sem: Semantics) -> tuple[list[str], list[Chain], list[str]]:
    """Neuron nodes (order), projection chains (order) and ignored auxiliary outputs."""
    adj = _Adjacency.of(ng)
    ignored: list[str] = []
    for name, node in ng.nodes.items():
        if _is_auxiliary_output(ng, sem, adj, name):
            ignored.append(name)
            continue
        _check_edges(name, node, adj)
    neurons = [n for n, node in ng.nodes.items()
               if isinstance(node, NEURON_NODES) and n not in ignored]
    _check_one_each(ng, neurons)
    found = [_trace(ng, adj, dst, first) for dst in neurons for first in adj.preds[dst]]
    return neurons, found, ignored


# --------------------------------------------------------------------------- order


def _metadata_order(ng: nir.NIRGraph, neurons: list[str], found: list[Chain]
                    ) -> tuple[list[str], list[Chain]]:
    """Ours: ``layer_index`` and ``projection_index`` must be 0..n-1."""
    def layer_key(n: str) -> int:
        return md_int(n, ng.nodes[n], "layer_index")

    def proj_key(c: Chain) -> int:
        if not c.nodes:
            raise GraphError(f"edge {c.src} -> {c.dst}: a direct connection between neuron "
                             "groups; csqcfs-deploy files put a weighted node on every "
                             "projection")
        return md_int(c.nodes[-1], ng.nodes[c.nodes[-1]], "projection_index")

    layers = sorted(neurons, key=layer_key)
    projs = sorted(found, key=proj_key)
    for what, keys in (("layer_index", [layer_key(n) for n in layers]),
                       ("projection_index", [proj_key(c) for c in projs])):
        if keys != list(range(len(keys))):
            raise InputFileError(f"metadata {what} values {keys} are not 0..{len(keys) - 1}")
    return layers, projs


def _topological_order(neurons: list[str], found: list[Chain]
                       ) -> tuple[list[str], list[Chain]]:
    """Plain NIR: Kahn's algorithm over neuron groups, ties by name."""
    indeg = dict.fromkeys(neurons, 0)
    for c in found:
        indeg[c.dst] += 1
    ready = sorted(n for n in neurons if indeg[n] == 0)
    layers: list[str] = []
    while ready:
        n = ready.pop(0)
        layers.append(n)
        for c in found:
            if c.src == n:
                indeg[c.dst] -= 1
                if indeg[c.dst] == 0:
                    ready.append(c.dst)
                    ready.sort()
    rank = {n: i for i, n in enumerate(layers)}
    projs = sorted(found, key=lambda c: (rank[c.dst], rank[c.src], c.nodes[-1] if c.nodes
                                         else ""))
    return layers, projs


def order(ng: nir.NIRGraph, sem: Semantics, neurons: list[str], found: list[Chain]
          ) -> tuple[list[str], list[Chain]]:
    """Layers and projections in the IF graph's order (metadata) or topological order."""
    if sem.ours:
        return _metadata_order(ng, neurons, found)
    return _topological_order(neurons, found)


# --------------------------------------------------------------------------- plain NIR


def per_channel_threshold(name: str, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """(C, ...) per-neuron values -> (C,), refusing a value that varies within a channel."""
    flat = values.reshape(values.shape[0], -1)
    if np.any(flat != flat[:, :1]):
        raise GraphError(f"node {name}: v_threshold varies within a channel; the IF graph has "
                         "one threshold per channel")
    return flat[:, 0].copy()


def plain_if_layer(name: str, node: Any, shape: tuple[int, ...], v_reset: npt.NDArray[Any],
                   bias: npt.NDArray[Any]) -> IFLayer:
    """A NIR IF node without metadata: ``v_th = floor(v_threshold) + 1``, hard reset, v = 0."""
    if np.any(v_reset != 0):
        raise GraphError(f"node {name}: v_reset must be 0 (csqcfs-deploy's hard reset "
                         "sets v = 0)")
    theta = per_channel_threshold(name, real_values(name, "v_threshold", node.v_threshold))
    if np.any(theta < 0):
        raise GraphError(f"node {name}: a negative v_threshold cannot be expressed "
                         "(csqcfs-deploy thresholds are positive)")
    # integer v: v > theta  <=>  v >= floor(theta) + 1
    v_th = np.floor(theta).astype(np.int64) + 1
    c = shape[0]
    ones = np.ones(c, dtype=np.float64)
    return IFLayer(name, shape, v_th=v_th, v_init=np.zeros(c, dtype=np.int64),
                   bias=bias, threshold_real=ones, reset="zero")


def plain_input_layer(name: str, shape: tuple[int, ...]) -> InputLayer:
    """A NIR Input without metadata: the foreign profile's unsigned integer input, scale 1."""
    bits = get_profile(FOREIGN_PROFILE).input_bits
    return InputLayer(name, shape, scale=1.0, raw_max=float(2**bits - 1),
                      mean=(0.0,) * shape[0], std=(1.0,) * shape[0], bits=bits)


def plain_meta(ng: nir.NIRGraph, num_classes: int) -> GraphMeta:
    """Graph metadata of a plain NIR graph: one level, phi 0, the foreign profile."""
    arch = graph_metadata(ng).get("arch", "")
    return GraphMeta(levels=1, phi=0.0, profile=FOREIGN_PROFILE,
                     arch=arch if isinstance(arch, str) else "",
                     num_classes=num_classes, notes=PLAIN_NOTES)


def plain_spike_edge(chain: Chain, shape: tuple[int, ...]
                     ) -> tuple[IdentityProjection, npt.NDArray[Any]]:
    """A direct edge between neuron groups of one shape: identity of weight 1, no bias."""
    c = shape[0]
    return (IdentityProjection(name=f"{chain.src}_to_{chain.dst}", src=chain.src,
                               dst=chain.dst, weight=np.ones(c, dtype=np.int64)),
            np.zeros(c, dtype=np.int64))
