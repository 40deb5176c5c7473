"""QCFS and CS-QCFS activations (SPEC section 1).

For channel ``c`` with learnable raw parameter ``up_c``::

    lambda_c = softplus(up_c)          # CS-QCFS; plain QCFS uses up directly
    h(x)_c   = lambda_c / L * clip(floor(x * L / lambda_c + phi), 0, L)

Both modules follow the reference implementations' attribute convention, which
is also what :mod:`csqcfs_deploy.convert.capture` recognises in users' models: a
learnable threshold ``up`` (one value, or one per channel), a level count
``t`` and optionally ``mode = 'softplus'``; ``phi`` defaults to 0.5.

Shapes: input (N, C) or (N, C, H, W); output the same shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.floor(x) - x).detach()


def qcfs_quantize(x: torch.Tensor, lam: torch.Tensor, levels: int, phi: float) -> torch.Tensor:
    """``lam / L * clip(floor(x * L / lam + phi), 0, L)`` with a straight-through floor.

    ``lam`` broadcasts against ``x`` (shape (C,) is expanded over channel dim 1).
    """
    if lam.dim() == 1 and lam.numel() > 1:
        lam = lam.view(1, -1, *([1] * (x.dim() - 2)))
    y = x / lam
    y = torch.clamp(y, 0.0, 1.0)
    # clamping before the floor equals clipping after it for 0 <= phi < 1
    y = floor_ste(y * levels + phi) / levels
    return y * lam


def _raw_for_threshold(threshold: float) -> float:
    """Inverse softplus: the raw parameter whose softplus is ``threshold``."""
    return threshold + math.log(-math.expm1(-threshold))


class CSQCFS(nn.Module):
    """Channel-wise softplus QCFS activation.

    Args:
        channels: number of channels C (dim 1 of the input).
        levels: quantization levels L >= 1 (``t`` in the reference code).
        phi: shift, 0 <= phi < 1 (default 0.5).
        init_threshold: initial ``lambda_c`` for every channel.
    """

    mode = "softplus"

    def __init__(
        self, channels: int, levels: int, phi: float = 0.5, init_threshold: float = 1.0
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if not 0.0 <= phi < 1.0:
            raise ValueError(f"phi must be in [0, 1), got {phi}")
        self.channels = channels
        self.t = int(levels)
        self.phi = float(phi)
        self.up = nn.Parameter(torch.full((channels,), _raw_for_threshold(init_threshold)))

    @property
    def levels(self) -> int:
        return self.t

    def threshold(self) -> torch.Tensor:
        """Per-channel threshold ``lambda_c = softplus(up_c)``, shape (C,)."""
        return F.softplus(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4) or x.shape[1] != self.channels:
            raise ValueError(
                f"CSQCFS({self.channels}) expects (N, {self.channels}) or "
                f"(N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        return qcfs_quantize(x, self.threshold(), self.t, self.phi)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, levels={self.t}, phi={self.phi}"


class QCFS(nn.Module):
    """Plain QCFS activation (Bu et al., ICLR 2022): one shared threshold ``up``.

    The threshold is used as is (no softplus) and may become non-positive in
    training; the folder rejects such a network.
    """

    mode = "linear"

    def __init__(self, levels: int, phi: float = 0.5, init_threshold: float = 8.0) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.t = int(levels)
        self.phi = float(phi)
        self.up = nn.Parameter(torch.tensor([float(init_threshold)]))

    @property
    def levels(self) -> int:
        return self.t

    def threshold(self) -> torch.Tensor:
        """The shared threshold, shape (1,)."""
        return self.up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4):
            raise ValueError(f"QCFS expects (N, C) or (N, C, H, W), got {tuple(x.shape)}")
        return qcfs_quantize(x, self.up, self.t, self.phi)

    def extra_repr(self) -> str:
        return f"levels={self.t}, phi={self.phi}"
