"""NIR exchange (SPEC section 6): integer IF graph <-> ``nir.NIRGraph`` <-> ``.nir`` file.

Mapping (one NIR node per layer, one chain of NIR nodes per projection)::

    InputLayer           -> nir.Input   (shape = the layer's shape)
    IFLayer              -> nir.IF      (r = 1, v_threshold/v_reset of the layer's shape)
    ReadoutLayer         -> nir.Output  (its per-step input, summed over the counted steps,
                                         is the readout membrane)
    projection p         -> [nir.SumPool2d]  p.pool, if any       (node "<p>_pool")
                            [nir.Flatten]    start_dim=0, a dense projection from (C, H, W)
                                                                  (node "<p>_flatten")
                            nir.Conv2d       conv (a grouped conv stored dense, block
                                             diagonal), or identity on (C, H, W) as a
                                             1x1 conv with a diagonal weight  (node "<p>")
                            nir.Affine       dense, or identity on (F,) as a diagonal matrix
    residual structure   -> two (or more) edges into the same IF node (readers sum them)

Units: NIR carries membrane units. A NIR weight is the stored integer weight
shifted left by the profile's ``act_shift`` (loihi2: x 64), so that
``v += W_nir (*) s + b`` is the membrane update; the layer's bias is the
``bias`` of its first incoming projection's Conv2d/Affine (zeros on the
others), so it is added every step as in the IF graph.

Flavours:

* ``native`` (default): int64 arrays, per-channel thresholds, ``v_threshold``
  = the IF graph's ``v_th`` (the amount the soft reset subtracts). Reset by
  subtraction, the initial membrane, the comparison, real-unit scales, the
  profile and the input encoding live in ``metadata`` (see README.md, "NIR export and import").
  Exact at every T, P and schedule for a reader that applies the metadata;
  :func:`nir_to_graph` restores the IF graph exactly.
* ``portable``: for readers that ignore metadata (NIR semantics: ``v`` starts
  at 0, ``v += I``, spike when ``v > v_threshold``, ``v <- v_reset = 0``). One
  threshold per layer (a graph quantized with per-layer thresholds);
  ``v_threshold = v_th - v_init + 1/2`` (``- 1/2`` where the profile fires on
  ``v >= v_th``): a half-integer, so that readers comparing with ``>`` and with
  ``>=`` agree on integer membranes; float32 arrays (float64 if a value is not
  exact in float32). A reader then spikes exactly as the IF graph at ``T = 1``
  without pre-simulation, as long as no value wraps or saturates (loihi2's
  24-bit current and voltage). The metadata still holds the originals, so our
  reader restores the IF graph exactly from a portable file too.

Reading a NIR graph *without* our metadata (a plain NIR file, or a portable
file whose metadata a tool dropped) follows NIR's own IF semantics: it becomes
an ``int16`` graph (``v >= v_th`` with ``v_th = floor(v_threshold) + 1``, hard
reset ``reset="zero"``, ``v_init = 0``, real scales 1); weights and biases must
be integer-valued.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nir
import numpy as np

from csqcfs_deploy import __version__
from csqcfs_deploy.convert.quantize import check_profile
from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)
from csqcfs_deploy.ir.profiles import Profile, get_profile

NIR_FORMAT = "csqcfs-deploy-nir"
NIR_FORMAT_VERSION = 1
FLAVORS: tuple[str, ...] = ("native", "portable")
FOREIGN_PROFILE = "int16"

NATIVE_EXACTNESS = ("exact at every T, P and schedule for a reader that applies this file's "
                    "metadata (soft reset, initial membrane, comparison, profile arithmetic)")
PORTABLE_EXACTNESS = ("exact only at T = 1 without pre-simulation (P = 0), as long as no "
                      "current wraps or voltage saturates: v starts at 0, the initial membrane "
                      "and the comparison are folded into v_threshold, hard reset; from step 2 "
                      "on a reader that ignores the metadata differs")
SCHEDULE_HINT = ("synchronous: every projection delivers its source's spikes of the same step; "
                 "pipelined (Lava/Loihi): projection delay = depth(dst) - depth(src) steps, "
                 "see node metadata pipelined_delay")

_FLOAT32_EXACT = 2**24


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class _Names:
    """NIR node names: the IF graph's names, plus unique helper names per projection."""

    pool: dict[str, str]
    flatten: dict[str, str]

    @classmethod
    def of(cls, graph: IFGraph) -> _Names:
        taken = {la.name for la in graph.layers} | {p.name for p in graph.projections}
        for name in taken:
            if not name or "/" in name or name in (".", ".."):
                raise GraphError(f"node name {name!r} cannot be stored in a NIR (HDF5) file")

        def fresh(base: str) -> str:
            name = base
            while name in taken:
                name += "_"
            taken.add(name)
            return name

        pool = {p.name: fresh(f"{p.name}_pool") for p in graph.projections if p.pool}
        flatten = {p.name: fresh(f"{p.name}_flatten") for p in graph.projections
                   if isinstance(p, DenseProjection) and len(p.pooled_shape(
                       graph.node(p.src).shape)) > 1}
        return cls(pool, flatten)


def _projection_kind(p: ProjectionT) -> str:
    if isinstance(p, ConvProjection):
        return "conv"
    if isinstance(p, DenseProjection):
        return "dense"
    return "identity"


def _check_flavor(flavor: str) -> None:
    if flavor not in FLAVORS:
        raise UsageError(f"unknown NIR flavour {flavor!r} (known: {', '.join(FLAVORS)})")


def _check_portable(graph: IFGraph) -> None:
    """The portable flavour needs one threshold and one initial membrane per layer."""
    for la in graph.if_layers:
        if np.any(la.v_th != la.v_th[0]) or np.any(la.v_init != la.v_init[0]):
            raise UsageError(
                f"layer {la.name} has per-channel thresholds ({int(la.v_th.min())}.."
                f"{int(la.v_th.max())}); the portable NIR flavour needs one threshold per layer: "
                "convert the checkpoint with --per-layer-thresholds (or use --flavor native)")
    for p in graph.projections:
        if p.pool is not None and p.pool.padding != (0, 0):
            raise UsageError(f"projection {p.name} has a padded sum pool; Norse and nirtorch "
                             "ignore SumPool2d padding, so the portable flavour refuses it (use "
                             "--flavor native)")
        if p.weight_exp != 0:
            raise UsageError(f"projection {p.name} has weight exponent {p.weight_exp}, which NIR "
                             "cannot express; use --flavor native")


def _portable_threshold(layer: IFLayer, profile: Profile) -> np.ndarray:
    """Per channel: the NIR threshold with which ``v > th`` from ``v = 0`` fires as step 1.

    Step 1 fires when ``v_init + I (>|>=) v_th`` for an integer input ``I``, that is
    ``I > v_th - v_init`` (strict) or ``I > v_th - v_init - 1``. Half an integer
    above that bound, the threshold gives the same spikes to a reader comparing with
    ``>=`` (spikingjelly, sinabs) as to one comparing with ``>`` (NIR, Norse, snntorch).
    """
    return (layer.v_th - layer.v_init).astype(np.float64) + (0.5 if profile.strict else -0.5)


def graph_to_nir(graph: IFGraph, flavor: str = "native") -> nir.NIRGraph:
    """The NIR graph of an integer IF graph (see the module docstring for the mapping)."""
    _check_flavor(flavor)
    if not graph.is_integer:
        raise GraphError("NIR export needs a quantized (integer) graph; convert with a profile "
                         "first")
    profile = get_profile(str(graph.meta.profile))
    if flavor == "portable":
        _check_portable(graph)
    shift = profile.act_shift
    names = _Names.of(graph)
    depths = graph.depths()
    layer_index = {la.name: i for i, la in enumerate(graph.layers)}

    # All parameters first in int64; the flavour decides the stored dtype.
    weights = {p.name: p.weight.astype(np.int64) << shift for p in graph.projections}
    biases: dict[str, np.ndarray] = {}
    for la in graph.layers:
        if isinstance(la, InputLayer):
            continue
        first = graph.incoming(la.name)[0].name
        for p in graph.incoming(la.name):
            biases[p.name] = (la.bias.copy() if p.name == first
                              else np.zeros(la.channels, dtype=np.int64))
    thresholds = {la.name: (la.v_th if flavor == "native" else _portable_threshold(la, profile))
                  for la in graph.if_layers}
    cast = _value_cast(flavor, [*weights.values(), *biases.values()],
                       list(thresholds.values()))

    nodes: dict[str, nir.NIRNode] = {}
    edges: list[tuple[str, str]] = []
    for la in graph.layers:
        md: dict[str, Any] = {"kind": "", "layer_index": layer_index[la.name]}
        if isinstance(la, InputLayer):
            md.update(kind="input", scale=float(la.scale), raw_max=float(la.raw_max),
                      mean=np.asarray(la.mean, dtype=np.float64),
                      std=np.asarray(la.std, dtype=np.float64), bits=int(la.bits))
            nodes[la.name] = nir.Input(input_type=np.array(la.shape), metadata=md)
        elif isinstance(la, IFLayer):
            per_neuron = _broadcast(thresholds[la.name], la.shape)
            md.update(kind="if", reset=la.reset, comparison=">" if profile.strict else ">=",
                      v_init=la.v_init.copy(), threshold_real=la.threshold_real.copy())
            if flavor == "portable":
                md["v_th"] = la.v_th.copy()
            nodes[la.name] = nir.IF(r=cast(np.ones(la.shape, dtype=np.int64)),
                                    v_threshold=cast(per_neuron),
                                    v_reset=cast(np.zeros(la.shape, dtype=np.int64)),
                                    metadata=md)
        else:
            assert isinstance(la, ReadoutLayer)
            md.update(kind="readout", scale=float(la.scale))
            nodes[la.name] = nir.Output(output_type=np.array(la.shape), metadata=md)

    for index, p in enumerate(graph.projections):
        src_shape = graph.node(p.src).shape
        prev = p.src
        if p.pool is not None:
            pool_name = names.pool[p.name]
            nodes[pool_name] = nir.SumPool2d(
                kernel_size=np.array(p.pool.kernel), stride=np.array(p.pool.stride),
                padding=np.array(p.pool.padding),
                metadata={"kind": "pool", "projection": p.name})
            edges.append((prev, pool_name))
            prev = pool_name
        shape = p.pooled_shape(src_shape)
        if p.name in names.flatten:
            flat_name = names.flatten[p.name]
            nodes[flat_name] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                           end_dim=-1,
                                           metadata={"kind": "flatten", "projection": p.name})
            edges.append((prev, flat_name))
            prev = flat_name
        md = {"kind": _projection_kind(p), "projection_index": index,
              "weight_shift": shift, "weight_exp": int(p.weight_exp),
              "pipelined_delay": depths[p.dst] - depths[p.src]}
        w, b = cast(weights[p.name]), cast(biases[p.name])
        if isinstance(p, ConvProjection):
            # NIR's type inference reads the input channels off weight.shape[1] and
            # ignores groups: a grouped conv is stored dense (block diagonal).
            md["groups"] = int(p.groups)
            nodes[p.name] = nir.Conv2d(input_shape=tuple(shape[1:]),
                                       weight=_expand_groups(w, p.groups),
                                       stride=tuple(p.stride), padding=tuple(p.padding),
                                       dilation=(1, 1), groups=1, bias=b, metadata=md)
        elif isinstance(p, DenseProjection):
            nodes[p.name] = nir.Affine(weight=w, bias=b, metadata=md)
        elif len(shape) == 3:  # identity on (C, H, W): a 1x1 conv with a diagonal weight
            c = shape[0]
            diag = np.diag(w).reshape(c, c, 1, 1)
            nodes[p.name] = nir.Conv2d(input_shape=tuple(shape[1:]), weight=diag,
                                       stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                                       bias=b, metadata=md)
        else:
            nodes[p.name] = nir.Affine(weight=np.diag(w), bias=b, metadata=md)
        edges.append((prev, p.name))
        edges.append((p.name, p.dst))

    meta = graph.meta
    graph_md: dict[str, Any] = {
        "format": NIR_FORMAT, "format_version": NIR_FORMAT_VERSION, "flavor": flavor,
        "exactness": NATIVE_EXACTNESS if flavor == "native" else PORTABLE_EXACTNESS,
        "producer": f"csqcfs-deploy {__version__}",
        "profile": str(meta.profile), "levels": int(meta.levels), "phi": float(meta.phi),
        "arch": meta.arch, "num_classes": int(meta.num_classes), "notes": meta.notes,
        "comparison": ">" if profile.strict else ">=",
        "weight_shift": shift,
        "current_wrap_bits": int(profile.current_bits or 0),
        "voltage_min": int(profile.voltage_min), "voltage_max": int(profile.voltage_max),
        "value_dtype": "int64" if flavor == "native" else str(cast.dtype),
        "schedule": SCHEDULE_HINT,
    }
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, metadata=graph_md, type_check=True)
    except ValueError as exc:  # NIR's own type inference disagrees: a bug in the mapping
        raise GraphError(f"NIR rejects the exported graph: {exc}") from None


@dataclass(frozen=True)
class _ValueCast:
    """Stores a flavour's parameter arrays: int64 (native) or float (portable)."""

    dtype: np.dtype

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=self.dtype)


def _value_cast(flavor: str, integers: list[np.ndarray], halves: list[np.ndarray]
                ) -> _ValueCast:
    """int64 (native); float32 when every integer and half-integer is exact in it, else
    float64 (portable)."""
    if flavor == "native":
        return _ValueCast(np.dtype(np.int64))
    biggest = max([float(np.abs(a).max(initial=0)) for a in integers]
                  + [2 * float(np.abs(a).max(initial=0)) for a in halves], default=0.0)
    return _ValueCast(np.dtype(np.float32 if biggest <= _FLOAT32_EXACT else np.float64))


def _expand_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """Grouped conv weight (O, I/g, kH, kW) -> the equivalent dense one (O, I, kH, kW)."""
    if groups == 1:
        return w
    o, ig, kh, kw = w.shape
    og = o // groups
    full = np.zeros((o, ig * groups, kh, kw), dtype=w.dtype)
    for g in range(groups):
        full[g * og:(g + 1) * og, g * ig:(g + 1) * ig] = w[g * og:(g + 1) * og]
    return full


def _compress_groups(name: str, w: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`_expand_groups`, refusing a weight outside the diagonal blocks."""
    if groups == 1:
        return w
    o, i, kh, kw = w.shape
    if groups < 1 or o % groups or i % groups:
        raise InputFileError(f"node {name}: metadata groups {groups} does not divide the "
                             f"weight shape {w.shape}")
    og, ig = o // groups, i // groups
    out = np.empty((o, ig, kh, kw), dtype=w.dtype)
    rest = w.copy()
    for g in range(groups):
        block = (slice(g * og, (g + 1) * og), slice(g * ig, (g + 1) * ig))
        out[g * og:(g + 1) * og] = w[block]
        rest[block] = 0
    if np.any(rest):
        raise InputFileError(f"node {name}: weights outside the {groups} groups of a grouped "
                             "convolution")
    return out


def _broadcast(per_channel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C,) -> ``shape`` = (C, ...), constant within each channel."""
    view = per_channel.reshape(-1, *([1] * (len(shape) - 1)))
    return np.ascontiguousarray(np.broadcast_to(view, shape))


# --------------------------------------------------------------------------- reader

_NEURON_NODES = (nir.Input, nir.IF, nir.Output)
_SYNAPSE_NODES = (nir.SumPool2d, nir.Flatten, nir.Conv2d, nir.Affine, nir.Linear)
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


@dataclass(frozen=True)
class _Semantics:
    """How NIR values map to the IF graph: ours (metadata) or plain NIR (none)."""

    ours: bool
    flavor: str
    profile: Profile
    weight_shift: int


@dataclass
class _Chain:
    """One projection read off the NIR graph: source neuron node -> synapse nodes -> dst."""

    src: str
    dst: str
    nodes: list[str] = field(default_factory=list)


def _kind(node: nir.NIRNode) -> str:
    return str(node.metadata.get("kind", "")) if isinstance(node.metadata, dict) else ""


def _md(node_name: str, node: Any, key: str) -> Any:
    md = node.metadata if isinstance(node.metadata, dict) else {}
    if key not in md:
        raise InputFileError(f"node {node_name}: csqcfs-deploy metadata lacks {key!r}")
    return md[key]


def _md_int(node_name: str, node: Any, key: str) -> int:
    value = _md(node_name, node, key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputFileError(f"node {node_name}: metadata {key} must be an integer, got "
                             f"{value!r}")
    return int(value)


def _md_float(node_name: str, node: Any, key: str) -> float:
    value = _md(node_name, node, key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise InputFileError(f"node {node_name}: metadata {key} must be a number, got {value!r}")
    return float(value)


def _md_str(node_name: str, node: Any, key: str) -> str:
    value = _md(node_name, node, key)
    if isinstance(value, bytes):
        value = value.decode("utf8")
    if not isinstance(value, str):
        raise InputFileError(f"node {node_name}: metadata {key} must be a string, got {value!r}")
    return value


def _md_array(node_name: str, node: Any, key: str, kind: str) -> np.ndarray:
    value = np.asarray(_md(node_name, node, key))
    if value.ndim != 1 or value.dtype.kind not in ("iu" if kind == "i" else "iuf"):
        raise InputFileError(f"node {node_name}: metadata {key} must be a 1-D "
                             f"{'integer' if kind == 'i' else 'numeric'} array")
    return value.astype(np.int64 if kind == "i" else np.float64)


def _int_values(node_name: str, what: str, values: Any) -> np.ndarray:
    """``values`` as int64, refusing anything that is not integer-valued."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise GraphError(f"node {node_name}: {what} is not integer-valued; csqcfs-deploy runs "
                         "integer graphs (quantize the network first)")
    if arr.size and np.abs(arr).max() > 2**53:
        raise GraphError(f"node {node_name}: {what} exceeds the exact integer range")
    return arr.astype(np.int64)


def _real_values(node_name: str, what: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
        raise GraphError(f"node {node_name}: {what} must be finite numbers")
    return arr.astype(np.float64)


def _pair(node_name: str, what: str, value: Any) -> tuple[int, int]:
    arr = np.asarray(value).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or arr.dtype.kind not in "iuf" or np.any(arr != np.round(arr)):
        raise GraphError(f"node {node_name}: {what} must be one or two integers, got {value!r}")
    return int(arr[0]), int(arr[1])


def _shape_of(node_name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        raise GraphError(f"node {node_name}: shape is not given")
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or arr.dtype.kind not in "iu" or np.any(arr < 1):
        raise GraphError(f"node {node_name}: invalid shape {value!r}")
    return tuple(int(d) for d in arr)


def _semantics(ng: nir.NIRGraph) -> _Semantics:
    md = ng.metadata if isinstance(ng.metadata, dict) else {}
    fmt = md.get("format")
    if fmt is None:
        return _Semantics(False, "plain", get_profile(FOREIGN_PROFILE), 0)
    if fmt != NIR_FORMAT:
        raise InputFileError(f"graph metadata names format {fmt!r}, not {NIR_FORMAT!r}")
    version = md.get("format_version")
    if version != NIR_FORMAT_VERSION:
        raise InputFileError(f"csqcfs-deploy NIR format version {version!r} is not supported "
                             f"(this tool reads version {NIR_FORMAT_VERSION})")
    flavor = _md_str("(graph)", ng, "flavor")
    if flavor not in FLAVORS:
        raise InputFileError(f"graph metadata names an unknown flavour {flavor!r}")
    profile = get_profile(_md_str("(graph)", ng, "profile"))
    shift = _md_int("(graph)", ng, "weight_shift")
    if shift != profile.act_shift:
        raise InputFileError(f"graph metadata weight_shift {shift} contradicts profile "
                             f"{profile.name} (act_shift {profile.act_shift})")
    return _Semantics(True, flavor, profile, shift)


def _check_node_types(ng: nir.NIRGraph) -> None:
    for name, node in ng.nodes.items():
        if isinstance(node, _NEURON_NODES + _SYNAPSE_NODES):
            continue
        reason = _UNSUPPORTED.get(type(node), f"an unsupported NIR node {type(node).__name__}")
        raise GraphError(f"node {name}: {reason} cannot run in csqcfs-deploy")


def _check_acyclic(nodes: Mapping[str, Any], edges: list[tuple[str, str]]) -> None:
    """Refuse a recurrent edge, naming it (iterative DFS, nodes in sorted order)."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a not in nodes or b not in nodes:
            missing = a if a not in nodes else b
            raise GraphError(f"edge {a} -> {b} names a node {missing!r} that does not exist")
        if a == b:
            raise GraphError(f"node {a}: recurrent edge {a} -> {b} (csqcfs-deploy runs "
                             "feed-forward graphs only)")
        succ[a].append(b)
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


def _chains(ng: nir.NIRGraph, sem: _Semantics) -> tuple[list[str], list[_Chain], list[str]]:
    """Neuron nodes (order), projection chains (order) and ignored auxiliary outputs."""
    nodes = ng.nodes
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in ng.edges:
        preds[b].append(a)
        succs[a].append(b)
    ignored: list[str] = []
    for name, node in nodes.items():
        if isinstance(node, nir.Output) and sem.ours and _kind(node) != "readout":
            # NIR's type inference adds an Output after a layer without projections.
            src = preds[name]
            if len(src) == 1 and isinstance(nodes[src[0]], nir.IF):
                ignored.append(name)
                continue
        if isinstance(node, _SYNAPSE_NODES):
            if len(preds[name]) != 1:
                raise GraphError(f"node {name}: a {type(node).__name__} needs exactly one "
                                 f"incoming edge, has {len(preds[name])}")
            if len(succs[name]) != 1:
                raise GraphError(f"node {name}: a {type(node).__name__} needs exactly one "
                                 f"outgoing edge, has {len(succs[name])} (connect each neuron "
                                 "group through its own synapse nodes)")
        elif isinstance(node, nir.Input) and preds[name]:
            raise GraphError(f"node {name}: an Input node cannot have incoming edges")
        elif isinstance(node, nir.Output) and succs[name]:
            raise GraphError(f"node {name}: an Output node cannot have outgoing edges")
    neurons = [n for n, node in nodes.items()
               if isinstance(node, _NEURON_NODES) and n not in ignored]
    inputs = [n for n in neurons if isinstance(nodes[n], nir.Input)]
    outputs = [n for n in neurons if isinstance(nodes[n], nir.Output)]
    if len(inputs) != 1:
        raise GraphError(f"the NIR graph needs exactly one Input node, has {len(inputs)}"
                         + (f" ({', '.join(sorted(inputs))})" if inputs else ""))
    if len(outputs) != 1:
        raise GraphError(f"the NIR graph needs exactly one Output node (the readout), has "
                         f"{len(outputs)}" + (f" ({', '.join(sorted(outputs))})"
                                              if outputs else ""))
    chains: list[_Chain] = []
    for dst in neurons:
        for first in preds[dst]:
            chain = _Chain(src="", dst=dst)
            cur = first
            while isinstance(nodes[cur], _SYNAPSE_NODES):
                chain.nodes.insert(0, cur)
                cur = preds[cur][0]
            if isinstance(nodes[cur], nir.Output):
                raise GraphError(f"node {cur}: an Output node feeds node {dst}")
            chain.src = cur
            chains.append(chain)
    return neurons, chains, ignored


def _order(ng: nir.NIRGraph, sem: _Semantics, neurons: list[str], chains: list[_Chain]
           ) -> tuple[list[str], list[_Chain]]:
    """Layers and projections in the IF graph's order (metadata) or topological order."""
    if sem.ours:
        def layer_key(n: str) -> int:
            return _md_int(n, ng.nodes[n], "layer_index")

        def proj_key(c: _Chain) -> int:
            if not c.nodes:
                raise GraphError(f"edge {c.src} -> {c.dst}: a direct connection between neuron "
                                 "groups; csqcfs-deploy files put a weighted node on every "
                                 "projection")
            return _md_int(c.nodes[-1], ng.nodes[c.nodes[-1]], "projection_index")

        layers = sorted(neurons, key=layer_key)
        projs = sorted(chains, key=proj_key)
        for what, keys in (("layer_index", [layer_key(n) for n in layers]),
                           ("projection_index", [proj_key(c) for c in projs])):
            if keys != list(range(len(keys))):
                raise InputFileError(f"metadata {what} values {keys} are not 0..{len(keys) - 1}")
        return layers, projs
    # plain NIR: Kahn's algorithm over neuron groups, ties by name
    indeg = dict.fromkeys(neurons, 0)
    for c in chains:
        indeg[c.dst] += 1
    ready = sorted(n for n in neurons if indeg[n] == 0)
    layers: list[str] = []
    while ready:
        n = ready.pop(0)
        layers.append(n)
        for c in chains:
            if c.src == n:
                indeg[c.dst] -= 1
                if indeg[c.dst] == 0:
                    ready.append(c.dst)
                    ready.sort()
    rank = {n: i for i, n in enumerate(layers)}
    projs = sorted(chains, key=lambda c: (rank[c.dst], rank[c.src], c.nodes[-1] if c.nodes
                                          else ""))
    return layers, projs


def _neuron_shape(name: str, node: Any) -> tuple[int, ...]:
    if isinstance(node, nir.Input):
        return _shape_of(name, node.input_type["input"])
    if isinstance(node, nir.Output):
        return _shape_of(name, node.output_type["output"])
    shape = tuple(int(d) for d in np.shape(node.r))
    if not shape:
        raise GraphError(f"node {name}: an IF node needs array-valued r and v_threshold")
    if np.shape(node.v_threshold) != shape or np.shape(node.v_reset) != shape:
        raise GraphError(f"node {name}: r, v_threshold and v_reset must have the same shape")
    return shape


def _projection(ng: nir.NIRGraph, sem: _Semantics, chain: _Chain,
                shapes: Mapping[str, tuple[int, ...]]) -> tuple[ProjectionT, np.ndarray]:
    """The projection of one chain and the bias it adds to its destination (int64)."""
    nodes = ng.nodes
    shape = shapes[chain.src]
    dst_shape = shapes[chain.dst]
    pool: SumPool | None = None
    flattened = False
    rest = list(chain.nodes)
    if not rest:  # plain NIR: a spike edge = identity synapse of weight 1
        if not sem.ours and shape == dst_shape:
            c = shape[0]
            return (IdentityProjection(name=f"{chain.src}_to_{chain.dst}", src=chain.src,
                                       dst=chain.dst, weight=np.ones(c, dtype=np.int64)),
                    np.zeros(c, dtype=np.int64))
        raise GraphError(f"edge {chain.src} -> {chain.dst}: connects shapes {shape} and "
                         f"{dst_shape} without a synapse node")
    if isinstance(nodes[rest[0]], nir.SumPool2d):
        name = rest.pop(0)
        node = nodes[name]
        try:
            pool = SumPool(kernel=_pair(name, "kernel_size", node.kernel_size),
                           stride=_pair(name, "stride", node.stride),
                           padding=_pair(name, "padding", node.padding))
            shape = pool.out_shape(shape)
        except GraphError as exc:
            raise GraphError(f"node {name}: {exc}") from None
    if rest and isinstance(nodes[rest[0]], nir.Flatten):
        name = rest.pop(0)
        node = nodes[name]
        declared = node.input_type.get("input") if isinstance(node.input_type, dict) else None
        if declared is not None and _shape_of(name, declared) != shape:
            raise GraphError(f"node {name}: flattens shape {_shape_of(name, declared)} but "
                             f"receives {shape}")
        if int(node.start_dim) != 0 or int(node.end_dim) not in (-1, len(shape) - 1):
            raise GraphError(f"node {name}: only a full flatten (start_dim=0, end_dim=-1; NIR "
                             "shapes exclude the batch) is supported")
        shape = (int(np.prod(shape)),)
        flattened = True
    if len(rest) != 1 or not isinstance(nodes[rest[0]], (nir.Conv2d, nir.Affine, nir.Linear)):
        where = rest[0] if rest else chain.nodes[-1]
        raise GraphError(f"node {where}: a projection must be [SumPool2d] [Flatten] followed by "
                         "one Conv2d, Affine or Linear node before the next neuron group")
    name = rest[0]
    node = nodes[name]
    kind = _kind(node) if sem.ours else ""
    if sem.ours and kind not in ("conv", "dense", "identity"):
        raise InputFileError(f"node {name}: metadata kind {kind!r} is not a projection kind")
    weight_exp = _md_int(name, node, "weight_exp") if sem.ours else 0
    w = _int_values(name, "weight", node.weight)
    unit = 1 << sem.weight_shift
    if np.any(w % unit):
        raise GraphError(f"node {name}: weights are not multiples of 2**{sem.weight_shift} "
                         f"(profile {sem.profile.name} shifts synaptic input by "
                         f"{sem.weight_shift})")
    w = w // unit
    if isinstance(node, nir.Linear):
        bias = None
    else:
        bias = _int_values(name, "bias", node.bias)
    common = {"name": name, "src": chain.src, "dst": chain.dst, "pool": pool,
              "weight_exp": weight_exp}
    if isinstance(node, nir.Conv2d):
        if flattened:
            raise GraphError(f"node {name}: a Conv2d after a Flatten")
        if len(shape) != 3:
            raise GraphError(f"node {name}: a Conv2d needs a (C, H, W) input, gets {shape}")
        if node.input_shape is not None and tuple(int(d) for d in np.asarray(
                node.input_shape).reshape(-1)) != shape[1:]:
            raise GraphError(f"node {name}: declares input {tuple(np.asarray(node.input_shape))}"
                             f" but receives {shape[1:]} from {chain.src}")
        if _pair(name, "dilation", node.dilation) != (1, 1):
            raise GraphError(f"node {name}: dilation is not supported")
        if w.ndim != 4:
            raise GraphError(f"node {name}: a Conv2d weight must be 4-D, got {w.shape}")
        stride = _pair(name, "stride", node.stride)
        padding = _conv_padding(name, node.padding, w.shape[2:], stride)
        groups = int(node.groups)
        if kind == "identity":
            c = shape[0]
            diag = np.diag(w.reshape(w.shape[0], -1)) if w.shape[2:] == (1, 1) else None
            if (diag is None or w.shape[:2] != (c, c) or groups != 1 or stride != (1, 1)
                    or padding != (0, 0) or np.any(w.reshape(c, c) != np.diag(diag))):
                raise InputFileError(f"node {name}: an identity projection must be a 1x1 "
                                     f"Conv2d with a diagonal {c}x{c} weight")
            proj: ProjectionT = IdentityProjection(weight=diag.copy(), **common)
        else:
            if sem.ours:
                if groups != 1:
                    raise InputFileError(f"node {name}: csqcfs-deploy files store grouped "
                                         "convolutions dense (groups = 1 in the node)")
                groups = _md_int(name, node, "groups")
                w = _compress_groups(name, w, groups)
            proj = ConvProjection(weight=w, stride=stride, padding=padding, groups=groups,
                                  **common)
    else:
        if len(shape) != 1:
            raise GraphError(f"node {name}: a dense node needs a 1-D input, gets {shape} (add "
                             "a nir.Flatten with start_dim=0)")
        if w.ndim != 2:
            raise GraphError(f"node {name}: weight must be 2-D, got {w.shape}")
        if kind == "identity":
            if w.shape[0] != w.shape[1] or np.any(w != np.diag(np.diag(w))):
                raise InputFileError(f"node {name}: an identity projection must be a square "
                                     "diagonal Affine")
            proj = IdentityProjection(weight=np.diag(w).copy(), **common)
        else:
            proj = DenseProjection(weight=w, **common)
    try:
        out = proj.out_shape(shapes[chain.src])
    except GraphError as exc:
        raise GraphError(f"node {name}: {exc}") from None
    if out != dst_shape:
        raise GraphError(f"node {name}: produces shape {out} but {chain.dst} has shape "
                         f"{dst_shape}")
    channels = out[0]
    if bias is None:
        bias = np.zeros(channels, dtype=np.int64)
    bias = bias.reshape(-1) if bias.size == channels else bias
    if bias.shape != (channels,):
        raise GraphError(f"node {name}: bias has shape {bias.shape}, expected ({channels},)")
    return proj, bias


def _conv_padding(name: str, value: Any, kernel: tuple[int, ...], stride: tuple[int, int]
                  ) -> tuple[int, int]:
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        if text == "valid":
            return (0, 0)
        if text == "same" and stride == (1, 1) and all(k % 2 == 1 for k in kernel):
            return (int(kernel[0]) // 2, int(kernel[1]) // 2)
        raise GraphError(f"node {name}: padding {text!r} is not supported here")
    return _pair(name, "padding", value)


def _per_channel_threshold(name: str, node: Any, values: np.ndarray) -> np.ndarray:
    """(C, ...) per-neuron values -> (C,), refusing a value that varies within a channel."""
    flat = values.reshape(values.shape[0], -1)
    if np.any(flat != flat[:, :1]):
        raise GraphError(f"node {name}: v_threshold varies within a channel; the IF graph has "
                         "one threshold per channel")
    return flat[:, 0].copy()


def _if_layer(name: str, node: Any, sem: _Semantics, shape: tuple[int, ...],
              bias: np.ndarray) -> IFLayer:
    if np.any(np.asarray(node.r) != 1):
        raise GraphError(f"node {name}: r must be 1 (csqcfs-deploy's IF neurons add their "
                         "input unscaled)")
    v_reset = _int_values(name, "v_reset", node.v_reset)
    c = shape[0]
    if not sem.ours:
        if np.any(v_reset != 0):
            raise GraphError(f"node {name}: v_reset must be 0 (csqcfs-deploy's hard reset "
                             "sets v = 0)")
        theta = _per_channel_threshold(name, node, _real_values(name, "v_threshold",
                                                                  node.v_threshold))
        if np.any(theta < 0):
            raise GraphError(f"node {name}: a negative v_threshold cannot be expressed "
                             "(csqcfs-deploy thresholds are positive)")
        # integer v: v > theta  <=>  v >= floor(theta) + 1
        v_th = np.floor(theta).astype(np.int64) + 1
        ones = np.ones(c, dtype=np.float64)
        return IFLayer(name, shape, v_th=v_th, v_init=np.zeros(c, dtype=np.int64),
                       bias=bias, threshold_real=ones, reset="zero")
    comparison = _md_str(name, node, "comparison")
    if comparison != (">" if sem.profile.strict else ">="):
        raise InputFileError(f"node {name}: comparison {comparison!r} contradicts profile "
                             f"{sem.profile.name}")
    v_init = _md_array(name, node, "v_init", "i")
    if sem.flavor == "native":
        v_th = _per_channel_threshold(name, node, _int_values(name, "v_threshold",
                                                                node.v_threshold))
    else:
        theta = _per_channel_threshold(name, node, _real_values(name, "v_threshold",
                                                                  node.v_threshold))
        v_th = _md_array(name, node, "v_th", "i")
        half = 0.5 if sem.profile.strict else -0.5
        if v_th.shape == (c,) and v_init.shape == (c,) and np.any(
                theta != (v_th - v_init) + half):
            raise InputFileError(f"node {name}: v_threshold disagrees with metadata v_th and "
                                 f"v_init (the portable threshold is v_th - v_init {half:+})")
    if np.any(v_reset != 0):
        raise InputFileError(f"node {name}: v_reset must be 0 in a csqcfs-deploy file")
    return IFLayer(name, shape, v_th=v_th, v_init=v_init, bias=bias,
                   threshold_real=_md_array(name, node, "threshold_real", "f"),
                   reset=_md_str(name, node, "reset"))


def nir_to_graph(ng: nir.NIRGraph) -> IFGraph:
    """The integer IF graph of a NIR graph (ours restores exactly; see the module docstring)."""
    if not isinstance(ng, nir.NIRGraph):
        raise InputFileError(f"expected a NIR graph, got a {type(ng).__name__} node")
    sem = _semantics(ng)
    _check_node_types(ng)
    _check_acyclic(ng.nodes, list(ng.edges))
    neurons, chains, _ = _chains(ng, sem)
    layer_names, chain_order = _order(ng, sem, neurons, chains)
    shapes = {n: _neuron_shape(n, ng.nodes[n]) for n in layer_names}

    projections: list[ProjectionT] = []
    bias: dict[str, np.ndarray] = {}
    for chain in chain_order:
        proj, b = _projection(ng, sem, chain, shapes)
        projections.append(proj)
        bias[chain.dst] = bias[chain.dst] + b if chain.dst in bias else b

    layers: list[InputLayer | IFLayer | ReadoutLayer] = []
    for name in layer_names:
        node = ng.nodes[name]
        shape = shapes[name]
        if sem.ours:
            expected = {nir.Input: "input", nir.IF: "if", nir.Output: "readout"}[type(node)]
            if _kind(node) != expected:
                raise InputFileError(f"node {name}: metadata kind {_kind(node)!r}, expected "
                                     f"{expected!r}")
        zero = np.zeros(shape[0], dtype=np.int64)
        if isinstance(node, nir.Input):
            if sem.ours:
                layers.append(InputLayer(
                    name, shape, scale=_md_float(name, node, "scale"),
                    raw_max=_md_float(name, node, "raw_max"),
                    mean=tuple(_md_array(name, node, "mean", "f").tolist()),
                    std=tuple(_md_array(name, node, "std", "f").tolist()),
                    bits=_md_int(name, node, "bits")))
            else:
                bits = get_profile(FOREIGN_PROFILE).input_bits
                layers.append(InputLayer(name, shape, scale=1.0, raw_max=float(2**bits - 1),
                                         mean=(0.0,) * shape[0], std=(1.0,) * shape[0],
                                         bits=bits))
        elif isinstance(node, nir.IF):
            layers.append(_if_layer(name, node, sem, shape, bias.get(name, zero)))
        else:
            scale = _md_float(name, node, "scale") if sem.ours else 1.0
            layers.append(ReadoutLayer(name, shape, bias=bias.get(name, zero), scale=scale))

    md = ng.metadata if isinstance(ng.metadata, dict) else {}
    if sem.ours:
        meta = GraphMeta(levels=_md_int("(graph)", ng, "levels"),
                         phi=_md_float("(graph)", ng, "phi"), profile=sem.profile.name,
                         arch=_md_str("(graph)", ng, "arch"),
                         num_classes=_md_int("(graph)", ng, "num_classes"),
                         notes=_md_str("(graph)", ng, "notes"))
    else:
        readout = next(la for la in layers if isinstance(la, ReadoutLayer))
        arch = md.get("arch", "")
        meta = GraphMeta(levels=1, phi=0.0, profile=FOREIGN_PROFILE,
                         arch=arch if isinstance(arch, str) else "",
                         num_classes=readout.channels,
                         notes="read from a NIR graph without csqcfs-deploy metadata "
                               "(NIR IF semantics: v > v_threshold, hard reset, v starts at 0)")
    graph = IFGraph(layers=tuple(layers), projections=tuple(projections), meta=meta)
    check_profile(graph)
    return graph


# --------------------------------------------------------------------------- files

_NIR_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, AssertionError, AttributeError,
                    IndexError)


def read_nir_graph(path: str | Path) -> IFGraph:
    """Read a ``.nir`` file into an integer IF graph (errors name the file and the node)."""
    p = require_file(path, "NIR file")
    try:
        ng = nir.read(p, type_check=False)
    except _NIR_READ_ERRORS as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InputFileError(f"{p} is not a readable NIR file ({detail})") from None
    try:
        return nir_to_graph(ng)
    except GraphError as exc:
        raise GraphError(f"{p}: {exc}") from None
    except InputFileError as exc:
        raise InputFileError(f"{p}: {exc}") from None


def _write(ng: nir.NIRGraph, graph: IFGraph, path: str | Path, flavor: str,
           verify: bool) -> Path:
    def writer(tmp: Path) -> None:
        nir.write(tmp, ng)
        if verify:
            back = nir_to_graph(nir.read(tmp))
            if not back.equals(graph):
                raise GraphError(f"the {flavor} NIR file does not read back as the same IF "
                                 "graph (nothing written)")

    return write_atomic(path, writer)


def write_nir_graph(graph: IFGraph, path: str | Path, flavor: str = "native",
                    verify: bool = True) -> Path:
    """Write ``graph`` as a NIR file, atomically.

    With ``verify`` the written file is read back with ``nir.read`` and our
    reader before it replaces ``path``; a difference from ``graph`` raises
    :class:`GraphError` and leaves nothing behind.
    """
    return _write(graph_to_nir(graph, flavor), graph, path, flavor, verify)


@dataclass(frozen=True)
class NirExport:
    """What ``export --target nir`` wrote (printable; ``to_json()`` for --json)."""

    path: Path
    flavor: str
    profile: str
    node_types: dict[str, int]
    edges: int
    value_dtype: str
    exactness: str
    verified: bool

    def to_json(self) -> dict[str, object]:
        return {"output": str(self.path), "format": "nir", "flavor": self.flavor,
                "profile": self.profile, "nodes": sum(self.node_types.values()),
                "node_types": dict(self.node_types), "edges": self.edges,
                "value_dtype": self.value_dtype, "exactness": self.exactness,
                "verified_round_trip": self.verified}

    def __str__(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.node_types.items()))
        lines = [
            f"wrote {self.path} (NIR, {self.flavor} flavour, profile {self.profile}, "
            f"{sum(self.node_types.values())} nodes, {self.edges} edges, {self.value_dtype})",
            f"nodes: {types}",
            f"{self.flavor} flavour: {self.exactness}",
        ]
        if self.verified:
            lines.append("verified: read back with nir.read and csqcfs-deploy's reader, it is "
                         "the same IF graph")
        return "\n".join(lines)


def export_nir(graph: IFGraph, path: str | Path, flavor: str = "native") -> NirExport:
    """Write ``graph`` to ``path`` (verified by reading it back) and describe what was written."""
    ng = graph_to_nir(graph, flavor)
    written = _write(ng, graph, path, flavor, verify=True)
    counts = Counter(type(node).__name__ for node in ng.nodes.values())
    return NirExport(path=written, flavor=flavor, profile=str(graph.meta.profile),
                     node_types=dict(counts), edges=len(ng.edges),
                     value_dtype=str(ng.metadata["value_dtype"]),
                     exactness=str(ng.metadata["exactness"]), verified=True)
