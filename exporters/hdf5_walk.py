"""The child side of the HDF5 probe: open one file, walk every object, read every dataset.

:mod:`csqcfs_deploy.exporters.hdf5_probe` runs this file as a script in a short-lived
child process (``python -I hdf5_walk.py FILE LIMITS_JSON``), so that a corrupt file
that crashes or hangs libhdf5 takes down only the child. It imports only the standard
library, numpy and h5py (not the project), and walks the file the way the readers do
(NIR's ``nir.read``, lava-dl's netx): group by group through every link, then every
attribute and every dataset in full. Before anything is read it checks the sizes each
object declares (shape x item size) against the limits it is given, so a compressed
"bomb" is refused before it is expanded. Soft and external links are refused (our files
have none, and a reader following them would leave the file or loop).

It prints one JSON line on stdout and exits 0: ``{"ok": true, "objects": ..,
"datasets": .., "declared_bytes": ..}`` or ``{"ok": false, "kind": "open" | "corrupt" |
"limit", "error": "..."}``. A crash shows as the child dying by a signal.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

#: Bytes read from a dataset per HDF5 call, so the child holds one slice at a time.
READ_SLICE_BYTES = 64 * 2**20
#: Address space the child may use beyond what it has after its imports: one dataset
#: at the limit plus this slack (decompression buffers, the chunk cache).
MEMORY_SLACK_BYTES = 2**30


class Refusal(Exception):
    """The file breaks a limit or uses a feature the readers do not allow."""


class Corrupt(Exception):
    """The file's structure is broken in a way h5py reports without an exception."""


@dataclass
class Walk:
    """What the walk has seen so far, checked against the limits as it grows."""

    limits: dict[str, Any]
    objects: int = 0
    datasets: int = 0
    declared_bytes: int = 0

    def count_object(self, name: str, depth: int) -> None:
        self.objects += 1
        if self.objects > self.limits["objects"]:
            raise Refusal(f"more than {self.limits['objects']} HDF5 objects (the limit)")
        if depth > self.limits["depth"]:
            raise Refusal(f"{name} is nested deeper than {self.limits['depth']} groups")

    def declare(self, what: str, shape: tuple[int, ...] | None, dtype: np.dtype[Any]) -> int:
        """Charge ``shape`` x item size to the budget (Python ints: no overflow)."""
        count = 0 if shape is None else math.prod(int(d) for d in shape)
        size = count * int(dtype.itemsize)
        limit = self.limits["dataset_bytes"]
        if size > limit:
            raise Refusal(f"{what} declares {_gib(size)} (shape {shape} x {dtype.itemsize}-byte "
                          f"items), over the limit of {_gib(limit)} per dataset")
        self.declared_bytes += size
        if self.declared_bytes > self.limits["total_bytes"]:
            raise Refusal(f"the file declares more than {_gib(self.limits['total_bytes'])} of "
                          f"data in all (the limit; reached at {what})")
        return size


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"


def _check_chunks(walk: Walk, ds: h5py.Dataset) -> None:
    """A chunk is decompressed whole: refuse chunks beyond the chunk limit."""
    if ds.chunks is None:
        return
    size = math.prod(int(d) for d in ds.chunks) * int(ds.dtype.itemsize)
    if size > walk.limits["chunk_bytes"]:
        raise Refusal(f"dataset {ds.name} has chunks of {_gib(size)}, over the limit of "
                      f"{_gib(walk.limits['chunk_bytes'])} per chunk")


def _read_dataset(ds: h5py.Dataset, size: int) -> None:
    """Read every element (one slice of the first axis at a time)."""
    shape = ds.shape
    if shape is None or size == 0:
        return
    if len(shape) == 0 or size <= READ_SLICE_BYTES:
        ds[()]
        return
    rows = max(1, READ_SLICE_BYTES // max(1, size // max(1, shape[0])))
    for start in range(0, shape[0], rows):
        ds[start:start + rows]


def _attributes(walk: Walk, obj: Any) -> None:
    for key in list(obj.attrs.keys()):
        aid = obj.attrs.get_id(key)
        walk.declare(f"attribute {key!r} of {obj.name}", aid.shape, aid.dtype)
        obj.attrs[key]


def _visit(walk: Walk, obj: Any, depth: int) -> None:
    walk.count_object(obj.name, depth)
    _attributes(walk, obj)
    if isinstance(obj, h5py.Dataset):
        walk.datasets += 1
        size = walk.declare(f"dataset {obj.name}", obj.shape, obj.dtype)
        _check_chunks(walk, obj)
        _read_dataset(obj, size)
        return
    if not isinstance(obj, h5py.Group):
        return
    for key in list(obj.keys()):
        link = obj.get(key, getlink=True)
        if link is None:
            raise Corrupt(f"the link {obj.name.rstrip('/')}/{key} cannot be resolved")
        if not isinstance(link, h5py.HardLink):
            raise Refusal(f"{obj.name.rstrip('/')}/{key} is a {type(link).__name__} (only "
                          "hard links are allowed)")
        _visit(walk, obj[key], depth + 1)


def _limit_memory(extra_bytes: int) -> None:
    """Cap the child's address space (Linux; elsewhere the limits above must do)."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            now = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return
    cap = now + extra_bytes
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def walk_file(path: str, limits: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of one file (see the module docstring)."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError, RuntimeError) as exc:
        return {"ok": False, "kind": "open", "error": _text(exc)}
    walk = Walk(limits)
    try:
        with f:
            _visit(walk, f, 0)
    except Refusal as exc:
        return {"ok": False, "kind": "limit", "error": str(exc)}
    except MemoryError:
        return {"ok": False, "kind": "limit", "error": "reading it needs more memory than "
                "the probe allows"}
    except (Corrupt, OSError, ValueError, RuntimeError, KeyError, TypeError, OverflowError,
            IndexError, AttributeError, UnicodeError, RecursionError) as exc:
        return {"ok": False, "kind": "corrupt", "error": _text(exc)}
    return {"ok": True, "objects": walk.objects, "datasets": walk.datasets,
            "declared_bytes": walk.declared_bytes}


def _text(exc: BaseException) -> str:
    """The exception's message on one line (a KeyError's without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())[:300] or type(exc).__name__


def main(argv: list[str]) -> int:
    """``hdf5_walk.py FILE LIMITS_JSON``: print the report of FILE."""
    path, limits = argv[1], json.loads(argv[2])
    signal.alarm(int(limits["timeout_s"]) + 5)  # no orphan outlives a killed parent long
    _limit_memory(int(limits["dataset_bytes"]) + MEMORY_SLACK_BYTES)
    report = walk_file(path, limits)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
