"""Datasets and the input encoding (normalisation + integer quantization).

``digits`` is scikit-learn's ``load_digits`` (ships inside scikit-learn, no
download): 1797 8x8 images with pixel values 0..16. The held-out test split is
fixed: ``train_test_split(test_size=0.2, stratify=y, random_state=0)``, i.e.
1437 training and 360 test samples.

``digits32`` is digits upsampled to 3x32x32 (synthetic, not CIFAR): the same
split, each digit coloured and shifted (:mod:`csqcfs_deploy.train.digits32`).

``cifar10`` and ``cifar100`` read a local copy of the python pickles
(``cifar-10-batches-py``: ``data_batch_1..5`` and ``test_batch``;
``cifar-100-python``: ``train`` and ``test``, fine labels) from ``--data-dir``;
nothing is ever downloaded. The pickles are read with a restricted unpickler
that only builds numpy arrays and builtins.

``data:FILE`` is the user's own ``.npz`` (:mod:`csqcfs_deploy.train.owndata`).

Named datasets live in one registry, :data:`LOADERS` (name -> loader taking
the ``--data-dir`` value); :data:`DATASETS` lists its names.
:class:`EncodingOverride` is ``--mean/--std/--raw-max/--input-bits``.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import DatasetError, UnknownDataset, UsageError
from csqcfs_deploy.ir import InputEncoding

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DATA_PREFIX = "data:"


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def describe_encoding(enc: InputEncoding) -> str:
    """``mean 0.4914,0.4822,0.4465 std 0.2023,0.1994,0.2010`` (+ raw max / bits if unusual)."""
    text = f"mean {_numbers(enc.mean)} std {_numbers(enc.std)}"
    if enc.raw_max != 255.0:
        text = f"raw max {enc.raw_max:.6g}, {text}"
    if enc.bits != 8:
        text += f", {enc.bits}-bit input"
    return text


@dataclass(frozen=True)
class Dataset:
    """Raw samples (N, C, H, W) float32 and integer labels, plus their encoding.

    ``classes_inferred``: ``classes`` is only the largest label + 1 (the user's
    own data without ``--classes``), so a model with more outputs still fits.
    """

    name: str
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[Any]
    x_test: npt.NDArray[Any]
    y_test: npt.NDArray[Any]
    encoding: InputEncoding
    classes: int
    classes_inferred: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def with_encoding(self, encoding: InputEncoding) -> Dataset:
        return replace(self, encoding=encoding)

    def describe(self, split: str = "test") -> str:
        """One line for outputs, e.g. ``cifar10 (test split, 10000 samples, mean … std …)``."""
        n = len(self.y_test if split == "test" else self.y_train)
        return f"{self.name} ({split} split, {n} samples, {describe_encoding(self.encoding)})"


DIGITS_ENCODING = InputEncoding(raw_max=16.0, mean=(0.0,), std=(1.0,), bits=8)
CIFAR10_ENCODING = InputEncoding(
    raw_max=255.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), bits=8
)
# CIFAR-100 statistics of the training images. The QCFS reference code uses
# mean (129.3, 124.1, 112.4)/255, std (68.2, 65.4, 70.4)/255: pass --mean/--std.
CIFAR100_ENCODING = InputEncoding(
    raw_max=255.0, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), bits=8
)


# --------------------------------------------------------------------------- overrides


def _parse_values(text: str, option: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} takes one number or one per channel separated by commas, "
                         f"got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} must be finite numbers, got {text!r}")
    return values


@dataclass(frozen=True)
class EncodingOverride:
    """``--mean/--std`` (one value or one per channel), ``--raw-max`` and ``--input-bits``:
    fields that replace those of a dataset's or a checkpoint's encoding (None keeps it)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    raw_max: float | None = None
    bits: int | None = None

    @classmethod
    def parse(cls, mean: str | None = None, std: str | None = None,
              raw_max: float | str | None = None, bits: int | str | None = None
              ) -> EncodingOverride:
        """Checked values from the command line (UsageError naming the option)."""
        m = None if mean is None else _parse_values(mean, "--mean")
        s = None if std is None else _parse_values(std, "--std")
        if s is not None and any(v <= 0 for v in s):
            raise UsageError(f"--std must be > 0, got {std}")
        r = None if raw_max is None else _parse_values(str(raw_max), "--raw-max")
        if r is not None and (len(r) != 1 or r[0] <= 0):
            raise UsageError(f"--raw-max must be one number > 0, got {raw_max}")
        b = None
        if bits is not None:
            try:
                b = int(bits)
            except ValueError:
                raise UsageError(f"--input-bits must be an integer, got {bits!r}") from None
            if not 2 <= b <= 24:
                raise UsageError(f"--input-bits must be in 2..24, got {bits}")
        return cls(m, s, None if r is None else r[0], b)

    @property
    def empty(self) -> bool:
        return self.mean is None and self.std is None and self.raw_max is None and \
            self.bits is None

    def apply(self, base: InputEncoding) -> InputEncoding:
        """``base`` with the given fields replaced; one value serves every channel."""
        channels = len(base.mean)

        def per_channel(values: tuple[float, ...] | None, old: tuple[float, ...], option: str
                        ) -> tuple[float, ...]:
            if values is None:
                return old
            if len(values) == 1:
                return values * channels
            if len(values) != channels:
                give = "one value" if channels == 1 else f"1 or {channels} values"
                raise UsageError(f"{option} has {len(values)} values but the input has "
                                 f"{channels} channel{'s' if channels != 1 else ''} "
                                 f"(give {give})")
            return values

        return InputEncoding(
            raw_max=base.raw_max if self.raw_max is None else self.raw_max,
            mean=per_channel(self.mean, base.mean, "--mean"),
            std=per_channel(self.std, base.std, "--std"),
            bits=base.bits if self.bits is None else self.bits,
        )


# --------------------------------------------------------------------------- checks


def check_fits_encoding(ds: Dataset) -> None:
    """Raw values must lie in 0..raw_max (and be whole numbers where the encoding feeds
    them unchanged as integers); DatasetError naming the dataset otherwise."""
    enc = ds.encoding
    for split, x in (("test", ds.x_test), ("train", ds.x_train)):
        if x.size == 0:
            continue
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > enc.raw_max:
            raise DatasetError(
                f"{ds.name}: {split} values lie in {lo:.6g}..{hi:.6g}, outside "
                f"0..{enc.raw_max:.6g} (the raw range); give --raw-max with the largest "
                "possible raw value")
        if enc.exact and not bool(np.all(np.floor(x) == x)):
            raise DatasetError(
                f"{ds.name}: {split} values are not whole numbers, but with mean 0, std 1 and "
                f"raw max {enc.raw_max:.6g} the raw values are fed unchanged as integers; "
                "scale them to integers (e.g. 0..255 with --raw-max 255) or give --mean/--std")


def check_labels(name: str, labels: npt.NDArray[Any], classes: int, what: str = "labels"
                 ) -> None:
    """Labels must be integers in 0..classes-1 (DatasetError naming the first bad one)."""
    if labels.size == 0:
        return
    bad = (labels < 0) | (labels >= classes)
    if bool(bad.any()):
        first = int(labels[np.argmax(bad)])
        raise DatasetError(f"{name}: {what} must lie in 0..{classes - 1}, found {first}")


# --------------------------------------------------------------------------- digits


def load_digits_dataset() -> Dataset:
    """scikit-learn's digits with the fixed stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return Dataset("digits", x_tr, y_tr, x_te, y_te, DIGITS_ENCODING, 10)


# --------------------------------------------------------------------------- CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR pickles: numpy arrays and builtins, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),  # empty bytes in protocol-2 pickles (Python 2's name)
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


#: values of one CIFAR image: 3 channels of 32 x 32 pixels, stored as bytes 0..255
CIFAR_PIXELS = 3 * 32 * 32


def _unpickle_batch(path: Path, what: str) -> dict[Any, Any]:
    """One CIFAR python pickle, read with :class:`_NumpyOnlyUnpickler`."""
    try:
        with path.open("rb") as fh:
            batch = _NumpyOnlyUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
            IndexError, AttributeError, OverflowError, MemoryError, RecursionError,
            UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DatasetError(f"{path} is not a {what} python pickle: {detail}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a {what} python pickle: it holds a "
                           f"{type(batch).__name__}, not a dict of data and labels")
    return batch


def _cifar_images(batch: dict[Any, Any], path: Path) -> npt.NDArray[np.float32]:
    """``batch[b"data"]``: N >= 1 images of 3072 finite whole values in 0..255, as float32
    (N, 3, 32, 32)."""
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "uif":
        kind = type(data).__name__ if not isinstance(data, np.ndarray) else data.dtype
        raise DatasetError(f"{path}: data must be a numeric array (CIFAR stores uint8), "
                           f"got {kind}")
    if data.ndim not in (2, 4) or data.size == 0 or data.size % CIFAR_PIXELS or \
            data[0].size != CIFAR_PIXELS:
        raise DatasetError(f"{path}: data has shape {data.shape}; expected (N, 3072) with "
                           "N >= 1 images")
    if data.dtype.kind == "f" and not bool(np.isfinite(data).all()):
        raise DatasetError(f"{path}: data contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    whole = data.dtype.kind != "f" or bool(np.all(np.floor(data) == data))
    if lo < 0 or hi > 255 or not whole:
        raise DatasetError(f"{path}: data must be whole pixel values in 0..255, found "
                           f"{lo:.6g}..{hi:.6g}")
    return data.reshape(-1, 3, 32, 32).astype(np.float32)


def _cifar_labels(batch: dict[Any, Any], label_key: bytes, path: Path, n: int,
                  classes: int, what: str) -> npt.NDArray[np.int64]:
    """``batch[label_key]``: n integer labels in 0..classes-1."""
    if label_key not in batch:
        raise DatasetError(f"{path} is not a {what} python pickle: it has no "
                           f"{label_key.decode()}")
    try:
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError, OverflowError):
        labels = np.asarray([], dtype=object)
    if labels.dtype.kind not in "ui":
        raise DatasetError(f"{path}: {label_key.decode()} must be integers, got "
                           f"{labels.dtype if labels.size else 'something else'}")
    if labels.ndim != 1 or len(labels) != n:
        raise DatasetError(f"{path}: {n} images but {label_key.decode()} has shape "
                           f"{labels.shape}")
    check_labels(str(path), labels, classes, label_key.decode())
    return labels.astype(np.int64)


def _read_cifar_batch(path: Path, label_key: bytes = b"labels", what: str = "CIFAR-10",
                      classes: int = 10) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Images (N, 3, 32, 32) float32 and labels (N,) int64 of one python batch; every
    problem a DatasetError naming ``path``."""
    batch = _unpickle_batch(path, what)
    data = _cifar_images(batch, path)
    return data, _cifar_labels(batch, label_key, path, len(data), classes, what)


def _cifar_root(data_dir: str | Path | None, name: str, folder: str) -> Path:
    if data_dir is None:
        raise DatasetError(f"{name} needs --data-dir pointing at a local {folder} folder "
                           "(nothing is downloaded)")
    root = Path(data_dir)
    if (root / folder).is_dir():
        root = root / folder
    return root


def _require(root: Path, needed: list[Path], what: str, folder: str) -> None:
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{what} not found in {root}: missing {', '.join(missing)} "
            f"(expected the python pickles of {folder}; nothing is downloaded)")


def load_cifar10_dataset(data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (or its parent)."""
    root = _cifar_root(data_dir, "cifar10", "cifar-10-batches-py")
    needed = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    _require(root, needed, "CIFAR-10", "cifar-10-batches-py")
    parts = [_read_cifar_batch(p) for p in needed[:5]]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(needed[5])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, CIFAR10_ENCODING, 10)


def load_cifar100_dataset(data_dir: str | Path | None) -> Dataset:
    """CIFAR-100 (100 fine labels) from a local ``cifar-100-python`` folder (or its parent)."""
    root = _cifar_root(data_dir, "cifar100", "cifar-100-python")
    needed = [root / "train", root / "test"]
    _require(root, needed, "CIFAR-100", "cifar-100-python")
    x_tr, y_tr = _read_cifar_batch(needed[0], b"fine_labels", "CIFAR-100", 100)
    x_te, y_te = _read_cifar_batch(needed[1], b"fine_labels", "CIFAR-100", 100)
    return Dataset("cifar100", x_tr, y_tr, x_te, y_te, CIFAR100_ENCODING, 100)


# --------------------------------------------------------------------------- registry

DatasetLoader = Callable[[Path | None], Dataset]


def _load_digits32(data_dir: Path | None) -> Dataset:
    """digits upsampled to 3x32x32 (synthetic, not CIFAR): :mod:`csqcfs_deploy.train.digits32`."""
    from csqcfs_deploy.train.digits32 import load_digits32_dataset

    return load_digits32_dataset()


LOADERS: dict[str, DatasetLoader] = {
    "digits": lambda data_dir: load_digits_dataset(),
    "digits32": _load_digits32,
    "cifar10": load_cifar10_dataset,
    "cifar100": load_cifar100_dataset,
}
DATASETS = tuple(LOADERS)


def load_dataset(name: str, data_dir: str | Path | None = None,
                 classes: int | None = None) -> Dataset:
    """A registered dataset (:data:`LOADERS`), or ``data:FILE`` (the user's own npz,
    with ``classes`` classes, default the largest label + 1)."""
    if name.startswith(DATA_PREFIX):
        from csqcfs_deploy.train.owndata import load_npz_dataset

        return check_splits(load_npz_dataset(name[len(DATA_PREFIX):], classes))
    loader = LOADERS.get(name)
    if loader is None:
        raise UnknownDataset(f"unknown dataset {name!r} (known: {', '.join(DATASETS)}, "
                           f"or {DATA_PREFIX}FILE.npz)")
    return check_splits(loader(None if data_dir is None else Path(data_dir)))


def check_splits(ds: Dataset) -> Dataset:
    """``ds`` when both splits hold samples, one label each, in 0..classes-1, and only
    finite values; DatasetError naming the dataset otherwise (never a run on 0 samples)."""
    for split, x, y in (("test", ds.x_test, ds.y_test), ("train", ds.x_train, ds.y_train)):
        if len(x) == 0:
            raise DatasetError(f"{ds.name}: the {split} split holds no samples")
        if len(y) != len(x) or y.ndim != 1 or y.dtype.kind not in "ui":
            raise DatasetError(f"{ds.name}: the {split} split has {len(x)} samples but "
                               f"labels of shape {y.shape} and dtype {y.dtype}")
        if not bool(np.isfinite(x).all()):
            raise DatasetError(f"{ds.name}: the {split} split contains NaN or infinite values")
        if not ds.classes_inferred:
            check_labels(ds.name, y, ds.classes, f"{split} labels")
    return ds
