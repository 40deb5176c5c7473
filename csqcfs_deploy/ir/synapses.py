"""Synaptic operations of the IF graph's projections, in torch.

``apply_projection(p, x)`` computes ``W (*) pool(x)`` for a batch ``x`` of
source values (N, *src_shape): spikes, spike counts or input integers. It does
*not* apply ``weight_exp``; :func:`apply_weight_exp` does, exactly as Lava's
Dense model (left shift, or arithmetic right shift = floor division).

The arithmetic runs in the dtype of ``x`` (float32/float64); exactness for
integer data is the caller's business (see :func:`csqcfs_deploy.ir.neuron.exact_float_bound`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.ir.nodes import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    ProjectionT,
    SumPool,
)


def sum_pool(x: torch.Tensor, pool: SumPool) -> torch.Tensor:
    """Sum over pooling windows with zero padding, (N, C, H, W) -> (N, C, H', W')."""
    if pool.padding != (0, 0):
        x = F.pad(x, (pool.padding[1], pool.padding[1], pool.padding[0], pool.padding[0]))
    if pool.kernel == pool.stride and x.shape[-2] % pool.kernel[0] == 0 \
            and x.shape[-1] % pool.kernel[1] == 0:
        n, c, h, w = x.shape
        kh, kw = pool.kernel
        return x.reshape(n, c, h // kh, kh, w // kw, kw).sum(dim=(3, 5))
    ones = torch.ones(x.shape[1], 1, *pool.kernel, dtype=x.dtype, device=x.device)
    return F.conv2d(x, ones, stride=pool.stride, groups=x.shape[1])


def projection_weight(p: ProjectionT, dtype: torch.dtype, device: torch.device | str = "cpu"
                      ) -> torch.Tensor:
    return torch.tensor(np.asarray(p.weight), dtype=dtype, device=device)


def apply_projection(p: ProjectionT, x: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W (*) pool(x)`` for source values x (N, *src_shape) -> (N, *dst_shape)."""
    w = weight if weight is not None else projection_weight(p, x.dtype, x.device)
    if p.pool is not None:
        x = sum_pool(x, p.pool)
    if isinstance(p, ConvProjection):
        return F.conv2d(x, w, None, p.stride, p.padding, 1, p.groups)
    if isinstance(p, DenseProjection):
        return F.linear(x.flatten(1), w)
    if isinstance(p, IdentityProjection):
        return x * w.view(1, -1, *([1] * (x.dim() - 2)))
    raise TypeError(f"unknown projection type {type(p).__name__}")  # pragma: no cover


def apply_weight_exp(acc: torch.Tensor, weight_exp: int) -> torch.Tensor:
    """Shift an integer sum by the weight exponent (right shifts floor, as numpy's >>)."""
    if weight_exp == 0:
        return acc
    if weight_exp > 0:
        return acc * (1 << weight_exp)
    return torch.div(acc, 1 << -weight_exp, rounding_mode="floor")


def max_abs_output(p: ProjectionT, max_abs_input: float) -> float:
    """Upper bound of ``|W (*) pool(x)|`` over outputs when ``|x| <= max_abs_input``."""
    window = 1 if p.pool is None else p.pool.window
    return p.max_abs_row_sum * window * max_abs_input
