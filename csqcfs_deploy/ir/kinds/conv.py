"""The conv kind: a 2-D convolution, as an ANN op and as an IF projection.

Weight (O, I/groups, kH, kW), stride, zero padding, groups; no dilation. The
ANN op computes ``y = conv2d(x, weight, bias)`` on (N, I, H, W); the projection
computes ``W (*) pool(s)`` into (N, O, H', W') without a bias (the bias belongs to
the target layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.fields import MAX_WINDOW, as_int, as_pair
from csqcfs_deploy.ir.kinds.generic import (
    BiasedOp,
    FloatArray,
    Wiring,
    apply_weights,
    op_forward,
    op_to_projection,
    projection_macs,
    scale_op_inputs,
)
from csqcfs_deploy.ir.nodes import Projection, check_padded, register, set_field, window_out


@dataclass(frozen=True, eq=False)
class ConvOp(BiasedOp):
    """y = conv2d(x, weight, bias), weight (O, I/groups, kH, kW)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


@register
@dataclass(frozen=True, eq=False)
class ConvProjection(Projection):
    """2-D convolution, weight (O, I/groups, kH, kW), zero padding."""

    weight_exp_refusal: ClassVar[str | None] = (
        "a conv weight exponent is not supported (Lava's fixed-point Conv ignores it)")

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

    def __post_init__(self) -> None:
        self._check_common(4)
        where = f"projection {self.name}"
        set_field(self, "stride", as_pair(self.stride, f"{where} stride", 1))
        set_field(self, "padding", as_pair(self.padding, f"{where} padding", 0))
        set_field(self, "groups", as_int(self.groups, f"{where} groups", 1))
        for k in self.kernel:
            as_int(k, f"{where} kernel size", 1, MAX_WINDOW)
        if self.weight.shape[0] % self.groups:
            raise GraphError(f"projection {self.name}: groups {self.groups} do not divide "
                             f"{self.weight.shape[0]} output channels")

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.pooled_shape(src_shape)
        if len(shape) != 3:
            raise GraphError(f"projection {self.name}: conv needs (C, H, W) input, got {shape}")
        c, h, w = shape
        check_padded(shape, self.padding, f"projection {self.name}")
        if c != self.weight.shape[1] * self.groups:
            raise GraphError(f"projection {self.name}: weight expects "
                             f"{self.weight.shape[1] * self.groups} input channels, source has {c}")
        oh = window_out(h, self.kernel[0], self.stride[0], self.padding[0])
        ow = window_out(w, self.kernel[1], self.stride[1], self.padding[1])
        if oh < 1 or ow < 1:
            raise GraphError(f"projection {self.name}: kernel does not fit input {shape}")
        return (int(self.weight.shape[0]), oh, ow)


# --------------------------------------------------------------------------- ANN op


@op_forward.register
def _forward(op: ConvOp, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, torch.from_numpy(op.weight),
                    None if op.bias is None else torch.from_numpy(op.bias),
                    op.stride, op.padding, 1, op.groups)


@scale_op_inputs.register
def _scale_inputs(op: ConvOp, factor: FloatArray, seen_shape: tuple[int, ...],
                  where: str) -> ConvOp:
    """Input channel c = g * cin_g + i of group g scales ``weight[o, i]`` for o in group g."""
    groups = op.groups
    cin_g = op.weight.shape[1]
    out_per_g = op.weight.shape[0] // groups
    f = factor.reshape(groups, cin_g)  # channel c = g * cin_g + i
    f = np.repeat(f, out_per_g, axis=0)  # (O, cin_g)
    return replace(op, weight=op.weight * f[:, :, None, None])


@op_to_projection.register
def _to_projection(op: ConvOp, wiring: Wiring) -> ConvProjection:
    return ConvProjection(name=wiring.name, src=wiring.src, dst=wiring.dst, weight=op.weight,
                          pool=wiring.pool, stride=op.stride, padding=op.padding,
                          groups=op.groups)


# --------------------------------------------------------------------------- IF projection


@apply_weights.register
def _apply(p: ConvProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, p.stride, p.padding, 1, p.groups)


@projection_macs.register
def _macs(p: ConvProjection, src_shape: tuple[int, ...]) -> int:
    """``O*H'*W'*(I/groups)*kH*kW``."""
    out = p.out_shape(src_shape)
    return int(np.prod(out)) * int(np.prod(p.weight.shape[1:]))
