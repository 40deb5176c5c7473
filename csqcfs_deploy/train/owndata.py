"""``--data FILE.npz``: the user's own samples as a :class:`Dataset` named ``data:FILE``.

The archive (read with ``np.load(allow_pickle=False)``) holds

* ``x``: (N, C, H, W) raw pixel values of any real dtype, or (N, H, W) for one
  channel, and ``y``: (N,) integer labels — the test (and evaluation) set;
* optionally ``x_train`` / ``y_train`` of the same sample shape. Without them
  ``x`` / ``y`` also serve as the training and calibration set.

Labels lie in ``0..classes-1``; ``classes`` is ``--classes`` or else the largest
label + 1 (then a model with more outputs still fits). The default encoding:
``raw_max`` is the largest value rounded up to 1, 255 or else the next
integer, ``mean`` 0 and ``std`` 1 per channel, 8-bit input; ``--mean/--std/
--raw-max/--input-bits`` (or a checkpoint's own encoding) replace it.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import DatasetError
from csqcfs_deploy.ir import InputEncoding
from csqcfs_deploy.train.datasets import DATA_PREFIX, Dataset, check_labels

KEYS = ("x", "y", "x_train", "y_train")


def default_raw_max(largest: float) -> float:
    """1 for data in 0..1, 255 for 0..255, else the largest value rounded up."""
    if largest <= 1:
        return 1.0
    if largest <= 255:
        return 255.0
    return float(math.ceil(largest))


def _read_arrays(path: Path, name: str) -> dict[str, npt.NDArray[Any]]:
    if not path.is_file():
        raise DatasetError(f"{name}: no such file {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{name}: {path} is not a readable .npz archive "
                           f"({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{name}: {path} is a single .npy array, not an .npz archive "
                           "with arrays x and y (np.savez(FILE, x=..., y=...))")
    with archive:
        present = set(archive.files)
        for key in ("x", "y"):
            if key not in present:
                raise DatasetError(f"{name}: the archive has no array {key!r} (it has "
                                   f"{', '.join(sorted(present)) or 'none'}; expected x and "
                                   "y, optionally x_train and y_train)")
        if ("x_train" in present) != ("y_train" in present):
            raise DatasetError(f"{name}: give both x_train and y_train, or neither")
        arrays: dict[str, npt.NDArray[Any]] = {}
        check_declared_sizes(archive, [k for k in KEYS if k in present], name)
        for key in KEYS:
            if key not in present:
                continue
            try:
                arrays[key] = np.asarray(archive[key])
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
                    MemoryError) as exc:
                raise DatasetError(f"{name}: array {key!r} cannot be read "
                                   f"({' '.join(str(exc).split())[:120]}); store plain "
                                   "numeric arrays") from None
    return arrays


def _declared(archive: np.lib.npyio.NpzFile, key: str, name: str
              ) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, bytes stored) of member ``key``, from its .npy header alone."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    try:
        info = archive.zip.getinfo(member)
        with archive.zip.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            stored = info.file_size - fh.tell()
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
            SyntaxError, TypeError) as exc:
        raise DatasetError(f"{name}: array {key!r} has no readable .npy header "
                           f"({' '.join(str(exc).split())[:120]})") from None
    return tuple(int(d) for d in shape), dtype, stored


def check_declared_sizes(archive: np.lib.npyio.NpzFile, keys: list[str], name: str) -> None:
    """Before any array is read: each member holds the bytes its header declares (a
    header may not claim more, which would be allocated up front), and all of them, as
    float32 copies too, fit in the machine's physical memory."""
    total = 0
    for key in keys:
        shape, dtype, stored = _declared(archive, key, name)
        count = math.prod(shape)
        if dtype.hasobject:
            raise DatasetError(f"{name}: array {key!r} holds Python objects, which cannot be "
                               "read without pickle; store plain numeric arrays")
        if count * dtype.itemsize > stored:
            raise DatasetError(f"{name}: array {key!r} declares {count * dtype.itemsize} bytes "
                               f"of {dtype} {shape} but holds {stored} bytes")
        total += count * (dtype.itemsize + 4)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if total > physical:
        raise DatasetError(f"{name}: the arrays need {total / 2**30:.1f} GiB in memory, more "
                           f"than this machine's {physical / 2**30:.1f} GiB")


def _samples(arr: npt.NDArray[Any], key: str, name: str) -> npt.NDArray[np.float32]:
    if arr.dtype.kind not in "uif":
        raise DatasetError(f"{name}: {key} has dtype {arr.dtype}; expected real numbers "
                           "(integers or floats)")
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim != 4 or 0 in arr.shape[1:]:
        raise DatasetError(f"{name}: {key} has shape {arr.shape}; expected (N, C, H, W) "
                           "or (N, H, W)")
    if arr.shape[0] == 0:
        raise DatasetError(f"{name}: {key} holds no samples")
    if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
        raise DatasetError(f"{name}: {key} contains NaN or infinite values")
    return arr.astype(np.float32)


def _labels(arr: npt.NDArray[Any], key: str, name: str, n: int) -> npt.NDArray[np.int64]:
    if arr.dtype.kind not in "ui":
        raise DatasetError(f"{name}: {key} has dtype {arr.dtype}; expected integer labels")
    if arr.ndim != 1 or len(arr) != n:
        raise DatasetError(f"{name}: {key} has shape {arr.shape}; expected ({n},), one label "
                           "per sample")
    out = arr.astype(np.int64)
    if len(out) and int(out.min()) < 0:
        raise DatasetError(f"{name}: {key} must be labels >= 0, found {int(out.min())}")
    return out


def load_npz_dataset(file: str | Path, classes: int | None = None) -> Dataset:
    """The user's own ``.npz`` (see the module docstring); DatasetError naming the problem."""
    path = Path(file)
    name = f"{DATA_PREFIX}{file}"
    arrays = _read_arrays(path, name)
    x_te = _samples(arrays["x"], "x", name)
    y_te = _labels(arrays["y"], "y", name, len(x_te))
    if "x_train" in arrays:
        x_tr = _samples(arrays["x_train"], "x_train", name)
        y_tr = _labels(arrays["y_train"], "y_train", name, len(x_tr))
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DatasetError(f"{name}: x_train samples have shape {x_tr.shape[1:]} but x "
                               f"samples {x_te.shape[1:]}")
    else:
        x_tr, y_tr = x_te, y_te
    largest = int(max(y_te.max(), y_tr.max()))
    if classes is not None:
        if classes < 1:
            raise DatasetError(f"--classes must be >= 1, got {classes}")
        check_labels(name, y_te, classes, "y")
        check_labels(name, y_tr, classes, "y_train")
    n_classes = largest + 1 if classes is None else int(classes)
    channels = int(x_te.shape[1])
    largest_raw = float(max(x_te.max(), x_tr.max()))
    encoding = InputEncoding(raw_max=default_raw_max(largest_raw), mean=(0.0,) * channels,
                             std=(1.0,) * channels, bits=8)
    return Dataset(name, x_tr, y_tr, x_te, y_te, encoding, n_classes,
                   classes_inferred=classes is None)
