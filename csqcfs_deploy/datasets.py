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

import numpy as np

from .errors import DatasetError

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class InputEncoding:
    """How raw samples become the network's real input and its integer input.

    Real input: ``x = (raw / raw_max - mean[c]) / std[c]``.
    Integer input: ``x_int = clip(round(x / scale), lo, hi)``, ``x ~ x_int * scale``,
    with ``bits``-bit integers (signed unless every real input is >= 0).
    When ``mean = 0``, ``std = 1`` and ``raw_max`` fits the integer range, the
    raw values themselves are the integers (``scale = 1 / raw_max``): exact.
    """

    raw_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bits: int = 8

    def __post_init__(self) -> None:
        if self.raw_max <= 0:
            raise DatasetError(f"raw_max must be > 0, got {self.raw_max}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise DatasetError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise DatasetError(f"std must be > 0, got {self.std}")
        if not 2 <= self.bits <= 24:
            raise DatasetError(f"input bits must be in 2..24, got {self.bits}")

    @property
    def signed(self) -> bool:
        """True when some real input can be negative."""
        return any(m > 0 for m in self.mean)

    @property
    def int_range(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)) + 1, 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def exact(self) -> bool:
        """True when the raw values are the integer input (no rounding)."""
        identity = all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)
        return identity and float(self.raw_max).is_integer() and self.raw_max <= self.int_range[1]

    @property
    def max_abs_int(self) -> int:
        """Largest magnitude an integer input can take."""
        if self.exact:
            return int(self.raw_max)
        return max(abs(v) for v in self.int_range)

    @property
    def scale(self) -> float:
        """Real value of one integer input unit."""
        if self.exact:
            return 1.0 / self.raw_max
        max_abs = max(
            max(abs((0.0 - m) / s), abs((1.0 - m) / s))
            for m, s in zip(self.mean, self.std, strict=True)
        )
        return max_abs / self.int_range[1]

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw (N, C, H, W) -> real network input, float32."""
        c = raw.shape[1]
        mean = np.asarray(self.mean, dtype=np.float64).reshape(1, c, *([1] * (raw.ndim - 2)))
        std = np.asarray(self.std, dtype=np.float64).reshape(1, c, *([1] * (raw.ndim - 2)))
        return ((raw.astype(np.float64) / self.raw_max - mean) / std).astype(np.float32)

    def to_int(self, raw: np.ndarray) -> np.ndarray:
        """Raw (N, C, H, W) -> integer input (int64), see class docstring."""
        if self.exact:
            return np.rint(raw).astype(np.int64)
        x = self.normalize(raw).astype(np.float64)
        lo, hi = self.int_range
        return np.clip(np.rint(x / self.scale), lo, hi).astype(np.int64)

    def to_json(self) -> dict[str, object]:
        return {"raw_max": self.raw_max, "mean": list(self.mean), "std": list(self.std),
                "bits": self.bits}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> InputEncoding:
        try:
            return cls(
                raw_max=float(data["raw_max"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[attr-defined]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[attr-defined]
                bits=int(data.get("bits", 8)),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"malformed input encoding {data!r}: {exc}") from None


@dataclass(frozen=True)
class Dataset:
    """Raw samples (N, C, H, W) float32 and integer labels, plus their encoding."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
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


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
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

