"""NIR 1.0.4 file layout (``export --nir-version 1.0.4``), for readers that pin ``nir <= 1.0.4``
(sinabs 3.1, rockpool 3.1).

nir 1.0.4's ``nir.read`` builds every node as ``cls(**fields)``, so a field its node
class lacks is a ``TypeError`` and the file does not load. Against nir 1.0.8 (what
:func:`~csqcfs_deploy.exporters.nir.writer.graph_to_nir` builds), nir 1.0.4 lacks
(read from its source, ``nir/ir/*.py``):

* ``IF.v_reset`` (1.0.4's IF has ``r``, ``v_threshold``, ``metadata``); our writer's
  ``v_reset`` is always 0, which is also what our reader (and nir 1.0.8's
  ``IF.from_dict``) assume when it is absent, so it is dropped (a non-zero one is
  refused);
* ``metadata`` on ``Conv2d``, ``Input`` and ``Output`` (IF, Affine, SumPool2d, Flatten
  and the graph itself keep theirs).

The node metadata that 1.0.4 cannot hold moves to the graph's metadata, under
:data:`LEGACY_FIELDS_KEY` (a group ``{node name: {"metadata": {...}}}``), which every
reader ignores; :func:`restore_legacy_fields` (called by our reader on every raw
record, a no-op for other files) moves it back, so our reader restores the IF graph
exactly from a 1.0.4 file. The file's ``version`` dataset says ``1.0.4``.

Both functions work on the raw record: ``NIRGraph.to_dict()`` on the way out, the
file's ``node`` group read with ``hdf2dict`` on the way in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.exporters.nir.readers import CURRENT_NIR

LEGACY_NIR_VERSION = "1.0.4"
#: The file layouts we write: ``nir.write``'s (the project's nir) and nir 1.0.4's.
NIR_VERSIONS: tuple[str, ...] = (CURRENT_NIR, LEGACY_NIR_VERSION)
#: Graph-metadata group holding the node fields nir 1.0.4 cannot hold.
LEGACY_FIELDS_KEY = "csqcfs_nir_1_0_4_fields"
#: Our native IF type (flavors.NATIVE_IF_TYPE) has IF's fields.
_NATIVE_IF = "CsqcfsIF"

#: The fields nir 1.0.4's node classes accept in a file (besides ``type``), for the node
#: types our writer emits (Input/Output store their type as ``shape``).
FIELDS_1_0_4: dict[str, frozenset[str]] = {
    "NIRGraph": frozenset({"nodes", "edges", "metadata"}),
    "Input": frozenset({"shape"}),
    "Output": frozenset({"shape"}),
    "IF": frozenset({"r", "v_threshold", "metadata"}),
    _NATIVE_IF: frozenset({"r", "v_threshold", "metadata"}),
    "Conv2d": frozenset({"input_shape", "weight", "stride", "padding", "dilation", "groups",
                         "bias"}),
    "Affine": frozenset({"weight", "bias", "metadata"}),
    "SumPool2d": frozenset({"kernel_size", "stride", "padding", "metadata"}),
    "Flatten": frozenset({"input_type", "start_dim", "end_dim", "metadata"}),
}


def check_nir_version(version: str) -> None:
    """UsageError unless ``version`` is a NIR file layout we write."""
    if version not in NIR_VERSIONS:
        raise UsageError(f"unknown NIR version {version!r} (known: {', '.join(NIR_VERSIONS)})")


def _strip_node(name: str, node: dict[str, Any]) -> dict[str, Any]:
    """Remove from ``node`` (in place) what nir 1.0.4 lacks; return what must be kept."""
    kind = str(node.get("type"))
    allowed = FIELDS_1_0_4.get(kind)
    if allowed is None:
        raise GraphError(f"node {name}: nir {LEGACY_NIR_VERSION} files cannot hold a {kind} node")
    kept: dict[str, Any] = {}
    for key in sorted(set(node) - allowed - {"type"}):
        value = node.pop(key)
        if key == "v_reset":
            if np.any(np.asarray(value) != 0):
                raise GraphError(f"node {name}: nir {LEGACY_NIR_VERSION} has no IF v_reset, "
                                 "and this one is not 0")
        elif key == "metadata":
            if value:
                kept["metadata"] = value
        else:
            raise GraphError(f"node {name}: nir {LEGACY_NIR_VERSION} has no {kind}.{key}")
    return kept


def legacy_record(record: dict[str, Any]) -> dict[str, Any]:
    """``NIRGraph.to_dict()`` (nir 1.0.8) laid out for nir 1.0.4 (see the module docstring).

    Works in place; the graph's metadata gains :data:`LEGACY_FIELDS_KEY` when a node's
    metadata had to move. GraphError for a node or field 1.0.4 cannot say.
    """
    kept = {name: k for name, node in record["nodes"].items()
            if (k := _strip_node(name, node))}
    extra = set(record) - FIELDS_1_0_4["NIRGraph"] - {"type"}
    if extra:
        raise GraphError(f"nir {LEGACY_NIR_VERSION} graphs cannot hold {sorted(extra)}")
    if kept:
        md = record.setdefault("metadata", {})
        if LEGACY_FIELDS_KEY in md:
            raise GraphError(f"graph metadata already has {LEGACY_FIELDS_KEY!r}")
        md[LEGACY_FIELDS_KEY] = kept
    return record


def legacy_record_for(nir_version: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` laid out for ``nir_version`` (checked): :func:`legacy_record` for 1.0.4."""
    check_nir_version(nir_version)
    return legacy_record(record) if nir_version == LEGACY_NIR_VERSION else record


def restore_legacy_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A file's raw ``node`` record with the node metadata that :func:`legacy_record`
    moved to the graph's metadata put back (in place; unchanged without
    :data:`LEGACY_FIELDS_KEY`). InputFileError for a malformed or conflicting entry,
    naming the node."""
    md = record.get("metadata") if isinstance(record, dict) else None
    if not isinstance(md, dict) or LEGACY_FIELDS_KEY not in md:
        return record
    kept = md.pop(LEGACY_FIELDS_KEY)
    nodes = record.get("nodes")
    if not isinstance(kept, dict) or not isinstance(nodes, dict):
        raise InputFileError(f"graph metadata {LEGACY_FIELDS_KEY} is not a group of nodes")
    for name, fields in kept.items():
        node = nodes.get(name)
        if not isinstance(node, dict):
            raise InputFileError(f"graph metadata {LEGACY_FIELDS_KEY} names node {name!r}, "
                                 "which the graph does not have")
        if not isinstance(fields, dict) or set(fields) != {"metadata"} \
                or not isinstance(fields["metadata"], dict):
            raise InputFileError(f"graph metadata {LEGACY_FIELDS_KEY}/{name} must hold "
                                 "exactly a metadata group")
        if "metadata" in node:
            raise InputFileError(f"node {name} has metadata both in the node and in graph "
                                 f"metadata {LEGACY_FIELDS_KEY}")
        node["metadata"] = fields["metadata"]
    return record
