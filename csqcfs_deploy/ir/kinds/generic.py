"""The kind-generic operations on synapse groups, declared once.

A synapse group has two forms: its *ANN op* in the captured graph (a
:class:`WeightedOp`: ``ConvOp``, ``LinearOp``, ``IdentityOp``) and its *IF projection*
in the IF graph (a :class:`~csqcfs_deploy.ir.nodes.Projection`: ``ConvProjection``,
``DenseProjection``, ``IdentityProjection``). Every operation on either form is
declared here:

* where the arithmetic differs per kind, as a ``functools.singledispatch`` function
  whose default raises :class:`~csqcfs_deploy.errors.TargetError` ("projection p: kind
  X is not supported by <operation>"); each kind module of :mod:`csqcfs_deploy.ir.kinds`
  registers its implementation: :func:`apply_weights`, :func:`projection_macs`,
  :func:`op_forward`, :func:`scale_op_inputs`, :func:`op_to_projection`;
* where it does not, written once for every kind on top of those and of the weight
  layout shared by all kinds (the output channel on axis 0): :func:`apply_projection`,
  :func:`fanout`, :func:`input_synapses`, :func:`max_abs_output`,
  :func:`scale_op_outputs`, :func:`sum_pool`, :func:`apply_weight_exp`.

Tensors are (N, *shape) with N the batch; per-channel arrays are (C,).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from csqcfs_deploy.errors import TargetError
from csqcfs_deploy.ir.kinds.table import kind_name
from csqcfs_deploy.ir.nodes import Projection, SumPool

#: The float64 parameters of an ANN op.
FloatArray = npt.NDArray[np.float64]


def unsupported(node: object, operation: str) -> TargetError:
    """The error for a kind that ``operation`` has no implementation for."""
    label = getattr(node, "name", None)
    where = f"projection {label}: " if label is not None else ""
    return TargetError(f"{where}kind {kind_name(node)} is not supported by {operation}")


# --------------------------------------------------------------------------- ANN ops


@dataclass(frozen=True, eq=False)
class WeightedOp:
    """Base of the ANN ops that are synapses; ``weight`` has the output channel on axis 0."""

    weight: FloatArray


@dataclass(frozen=True, eq=False)
class BiasedOp(WeightedOp):
    """A synapse op with an optional per-output-channel bias (O,)."""

    bias: FloatArray | None


W = TypeVar("W", bound=WeightedOp)


@dataclass(frozen=True)
class Wiring:
    """Where a projection built from an ANN op sits: its name, layers and sum-pool prefix."""

    name: str
    src: str
    dst: str
    pool: SumPool | None


def per_channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values (C,) viewed as (1, C, 1, ..., 1) to broadcast against ``like``."""
    return values.view(1, -1, *([1] * (like.dim() - 2)))


@functools.singledispatch
def op_forward(op: WeightedOp, x: torch.Tensor) -> torch.Tensor:
    """The ANN op on real float64 inputs x (N, *in_shape) -> (N, *out_shape), bias included."""
    raise unsupported(op, "evaluate_ann")


@functools.singledispatch
def scale_op_inputs(op: WeightedOp, factor: FloatArray, seen_shape: tuple[int, ...],
                    where: str) -> WeightedOp:
    """Multiply the synapses from input channel c by ``factor[c]`` (C_in,).

    ``seen_shape`` is the (C, H, W) or (F,) shape the op's input has before any
    flatten; ``where`` names the node in errors.
    """
    raise unsupported(op, "the fold passes (input scaling)")


def scale_op_outputs(op: W, factor: FloatArray) -> W:
    """Multiply output channel c (its weights and bias) by ``factor[c]`` (O,), every kind."""
    shape = (-1,) + (1,) * (op.weight.ndim - 1)
    weight = op.weight * factor.reshape(shape)
    if isinstance(op, BiasedOp):
        bias = None if op.bias is None else op.bias * factor
        return dataclasses.replace(op, weight=weight, bias=bias)
    return dataclasses.replace(op, weight=weight)


@functools.singledispatch
def op_to_projection(op: WeightedOp, wiring: Wiring) -> Projection:
    """The IF projection of a folded ANN op (float weights; the bias goes to the layer)."""
    raise unsupported(op, "build_float_graph")


# --------------------------------------------------------------------------- IF projections


@functools.singledispatch
def apply_weights(p: Projection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``W (*) x`` for pooled source values x (N, *pooled_shape) -> (N, *dst_shape).

    ``weight`` is ``p.weight`` (or a stand-in of its shape) as a tensor of x's dtype.
    """
    raise unsupported(p, "apply_projection")


@functools.singledispatch
def projection_macs(p: Projection, src_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the ANN layer that ``p`` stands for (one forward pass).

    Conv ``O*H'*W'*(I/groups)*kH*kW``, dense ``O*F``; identity shortcuts (and pooling)
    are additions, not MACs.
    """
    raise unsupported(p, "projection_macs")


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


def projection_weight(p: Projection, dtype: torch.dtype, device: torch.device | str = "cpu"
                      ) -> torch.Tensor:
    """``p.weight`` as a tensor of ``dtype`` on ``device``."""
    return torch.tensor(np.asarray(p.weight), dtype=dtype, device=device)


def apply_projection(p: Projection, x: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W (*) pool(x)`` for source values x (N, *src_shape) -> (N, *dst_shape).

    Without ``weight_exp`` (see :func:`apply_weight_exp`); the arithmetic runs in the
    dtype of ``x``, so exactness for integer data is the caller's business (see
    :func:`csqcfs_deploy.ir.neuron.exact_float_bound`).
    """
    w = weight if weight is not None else projection_weight(p, x.dtype, x.device)
    if p.pool is not None:
        x = sum_pool(x, p.pool)
    return apply_weights(p, x, w)


def apply_weight_exp(acc: torch.Tensor, weight_exp: int) -> torch.Tensor:
    """Shift an integer sum by the weight exponent (right shifts floor, as numpy's >>)."""
    if weight_exp == 0:
        return acc
    if weight_exp > 0:
        return acc * (1 << weight_exp)
    return torch.div(acc, 1 << -weight_exp, rounding_mode="floor")


def max_abs_output(p: Projection, max_abs_input: float) -> float:
    """Upper bound of ``|W (*) pool(x)|`` over outputs when ``|x| <= max_abs_input``."""
    window = 1 if p.pool is None else p.pool.window
    return p.max_abs_row_sum * window * max_abs_input


def fanout(p: Projection, src_shape: tuple[int, ...]) -> torch.Tensor:
    """Per source neuron (*src_shape), the number of synapse paths of ``p`` leaving it (int64).

    The adjoint of the all-ones connectivity applied to all-ones targets: the
    gradient of ``sum(apply_projection(p, x, ones))`` by ``x`` at ``x = 1`` (borders,
    stride, groups, padding and a sum-pool prefix exact; one path per window a
    neuron is in), for every kind.
    """
    x = torch.ones(1, *src_shape, dtype=torch.float64, requires_grad=True)
    ones = torch.ones(p.weight.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(apply_projection(p, x, ones).sum(), x)
    return grad[0].round().to(torch.int64)


def input_synapses(p: Projection, src_shape: tuple[int, ...]) -> int:
    """Synapse paths of a projection from the input (all of them carry the analog input)."""
    return int(fanout(p, src_shape).sum())
