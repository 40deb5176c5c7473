"""Shared fixtures: one trained digits-cnn per test session, its folded and quantized graphs."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.train.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from csqcfs_deploy.train.datasets import Dataset, load_digits_dataset
from csqcfs_deploy.train.training import TrainOptions, train
from csqcfs_deploy.train.zoo import randomize_batchnorm

PROFILE_NAMES = ("loihi2", "int8", "int16")
__all__ = ["randomize_batchnorm", "random_integer_input"]


@pytest.fixture
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch thread for the test: unbatched tiny forwards are far faster on one
    thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_raises() -> None:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal. A suite started in the
    background (``cmd &`` in a shell without job control) inherits SIGINT ignored, and
    Python then never raises it: the Ctrl-C tests would fail for the wrong reason."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits_dataset()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """digits-cnn trained at L = 1 with the default options (seed 0)."""
    result = train(digits, TrainOptions(progress=False))
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    save_checkpoint(path, result.model, result.config)
    return path


@pytest.fixture(scope="session")
def digits_model(digits_checkpoint: Path) -> tuple[nn.Module, ModelConfig]:
    return load_checkpoint(digits_checkpoint)


@pytest.fixture(scope="session")
def digits_fold(digits_model: tuple[nn.Module, ModelConfig]) -> FoldResult:
    model, cfg = digits_model
    return fold(model, cfg.input_shape, cfg.encoding, arch=cfg.arch,
                num_classes=cfg.num_classes)


@pytest.fixture(scope="session")
def digits_graphs(digits_fold: FoldResult) -> dict[str, IFGraph]:
    """The trained digits-cnn quantized to every profile."""
    return {name: quantize(digits_fold.graph, name)[0] for name in PROFILE_NAMES}


@pytest.fixture
def random_bn() -> Callable[[nn.Module, int], nn.Module]:
    return randomize_batchnorm


def random_integer_input(graph: IFGraph, n: int, seed: int) -> torch.Tensor:
    """Random integer inputs within the graph's encoding range."""
    lo, hi = graph.input.encoding.int_range
    hi = min(hi, graph.input.encoding.max_abs_int)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(lo, hi + 1, size=(n, *graph.input.shape)))
