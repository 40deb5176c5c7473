"""NIR -> integer IF graph: :func:`nir_to_graph` (in memory) and :func:`read_nir_graph` (a file).

A csqcfs-deploy file (either flavour) is restored exactly from its metadata; a
plain NIR graph is read with NIR's own IF semantics (see
:mod:`csqcfs_deploy.exporters.nir.semantics`). Neuron nodes (Input, IF, Output) give
their shapes and become layers through :data:`NEURON_NODES_READ` (a
:class:`KindTable` keyed by NIR node type); each
projection chain through :func:`~csqcfs_deploy.exporters.nir.projections.read_projection`.
The destination layer's bias (C,) int64 is the sum of its incoming chains' biases.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nir
import numpy as np
import numpy.typing as npt
from nir.serialization import hdf2dict

from csqcfs_deploy.convert.quantize import check_profile
from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.hdf5_probe import probed_hdf5
from csqcfs_deploy.exporters.nir.flavors import (
    portable_half,
    portable_threshold_of,
    restore_native_types,
)
from csqcfs_deploy.exporters.nir.legacy import restore_legacy_fields
from csqcfs_deploy.exporters.nir.projections import read_projection
from csqcfs_deploy.exporters.nir.semantics import (
    Semantics,
    chains,
    order,
    per_channel_threshold,
    plain_if_layer,
    plain_input_layer,
    plain_meta,
    semantics,
)
from csqcfs_deploy.exporters.nir.validate import (
    check_acyclic,
    check_node_types,
    check_raw_graph,
    int_values,
    md_array,
    md_float,
    md_int,
    md_kind,
    md_str,
    real_values,
    shape_of,
)
from csqcfs_deploy.files import require_file
from csqcfs_deploy.ir import (
    GraphMeta,
    IFGraph,
    IFLayer,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.nodes import CalibrationRecord

LayerT = InputLayer | IFLayer | ReadoutLayer


@dataclass(frozen=True)
class NeuronNode:
    """One neuron node to read: its name, the NIR node, its shape and its summed bias (C,)."""

    name: str
    node: Any
    sem: Semantics
    shape: tuple[int, ...]
    bias: npt.NDArray[Any]


@dataclass(frozen=True)
class NeuronReader:
    """How one NIR neuron node type is read: its metadata kind, its shape, the layer."""

    kind: str
    shape: Callable[[str, Any], tuple[int, ...]]
    build: Callable[[NeuronNode], LayerT]


NEURON_NODES_READ: KindTable[NeuronReader] = KindTable("the NIR reader")


def _input_shape(name: str, node: Any) -> tuple[int, ...]:
    return shape_of(name, node.input_type["input"])


def _output_shape(name: str, node: Any) -> tuple[int, ...]:
    return shape_of(name, node.output_type["output"])


def _if_shape(name: str, node: Any) -> tuple[int, ...]:
    """An IF node's shape is that of ``r``; ``v_threshold`` and ``v_reset`` must match."""
    shape = tuple(int(d) for d in np.shape(node.r))
    if not shape:
        raise GraphError(f"node {name}: an IF node needs array-valued r and v_threshold")
    if np.shape(node.v_threshold) != shape or np.shape(node.v_reset) != shape:
        raise GraphError(f"node {name}: r, v_threshold and v_reset must have the same shape")
    return shape


def _input_layer(n: NeuronNode) -> InputLayer:
    if not n.sem.ours:
        return plain_input_layer(n.name, n.shape)
    name, node = n.name, n.node
    return InputLayer(name, n.shape, scale=md_float(name, node, "scale"),
                      raw_max=md_float(name, node, "raw_max"),
                      mean=tuple(md_array(name, node, "mean", "f").tolist()),
                      std=tuple(md_array(name, node, "std", "f").tolist()),
                      bits=md_int(name, node, "bits"))


def _portable_v_th(n: NeuronNode, v_init: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``v_th`` from the metadata, checked against the stored portable threshold."""
    name, node, profile = n.name, n.node, n.sem.profile
    theta = per_channel_threshold(name, real_values(name, "v_threshold", node.v_threshold))
    v_th = md_array(name, node, "v_th", "i")
    c = n.shape[0]
    if v_th.shape == (c,) and v_init.shape == (c,) and np.any(
            theta != portable_threshold_of(v_th, v_init, profile)):
        raise InputFileError(f"node {name}: v_threshold disagrees with metadata v_th and "
                             f"v_init (the portable threshold is v_th - v_init "
                             f"{portable_half(profile):+})")
    return v_th


def _if_layer(n: NeuronNode) -> IFLayer:
    name, node, sem = n.name, n.node, n.sem
    if np.any(np.asarray(node.r) != 1):
        raise GraphError(f"node {name}: r must be 1 (csqcfs-deploy's IF neurons add their "
                         "input unscaled)")
    v_reset = int_values(name, "v_reset", node.v_reset)
    if not sem.ours:
        return plain_if_layer(name, node, n.shape, v_reset, n.bias)
    comparison = md_str(name, node, "comparison")
    if comparison != (">" if sem.profile.strict else ">="):
        raise InputFileError(f"node {name}: comparison {comparison!r} contradicts profile "
                             f"{sem.profile.name}")
    v_init = md_array(name, node, "v_init", "i")
    if sem.flavor == "native":
        v_th = per_channel_threshold(name, int_values(name, "v_threshold", node.v_threshold))
    else:
        v_th = _portable_v_th(n, v_init)
    if np.any(v_reset != 0):
        raise InputFileError(f"node {name}: v_reset must be 0 in a csqcfs-deploy file")
    return IFLayer(name, n.shape, v_th=v_th, v_init=v_init, bias=n.bias,
                   threshold_real=md_array(name, node, "threshold_real", "f"),
                   reset=md_str(name, node, "reset"))


def _readout_layer(n: NeuronNode) -> ReadoutLayer:
    scale = md_float(n.name, n.node, "scale") if n.sem.ours else 1.0
    return ReadoutLayer(n.name, n.shape, bias=n.bias, scale=scale)


NEURON_NODES_READ.add(nir.Input, NeuronReader("input", _input_shape, _input_layer))
NEURON_NODES_READ.add(nir.IF, NeuronReader("if", _if_shape, _if_layer))
NEURON_NODES_READ.add(nir.Output, NeuronReader("readout", _output_shape, _readout_layer))


def _read_layer(n: NeuronNode) -> LayerT:
    reader = NEURON_NODES_READ.lookup(n.node)
    if n.sem.ours and md_kind(n.node) != reader.kind:
        raise InputFileError(f"node {n.name}: metadata kind {md_kind(n.node)!r}, expected "
                             f"{reader.kind!r}")
    return reader.build(n)


def _meta(ng: nir.NIRGraph, sem: Semantics, layers: list[LayerT]) -> GraphMeta:
    if not sem.ours:
        readout = next(la for la in layers if isinstance(la, ReadoutLayer))
        return plain_meta(ng, readout.channels)
    return GraphMeta(levels=md_int("(graph)", ng, "levels"),
                     phi=md_float("(graph)", ng, "phi"), profile=sem.profile.name,
                     arch=md_str("(graph)", ng, "arch"),
                     num_classes=md_int("(graph)", ng, "num_classes"),
                     notes=md_str("(graph)", ng, "notes"),
                     calibration=_calibration(ng))


def _calibration(ng: nir.NIRGraph) -> CalibrationRecord | None:
    """The graph's calibration record (metadata ``calibration``: JSON, "" or absent: none)."""
    if "calibration" not in (ng.metadata or {}):
        return None
    text = md_str("(graph)", ng, "calibration")
    if not text:
        return None
    try:
        data = json.loads(text)
        return CalibrationRecord(**data)
    except (ValueError, TypeError, RecursionError, GraphError) as exc:
        raise InputFileError(f"graph metadata calibration is malformed ({exc})") from None


def nir_to_graph(ng: nir.NIRGraph) -> IFGraph:
    """The integer IF graph of a NIR graph (ours restores exactly; see the package docstring)."""
    if not isinstance(ng, nir.NIRGraph):
        raise InputFileError(f"expected a NIR graph, got a {type(ng).__name__} node")
    sem = semantics(ng)
    check_node_types(ng)
    check_acyclic(ng.nodes, list(ng.edges))
    neurons, found, _ = chains(ng, sem)
    layer_names, chain_order = order(ng, sem, neurons, found)
    shapes = {n: NEURON_NODES_READ.lookup(ng.nodes[n]).shape(n, ng.nodes[n])
              for n in layer_names}

    projections: list[ProjectionT] = []
    bias: dict[str, npt.NDArray[Any]] = {}
    for chain in chain_order:
        proj, b = read_projection(ng, sem, chain, shapes)
        projections.append(proj)
        bias[chain.dst] = bias[chain.dst] + b if chain.dst in bias else b

    layers: list[LayerT] = []
    for name in layer_names:
        zero = np.zeros(shapes[name][0], dtype=np.int64)
        layers.append(_read_layer(NeuronNode(name, ng.nodes[name], sem, shapes[name],
                                             bias.get(name, zero))))
    graph = IFGraph(layers=tuple(layers), projections=tuple(projections),
                    meta=_meta(ng, sem, layers))
    check_profile(graph)
    return graph


# --------------------------------------------------------------------------- files

#: What h5py raises on a file it cannot read (after the probe, only on a file that
#: changed in between: the probe and this read open the same pinned inode).
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError,
              IndexError, AttributeError, UnicodeError)
#: What NIR raises building nodes from values our raw checks let through.
_NIR_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError,
                     AssertionError, OverflowError, ZeroDivisionError, RecursionError)


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _raw_record(p: Path) -> dict[str, Any]:
    """The file's ``node`` group as nested dicts of arrays (as ``nir.read`` reads it),
    after the HDF5 probe (:func:`~csqcfs_deploy.exporters.hdf5_probe.probed_hdf5`)."""
    with probed_hdf5(p, "NIR") as pinned:
        try:
            with h5py.File(pinned, "r") as f:
                node = f.get("node")
                if not isinstance(node, h5py.Group):
                    raise InputFileError(f"{p} is not a readable NIR file (it has no "
                                         "'node' group)")
                record: dict[str, Any] = restore_native_types(hdf2dict(node))
        except _H5_ERRORS as exc:
            raise InputFileError(f"{p} is not a readable NIR file ({_detail(exc)})") from None
    return record


def _build_nir(p: Path, record: dict[str, Any]) -> nir.NIRGraph:
    """``nir.dict2NIRNode`` on a checked record, NIR's warnings and exceptions contained."""
    if "type_check" in record:
        raise InputFileError(f"{p} is not a readable NIR file (a 'type_check' entry)")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            ng = nir.dict2NIRNode({**record, "type_check": False})
    except _NIR_BUILD_ERRORS as exc:
        raise InputFileError(f"{p} is not a readable NIR file ({_detail(exc)})") from None
    if not isinstance(ng, nir.NIRGraph):
        raise InputFileError(f"{p}: expected a NIR graph, got a {type(ng).__name__} node")
    return ng


def read_nir_graph(path: str | Path) -> IFGraph:
    """Read a ``.nir`` file into an integer IF graph (errors name the file and the node).

    The file is probed in a child process first (a corrupt HDF5 file that would crash
    or hang libhdf5, or declares more data than :mod:`~csqcfs_deploy.exporters.hdf5_probe`
    allows, is refused), its raw content is checked (:func:`check_raw_graph`), and only
    then NIR builds its nodes and :func:`nir_to_graph` reads them.
    """
    p, ng = load_nir(path)
    with named_errors(p):
        return nir_to_graph(ng)


def is_foreign(record: dict[str, Any]) -> bool:
    """True for a raw graph record without csqcfs-deploy metadata (a plain NIR graph)."""
    md = record.get("metadata")
    return not (isinstance(md, dict) and "format" in md)


def load_nir(path: str | Path, foreign: bool = False) -> tuple[Path, nir.NIRGraph]:
    """The checked NIR graph of a file (probe, raw checks, then NIR builds the nodes);
    ``foreign``: a plain graph may hold the float import's node types too
    (:data:`~csqcfs_deploy.exporters.nir.validate.RAW_FLOAT_NODES`)."""
    p = require_file(path, "NIR file")
    record = _raw_record(p)
    with named_errors(p):
        check_raw_graph(restore_legacy_fields(record), foreign and is_foreign(record))
    return p, _build_nir(p, record)


@contextlib.contextmanager
def named_errors(p: Path) -> Iterator[None]:
    """Prefix the file name to a GraphError or InputFileError raised in the block."""
    try:
        yield
    except GraphError as exc:
        raise GraphError(f"{p}: {exc}") from None
    except InputFileError as exc:
        raise InputFileError(f"{p}: {exc}") from None
