"""Datasets and the input encoding (normalisation + integer quantization).

``digits`` is scikit-learn's ``load_digits`` (ships inside scikit-learn, no
download): 1797 8x8 images with pixel values 0..16. The held-out test split is
fixed: ``train_test_split(test_size=0.2, stratify=y, random_state=0)``, i.e.
1437 training and 360 test samples.

``cifar10`` reads a local copy of the python batches (``cifar-10-batches-py``:
``data_batch_1..5`` and ``test_batch``) from ``--data-dir``; nothing is ever
downloaded. The batches are unpickled with a restricted unpickler that only
builds numpy arrays and builtins.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import DatasetError
from csqcfs_deploy.ir import InputEncoding

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Raw samples (N, C, H, W) float32 and integer labels, plus their encoding."""

    name: str
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[Any]
    x_test: npt.NDArray[Any]
    y_test: npt.NDArray[Any]
    encoding: InputEncoding
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])


DIGITS_ENCODING = InputEncoding(raw_max=16.0, mean=(0.0,), std=(1.0,), bits=8)
CIFAR10_ENCODING = InputEncoding(
    raw_max=255.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), bits=8
)


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


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: numpy arrays and builtins, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        with path.open("rb") as fh:
            batch = _NumpyOnlyUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    return data.astype(np.float32), labels


def load_cifar10_dataset(data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (or its parent)."""
    if data_dir is None:
        raise DatasetError("cifar10 needs --data-dir pointing at a local cifar-10-batches-py "
                           "folder (nothing is downloaded)")
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    needed = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found in {root}: missing {', '.join(missing)} "
            "(expected the python batches of cifar-10-batches-py; nothing is downloaded)"
        )
    parts = [_read_cifar_batch(p) for p in needed[:5]]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(needed[5])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, CIFAR10_ENCODING, 10)


DATASETS = ("digits", "cifar10")


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``digits`` (embedded) or ``cifar10`` (local copy only)."""
    if name == "digits":
        return load_digits_dataset()
    if name == "cifar10":
        return load_cifar10_dataset(data_dir)
    raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")

