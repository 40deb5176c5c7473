"""Training CS-QCFS networks (deterministic for a seed).

Adam with a one-cycle learning rate, cross-entropy, random +-1 pixel shifts as
augmentation on 8x8 inputs (random crop with padding 4 and horizontal flips on
32x32, except for digits32: digits are not mirror-invariant).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.train.checkpoint import ModelConfig
from csqcfs_deploy.train.datasets import Dataset
from csqcfs_deploy.train.threshold_init import thresholds_from_data
from csqcfs_deploy.train.zoo import arch_spec, build_model

# datasets whose images are not mirror-invariant: never flipped in augmentation
UNMIRRORED = frozenset({"digits", "digits32"})
#: training samples that set data-driven initial thresholds (ArchSpec.thresholds_from_data)
CALIBRATION_BATCH = 256


@dataclass(frozen=True)
class TrainOptions:
    """Training options. ``init_threshold``: the initial lambda of every activation
    (None: the architecture's default); ``flip``: mirror inputs in augmentation (None:
    see :func:`mirrors`)."""

    arch: str = "digits-cnn"
    levels: int = 1
    phi: float = 0.5
    epochs: int = 40
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 5e-4
    seed: int = 0
    progress: bool = True
    init_threshold: float | None = None
    flip: bool | None = None


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module
    config: ModelConfig
    test_accuracy: float
    train_accuracy: float
    seconds: float
    epochs: int


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random shift (and, with ``flip``, horizontal mirroring) of a batch (N, C, H, W)."""
    n, _, h, w = x.shape
    pad = 1 if h <= 8 else 4
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[idx_n, idx_c, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out


def mirrors(dataset: Dataset) -> bool:
    """Whether training mirrors inputs by default: images wider than 8 pixels, unless the
    dataset is one of :data:`UNMIRRORED` (digits change meaning when mirrored)."""
    return dataset.input_shape[-1] > 8 and dataset.name not in UNMIRRORED


@torch.no_grad()
def evaluate(model: nn.Module, x: npt.NDArray[Any], y: npt.NDArray[Any],
             batch_size: int = 256) -> float:
    """Accuracy of ``model`` on real inputs ``x`` (N, C, H, W)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(x[i : i + batch_size]))
        correct += int((logits.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def train(dataset: Dataset, options: TrainOptions) -> TrainResult:
    """Train ``options.arch`` on ``dataset``; returns the model and its test accuracy."""
    spec = arch_spec(options.arch)
    if tuple(spec.input_shape) != dataset.input_shape:
        raise UsageError(
            f"architecture {options.arch} takes inputs {spec.input_shape}, "
            f"dataset {dataset.name} has {dataset.input_shape}"
        )
    flip = mirrors(dataset) if options.flip is None else options.flip
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    model = build_model(options.arch, options.levels, options.phi, dataset.classes,
                        init_threshold=options.init_threshold)
    x_train = torch.from_numpy(dataset.encoding.normalize(dataset.x_train))
    y_train = torch.from_numpy(dataset.y_train)
    x_test = dataset.encoding.normalize(dataset.x_test)
    if spec.thresholds_from_data and options.init_threshold is None:
        model.train()
        calibration = torch.randperm(len(x_train), generator=gen)[:CALIBRATION_BATCH]
        thresholds_from_data(model, x_train[calibration])

    thresholds = [p for n, p in model.named_parameters() if n.endswith(".up") or n == "up"]
    others = [p for n, p in model.named_parameters() if not (n.endswith(".up") or n == "up")]
    optimizer = torch.optim.Adam(
        [{"params": others, "weight_decay": options.weight_decay},
         {"params": thresholds, "weight_decay": 0.0}],
        lr=options.lr,
    )
    steps_per_epoch = (len(x_train) + options.batch_size - 1) // options.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch
    )
    start = time.perf_counter()
    bar = tqdm(range(options.epochs), desc=f"train {options.arch} L={options.levels}",
               disable=not options.progress, leave=False)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss = 0.0
        for i in range(0, len(perm), options.batch_size):
            idx = perm[i : i + options.batch_size]
            if len(idx) < 2:
                continue
            xb = _augment(x_train[idx], gen, flip)
            loss = F.cross_entropy(model(xb), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total_loss / len(perm):.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    test_acc = evaluate(model, x_test, dataset.y_test)
    train_acc = evaluate(model, dataset.encoding.normalize(dataset.x_train), dataset.y_train)
    config = ModelConfig(
        arch=options.arch, levels=options.levels, phi=options.phi,
        num_classes=dataset.classes, input_shape=dataset.input_shape,
        encoding=dataset.encoding, dataset=dataset.name,
        extra={"seed": options.seed, "epochs": options.epochs, "test_accuracy": test_acc},
    )
    return TrainResult(model, config, test_acc, train_acc, seconds, options.epochs)
