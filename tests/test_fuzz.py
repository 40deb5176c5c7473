"""Mutation fuzzing of the loaders: whatever the bytes of an ``.ifg``, ``.nir`` or netx
file, loading it either works or raises the tool's own error (issue 13).

Hypothesis mutates the bytes of real files (bit flips, truncation, insertions,
overwrites, biased towards the first 4 KiB where the zip and HDF5 structures
are) and the ``.ifg`` manifest and arrays (values replaced by hostile ones, keys
deleted). Each mutant is loaded in a forked child (:class:`ForkServer`: a corrupt
HDF5 file may crash libhdf5), by ``load_model`` (what every command uses) and,
for netx files, ``read_netx_plan``. A failure is anything but exit 0 or a
CsqcfsError: another exception (exit 70, with its traceback), a signal, a hang.

The default run tries a fixed, seeded number of mutants per kind (about 15 s);
the slow one fuzzes for ``CSQCFS_FUZZ_SECONDS`` (default 600) in all.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from csqcfs_deploy.convert.fold import FoldResult
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.ir import IFGraph, save_graph

from .hostile import mutate as mu
from .hostile.runner import ForkServer, Outcome

LOADERS = {"ifg": ("model",), "nir": ("model",), "netx": ("netx", "model")}
OTHER_EXCEPTION_EXIT = 70
#: the first bytes, where zip headers and the HDF5 superblock / root group live
HEAD_BYTES = 4096
#: mutants per kind in the default run (a .nir or netx load probes the file in a child
#: interpreter first, which takes about 0.5 s; an .ifg load about 0.05 s)
QUICK_EXAMPLES = {"ifg": 15, "nir": 6, "netx": 4, "manifest": 15}
#: a mutant that hangs libhdf5 is stopped by the probe after 20 s
LOAD_TIMEOUT_S = 90.0
FUZZ_SECONDS_ENV = "CSQCFS_FUZZ_SECONDS"
#: mutants per fuzzer and round in the slow run (short rounds: the time limit holds)
ROUND = 10


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory, digits_graphs: dict[str, IFGraph],
               digits_fold: FoldResult) -> dict[str, Path]:
    from csqcfs_deploy.exporters.netx import write_netx
    from csqcfs_deploy.exporters.nir import write_nir_graph

    root = tmp_path_factory.mktemp("fuzz-real")
    graph = digits_graphs["loihi2"]
    per_layer = quantize(digits_fold.graph, "loihi2", per_channel=False)[0]
    return {"ifg": save_graph(graph, root / "real.ifg"),
            "nir": write_nir_graph(graph, root / "real.nir"),
            "netx": write_netx(per_layer, root / "real.netx").path}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("fuzz-server") / "log.txt") as fs:
        yield fs


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-mutants")


def escaped(outcome: Outcome) -> str | None:
    """What went wrong when a mutant was loaded (None: loaded, or the tool's own error)."""
    if outcome.timed_out:
        return f"hang after {outcome.seconds:.0f} s"
    if outcome.returncode < 0:
        return f"crash: signal {-outcome.returncode}"
    if outcome.returncode == OTHER_EXCEPTION_EXIT or "Traceback" in outcome.stderr:
        return "exception escaped: " + outcome.stderr.strip().splitlines()[-1][:300]
    if outcome.returncode != 0 and not outcome.stderr.startswith("error: "):
        return f"exit {outcome.returncode} without an error line: {outcome.stderr[-300:]}"
    return None


def check_mutant(server: ForkServer, path: Path, data: bytes, loaders: tuple[str, ...]
                 ) -> None:
    path.write_bytes(data)
    for loader in loaders:
        problem = escaped(server.load(loader, path, timeout_s=LOAD_TIMEOUT_S))
        assert problem is None, f"{loader} on a mutant of {path.suffix}: {problem}"


# --------------------------------------------------------------------------- strategies

ByteOp = tuple[str, float, int, bool]
byte_ops = st.lists(st.tuples(st.sampled_from(("flip", "truncate", "insert", "overwrite")),
                              st.floats(0, 1), st.integers(0, 255), st.booleans()),
                    min_size=1, max_size=4)


def apply_byte_ops(data: bytes, ops: list[ByteOp]) -> bytes:
    """Apply (operation, where in 0..1, byte value, in the head) to ``data``."""
    for op, where, value, in_head in ops:
        if not data:
            break
        span = min(len(data), HEAD_BYTES) if in_head else len(data)
        pos = min(int(where * span), len(data) - 1)
        if op == "flip":
            data = mu.flip_bits(data, [pos * 8 + value % 8])
        elif op == "truncate":
            data = data[:pos]
        elif op == "insert":
            data = data[:pos] + bytes([value]) * (1 + value % 7) + data[pos:]
        else:
            data = data[:pos] + bytes([value]) + data[pos + 1:]
    return data


hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
    st.text(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
    st.sampled_from([{"__array__": "p0.weight"}, {"__array__": "nope"}, {"__tuple__": [0]},
                     {"__tuple__": "x"}, {"__type__": "IFLayer", "fields": {}}, {}, []]))


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position (dict key / list index path) in a JSON value."""
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    items: Any = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, child in items:
        found += json_paths(child, (*prefix, key))
    return found


def edit_json(manifest: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    """Set (or delete) ``manifest`` at ``path``; a path a previous edit removed is skipped."""
    parent = manifest
    for key in path[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return
    if not isinstance(parent, (dict, list)):
        return
    try:
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return


ARRAY_CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "complex": lambda a: a.astype(np.complex128),
    "nan": lambda a: np.full(a.shape, np.nan),
    "huge": lambda a: np.full(a.shape, 2**62, dtype=np.int64),
    "strings": lambda a: a.astype("<U2"),
    "bool": lambda a: a.astype(bool),
    "flat": lambda a: a.reshape(-1),
    "empty": lambda a: a.reshape(-1)[:0],
    "extra-dim": lambda a: a[None],
}


def manifest_mutant(real: bytes, edits: list[tuple[int, bool, Any]],
                    arrays_changed: list[tuple[int, str]]) -> bytes:
    """``real`` (an .ifg) with manifest values replaced or deleted and arrays changed."""
    with np.load(io.BytesIO(real), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(arrays.pop("__manifest__").tobytes().decode())
    paths = json_paths(manifest)
    for index, delete, value in edits:
        edit_json(manifest, paths[index % len(paths)], value, delete)
    names = sorted(arrays)
    for index, change in arrays_changed:
        name = names[index % len(names)]
        arrays[name] = ARRAY_CHANGES[change](arrays[name])
    return mu.ifg_bytes(manifest, arrays)


manifest_edits = st.lists(st.tuples(st.integers(0, 10_000), st.booleans(), hostile_values),
                          min_size=1, max_size=3)
array_edits = st.lists(st.tuples(st.integers(0, 100), st.sampled_from(sorted(ARRAY_CHANGES))),
                       max_size=2)


# --------------------------------------------------------------------------- the fuzzers


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck))


def fuzz_bytes(server: ForkServer, real: Path, scratch: Path, examples: int,
               seed_value: int) -> int:
    """Load up to ``examples`` byte mutants of ``real``; returns how many were tried."""
    data = real.read_bytes()
    target = scratch / f"mutant{real.suffix}"
    loaders = LOADERS[real.suffix.lstrip(".")]
    tried = 0

    @seed(seed_value)
    @fuzz_settings(examples)
    @given(byte_ops)
    def one(ops: list[ByteOp]) -> None:
        nonlocal tried
        tried += 1
        check_mutant(server, target, apply_byte_ops(data, ops), loaders)

    one()
    return tried


def fuzz_manifest(server: ForkServer, real: Path, scratch: Path, examples: int,
                  seed_value: int) -> int:
    """Load up to ``examples`` manifest / array mutants of ``real`` (an .ifg)."""
    data = real.read_bytes()
    target = scratch / "manifest-mutant.ifg"
    tried = 0

    @seed(seed_value)
    @fuzz_settings(examples)
    @given(manifest_edits, array_edits)
    def one(edits: list[tuple[int, bool, Any]], changes: list[tuple[int, str]]) -> None:
        nonlocal tried
        tried += 1
        check_mutant(server, target, manifest_mutant(data, edits, changes), LOADERS["ifg"])

    one()
    return tried


@pytest.mark.parametrize("kind", ["ifg", "nir", "netx"])
def test_byte_mutants_load_or_raise_our_error(kind: str, real_files: dict[str, Path],
                                              server: ForkServer, scratch: Path) -> None:
    tried = fuzz_bytes(server, real_files[kind], scratch, QUICK_EXAMPLES[kind], seed_value=13)
    assert tried >= QUICK_EXAMPLES[kind] // 2


def test_manifest_mutants_load_or_raise_our_error(real_files: dict[str, Path],
                                                  server: ForkServer, scratch: Path) -> None:
    tried = fuzz_manifest(server, real_files["ifg"], scratch, QUICK_EXAMPLES["manifest"],
                          seed_value=13)
    assert tried >= QUICK_EXAMPLES["manifest"] // 2


@pytest.mark.slow
def test_fuzz_for_a_while(real_files: dict[str, Path], server: ForkServer,
                          scratch: Path) -> None:
    """Rounds of :data:`ROUND` mutants per fuzzer, new seeds each round, until the time is up."""
    budget_s = float(os.environ.get(FUZZ_SECONDS_ENV, "600"))
    deadline = time.monotonic() + budget_s
    rounds = tried = 0
    while time.monotonic() < deadline:
        for kind in ("ifg", "nir", "netx"):
            tried += fuzz_bytes(server, real_files[kind], scratch, ROUND, seed_value=1000 + rounds)
        tried += fuzz_manifest(server, real_files["ifg"], scratch, ROUND, seed_value=1000 + rounds)
        rounds += 1
    print(f"\nfuzz: {rounds} rounds, {tried} mutants loaded, none escaped, in "
          f"{budget_s:.0f} s")
