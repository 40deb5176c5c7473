"""Mutations of real files: bytes (flips, truncation), ``.ifg`` archives (manifest,
arrays, raw zip members, a zip bomb), HDF5 files (datasets replaced in a copy) and
checkpoints (payload edited, pickled code). Used by the corpus and the fuzzer."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

Manifest = dict[str, Any]
Arrays = dict[str, np.ndarray]

# --------------------------------------------------------------------------- bytes


def flip_bits(data: bytes, bit_positions: Iterable[int]) -> bytes:
    """``data`` with the given bits (0 = lowest bit of byte 0) inverted."""
    out = bytearray(data)
    for bit in bit_positions:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def random_flips(data: bytes, count: int, seed: int, start: int = 0,
                 stop: int | None = None) -> bytes:
    """``count`` random bit flips (seeded) within bytes ``start:stop``."""
    stop = len(data) if stop is None else min(stop, len(data))
    rng = np.random.default_rng(seed)
    bits = rng.integers(start * 8, stop * 8, size=count)
    return flip_bits(data, (int(b) for b in bits))


def random_bytes(size: int, seed: int, prefix: bytes = b"") -> bytes:
    """``prefix`` then seeded random bytes, ``size`` in all."""
    rng = np.random.default_rng(seed)
    return prefix + rng.integers(0, 256, size=max(0, size - len(prefix)),
                                 dtype=np.uint8).tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- .ifg


def read_ifg(path: Path) -> tuple[Manifest, Arrays]:
    """The manifest (a dict) and the arrays of an ``.ifg`` file."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(arrays.pop("__manifest__").tobytes().decode())
    return manifest, arrays


def ifg_bytes(manifest: Any, arrays: Arrays, allow_pickle: bool = False) -> bytes:
    """An ``.ifg`` archive as :func:`csqcfs_deploy.ir.save_graph` writes it."""
    text = json.dumps(manifest).encode()
    buf = io.BytesIO()
    members = {"__manifest__": np.frombuffer(text, dtype=np.uint8), **arrays}
    if allow_pickle:
        np.savez(buf, **members)  # object arrays are pickled
    else:
        np.savez_compressed(buf, **members)
    return buf.getvalue()


def edit_ifg(src: Path, dst: Path, edit: Callable[[Manifest, Arrays], Any]) -> Path:
    """Write a copy of ``src`` with ``edit(manifest, arrays)`` applied (in place; a
    returned value that is not None replaces the manifest)."""
    manifest, arrays = read_ifg(src)
    replaced = edit(manifest, arrays)
    return write_bytes(dst, ifg_bytes(manifest if replaced is None else replaced, arrays))


def node(manifest: Manifest, section: str, index: int) -> dict[str, Any]:
    """The ``fields`` of ``manifest[section][index]`` (layers / projections)."""
    fields: dict[str, Any] = manifest[section][index]["fields"]
    return fields


@dataclass(frozen=True)
class ZipMember:
    """A zip member as stored: name, method (8: deflate, 0: stored), CRC-32, sizes, data."""

    name: str
    method: int
    crc: int
    compressed_size: int
    size: int
    data: bytes


def zip_members(path: Path) -> list[ZipMember]:
    """The members of ``path`` with their stored (still compressed) bytes."""
    raw = path.read_bytes()
    members = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                          info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            members.append(ZipMember(info.filename, info.compress_type, info.CRC,
                                     info.compress_size, info.file_size,
                                     raw[start:start + info.compress_size]))
    return members


ZIP64_LIMIT = 0xFFFFFFFF


def _zip64_extra(m: ZipMember) -> tuple[bytes, int, int]:
    if m.size < ZIP64_LIMIT and m.compressed_size < ZIP64_LIMIT:
        return b"", m.compressed_size, m.size
    return struct.pack("<HHQQ", 1, 16, m.size, m.compressed_size), ZIP64_LIMIT, ZIP64_LIMIT


def write_zip(path: Path, members: Iterable[ZipMember]) -> Path:
    """A zip archive of ``members`` as given (zip64 sizes where needed)."""
    body = io.BytesIO()
    central = io.BytesIO()
    count = 0
    for m in members:
        name = m.name.encode()
        extra, csize, usize = _zip64_extra(m)
        offset = body.tell()
        body.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, m.method, 0, 0x21, m.crc,
                               csize, usize, len(name), len(extra)) + name + extra)
        body.write(m.data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, m.method, 0,
                                  0x21, m.crc, csize, usize, len(name), len(extra), 0, 0, 0,
                                  0, offset) + name + extra)
        count += 1
    cd_offset = body.tell()
    cd = central.getvalue()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(cd), cd_offset, 0)
    path.write_bytes(body.getvalue() + cd + end)
    return path


def corrupt_deflate(src: Path, dst: Path, member: str = "__manifest__.npy") -> Path:
    """A copy of ``src`` whose ``member`` starts with a deflate block of the reserved
    type 3 (zlib: "invalid block type"); sizes and CRC unchanged."""
    members = zip_members(src)
    out = []
    for m in members:
        if m.name == member:
            m = ZipMember(m.name, m.method, m.crc, m.compressed_size, m.size,
                          b"\xff\xff" + m.data[2:])
        out.append(m)
    return write_zip(dst, out)


# CRC-32 of long runs of zeros without reading them (zlib's crc32_combine)


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's algorithm)."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def crc32_zeros(length: int, block: int = 1 << 20) -> int:
    """CRC-32 of ``length`` zero bytes (``length`` a multiple of ``block``)."""
    crc, done = 0, 0
    unit = zlib.crc32(bytes(block))
    power, power_len = unit, block
    remaining = length // block
    while remaining:
        if remaining & 1:
            crc = crc32_combine(crc, power, power_len) if done else power
            done += power_len
        power = crc32_combine(power, power, power_len)
        power_len *= 2
        remaining >>= 1
    return crc


def zero_bomb_member(name: str, declared_bytes: int, block: int = 1 << 20) -> ZipMember:
    """A deflated ``.npy`` member holding ``declared_bytes`` zeros (uint8), a valid
    stream of about declared/1000 bytes: one full-flushed block repeated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (declared_bytes,)})
    head = header.getvalue()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    repeat = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    data = first + repeat * (declared_bytes // block) + comp.flush(zlib.Z_FINISH)
    size = len(head) + declared_bytes
    crc = crc32_combine(zlib.crc32(head), crc32_zeros(declared_bytes, block), declared_bytes)
    return ZipMember(name, 8, crc, len(data), size, data)


def ifg_with_bomb(src: Path, dst: Path, declared_bytes: int) -> Path:
    """A copy of ``src`` with an extra, unreferenced member of ``declared_bytes`` zeros."""
    return write_zip(dst, [*zip_members(src), zero_bomb_member("bomb.npy", declared_bytes)])


# --------------------------------------------------------------------------- HDF5


def edit_hdf5(src: Path, dst: Path, edit: Callable[[h5py.File], object]) -> Path:
    """A copy of ``src`` with ``edit(file)`` applied (opened read-write)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def replace_dataset(f: h5py.File, name: str, data: Any = None, **create: Any) -> None:
    """Delete dataset ``name`` and create it again from ``data`` / ``create`` options."""
    del f[name]
    if data is None:
        f.create_dataset(name, **create)
    else:
        f.create_dataset(name, data=data, **create)


def flip_signature(data: bytes, signature: bytes) -> bytes:
    """``data`` with the first occurrence of ``signature`` (e.g. HDF5's ``SNOD``) damaged."""
    at = data.find(signature)
    if at < 0:
        raise ValueError(f"no {signature!r} in the file")
    return data[:at] + bytes(b ^ 0x20 for b in signature) + data[at + len(signature):]


# --------------------------------------------------------------------------- checkpoints


def load_payload(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return payload


def edit_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of checkpoint ``src`` with ``edit(payload)`` applied (in place)."""
    payload = load_payload(src)
    edit(payload)
    torch.save(payload, dst)
    return dst


def edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of checkpoint ``src`` whose config JSON has ``changes``."""
    def edit(payload: dict[str, Any]) -> None:
        config = json.loads(payload["config"])
        config.update(changes)
        payload["config"] = json.dumps(config)
    return edit_checkpoint(src, dst, edit)


class ShellPayload:
    """Pickles as a call of ``os.system(command)``: loading it must never run it."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def touch_command(marker: Path) -> str:
    return f"touch {marker}"
