"""The identity kind: one synapse per neuron (an explicit shortcut), weight (C,).

The ANN op computes ``y[c] = weight[c] * x[c]``; the projection the same on
``pool(s)``, keeping the source's shape. No bias, no MACs (an addition).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.kinds.generic import (
    FloatArray,
    WeightedOp,
    Wiring,
    apply_weights,
    op_forward,
    op_to_projection,
    per_channel_view,
    projection_macs,
    scale_op_inputs,
)
from csqcfs_deploy.ir.nodes import Projection, register


@dataclass(frozen=True, eq=False)
class IdentityOp(WeightedOp):
    """y[c] = weight[c] * x[c] (an explicit shortcut synapse), weight (C,)."""


@register
@dataclass(frozen=True, eq=False)
class IdentityProjection(Projection):
    """One synapse per neuron (an explicit shortcut), weight (C,) per channel."""

    def __post_init__(self) -> None:
        self._check_common(1)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.pooled_shape(src_shape)
        if shape[0] != self.weight.shape[0]:
            raise GraphError(f"projection {self.name}: weight has {self.weight.shape[0]} "
                             f"channels, source has {shape[0]}")
        return shape


# --------------------------------------------------------------------------- ANN op


@op_forward.register
def _forward(op: IdentityOp, x: torch.Tensor) -> torch.Tensor:
    return x * per_channel_view(torch.from_numpy(op.weight), x)


@scale_op_inputs.register
def _scale_inputs(op: IdentityOp, factor: FloatArray, seen_shape: tuple[int, ...],
                  where: str) -> IdentityOp:
    return replace(op, weight=op.weight * factor)


@op_to_projection.register
def _to_projection(op: IdentityOp, wiring: Wiring) -> IdentityProjection:
    return IdentityProjection(name=wiring.name, src=wiring.src, dst=wiring.dst,
                              weight=op.weight, pool=wiring.pool)


# --------------------------------------------------------------------------- IF projection


@apply_weights.register
def _apply(p: IdentityProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * per_channel_view(weight, x)


@projection_macs.register
def _macs(p: IdentityProjection, src_shape: tuple[int, ...]) -> int:
    """An identity shortcut is an addition, not a MAC."""
    return 0
