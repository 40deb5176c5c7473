"""``digits32``: digits upsampled to 3x32x32 (synthetic, not CIFAR).

An embedded, CIFAR-shaped data set for tests and demonstrations of the 3x32x32
architectures (vgg16, resnet18, resnet20) without any download. It is made
from scikit-learn's ``load_digits`` at load time, deterministically:

* the same fixed stratified split as ``digits``
  (``train_test_split(test_size=0.2, stratify=y, random_state=0)``: 1437
  training and 360 test digits);
* every 8x8 digit (0..16) is upsampled bilinearly to 24x24 and placed at a
  random offset (0..8 pixels in each direction) inside a 32x32 canvas;
* each sample gets its own random background and foreground RGB colour, light
  ink on a darker background (every channel of the foreground at least
  ``MIN_CONTRAST`` above the background's; with random polarity networks
  learned markedly slower), the digit's intensity blends between them, and
  mild Gaussian noise (std ``NOISE_STD``) is added;
* pixel values are integers 0..255 (the uint8 range, as in CIFAR), stored as
  float32 like every :class:`~csqcfs_deploy.train.datasets.Dataset`.

The normalisation (per-channel mean and std of ``raw / 255``) is computed from
the training split at load time, rounded to four decimals; with the default
seed it is about 0.45 / 0.24 per channel. ``renderings`` > 1 draws several
independent renderings (offset, colours, noise) of every training digit; the
registered data set uses one, so both splits keep the digits' sizes.

Digits are not mirror-invariant: training does not flip digits32
(:data:`csqcfs_deploy.train.training.UNMIRRORED`). resnet20 at ``--levels 8``
with the default options reached 79 / 95 / 98 % test accuracy after 4 / 6 / 8
epochs (seed 0); one epoch is about 11 s on 2 cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import DatasetError
from csqcfs_deploy.ir import InputEncoding
from csqcfs_deploy.train.datasets import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, Dataset

NAME = "digits32"
DESCRIPTION = "digits upsampled to 3x32x32 (synthetic, not CIFAR)"
SEED = 32
CANVAS = 32
GLYPH = 24
MIN_CONTRAST = 64.0
NOISE_STD = 6.0
RAW_MAX = 255.0


def _bilinear_matrix(n_out: int, n_in: int) -> npt.NDArray[np.float64]:
    """(n_out, n_in) matrix of 1-D bilinear resampling (pixel centres aligned)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def _colours(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.float64],
                                                        npt.NDArray[np.float64]]:
    """Background and foreground RGB (n, 3): light ink on a darker background, every
    channel of the foreground at least MIN_CONTRAST above the background's."""
    bg = rng.integers(0, int(RAW_MAX - MIN_CONTRAST) + 1, size=(n, 3)).astype(np.float64)
    fg = bg + MIN_CONTRAST + rng.random((n, 3)) * (RAW_MAX - MIN_CONTRAST - bg)
    return bg, np.rint(fg)


def render(images: npt.NDArray[Any], rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """8x8 digits (N, 8, 8) with values 0..16 -> coloured, shifted (N, 3, 32, 32) in 0..255."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise DatasetError(f"digits32 renders 8x8 digits, got shape {images.shape}")
    n = len(images)
    up = _bilinear_matrix(GLYPH, 8)
    glyphs = np.clip(up @ (images / 16.0) @ up.T, 0.0, 1.0)  # (N, 24, 24)
    span = CANVAS - GLYPH
    dy = rng.integers(0, span + 1, size=n)
    dx = rng.integers(0, span + 1, size=n)
    alpha = np.zeros((n, CANVAS, CANVAS))
    for i in range(n):
        alpha[i, dy[i]:dy[i] + GLYPH, dx[i]:dx[i] + GLYPH] = glyphs[i]
    bg, fg = _colours(rng, n)
    pixels = (bg[:, :, None, None] + alpha[:, None] * (fg - bg)[:, :, None, None]).astype(
        np.float32)
    pixels += NOISE_STD * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    out: npt.NDArray[np.float32] = np.clip(np.rint(pixels), 0, RAW_MAX)
    return out


def encoding_of(x_train: npt.NDArray[Any]) -> InputEncoding:
    """Per-channel mean and std of ``raw / 255`` over the training split (4 decimals)."""
    scaled = np.asarray(x_train, dtype=np.float64) / RAW_MAX
    mean = tuple(round(float(v), 4) for v in scaled.mean(axis=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in scaled.std(axis=(0, 2, 3)))
    return InputEncoding(raw_max=RAW_MAX, mean=mean, std=std, bits=8)


def load_digits32_dataset(seed: int = SEED, renderings: int = 1) -> Dataset:
    """Digits upsampled to 3x32x32 (synthetic, not CIFAR); deterministic for ``seed``.

    The split is the one of ``digits``; ``renderings`` independent renderings of
    every training digit (the test split always has one per digit).
    """
    if renderings < 1:
        raise DatasetError(f"digits32 needs renderings >= 1, got {renderings}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    x_tr = np.concatenate([
        render(bunch.images[idx_tr], np.random.default_rng([seed, 0, copy]))
        for copy in range(renderings)])
    y_tr = np.tile(labels[idx_tr], renderings)
    x_te = render(bunch.images[idx_te], np.random.default_rng([seed, 1, 0]))
    return Dataset(NAME, x_tr, y_tr, x_te, labels[idx_te], encoding_of(x_tr), 10)
