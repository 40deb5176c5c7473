"""The ``.ifg`` file: an npz archive with a JSON manifest and the arrays.

One registry (:data:`~csqcfs_deploy.ir.nodes.NODE_TYPES`) drives both
:func:`save_graph` and :func:`load_graph`; files are written atomically.

A ``.ifg`` may come from anyone, so :func:`load_graph` reads it defensively: every
problem (not a zip archive, a corrupt deflate stream, a malformed manifest, a refused
array, a node that fails its own validation) is one
:class:`~csqcfs_deploy.errors.InputFileError` naming the file. Limits, all checked
before the data they guard is read or allocated:

* the manifest (member ``__manifest__.npy``, UTF-8 JSON) is at most
  :data:`MAX_MANIFEST_BYTES` (16 MiB), entries nest at most :data:`MAX_MANIFEST_DEPTH`
  (32) levels, and it lists at most :data:`~csqcfs_deploy.ir.graph.MAX_NODES` (4096)
  layers and projections;
* arrays are read lazily (:mod:`.npz`): only the members the manifest references, each
  once; a member's npy header is read and checked first (integer and float dtypes
  only, at most 8 dimensions), and the declared element counts of all referenced
  arrays together must stay within :data:`DEFAULT_MAX_ELEMENTS` (2**29, 4 GiB as the
  int64/float64 the nodes hold). A graph that needs more can raise it with the
  environment variable :data:`MAX_ELEMENTS_ENV` (``CSQCFS_IFG_MAX_ELEMENTS``).
  Members the manifest does not reference are never read, whatever they declare;
* each node validates its fields' types and ranges (:mod:`.fields`: neurons per layer
  and per graph, kernel, stride and padding sizes, ``|weight_exp|``, levels, finite
  floats), and the graph its structure and each ``weight_exp`` against the profile.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.ir.graph import MAX_NODES, IFGraph
from csqcfs_deploy.ir.nodes import NODE_TYPES, Array, Node
from csqcfs_deploy.ir.npz import ARCHIVE_ERRORS, NpzMembers

IFG_FORMAT = "csqcfs-ifg"
IFG_VERSION = 1
MANIFEST = "__manifest__"
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MANIFEST_DEPTH = 32
DEFAULT_MAX_ELEMENTS = 2**29
MAX_ELEMENTS_ENV = "CSQCFS_IFG_MAX_ELEMENTS"


# --------------------------------------------------------------------------- writing


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


def save_graph(graph: IFGraph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` atomically (a failure leaves no file)."""
    data = graph_to_bytes(graph)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write_atomic(path, write)



# --------------------------------------------------------------------------- reading


def max_elements() -> int:
    """The element budget of one graph's arrays: :data:`MAX_ELEMENTS_ENV` or the default."""
    text = os.environ.get(MAX_ELEMENTS_ENV)
    if text is None:
        return DEFAULT_MAX_ELEMENTS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{MAX_ELEMENTS_ENV} must be a positive integer, got {text!r}")
    return value


class _ManifestReader:
    """Turns a parsed manifest back into nodes, reading each referenced array on demand."""

    def __init__(self, members: NpzMembers, source: str) -> None:
        self.members = members
        self.source = source

    def fail(self, text: str) -> InputFileError:
        return InputFileError(f"{self.source}: malformed IF graph manifest: {text}")

    def decode(self, value: Any, depth: int) -> Any:
        """The field value a manifest entry stands for (arrays, tuples, nodes, scalars)."""
        if depth > MAX_MANIFEST_DEPTH:
            raise self.fail(f"entries nested deeper than {MAX_MANIFEST_DEPTH} levels")
        if isinstance(value, list):
            return [self.decode(v, depth + 1) for v in value]
        if not isinstance(value, dict):
            return value
        if "__array__" in value:
            key = value["__array__"]
            if not isinstance(key, str) or key == MANIFEST:
                raise self.fail(f"array reference {key!r:.80} is not an array name")
            return self.members.read(key)
        if "__tuple__" in value:
            items = value["__tuple__"]
            if not isinstance(items, list):
                raise self.fail(f"tuple entry holds {type(items).__name__}, not a list")
            return tuple(self.decode(v, depth + 1) for v in items)
        if "__type__" in value:
            return self.node(value, depth)
        raise self.fail(f"entry {value!r:.80} is not an array, tuple or node")

    def node(self, value: dict[str, Any], depth: int) -> Any:
        """The node an entry ``{"__type__": name, "fields": {...}}`` describes (validated)."""
        type_name = value["__type__"]
        cls = NODE_TYPES.get(type_name) if isinstance(type_name, str) else None
        if cls is None:
            raise self.fail(f"unknown node type {type_name!r:.80}")
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise self.fail(f"{type_name} node has no fields object")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(str(k) for k in fields if k not in known or k.startswith("_"))
        if unknown:
            raise self.fail(f"{type_name} node has unknown fields {', '.join(unknown)[:120]}")
        missing = sorted(name for name, f in known.items() if name not in fields
                         and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise self.fail(f"{type_name} node lacks fields {', '.join(missing)}")
        kwargs = {k: self.decode(v, depth + 1) for k, v in fields.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise self.fail(f"{type_name} node: {str(exc)[:160]}") from None

    def graph(self, manifest: Any) -> IFGraph:
        """The graph of a parsed manifest (format marker and version checked first)."""
        if not isinstance(manifest, dict) or manifest.get("format") != IFG_FORMAT:
            raise InputFileError(f"{self.source} is not an IF graph file "
                                 "(format marker missing)")
        version = manifest.get("version")
        if version != IFG_VERSION or isinstance(version, bool):
            raise InputFileError(f"{self.source}: IF graph format version {version!r:.40} "
                                 f"is not supported (this tool reads version {IFG_VERSION})")
        layers, projections = self.entries(manifest, "layers"), self.entries(manifest,
                                                                               "projections")
        if len(layers) + len(projections) > MAX_NODES:
            raise self.fail(f"more than {MAX_NODES} layers and projections")
        meta = manifest.get("meta")
        if not isinstance(meta, dict):
            raise self.fail("'meta' is not a node")
        return IFGraph(layers=tuple(self.decode(v, 1) for v in layers),
                       projections=tuple(self.decode(v, 1) for v in projections),
                       meta=self.decode(meta, 1))

    def entries(self, manifest: dict[str, Any], key: str) -> list[Any]:
        """The list ``manifest[key]`` (the layer or projection entries)."""
        value = manifest.get(key)
        if not isinstance(value, list):
            raise self.fail(f"{key!r} is not a list")
        return value


def _read_manifest(archive: zipfile.ZipFile, source: str) -> Any:
    """The parsed JSON manifest (at most :data:`MAX_MANIFEST_BYTES` of UTF-8)."""
    members = NpzMembers(archive, source, MAX_MANIFEST_BYTES, " (the manifest's size limit)")
    if not members.has(MANIFEST):
        raise InputFileError(f"{source} is not an IF graph file (no manifest)")
    raw = members.read(MANIFEST, np.dtype(np.uint8))
    try:
        return json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputFileError(f"{source}: corrupt IF graph manifest "
                             f"({type(exc).__name__}: {str(exc)[:120]})") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise InputFileError(f"{source}: corrupt IF graph manifest ({str(exc)[:120]})") from None


def _read_archive(file: str | IO[bytes], source: str) -> IFGraph:
    """The graph of an ``.ifg`` archive; every failure an InputFileError naming ``source``."""
    budget = max_elements()
    try:
        archive = zipfile.ZipFile(file)
    except ARCHIVE_ERRORS as exc:
        raise InputFileError(f"{source} is not an IF graph file (not a readable zip archive: "
                             f"{type(exc).__name__}: {str(exc)[:120]})") from None
    try:
        with archive:
            manifest = _read_manifest(archive, source)
            members = NpzMembers(archive, source, budget,
                                 f"; set {MAX_ELEMENTS_ENV} to raise it")
            return _ManifestReader(members, source).graph(manifest)
    except GraphError as exc:
        raise InputFileError(f"{source}: invalid IF graph: {exc}") from None
    except ARCHIVE_ERRORS as exc:
        raise InputFileError(f"{source} is a corrupt or truncated IF graph file "
                             f"({type(exc).__name__}: {str(exc)[:160]})") from None


def graph_from_bytes(data: bytes, source: str = "<bytes>") -> IFGraph:
    """The graph of the bytes of an ``.ifg`` file (see the module docstring's limits)."""
    return _read_archive(io.BytesIO(data), source)


def load_graph(path: str | Path) -> IFGraph:
    """Read a graph written by :func:`save_graph`; validation runs on construction.

    Every problem of the file (not an archive, corrupt, a bad manifest, an array
    refused, a node that fails validation) is an InputFileError naming it.
    """
    p = require_file(path, "IF graph file")
    return _read_archive(str(p), str(p))
