"""digits32: digits upsampled to 3x32x32 (synthetic, not CIFAR) -- the data set itself, its
registration, and resnet20 trained on it through ``train`` and ``sweep``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import DatasetError
from csqcfs_deploy.train import digits32
from csqcfs_deploy.train.checkpoint import save_checkpoint
from csqcfs_deploy.train.datasets import DATASETS, Dataset, load_dataset, load_digits_dataset
from csqcfs_deploy.train.digits32 import load_digits32_dataset, render
from csqcfs_deploy.train.training import TrainOptions, train


@pytest.fixture(scope="module")
def d32() -> Dataset:
    return load_digits32_dataset()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_shapes_dtypes_and_split(d32: Dataset) -> None:
    assert d32.name == "digits32" and d32.classes == 10
    assert d32.x_train.shape == (1437, 3, 32, 32) and d32.x_test.shape == (360, 3, 32, 32)
    assert d32.input_shape == (3, 32, 32)
    assert d32.x_train.dtype == np.float32 and d32.x_test.dtype == np.float32
    assert d32.y_train.dtype == np.int64 and d32.y_test.dtype == np.int64
    digits = load_digits_dataset()  # the same fixed stratified split, digit for digit
    np.testing.assert_array_equal(d32.y_train, digits.y_train)
    np.testing.assert_array_equal(d32.y_test, digits.y_test)


def test_class_balance(d32: Dataset) -> None:
    for labels in (d32.y_train, d32.y_test):
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10
        # stratified: every class holds its share of the split, within two samples
        full = np.bincount(np.concatenate([d32.y_train, d32.y_test]))
        expected = full * len(labels) / full.sum()
        assert np.all(np.abs(counts - expected) <= 2), counts


def test_raw_values_are_uint8_range_integers(d32: Dataset) -> None:
    for x in (d32.x_train, d32.x_test):
        assert x.min() >= 0 and x.max() <= 255
        assert np.array_equal(x, np.rint(x))
        assert x.min() == 0 and x.max() == 255  # the colours span the range
    per_sample_bg = d32.x_train[:, :, 0, 0]
    assert len(np.unique(per_sample_bg, axis=0)) > 1000  # a colour per sample, not one palette


def test_deterministic_and_seeded(d32: Dataset) -> None:
    again = load_digits32_dataset()
    np.testing.assert_array_equal(d32.x_train, again.x_train)
    np.testing.assert_array_equal(d32.x_test, again.x_test)
    assert again.encoding == d32.encoding
    other = load_digits32_dataset(seed=digits32.SEED + 1)
    assert not np.array_equal(other.x_test, d32.x_test)
    np.testing.assert_array_equal(other.y_test, d32.y_test)
    # the test split does not depend on how many renderings train on
    more = load_digits32_dataset(renderings=2)
    assert more.x_train.shape == (2 * 1437, 3, 32, 32)
    np.testing.assert_array_equal(more.x_test, d32.x_test)
    np.testing.assert_array_equal(more.x_train[:1437], d32.x_train)
    np.testing.assert_array_equal(more.y_train, np.tile(d32.y_train, 2))
    assert not np.array_equal(more.x_train[1437:], d32.x_train)
    with pytest.raises(DatasetError, match="renderings >= 1"):
        load_digits32_dataset(renderings=0)


def test_encoding_is_the_training_split_statistics(d32: Dataset) -> None:
    enc = d32.encoding
    assert enc.raw_max == 255.0 and enc.bits == 8 and len(enc.mean) == len(enc.std) == 3
    scaled = d32.x_train.astype(np.float64) / 255.0
    np.testing.assert_allclose(enc.mean, scaled.mean(axis=(0, 2, 3)), atol=6e-5)
    np.testing.assert_allclose(enc.std, scaled.std(axis=(0, 2, 3)), atol=6e-5)
    x_int = enc.to_int(d32.x_test)
    assert x_int.min() >= -127 and x_int.max() <= 127 and x_int.min() < 0 < x_int.max()


def test_render_places_a_coloured_glyph_inside_the_canvas() -> None:
    blank = np.zeros((50, 8, 8))
    solid = np.full((50, 8, 8), 16.0)
    x0 = render(blank, np.random.default_rng(3))
    x1 = render(solid, np.random.default_rng(3))  # same offsets, colours and noise
    for i in range(50):
        # a blank digit is the background colour everywhere (up to the noise) ...
        spread = x0[i].reshape(3, -1).std(axis=1)
        assert np.all(spread < 3 * digits32.NOISE_STD)
        # ... and a solid one a GLYPH x GLYPH block of the foreground colour inside it
        changed = np.abs(x1[i] - x0[i]).mean(axis=0) > digits32.MIN_CONTRAST / 2
        rows, cols = np.nonzero(changed)
        assert rows.max() - rows.min() + 1 == digits32.GLYPH
        assert cols.max() - cols.min() + 1 == digits32.GLYPH
        assert changed.sum() == digits32.GLYPH ** 2
    bg = x0[:, :, :4, :4].mean(axis=(2, 3))
    fg = x1[:, :, 14:18, 14:18].mean(axis=(2, 3))  # the centre lies in every placement
    # light ink on a darker background, in every channel
    assert np.all(fg - bg > digits32.MIN_CONTRAST - 3 * digits32.NOISE_STD)
    with pytest.raises(DatasetError, match="8x8"):
        render(np.zeros((2, 16, 16)), np.random.default_rng(0))


def test_registered_and_never_presented_as_cifar(d32: Dataset) -> None:
    assert "digits32" in DATASETS
    ds = load_dataset("digits32")
    np.testing.assert_array_equal(ds.x_test, d32.x_test)
    assert "cifar" not in ds.name.lower()
    texts = [digits32.DESCRIPTION, digits32.__doc__ or "", ds.describe(), ds.describe("train"),
             load_digits32_dataset.__doc__ or ""]
    for text in texts:
        # every mention of CIFAR says what it is not, or that only the shape is CIFAR's
        rest = re.sub(r"not CIFAR|CIFAR-shaped|as in CIFAR|CIFAR layouts?", "", text)
        assert "cifar" not in rest.lower(), text
    assert digits32.DESCRIPTION == "digits upsampled to 3x32x32 (synthetic, not CIFAR)"


def subset(ds: Dataset, n_train: int) -> Dataset:
    """The first ``n_train`` training samples (the split stays stratified enough)."""
    return replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train])


def test_sweep_shows_resnet20_accuracy_per_t_fast(d32: Dataset, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """resnet20 on digits32 through ``sweep``: one short epoch, structure of the output."""
    result = train(subset(d32, 256), TrainOptions(arch="resnet20", levels=2, epochs=1,
                                                  batch_size=32, progress=False))
    assert result.config.dataset == "digits32" and result.config.input_shape == (3, 32, 32)
    ckpt = save_checkpoint(tmp_path / "r20.pt", result.model, result.config)
    code, out, err = run_cli(["sweep", str(ckpt), "--timesteps", "1,2", "--samples", "20",
                              "--calibration-samples", "32", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["dataset"] == "digits32" and data["samples"] == 20 and data["levels"] == 2
    assert [r["timesteps"] for r in data["rows"]] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["rows"])
    assert 0.0 <= data["float_ann_accuracy"] <= 1.0
    assert data["float_ann_source"] == "trained network"
    code, out, err = run_cli(["sweep", str(ckpt), "--timesteps", "2", "--samples", "10",
                              "--calibration-samples", "32"], capsys)
    assert code == 0, err
    assert "resnet20 on digits32" in out and "SNN %" in out and "cifar" not in out.lower()


@pytest.mark.slow
def test_sweep_shows_trained_resnet20_accuracy(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``train --dataset digits32 --arch resnet20`` learns in a few epochs; ``sweep`` shows
    its accuracy per T, well above chance (0.1), and the SNN approaching the quantized ANN.

    About 1.5 min on 2 idle cores (6 epochs of 1437 samples, then 2 x 100 SNN runs)."""
    ckpt = tmp_path / "r20.pt"
    code, out, err = run_cli(["train", "--dataset", "digits32", "--arch", "resnet20",
                              "--levels", "8", "--epochs", "6", "--json", "-o", str(ckpt)],
                             capsys)
    assert code == 0, err
    trained = json.loads(out)
    assert trained["dataset"] == "digits32" and trained["test_accuracy"] > 0.85
    code, out, err = run_cli(["sweep", str(ckpt), "--profile", "int16", "--timesteps", "8,32",
                              "--samples", "100", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["dataset"] == "digits32" and data["levels"] == 8 and data["samples"] == 100
    assert data["float_ann_accuracy"] > 0.85 and data["quantized_ann_accuracy"] > 0.85
    acc = {r["timesteps"]: r["accuracy"] for r in data["rows"]}
    assert set(acc) == {8, 32}
    assert acc[8] > 0.3 and acc[32] > 0.75 and acc[32] > acc[8]
    assert acc[32] >= data["quantized_ann_accuracy"] - 0.15
