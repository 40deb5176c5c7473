"""The bad-input corpus: hostile files made from real ones, and the commands that read them.

:func:`make_base_files` writes the real files (a trained digits-cnn checkpoint,
its ``.ifg``, ``.nir`` and netx exports, own data, an energy file, a CIFAR-10
folder); :func:`build_corpus` writes every hostile variant next to them and
returns one :class:`Case` per input, with every command that reads it
(``runs``) and the one the default test runs (``quick``). Every path in a
command is relative to the corpus folder, where the commands run.

Categories: ``generic`` (empty, random, truncated, bit-flipped files of each
kind), ``kind`` (a file of the wrong kind or extension), ``ifg`` (manifest and
array corruptions), ``nir`` (HDF5 corruptions), ``checkpoint`` (configs, state
dicts, pickled code) here; ``data``, ``cifar``, ``energy``, ``output``,
``option`` and ``target`` in :mod:`tests.hostile.corpus_inputs`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.hostile import mutate as mu
from tests.hostile.cases import BaseFiles, Case, CorpusBuilder, model_runs

__all__ = ["BaseFiles", "Case", "build_corpus", "make_base_files"]

#: the file a pickled payload would create (``touch``)
MARKER = "PAYLOAD-RAN"
#: an unreferenced member of 12 GiB in a 12 MB .ifg
BOMB_BYTES = 12 << 30


# --------------------------------------------------------------------------- base files


def _digits_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, size=(n, 1, 8, 8)).astype(np.float32),
            rng.integers(0, 10, size=n).astype(np.int64))


def write_cifar(folder: Path, per_batch: int = 4, seed: int = 0,
                edit: Callable[[str, dict[bytes, Any]], Any] | None = None) -> Path:
    """A tiny ``cifar-10-batches-py`` folder (``per_batch`` images per batch);
    ``edit(batch_name, batch)`` may change each batch dict before it is pickled."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch: dict[bytes, Any] = {
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)]}
        if edit is not None:
            edit(name, batch)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def make_base_files(root: Path, checkpoint: Path, write_ifg: Callable[[Path], object],
                    write_nir: Callable[[Path], object],
                    write_netx: Callable[[Path], object]) -> BaseFiles:
    """Copy the checkpoint into ``root`` and write the other real files there."""
    root.mkdir(parents=True, exist_ok=True)
    base = BaseFiles(root)
    shutil.copyfile(checkpoint, base.path(base.checkpoint))
    write_ifg(base.path(base.ifg))
    write_nir(base.path(base.nir))
    write_netx(base.path(base.netx))
    x, y = _digits_data(16, seed=1)
    np.savez(base.path(base.data), x=x, y=y)
    base.path(base.energy).write_text(json.dumps(
        {"name": "mine", "source": "a test", "sop_pj": 1.0}))
    write_cifar(base.path(base.cifar) / "cifar-10-batches-py")
    return base


# --------------------------------------------------------------------------- generic, kind


def _manifest_data_range(path: Path) -> tuple[int, int]:
    """Byte range of the manifest member's compressed data in an .ifg."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("__manifest__.npy")
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + i:info.header_offset + i + 2],
                                          "little") for i in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def add_generic(c: CorpusBuilder) -> None:
    """Empty, random, truncated and bit-flipped files of each kind."""
    b = c.base
    good = {kind: c.root.joinpath(name).read_bytes() for kind, name in
            (("ifg", b.ifg), ("nir", b.nir), ("pt", b.checkpoint), ("netx", b.netx))}
    magic = {"ifg": b"PK\x03\x04", "nir": b"\x89HDF\r\n\x1a\n", "pt": b"", "netx": b""}
    for kind, data in good.items():
        c.model_file("generic", f"empty-{kind}", c.write(f"empty.{kind}", b""))
        c.model_file("generic", f"random-{kind}",
                     c.write(f"random.{kind}", mu.random_bytes(4096, 7, magic[kind])))
        c.model_file("generic", f"truncated-half-{kind}",
                     c.write(f"truncated-half.{kind}", data[:len(data) // 2]))
        c.model_file("generic", f"truncated-head-{kind}",
                     c.write(f"truncated-head.{kind}", data[:100]))
    start, stop = _manifest_data_range(c.root / b.ifg)
    c.model_file("generic", "bitflip-ifg-manifest",
                 c.write("bitflip-manifest.ifg", mu.random_flips(good["ifg"], 16, 3, start, stop)))
    c.model_file("generic", "bitflip-ifg-crc",
                 c.write("bitflip-crc.ifg", mu.random_flips(good["ifg"], 1, 5, start, stop)))
    for seed in (1, 2, 3, 4):
        c.model_file("generic", f"bitflip16-nir-meta-{seed}", c.write(
            f"bitflip16-{seed}.nir", mu.random_flips(good["nir"], 16, seed, 0, 4096)))
    for sig in (b"SNOD", b"TREE", b"HEAP", b"GCOL"):
        c.model_file("generic", f"signature-nir-{sig.decode()}", c.write(
            f"signature-{sig.decode()}.nir", mu.flip_signature(good["nir"], sig)))
    c.model_file("generic", "bitflip16-netx", c.write(
        "bitflip16.netx", mu.random_flips(good["netx"], 16, 11, 0, 4096)))
    c.model_file("generic", "bitflip-pt-pickle", c.write(
        "bitflip-pickle.pt", _flip_in_member(c.root / b.checkpoint, "data.pkl", 8, 13)))


def _flip_in_member(path: Path, suffix: str, count: int, seed: int) -> bytes:
    """``path`` with ``count`` bits flipped inside the (stored) member ending in ``suffix``."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + i:info.header_offset + i + 2],
                                          "little") for i in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    return mu.random_flips(raw, count, seed, start, start + info.compress_size)


def add_wrong_kind(c: CorpusBuilder) -> None:
    """A file of another kind where a MODEL (or a data / energy file) is expected."""
    b = c.base
    c.model_file("kind", "netx-as-model", b.netx)
    shutil.copyfile(c.root / b.data, c.root / "data-as.ifg")
    c.model_file("kind", "npz-data-as-model", "data-as.ifg")
    shutil.copyfile(c.root / b.energy, c.root / "energy-as.ifg")
    c.model_file("kind", "json-as-model", "energy-as.ifg")
    c.model_file("kind", "text-as-nir", c.write("text.nir", b"this is not HDF5\n"))
    c.model_file("kind", "png-as-ifg", c.write("image.ifg", b"\x89PNG\r\n\x1a\n" + bytes(64)))
    shutil.copyfile(c.root / b.cifar / "cifar-10-batches-py" / "test_batch",
                    c.root / "cifar-batch-as.pt")
    c.model_file("kind", "cifar-pickle-as-model", "cifar-batch-as.pt")
    (c.root / "folder.ifg").mkdir()
    c.model_file("kind", "directory-as-model", "folder.ifg")
    c.model_file("kind", "missing-model", "no-such-file.ifg")
    os.symlink("loop.nir", c.root / "loop.nir")
    c.model_file("kind", "symlink-loop", "loop.nir")
    os.mkfifo(c.root / "fifo.ifg")
    c.model_file("kind", "fifo-as-model", "fifo.ifg", timeout_s=20.0)
    c.add("kind", "dev-zero-as-model", model_runs("/dev/zero"), names=("/dev/zero",),
          timeout_s=20.0)
    c.add("kind", "ifg-as-energy", [("report", b.ifg, "--samples", "4", "--energy", b.ifg)],
          names=(b.ifg,))
    c.add("kind", "ifg-as-data", [("run", b.ifg, "--backend", "int", "--data", b.ifg,
                                   "--samples", "4")], names=(b.ifg,))


# --------------------------------------------------------------------------- .ifg


def _tuple(*values: Any) -> dict[str, Any]:
    return {"__tuple__": list(values)}


IfgEdit = Callable[[mu.Manifest, mu.Arrays], Any]


def _set(section: str, index: int, key: str, value: Any) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        mu.node(m, section, index)[key] = value
    return edit


def _array(key: str, make: Callable[[np.ndarray], np.ndarray]) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        a[key] = make(a[key])
    return edit


def _top(key: str, value: Any) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        if value is KeyError:
            del m[key]
        else:
            m[key] = value
    return edit


def _meta(key: str, value: Any) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        m["meta"]["fields"][key] = value
    return edit


def _del_field(section: str, index: int, key: str) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        del mu.node(m, section, index)[key]
    return edit


def _entry(section: str, index: int, key: str, value: Any) -> IfgEdit:
    def edit(m: mu.Manifest, a: mu.Arrays) -> None:
        entry = m[section][index]
        if value is KeyError:
            del entry[key]
        else:
            entry[key] = value
    return edit


def _nan_at(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.float64)
    out.flat[0] = np.nan
    return out


IFG_EDITS: dict[str, IfgEdit] = {
    "shape-strings": _set("layers", 1, "shape", _tuple("32", "eight", 8)),
    "shape-float": _set("layers", 1, "shape", _tuple(32, 8.5, 8)),
    "shape-negative": _set("layers", 1, "shape", _tuple(-32, 8, 8)),
    "shape-huge": _set("layers", 1, "shape", _tuple(2**40, 8, 8)),
    "stride-0": _set("projections", 0, "stride", _tuple(0, 0)),
    "stride-string": _set("projections", 0, "stride", _tuple("1", "x")),
    "padding-20000": _set("projections", 0, "padding", _tuple(20000, 20000)),
    "padding-negative": _set("projections", 0, "padding", _tuple(-5, -5)),
    "groups-0": _set("projections", 0, "groups", 0),
    "weight-exp--200": _set("projections", 0, "weight_exp", -200),
    "weight-exp-70": _set("projections", 0, "weight_exp", 70),
    "weight-exp-1e20": _set("projections", 0, "weight_exp", 1e20),
    "weight-exp-bigint": _set("projections", 0, "weight_exp", 10**30),
    "weight-exp-string": _set("projections", 0, "weight_exp", "big"),
    "projection-name-int": _set("projections", 0, "name", 5),
    "layer-name-int": _set("layers", 1, "name", 7),
    "duplicate-layer-name": _set("layers", 2, "name", "act2"),
    "src-missing": _set("projections", 1, "src", "nowhere"),
    "reset-unknown": _set("layers", 1, "reset", "explode"),
    "std-string": _set("layers", 0, "std", _tuple("x")),
    "std-zero": _set("layers", 0, "std", _tuple(0.0)),
    "scale-nan": _set("layers", 0, "scale", float("nan")),
    "raw-max-inf": _set("layers", 0, "raw_max", float("inf")),
    "bits-99": _set("layers", 0, "bits", 99),
    "levels-string": _meta("levels", "many"),
    "profile-unknown": _meta("profile", "loihi9"),
    "extra-field": _set("layers", 1, "evil", 1),
    "missing-field": _del_field("layers", 1, "v_th"),
    "array-ref-missing": _set("layers", 1, "bias", {"__array__": "nope"}),
    "array-ref-int": _set("layers", 1, "bias", {"__array__": 5}),
    "tuple-int": _set("layers", 1, "shape", {"__tuple__": 5}),
    "unknown-node-type": _entry("layers", 1, "__type__", "EvilLayer"),
    "node-type-int": _entry("layers", 1, "__type__", 5),
    "fields-list": _entry("layers", 1, "fields", []),
    "fields-missing": _entry("layers", 1, "fields", KeyError),
    "layers-dict": _top("layers", {"a": 1}),
    "layers-null": _top("layers", None),
    "projections-int": _top("projections", 5),
    "meta-string": _top("meta", "meta"),
    "version-2": _top("version", 2),
    "format-missing": _top("format", KeyError),
    "manifest-list": lambda m, a: [1, 2, 3],
    "weights-complex": _array("p0.weight", lambda w: w.astype(np.complex128) + 1j),
    "weights-nan": _array("p0.weight", _nan_at),
    "weights-fraction": _array("p0.weight", lambda w: w.astype(np.float64) + 0.5),
    "weights-strings": _array("p0.weight", lambda w: w.astype("<U4")),
    "weights-2**40": _array("p0.weight", lambda w: w.astype(np.int64) * 2**40),
    "weights-flat": _array("p0.weight", lambda w: w.reshape(-1)),
    "weights-empty": _array("p0.weight", lambda w: np.zeros((0,), dtype=w.dtype)),
    "bias-short": _array("l1.bias", lambda b: b.reshape(-1)[:5]),
    "v-th-zero": _array("l1.v_th", np.zeros_like),
    "v-th-negative": _array("l1.v_th", lambda v: -np.abs(v) - 1),
    "v-th-nan": _array("l1.v_th", _nan_at),
}


def _declared_huge_member(src: Path, dst: Path, member: str) -> Path:
    """``member`` replaced by an .npy whose header declares 2**34 int64 but holds 16 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False,
                                                  "shape": (2**34,)})
    body = header.getvalue() + bytes(16)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = comp.compress(body) + comp.flush()
    out = [m if m.name != member else
           mu.ZipMember(m.name, 8, zlib.crc32(body), len(data), len(body), data)
           for m in mu.zip_members(src)]
    return mu.write_zip(dst, out)


def add_ifg(c: CorpusBuilder) -> None:
    """Each .ifg manifest / array corruption, pickled arrays, deflate and zip bombs."""
    src = c.root / c.base.ifg
    for name, edit in IFG_EDITS.items():
        c.model_file("ifg", name, mu.edit_ifg(src, c.root / f"ifg-{name}.ifg", edit).name)
    manifest, arrays = mu.read_ifg(src)
    deep = b"[" * 100_000 + b"]" * 100_000
    for name, text in (("manifest-deep-list", deep), ("manifest-not-json", b"{not json"),
                       ("manifest-not-utf8", b"\xff\xfe\x00garbage")):
        buf = mu.ifg_bytes(manifest, arrays)
        c.model_file("ifg", name, c.write(f"ifg-{name}.ifg", _with_manifest_text(buf, text)))
    marker = c.root / MARKER
    evil = dict(arrays)
    evil["p0.weight"] = np.array([mu.ShellPayload(mu.touch_command(marker))], dtype=object)
    c.model_file("ifg", "pickled-array", c.write("ifg-pickled-array.ifg",
                                                 mu.ifg_bytes(manifest, evil, allow_pickle=True)),
                 markers=(marker,))
    c.model_file("ifg", "corrupt-deflate-manifest",
                 mu.corrupt_deflate(src, c.root / "ifg-deflate-manifest.ifg").name)
    c.model_file("ifg", "corrupt-deflate-array",
                 mu.corrupt_deflate(src, c.root / "ifg-deflate-array.ifg", "p0.weight.npy").name)
    c.model_file("ifg", "declared-huge-array",
                 _declared_huge_member(src, c.root / "ifg-declared-huge.ifg",
                                       "p0.weight.npy").name)
    c.model_file("ifg", "unreferenced-12GiB-member",
                 mu.ifg_with_bomb(src, c.root / "ifg-bomb.ifg", BOMB_BYTES).name,
                 may_succeed=True)


def _with_manifest_text(ifg: bytes, text: bytes) -> bytes:
    """``ifg`` (archive bytes) with the manifest member replaced by ``text``."""
    with np.load(io.BytesIO(ifg), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "__manifest__"}
    buf = io.BytesIO()
    np.savez_compressed(buf, __manifest__=np.frombuffer(text, dtype=np.uint8), **arrays)
    return buf.getvalue()


# --------------------------------------------------------------------------- checkpoints


def add_checkpoint(c: CorpusBuilder) -> None:
    """Configs out of range, broken state dicts, pickled code (which must not run)."""
    src = c.root / c.base.checkpoint
    configs: dict[str, dict[str, Any]] = {
        "levels-0": {"levels": 0}, "phi-nan": {"phi": float("nan")},
        "levels-string": {"levels": "many"}, "phi-string": {"phi": "half"},
        "num-classes-0": {"num_classes": 0}, "arch-unknown": {"arch": "alexnet9"},
        "input-shape-huge": {"input_shape": [1, 100_000, 100_000]},
        "input-shape-strings": {"input_shape": ["1", "x", 8]},
        "dataset-unknown": {"dataset": "imagenet99"}, "encoding-junk": {"encoding": 5},
        "levels-negative": {"levels": -3}, "phi-inf": {"phi": float("inf")},
    }
    for name, change in configs.items():
        c.model_file("checkpoint", name,
                     mu.edit_config(src, c.root / f"pt-{name}.pt", **change).name)

    def payload_edit(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        def edit(p: dict[str, Any]) -> None:
            p[key] = value
        return edit

    def state_edit(make: Callable[[dict[str, torch.Tensor]], object]
                   ) -> Callable[[dict[str, Any]], None]:
        def edit(p: dict[str, Any]) -> None:
            make(p["state_dict"])
        return edit

    def first_weight(sd: dict[str, torch.Tensor]) -> str:
        return next(k for k, v in sd.items() if v.is_floating_point() and v.ndim > 1)

    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        "config-not-json": payload_edit("config", "{levels"),
        "config-missing": lambda p: p.pop("config"),
        "version-99": payload_edit("version", 99),
        "format-missing": lambda p: p.pop("format"),
        "state-dict-list": payload_edit("state_dict", [1, 2]),
        "state-nan": state_edit(lambda sd: sd[first_weight(sd)].view(-1).__setitem__(
            0, float("nan"))),
        "state-complex": state_edit(lambda sd: sd.__setitem__(
            first_weight(sd), sd[first_weight(sd)].to(torch.complex64))),
        "state-missing-key": state_edit(lambda sd: sd.pop(first_weight(sd))),
        "state-wrong-shape": state_edit(lambda sd: sd.__setitem__(
            first_weight(sd), sd[first_weight(sd)].flatten())),
    }
    for name, edit in edits.items():
        c.model_file("checkpoint", name,
                     mu.edit_checkpoint(src, c.root / f"pt-{name}.pt", edit).name)
    marker = c.root / MARKER
    payload = mu.load_payload(src)
    payload["extra"] = mu.ShellPayload(mu.touch_command(marker))
    torch.save(payload, c.root / "pt-pickle-payload.pt")
    c.model_file("checkpoint", "pickle-payload", "pt-pickle-payload.pt", markers=(marker,))
    c.model_file("checkpoint", "legacy-pickle-payload", c.write(
        "pt-legacy-payload.pt", pickle.dumps({"x": mu.ShellPayload(mu.touch_command(marker))})),
        markers=(marker,))


# --------------------------------------------------------------------------- the corpus


def build_corpus(base: BaseFiles) -> list[Case]:
    """Write every hostile input into ``base.root`` and return the cases."""
    from tests.hostile import corpus_inputs as more

    c = CorpusBuilder(base)
    for add in (add_generic, add_wrong_kind, add_ifg, add_checkpoint, more.add_nir,
                more.add_data, more.add_cifar, more.add_energy, more.add_output,
                more.add_option, more.add_target):
        add(c)
    return c.cases
