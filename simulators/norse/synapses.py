"""The synapses of the Norse module: one ``nn.Sequential`` per projection.

Each projection becomes torch layers holding its integer weights as floats, in
this order: a :class:`SumPool2d` where the projection has a pool; the kind's own
layer (``nn.Conv2d``, ``nn.Flatten`` + ``nn.Linear``, or :class:`ChannelScale` for
an identity shortcut, chosen through the :data:`SYNAPSES` kind table);
:class:`IntegerRound`; and, where ``weight_exp != 0``, :class:`WeightExponent`.
Input (N, *src_shape) -> output (N, *dst_shape), integers in the module's dtype
(exact by :mod:`.bounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    ProjectionT,
    SumPool,
)
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.synapses import sum_pool


class SumPool2d(nn.Module):
    """Sum over pooling windows with zero padding, (N, C, H, W) -> (N, C, H', W')."""

    def __init__(self, pool: SumPool) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_pool(x, self.pool)

    def extra_repr(self) -> str:
        return f"kernel={self.pool.kernel}, stride={self.pool.stride}, padding={self.pool.padding}"


class ChannelScale(nn.Module):
    """Identity projection: one synapse per neuron, ``x * w[c]``; weight (C,)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class IntegerRound(nn.Module):
    """Round to the nearest integer; identity gradient (straight-through)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return x.round()
        return x + (x.round() - x).detach()


class WeightExponent(nn.Module):
    """Shift an integer sum by ``exp``: ``x * 2**exp``, or ``floor(x / 2**-exp)``."""

    def __init__(self, exp: int) -> None:
        super().__init__()
        self.exp = int(exp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exp >= 0:
            return x * float(1 << self.exp)
        return torch.floor(x / float(1 << -self.exp))

    def extra_repr(self) -> str:
        return f"exp={self.exp}"


#: Builds a projection kind's own layers from (projection, weight tensor in the module's
#: dtype, dtype).
SynapseLayers = Callable[[Any, torch.Tensor, torch.dtype], list[nn.Module]]

#: The kinds of projection the Norse back end runs, keyed by projection class.
SYNAPSES: KindTable[SynapseLayers] = KindTable("norse")


@SYNAPSES.register(ConvProjection)
def _conv(p: ConvProjection, w: torch.Tensor, dtype: torch.dtype) -> list[nn.Module]:
    """(N, C_in, H, W) -> (N, C_out, H', W'); weight (C_out, C_in / groups, kh, kw)."""
    conv = nn.Conv2d(w.shape[1] * p.groups, w.shape[0], p.kernel, stride=p.stride,
                     padding=p.padding, groups=p.groups, bias=False, dtype=dtype)
    conv.weight = nn.Parameter(w, requires_grad=False)
    return [conv]


@SYNAPSES.register(DenseProjection)
def _dense(p: DenseProjection, w: torch.Tensor, dtype: torch.dtype) -> list[nn.Module]:
    """(N, *src_shape) -> flattened (N, F_in) -> (N, F_out); weight (F_out, F_in)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return [nn.Flatten(1), lin]


@SYNAPSES.register(IdentityProjection)
def _identity(p: IdentityProjection, w: torch.Tensor, dtype: torch.dtype) -> list[nn.Module]:
    """(N, C, ...) -> (N, C, ...), ``x * w[c]``; weight (C,)."""
    return [ChannelScale(w)]


def synapse_module(p: ProjectionT, dtype: torch.dtype) -> nn.Sequential:
    """The torch layers of one projection, holding its integer weights in ``dtype``.

    A projection kind without a :data:`SYNAPSES` entry is a
    :class:`~csqcfs_deploy.errors.TargetError` naming it.
    """
    build = SYNAPSES.lookup(p)
    w = torch.tensor(np.asarray(p.weight), dtype=dtype)
    parts: list[nn.Module] = []
    if p.pool is not None:
        parts.append(SumPool2d(p.pool))
    parts += build(p, w, dtype)
    parts.append(IntegerRound())
    if p.weight_exp != 0:
        parts.append(WeightExponent(p.weight_exp))
    return nn.Sequential(*parts)
