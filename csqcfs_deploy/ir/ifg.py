"""The ``.ifg`` file: an npz archive with a JSON manifest and the arrays.

One registry (:data:`~csqcfs_deploy.ir.nodes.NODE_TYPES`) drives both
:func:`save_graph` and :func:`load_graph`; files are written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.ir.graph import IFGraph
from csqcfs_deploy.ir.nodes import NODE_TYPES, Array, Node

IFG_FORMAT = "csqcfs-ifg"
IFG_VERSION = 1


# --------------------------------------------------------------------------- save / load


def _encode(value: Any, arrays: dict[str, Array], prefix: str) -> Any:
    """JSON-able description of a field value; arrays go to ``arrays``."""
    if isinstance(value, np.ndarray):
        arrays[prefix] = value
        return {"__array__": prefix}
    if isinstance(value, Node) and dataclasses.is_dataclass(value):
        return _encode_node(value, arrays, prefix)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise GraphError(f"cannot serialise field {prefix} of type {type(value).__name__}")


def _encode_node(node: Node, arrays: dict[str, Array], prefix: str) -> dict[str, Any]:
    type_name = type(node).__name__
    if NODE_TYPES.get(type_name) is not type(node):
        raise GraphError(f"node type {type_name} is not registered")
    fields = {
        f.name: _encode(getattr(node, f.name), arrays, f"{prefix}.{f.name}")
        for f in dataclasses.fields(node)  # type: ignore[arg-type]
        if not f.name.startswith("_")
    }
    return {"__type__": type_name, "fields": fields}


def _decode(value: Any, arrays: dict[str, Array]) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            key = value["__array__"]
            if key not in arrays:
                raise InputFileError(f"IF graph file lacks array {key!r}")
            return arrays[key]
        if "__tuple__" in value:
            return tuple(_decode(v, arrays) for v in value["__tuple__"])
        if "__type__" in value:
            cls = NODE_TYPES.get(value["__type__"])
            if cls is None:
                raise InputFileError(f"IF graph file has unknown node type {value['__type__']!r}")
            fields = {k: _decode(v, arrays) for k, v in value["fields"].items()}
            return cls(**fields)
        raise InputFileError(f"IF graph file has a malformed entry {value!r}")
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def graph_to_bytes(graph: IFGraph) -> bytes:
    """The single-file format: an .npz archive with a JSON manifest and the arrays."""
    arrays: dict[str, Array] = {}
    manifest = {
        "format": IFG_FORMAT,
        "version": IFG_VERSION,
        "meta": _encode_node(graph.meta, arrays, "meta"),
        "layers": [_encode_node(la, arrays, f"l{i}") for i, la in enumerate(graph.layers)],
        "projections": [
            _encode_node(p, arrays, f"p{i}") for i, p in enumerate(graph.projections)
        ],
    }
    text = json.dumps(manifest, sort_keys=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, __manifest__=np.frombuffer(text.encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def graph_from_bytes(data: bytes, source: str = "<bytes>") -> IFGraph:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise InputFileError(f"{source} is not an IF graph file ({exc})") from None
    if "__manifest__" not in arrays:
        raise InputFileError(f"{source} is not an IF graph file (no manifest)")
    try:
        manifest = json.loads(arrays.pop("__manifest__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{source}: corrupt IF graph manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != IFG_FORMAT:
        raise InputFileError(f"{source} is not an IF graph file (format marker missing)")
    if manifest.get("version") != IFG_VERSION:
        raise InputFileError(f"{source}: IF graph format version {manifest.get('version')!r} "
                             f"is not supported (this tool reads version {IFG_VERSION})")
    try:
        meta = _decode(manifest["meta"], arrays)
        layers = tuple(_decode(v, arrays) for v in manifest["layers"])
        projections = tuple(_decode(v, arrays) for v in manifest["projections"])
    except (KeyError, TypeError) as exc:
        raise InputFileError(f"{source}: malformed IF graph manifest ({exc})") from None
    return IFGraph(layers=layers, projections=projections, meta=meta)


def save_graph(graph: IFGraph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` atomically (a failure leaves no file)."""
    data = graph_to_bytes(graph)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write_atomic(path, write)


def load_graph(path: str | Path) -> IFGraph:
    """Read a graph written by :func:`save_graph`; validation runs on construction."""
    p = require_file(path, "IF graph file")
    try:
        return graph_from_bytes(p.read_bytes(), str(p))
    except GraphError as exc:
        raise InputFileError(f"{p}: invalid IF graph: {exc}") from None
