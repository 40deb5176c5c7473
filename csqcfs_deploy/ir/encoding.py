"""The input encoding: how raw samples become real and integer network input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import DatasetError


def _finite(value: object) -> bool:
    """True for a finite real number (not a bool, a string or NaN/Inf)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


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
        if not _finite(self.raw_max) or self.raw_max <= 0:
            raise DatasetError(f"raw_max must be a finite number > 0, got {self.raw_max!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise DatasetError("mean and std need one value per channel")
        if not all(_finite(m) for m in self.mean):
            raise DatasetError(f"mean must be finite numbers, got {self.mean!r}")
        if not all(_finite(s) and s > 0 for s in self.std):
            raise DatasetError(f"std must be finite numbers > 0, got {self.std!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) \
                or not 2 <= self.bits <= 24:
            raise DatasetError(f"input bits must be an integer in 2..24, got {self.bits!r}")

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

    def normalize(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Raw (N, C, H, W) -> real network input, float32."""
        c = raw.shape[1]
        mean = np.asarray(self.mean, dtype=np.float64).reshape(1, c, *([1] * (raw.ndim - 2)))
        std = np.asarray(self.std, dtype=np.float64).reshape(1, c, *([1] * (raw.ndim - 2)))
        out: npt.NDArray[np.float32] = (
            (raw.astype(np.float64) / self.raw_max - mean) / std).astype(np.float32)
        return out

    def to_int(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Raw (N, C, H, W) -> integer input (int64), see class docstring."""
        out: npt.NDArray[np.int64]
        if self.exact:
            out = np.rint(raw).astype(np.int64)
            return out
        x = self.normalize(raw).astype(np.float64)
        lo, hi = self.int_range
        out = np.clip(np.rint(x / self.scale), lo, hi).astype(np.int64)
        return out

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
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise DatasetError(f"malformed input encoding {data!r:.200}: {exc}") from None
