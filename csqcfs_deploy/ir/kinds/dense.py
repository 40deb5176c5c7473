"""The dense kind: a fully connected layer, as an ANN op and as an IF projection.

Weight (O, F). The ANN op computes ``y = x @ weight.T + bias`` on (N, F); the
projection flattens a (C, H, W) source C-major and computes ``W @ pool(s)`` into
(N, O) without a bias (the bias belongs to the target layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import GraphError
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
from csqcfs_deploy.ir.nodes import Projection, register


@dataclass(frozen=True, eq=False)
class LinearOp(BiasedOp):
    """y = x @ weight.T + bias, weight (O, F)."""


@register
@dataclass(frozen=True, eq=False)
class DenseProjection(Projection):
    """Fully connected, weight (O, F); a (C, H, W) source is flattened C-major."""

    def __post_init__(self) -> None:
        self._check_common(2)

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        features = int(np.prod(self.pooled_shape(src_shape)))
        if features != self.weight.shape[1]:
            raise GraphError(f"projection {self.name}: weight expects {self.weight.shape[1]} "
                             f"inputs, source gives {features}")
        return (int(self.weight.shape[0]),)


# --------------------------------------------------------------------------- ANN op


@op_forward.register
def _forward(op: LinearOp, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, torch.from_numpy(op.weight),
                    None if op.bias is None else torch.from_numpy(op.bias))


@scale_op_inputs.register
def _scale_inputs(op: LinearOp, factor: FloatArray, seen_shape: tuple[int, ...],
                  where: str) -> LinearOp:
    """Channel c of a (C, H, W) input that was flattened covers features c*H*W .. (c+1)*H*W-1."""
    per_feature = factor if len(seen_shape) == 1 else np.repeat(
        factor, int(np.prod(seen_shape[1:])))
    if per_feature.shape[0] != op.weight.shape[1]:
        raise GraphError(f"node '{where}': cannot map {factor.shape[0]} channels onto "
                         f"{op.weight.shape[1]} inputs")
    return replace(op, weight=op.weight * per_feature[None, :])


@op_to_projection.register
def _to_projection(op: LinearOp, wiring: Wiring) -> DenseProjection:
    return DenseProjection(name=wiring.name, src=wiring.src, dst=wiring.dst, weight=op.weight,
                           pool=wiring.pool)


# --------------------------------------------------------------------------- IF projection


@apply_weights.register
def _apply(p: DenseProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.flatten(1), weight)


@projection_macs.register
def _macs(p: DenseProjection, src_shape: tuple[int, ...]) -> int:
    """``O*F``."""
    return int(p.weight.shape[0] * p.weight.shape[1])
