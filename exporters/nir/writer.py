"""Integer IF graph -> NIR: :func:`graph_to_nir` (in memory), :func:`write_nir_graph` and
:func:`export_nir` (a file, verified by reading it back).

One NIR node per layer (:data:`LAYER_WRITERS`, keyed by layer class) and one chain
per projection: ``[SumPool2d] [Flatten]`` and the weighted node of its kind
(:data:`PROJECTION_WRITERS`, keyed by projection class). All parameters are
computed in int64 (NIR weight ``= W << act_shift``, the layer bias (C,) on the
first incoming projection, zeros on the others); the flavour's
:class:`~csqcfs_deploy.exporters.nir.flavors.ValueCast` decides the stored dtype.
The metadata written here is the file format (README "NIR export and import").
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nir
import numpy as np
import numpy.typing as npt
from nir.serialization import hdf2dict

from csqcfs_deploy import __version__
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.exporters.h5write import write_array
from csqcfs_deploy.exporters.nir.flavors import (
    NIR_FORMAT,
    NIR_FORMAT_VERSION,
    PORTABLE_FLAVORS,
    SCHEDULE_HINT,
    ValueCast,
    check_flavor,
    check_portable,
    choose_flavor,
    exactness,
    hide_native_types,
    portable_threshold,
    restore_native_types,
    value_cast,
)
from csqcfs_deploy.exporters.nir.groups import expand_groups
from csqcfs_deploy.exporters.nir.legacy import legacy_record_for, restore_legacy_fields
from csqcfs_deploy.exporters.nir.reader import nir_to_graph
from csqcfs_deploy.exporters.nir.readers import CURRENT_NIR, ReaderFact, facts_for
from csqcfs_deploy.files import write_atomic
from csqcfs_deploy.interrupts import deferred_signals
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.kinds import KindTable, kind_name
from csqcfs_deploy.ir.profiles import Profile, get_profile

# --------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class Synapse:
    """The weighted node of one projection: ``shape`` its input shape (after the pool),
    ``weight`` and ``bias`` already in membrane units and the flavour's dtype, ``md``
    its metadata."""

    shape: tuple[int, ...]
    weight: npt.NDArray[Any]
    bias: npt.NDArray[Any]
    md: dict[str, Any]


@dataclass(frozen=True)
class ProjectionWriter:
    """How one projection kind is written: whether a (C, H, W) input is flattened
    first (node "<p>_flatten"), and its weighted NIR node."""

    flattens_images: bool
    build: Callable[[Any, Synapse], nir.NIRNode]   # (the projection, its Synapse)


PROJECTION_WRITERS: KindTable[ProjectionWriter] = KindTable("the NIR writer")


def _conv_node(p: ConvProjection, s: Synapse) -> nir.NIRNode:
    """A conv; NIR's type inference ignores groups, so a grouped conv is stored dense."""
    md = {**s.md, "groups": int(p.groups)}
    return nir.Conv2d(input_shape=tuple(s.shape[1:]), weight=expand_groups(s.weight, p.groups),
                      stride=tuple(p.stride), padding=tuple(p.padding), dilation=(1, 1),
                      groups=1, bias=s.bias, metadata=md)


def _dense_node(p: DenseProjection, s: Synapse) -> nir.NIRNode:
    return nir.Affine(weight=s.weight, bias=s.bias, metadata=s.md)


def _identity_node(p: IdentityProjection, s: Synapse) -> nir.NIRNode:
    """On (C, H, W) a 1x1 conv with a diagonal weight; on (F,) a diagonal Affine."""
    if len(s.shape) == 3:
        c = s.shape[0]
        diag = np.diag(s.weight).reshape(c, c, 1, 1)
        return nir.Conv2d(input_shape=tuple(s.shape[1:]), weight=diag, stride=(1, 1),
                          padding=(0, 0), dilation=(1, 1), groups=1, bias=s.bias,
                          metadata=s.md)
    return nir.Affine(weight=np.diag(s.weight), bias=s.bias, metadata=s.md)


PROJECTION_WRITERS.add(ConvProjection, ProjectionWriter(False, _conv_node))
PROJECTION_WRITERS.add(DenseProjection, ProjectionWriter(True, _dense_node))
PROJECTION_WRITERS.add(IdentityProjection, ProjectionWriter(False, _identity_node))


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
                   if PROJECTION_WRITERS.lookup(p).flattens_images and len(p.pooled_shape(
                       graph.layer(p.src).shape)) > 1}
        return cls(pool, flatten)


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Values:
    """Everything a node needs besides its own IF graph node."""

    flavor: str
    profile: Profile
    cast: ValueCast
    thresholds: dict[str, npt.NDArray[Any]]


LAYER_WRITERS: KindTable[Callable[[Any, dict[str, Any], _Values], nir.NIRNode]] = \
    KindTable("the NIR writer")


def _broadcast(per_channel: npt.NDArray[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """(C,) -> ``shape`` = (C, ...), constant within each channel."""
    view = per_channel.reshape(-1, *([1] * (len(shape) - 1)))
    return np.ascontiguousarray(np.broadcast_to(view, shape))


@LAYER_WRITERS.register(InputLayer)
def _input_node(la: InputLayer, md: dict[str, Any], values: _Values) -> nir.NIRNode:
    md.update(kind="input", scale=float(la.scale), raw_max=float(la.raw_max),
              mean=np.asarray(la.mean, dtype=np.float64),
              std=np.asarray(la.std, dtype=np.float64), bits=int(la.bits))
    return nir.Input(input_type=np.array(la.shape), metadata=md)


@LAYER_WRITERS.register(IFLayer)
def _if_node(la: IFLayer, md: dict[str, Any], values: _Values) -> nir.NIRNode:
    cast = values.cast
    per_neuron = _broadcast(values.thresholds[la.name], la.shape)
    md.update(kind="if", reset=la.reset, comparison=">" if values.profile.strict else ">=",
              v_init=la.v_init.copy(), threshold_real=la.threshold_real.copy())
    if values.flavor in PORTABLE_FLAVORS:
        md["v_th"] = la.v_th.copy()
    return nir.IF(r=cast(np.ones(la.shape, dtype=np.int64)), v_threshold=cast(per_neuron),
                  v_reset=cast(np.zeros(la.shape, dtype=np.int64)), metadata=md)


@LAYER_WRITERS.register(ReadoutLayer)
def _readout_node(la: ReadoutLayer, md: dict[str, Any], values: _Values) -> nir.NIRNode:
    md.update(kind="readout", scale=float(la.scale))
    return nir.Output(output_type=np.array(la.shape), metadata=md)


# --------------------------------------------------------------------------- the graph


def _biases(graph: IFGraph) -> dict[str, npt.NDArray[Any]]:
    """Per projection: its destination's bias (C,) if it is the first incoming, else zeros."""
    biases: dict[str, npt.NDArray[Any]] = {}
    for la in graph.layers:
        if isinstance(la, InputLayer):
            continue
        first = graph.incoming(la.name)[0].name
        for p in graph.incoming(la.name):
            biases[p.name] = (la.bias.copy() if p.name == first
                              else np.zeros(la.channels, dtype=np.int64))
    return biases


def _chain(graph: IFGraph, p: ProjectionT, names: _Names, nodes: dict[str, nir.NIRNode],
           edges: list[tuple[str, str]]) -> tuple[str, tuple[int, ...]]:
    """Add the pool and flatten nodes of ``p``: (the last node, the weighted node's input)."""
    prev = p.src
    if p.pool is not None:
        pool_name = names.pool[p.name]
        nodes[pool_name] = nir.SumPool2d(
            kernel_size=np.array(p.pool.kernel), stride=np.array(p.pool.stride),
            padding=np.array(p.pool.padding), metadata={"kind": "pool", "projection": p.name})
        edges.append((prev, pool_name))
        prev = pool_name
    shape = p.pooled_shape(graph.layer(p.src).shape)
    if p.name in names.flatten:
        flat_name = names.flatten[p.name]
        nodes[flat_name] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                       end_dim=-1,
                                       metadata={"kind": "flatten", "projection": p.name})
        edges.append((prev, flat_name))
        prev = flat_name
    return prev, shape


def _graph_metadata(graph: IFGraph, flavor: str, profile: Profile, cast: ValueCast
                    ) -> dict[str, Any]:
    meta = graph.meta
    return {
        "format": NIR_FORMAT, "format_version": NIR_FORMAT_VERSION, "flavor": flavor,
        "exactness": exactness(flavor),
        "producer": f"csqcfs-deploy {__version__}",
        "profile": str(meta.profile), "levels": int(meta.levels), "phi": float(meta.phi),
        "arch": meta.arch, "num_classes": int(meta.num_classes), "notes": meta.notes,
        "comparison": ">" if profile.strict else ">=",
        "weight_shift": profile.act_shift,
        "current_wrap_bits": int(profile.current_bits or 0),
        "voltage_min": int(profile.voltage_min), "voltage_max": int(profile.voltage_max),
        "value_dtype": "int64" if flavor == "native" else str(cast.dtype),
        "schedule": SCHEDULE_HINT,
        "calibration": "" if meta.calibration is None else json.dumps(
            {f.name: getattr(meta.calibration, f.name)
             for f in dataclasses.fields(meta.calibration)}),
    }


def graph_to_nir(graph: IFGraph, flavor: str = "native") -> nir.NIRGraph:
    """The NIR graph of an integer IF graph (see the package docstring for the mapping).

    In memory every flavour holds ``nir.IF`` nodes; a native graph's IF nodes get the
    type :data:`~csqcfs_deploy.exporters.nir.flavors.NATIVE_IF_TYPE` only in the file
    (:func:`write_nir_file`), so hand a native graph to a plain reader only through a file.
    """
    check_flavor(flavor)
    if not graph.is_integer:
        raise GraphError("NIR export needs a quantized (integer) graph; convert with a profile "
                         "first")
    profile = get_profile(str(graph.meta.profile))
    if flavor in PORTABLE_FLAVORS:
        check_portable(graph, flavor, profile)
    shift = profile.act_shift
    names = _Names.of(graph)
    depths = graph.depths()

    # All parameters first in int64; the flavour decides the stored dtype.
    weights = {p.name: p.weight.astype(np.int64) << shift for p in graph.projections}
    biases = _biases(graph)
    thresholds = {la.name: (la.v_th if flavor == "native" else portable_threshold(la, profile))
                  for la in graph.if_layers}
    cast = value_cast(flavor, [*weights.values(), *biases.values()], list(thresholds.values()))
    values = _Values(flavor, profile, cast, thresholds)

    nodes: dict[str, nir.NIRNode] = {}
    edges: list[tuple[str, str]] = []
    for index, la in enumerate(graph.layers):
        md: dict[str, Any] = {"kind": "", "layer_index": index}
        nodes[la.name] = LAYER_WRITERS.lookup(la)(la, md, values)
    for index, p in enumerate(graph.projections):
        prev, shape = _chain(graph, p, names, nodes, edges)
        md = {"kind": kind_name(p), "projection_index": index,
              "weight_shift": shift, "weight_exp": int(p.weight_exp),
              "pipelined_delay": depths[p.dst] - depths[p.src]}
        synapse = Synapse(shape, cast(weights[p.name]), cast(biases[p.name]), md)
        nodes[p.name] = PROJECTION_WRITERS.lookup(p).build(p, synapse)
        edges.append((prev, p.name))
        edges.append((p.name, p.dst))
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, type_check=True,
                            metadata=_graph_metadata(graph, flavor, profile, cast))
    except ValueError as exc:  # NIR's own type inference disagrees: a bug in the mapping
        raise GraphError(f"NIR rejects the exported graph: {exc}") from None


# --------------------------------------------------------------------------- files


def _write_node(group: h5py.Group, node: dict[str, Any], compression: str) -> None:
    """One entry of ``NIRGraph.to_dict()``, laid out as ``nir.write`` does (an empty
    metadata dict is skipped, strings as HDF5 strings, arrays compressed)."""
    for key, value in node.items():
        if key == "metadata":
            if value != {}:
                _write_node(group.create_group(key), value, compression)
        elif isinstance(value, str):
            group.create_dataset(key, data=value, dtype=h5py.string_dtype())
        elif isinstance(value, np.ndarray):
            write_array(group, key, value, compression)
        elif isinstance(value, dict):
            _write_node(group.create_group(str(key)), value, compression)
        else:
            group.create_dataset(key, data=value)


def write_nir_file(path: str | Path, ng: nir.NIRGraph, compression: str = "gzip",
                   nir_version: str = CURRENT_NIR) -> None:
    """``nir.write(path, ng)``'s file, its arrays written in slices so that Ctrl-C and
    SIGTERM are honoured within ~0.1 s (call it inside
    :func:`~csqcfs_deploy.interrupts.deferred_signals`; see :mod:`.h5write`). A native
    graph's IF nodes are stored with our type (:func:`hide_native_types`); ``nir_version``
    1.0.4: laid out for nir 1.0.4 (:mod:`.legacy`)."""
    record = legacy_record_for(nir_version, hide_native_types(ng.to_dict()))
    with h5py.File(path, "w") as f:
        f.create_dataset("version", data=nir.version if nir_version == CURRENT_NIR
                         else nir_version, dtype=h5py.string_dtype())
        _write_node(f.create_group("node"), record, compression)


def read_back(path: Path, flavor: str, nir_version: str = CURRENT_NIR) -> nir.NIRGraph:
    """The written file as NIR: with ``nir.read`` (a portable file must load in plain
    readers), or for a native file its raw record with our IF type mapped back."""
    if flavor in PORTABLE_FLAVORS and nir_version == CURRENT_NIR:
        return nir.read(path)
    with h5py.File(path, "r") as f:
        record = restore_legacy_fields(restore_native_types(hdf2dict(f["node"])))
    ng: nir.NIRGraph = nir.dict2NIRNode({**record, "type_check": True})
    return ng


def _write(ng: nir.NIRGraph, graph: IFGraph, path: str | Path, flavor: str,
           verify: bool, nir_version: str = CURRENT_NIR) -> Path:
    def writer(tmp: Path) -> None:
        with deferred_signals():  # HDF5 calls only: a signal is raised when they return
            write_nir_file(tmp, ng, nir_version=nir_version)
            back_nir = read_back(tmp, flavor, nir_version) if verify else None
        if back_nir is not None and not nir_to_graph(back_nir).equals(graph):
            raise GraphError(f"the {flavor} NIR file does not read back as the same IF graph "
                             "(nothing written)")

    return write_atomic(path, writer)


def write_nir_graph(graph: IFGraph, path: str | Path, flavor: str = "native",
                    verify: bool = True, nir_version: str = CURRENT_NIR) -> Path:
    """Write ``graph`` as a NIR file, atomically.

    With ``verify`` the written file is read back with ``nir.read`` and our
    reader before it replaces ``path``; a difference from ``graph`` raises
    :class:`GraphError` and leaves nothing behind.
    """
    return _write(graph_to_nir(graph, flavor), graph, path, flavor, verify, nir_version)


@dataclass(frozen=True)
class NirExport:
    """What ``export --target nir`` wrote (``to_json()`` for --json; the CLI's text is
    :func:`csqcfs_deploy.cli.nir_text.export_text`). ``fallback``: why the default flavour
    fell back to native ("" if it did not); ``readers``: the measured reader facts that
    apply to this file (:mod:`.readers`)."""

    path: Path
    flavor: str
    profile: str
    node_types: dict[str, int]
    edges: int
    value_dtype: str
    exactness: str
    verified: bool
    fallback: str = ""
    nir_version: str = CURRENT_NIR
    readers: tuple[ReaderFact, ...] = ()

    @property
    def nodes(self) -> int:
        return sum(self.node_types.values())

    def to_json(self) -> dict[str, object]:
        return {"output": str(self.path), "format": "nir", "flavor": self.flavor,
                "profile": self.profile, "nodes": self.nodes,
                "node_types": dict(self.node_types), "edges": self.edges,
                "value_dtype": self.value_dtype, "exactness": self.exactness,
                "verified_round_trip": self.verified, "flavor_fallback": self.fallback,
                "nir_version": self.nir_version,
                "readers": [fact.to_json() for fact in self.readers]}


def export_nir(graph: IFGraph, path: str | Path, flavor: str | None = None,
               nir_version: str = CURRENT_NIR) -> NirExport:
    """Write ``graph`` to ``path`` (verified by reading it back) and describe what was written.

    ``flavor`` None is the default: ``portable`` where the graph can be said portably,
    else ``native`` (``NirExport.fallback`` says why); a named portable flavour that
    cannot express the graph is a UsageError naming the layer or projection.
    """
    if not graph.is_integer:
        raise GraphError("NIR export needs a quantized (integer) graph; convert with a profile "
                         "first")
    choice = choose_flavor(graph, flavor, get_profile(str(graph.meta.profile)))
    ng = graph_to_nir(graph, choice.flavor)
    written = _write(ng, graph, path, choice.flavor, verify=True, nir_version=nir_version)
    counts = Counter(type(node).__name__ for node in ng.nodes.values())
    return NirExport(path=written, flavor=choice.flavor, profile=str(graph.meta.profile),
                     node_types=dict(counts), edges=len(ng.edges),
                     value_dtype=str(ng.metadata["value_dtype"]),
                     exactness=str(ng.metadata["exactness"]), verified=True,
                     fallback=choice.fallback, nir_version=nir_version,
                     readers=facts_for(choice.flavor, nir_version))
