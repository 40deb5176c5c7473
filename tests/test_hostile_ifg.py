"""Hostile ``.ifg`` files: every bad file is one ``error:`` line naming it, never a traceback.

Each bad file is made from a real saved graph (a small loihi2 conv + dense network on
the digits input, built by hand so that no training is needed) by editing its JSON
manifest or its arrays, or by writing npz members with hand-made npy headers (a
12 GiB array declared over a tiny payload). The real CLI runs on them in-process.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from csqcfs_deploy.cli.main import main
from csqcfs_deploy.cli.model_io import load_model
from csqcfs_deploy.errors import InputFileError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ReadoutLayer,
    graph_to_bytes,
    load_graph,
)
from csqcfs_deploy.ir.nodes import GraphMeta

Manifest = dict[str, Any]
Arrays = dict[str, np.ndarray]
#: An edit of a saved graph: (manifest, arrays) -> None, in place.
Edit = Callable[[Manifest, Arrays], None]
GIB = 2**30


def base_graph() -> IFGraph:
    """input (1, 8, 8) -> conv 3x3 pad 1 -> IF (4, 8, 8) -> dense -> readout (10,), loihi2."""
    rng = np.random.default_rng(0)
    return IFGraph(
        (InputLayer("input", (1, 8, 8), 1 / 16, 16.0, (0.0,), (1.0,), 8),
         IFLayer("c1", (4, 8, 8), np.full(4, 640), np.full(4, 320), np.zeros(4, np.int64),
                 np.ones(4)),
         ReadoutLayer("out", (10,), np.zeros(10, np.int64), 0.01)),
        (ConvProjection("p0", "input", "c1", 2 * rng.integers(-20, 20, (4, 1, 3, 3)),
                        padding=(1, 1)),
         DenseProjection("p1", "c1", "out", 2 * rng.integers(-20, 20, (10, 256)))),
        GraphMeta(levels=1, phi=0.5, profile="loihi2", arch="hand", num_classes=10))


def saved_parts() -> tuple[Manifest, Arrays]:
    """The manifest and arrays of the saved base graph, read back from its bytes."""
    with np.load(io.BytesIO(graph_to_bytes(base_graph()))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(arrays.pop("__manifest__").tobytes())
    return manifest, arrays


def npy_bytes(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """An npy member with a hand-written header (it may declare anything)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def write_npz(path: Path, manifest: Manifest | bytes, arrays: Arrays,
              raw_members: dict[str, bytes] | None = None) -> Path:
    """A deflated npz: the manifest (JSON, or raw bytes), the arrays, extra raw members."""
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    members = {"__manifest__": np.lib.format.header_data_from_array_1_0(
        np.frombuffer(text, np.uint8))}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__manifest__.npy", npy_bytes(members["__manifest__"], text))
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            zf.writestr(f"{key}.npy", buf.getvalue())
        for name, data in (raw_members or {}).items():
            zf.writestr(name, data)
    return path


def edited(path: Path, edit: Edit) -> Path:
    manifest, arrays = saved_parts()
    edit(manifest, arrays)
    return write_npz(path, manifest, arrays)


def fields(manifest: Manifest, where: str) -> dict[str, Any]:
    """The fields of ``meta``, ``l<i>`` (layer i) or ``p<i>`` (projection i)."""
    if where == "meta":
        node = manifest["meta"]
    else:
        node = manifest["layers" if where[0] == "l" else "projections"][int(where[1:])]
    out: dict[str, Any] = node["fields"]
    return out


def set_field(where: str, name: str, value: Any) -> Edit:
    def edit(m: Manifest, a: Arrays) -> None:
        fields(m, where)[name] = value
    return edit


def set_array(key: str, value: np.ndarray) -> Edit:
    def edit(m: Manifest, a: Arrays) -> None:
        a[key] = value
    return edit


def tup(*items: Any) -> dict[str, Any]:
    return {"__tuple__": list(items)}


def drop_field(where: str, name: str) -> Edit:
    def edit(m: Manifest, a: Arrays) -> None:
        del fields(m, where)[name]
    return edit


def set_top(key: str, value: Any) -> Edit:
    def edit(m: Manifest, a: Arrays) -> None:
        m[key] = value
    return edit


def swap_meta_for_layer(m: Manifest, a: Arrays) -> None:
    m["meta"] = m["layers"][2]


def many_nodes(m: Manifest, a: Arrays) -> None:
    m["projections"] = [m["projections"][1]] * 5000


def nested_deep(m: Manifest, a: Arrays) -> None:
    value: Any = 1
    for _ in range(40):
        value = {"__tuple__": [value]}
    fields(m, "meta")["arch"] = value


#: (id, edit, what the message must mention): each edit makes a file load_graph refuses.
MANIFEST_EDITS: list[tuple[str, Edit, str]] = [
    ("shape-string", set_field("l0", "shape", "abc"), "shape"),
    ("shape-item-string", set_field("l1", "shape", tup("4", 8, 8)), "shape"),
    ("shape-zero", set_field("l1", "shape", tup(0, 8, 8)), "shape"),
    ("shape-negative", set_field("l2", "shape", tup(-10)), "shape"),
    ("shape-huge", set_field("l1", "shape", tup(4, 100_000, 100_000)), "neurons"),
    ("shape-float", set_field("l2", "shape", tup(10.0)), "shape"),
    ("stride-string", set_field("p0", "stride", tup("1", 1)), "stride"),
    ("stride-zero", set_field("p0", "stride", tup(0, 1)), "stride"),
    ("padding-string", set_field("p0", "padding", "1"), "padding"),
    ("padding-20000", set_field("p0", "padding", tup(20000, 20000)), "padding"),
    ("padding-negative", set_field("p0", "padding", tup(-1, 1)), "padding"),
    ("groups-zero", set_field("p0", "groups", 0), "groups"),
    ("groups-string", set_field("p0", "groups", "1"), "groups"),
    ("levels-string", set_field("meta", "levels", "two"), "levels"),
    ("levels-zero", set_field("meta", "levels", 0), "levels"),
    ("phi-nan", set_field("meta", "phi", float("nan")), "phi"),
    ("std-string", set_field("l0", "std", tup("one")), "std"),
    ("std-nan", set_field("l0", "std", tup(float("nan"))), "std"),
    ("std-not-tuple", set_field("l0", "std", 1.0), "std"),
    ("scale-inf", set_field("l0", "scale", float("inf")), "scale"),
    ("readout-scale-nan", set_field("l2", "scale", float("nan")), "scale"),
    ("raw-max-string", set_field("l0", "raw_max", "16"), "raw_max"),
    ("bits-99", set_field("l0", "bits", 99), "bits"),
    ("weight-exp--200", set_field("p1", "weight_exp", -200), "weight_exp"),
    ("weight-exp-70", set_field("p1", "weight_exp", 70), "weight_exp"),
    ("weight-exp-1e20", set_field("p1", "weight_exp", 1e20), "weight_exp"),
    ("weight-exp-string", set_field("p1", "weight_exp", "1"), "weight_exp"),
    ("weight-exp-profile", set_field("p1", "weight_exp", 9), "loihi2"),
    ("name-int", set_field("p1", "name", 5), "name"),
    ("src-int", set_field("p1", "src", 7), "src"),
    ("reset-int", set_field("l1", "reset", 5), "reset"),
    ("profile-unknown", set_field("meta", "profile", "tpu"), "profile"),
    ("calibration-nan", set_field("meta", "calibration", {
        "__type__": "CalibrationRecord", "fields": {"timesteps": 1, "presim": 0, "samples": 4,
                                                    "source": "x", "fidelity": float("nan")}}),
     "fidelity"),
    ("pool-wrong-node", set_field("p1", "pool", {"__type__": "GraphMeta", "fields": {
        "levels": 1, "phi": 0.5}}), "pool"),
    ("unknown-type", set_field("meta", "calibration", {"__type__": "os.system",
                                                       "fields": {}}), "unknown node type"),
    ("unknown-field", set_field("p1", "evil", 1), "unknown fields"),
    ("missing-field", drop_field("p1", "weight"), "lacks fields"),
    ("fields-not-object", lambda m, a: m["layers"][0].update(fields=5), "fields"),
    ("array-ref-int", set_field("p1", "weight", {"__array__": 5}), "array"),
    ("array-missing", set_field("p1", "weight", {"__array__": "nope"}), "nope"),
    ("meta-is-layer", swap_meta_for_layer, "GraphMeta"),
    ("layers-not-list", set_top("layers", {"a": 1}), "layers"),
    ("too-many-nodes", many_nodes, "4096"),
    ("nested-deep", nested_deep, "nested"),
    ("version-2", set_top("version", 2), "version"),
    ("format-missing", set_top("format", None), "not an IF graph file"),
    ("v-th-nan", set_array("l1.v_th", np.array([640.0, np.nan, 640.0, 640.0])), "non-finite"),
    ("weights-complex", set_array("p1.weight", np.ones((10, 256), np.complex128)), "complex"),
    ("weights-bool", set_array("p1.weight", np.ones((10, 256), bool)), "bool"),
    ("weights-strings", set_array("p1.weight", np.full((10, 256), "w")), "U1"),
    ("weights-uint64-huge", set_array("p1.weight", np.full((10, 256), 2**63, np.uint64)),
     "int64"),
    ("weights-wrong-ndim", set_array("p1.weight", np.ones(2560, np.int64)), "dimensions"),
    ("kernel-empty", set_array("p0.weight", np.ones((4, 1, 0, 0), np.int64)), "empty"),
]


def raw_file(data: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return make


def via_edit(edit: Edit) -> Callable[[Path], Path]:
    return lambda path: edited(path, edit)


def truncated(path: Path) -> Path:
    data = graph_to_bytes(base_graph())
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_deflate(path: Path) -> Path:
    """Garbage at the start of one member's deflate stream (zlib.error when read)."""
    path.write_bytes(graph_to_bytes(base_graph()))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("p1.weight.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26:
                                                   info.header_offset + 30]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def manifest_bytes(text: bytes) -> Callable[[Path], Path]:
    return lambda path: write_npz(path, text, saved_parts()[1])


def bomb_member(header: dict[str, Any], key: str = "p1.weight",
                referenced: bool = True) -> Callable[[Path], Path]:
    """A member declaring ``header`` over a 1 KiB payload (referenced as ``key`` or not)."""
    def make(path: Path) -> Path:
        manifest, arrays = saved_parts()
        name = key if referenced else "unused.bomb"
        if referenced:
            arrays.pop(key)
        return write_npz(path, manifest, arrays, {f"{name}.npy": npy_bytes(header, b"\0" * 1024)})
    return make


def zip_of(members: dict[str, bytes]) -> Callable[[Path], Path]:
    """A zip archive of exactly these raw members."""
    def make(path: Path) -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path
    return make


BOMB_12_GIB = {"descr": "<f8", "fortran_order": False, "shape": (12 * GIB // 8,)}

#: (id, maker, what the message must mention): whole-file and member-level damage.
FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("empty", raw_file(b""), "not a .ifg graph file"),
    ("random", raw_file(np.random.default_rng(1).bytes(4096)), "not a .ifg graph file"),
    ("zip-no-manifest", zip_of({"x.npy": npy_bytes(
        {"descr": "<i8", "fortran_order": False, "shape": (1,)}, b"\0" * 8)}), "manifest"),
    ("truncated", truncated, "archive"),
    ("corrupt-deflate", corrupt_deflate, "corrupt"),
    ("manifest-not-json", manifest_bytes(b"\x00{not json"), "manifest"),
    ("manifest-not-utf8", manifest_bytes(b"\xff\xfe\xfd"), "manifest"),
    ("manifest-list", manifest_bytes(b"[1, 2, 3]"), "not an IF graph file"),
    ("manifest-100000-deep", manifest_bytes(b"[" * 100_000 + b"]" * 100_000), "manifest"),
    ("manifest-huge-int", manifest_bytes(b'{"format": ' + b"9" * 5000 + b"}"), "manifest"),
    ("bomb-12-gib-referenced", bomb_member(BOMB_12_GIB), "limit"),
    ("object-dtype", bomb_member({"descr": "|O", "fortran_order": False, "shape": (10, 256)}),
     "dtype"),
    ("complex-dtype-header", bomb_member({"descr": "<c16", "fortran_order": False,
                                          "shape": (10, 256)}), "dtype"),
    ("short-payload", bomb_member({"descr": "<i8", "fortran_order": False,
                                   "shape": (10, 256)}), "truncated"),
    ("npy-header-4gib", zip_of({"__manifest__.npy": b"\x93NUMPY\x02\x00"
                                + (2**32 - 1).to_bytes(4, "little")}), "header"),
]


ALL_CASES = [(i, via_edit(e), w) for i, e, w in MANIFEST_EDITS] + FILE_CASES


def one_error_line(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert str(path) in lines[0], err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


@pytest.mark.parametrize(("case", "make", "mention"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_ifg_is_one_error_line(case: str, make: Callable[[Path], Path], mention: str,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path / f"{case}.ifg")
    with pytest.raises(InputFileError, match=str(tmp_path)) as info:
        # an empty or random file is refused by the CLI's file-kind check, before the loader
        load_model(path) if case in ("empty", "random") else load_graph(path)
    assert mention.lower() in str(info.value).lower(), str(info.value)
    for command in (["run", str(path), "--backend", "int", "--samples", "2"],
                    ["verify", str(path), "--backends", "int", "--samples", "2"],
                    ["export", str(path), "--out", str(tmp_path / "out.nir")]):
        assert main(command) == InputFileError.exit_code
        line = one_error_line(capsys, path)
        assert mention.lower() in line.lower(), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing left behind


def test_base_file_is_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The corpus's source file, rewritten by these helpers unedited, loads and exports."""
    path = write_npz(tmp_path / "good.ifg", *saved_parts())
    assert load_graph(path).equals(base_graph())
    assert main(["export", str(path), "--out", str(tmp_path / "good.nir")]) == 0


def test_unreferenced_12_gib_member_is_never_read(tmp_path: Path) -> None:
    path = bomb_member(BOMB_12_GIB, referenced=False)(tmp_path / "bomb.ifg")
    tracemalloc.start()
    start = time.perf_counter()
    graph = load_graph(path)
    elapsed_s = time.perf_counter() - start
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert graph.equals(base_graph())
    assert elapsed_s < 5.0 and peak_bytes < 32 * 2**20, (elapsed_s, peak_bytes)


def test_referenced_bomb_is_refused_before_allocation(tmp_path: Path) -> None:
    path = bomb_member(BOMB_12_GIB)(tmp_path / "bomb.ifg")
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InputFileError, match=r"declares shape \(1610612736,\)") as info:
        load_graph(path)
    elapsed_s = time.perf_counter() - start
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "CSQCFS_IFG_MAX_ELEMENTS" in str(info.value)
    assert elapsed_s < 5.0 and peak_bytes < 32 * 2**20, (elapsed_s, peak_bytes)


def test_element_limit_is_raised_by_the_environment(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_npz(tmp_path / "good.ifg", *saved_parts())
    total = sum(math.prod(a.shape) for a in saved_parts()[1].values())
    monkeypatch.setenv("CSQCFS_IFG_MAX_ELEMENTS", str(total - 1))
    with pytest.raises(InputFileError, match="exceed the limit"):
        load_graph(path)
    monkeypatch.setenv("CSQCFS_IFG_MAX_ELEMENTS", str(total))
    assert load_graph(path).equals(base_graph())


def test_bomb_through_the_installed_cli(tmp_path: Path) -> None:
    """A subprocess running the CLI: exit 2, one line, no MemoryError."""
    path = bomb_member(BOMB_12_GIB)(tmp_path / "bomb.ifg")
    entry = "import sys; from csqcfs_deploy.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", entry, "export", str(path),
                           "--out", str(tmp_path / "x.nir")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == InputFileError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.ifg"]


def test_profile_violation_names_the_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Float weights in a loihi2 graph load as a graph but fail the profile check: exit 4."""
    path = edited(tmp_path / "float-weights.ifg",
                  set_array("p1.weight", np.full((10, 256), 0.5)))
    assert main(["run", str(path), "--backend", "int", "--samples", "2"]) == 4
    assert "not integers" in one_error_line(capsys, path)
