"""Leaf modules of a traced model, translated into ANN ops (SPEC section 1).

A leaf module is translated by its class (:func:`module_op`, a ``singledispatch``
over the module's class and its bases: Conv2d, Linear, BatchNorm1d/2d, AvgPool2d,
AdaptiveAvgPool2d, Flatten, Dropout, Identity). Activations are recognised
before that by what their forward computes (:mod:`.activation`) and become
ActOps through :func:`activation_op`.
Anything else is a :class:`GraphError` naming the node and its module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from csqcfs_deploy.convert.activation import ActivationSpec
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.ann import (
    ActOp,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    DropoutOp,
    FlattenOp,
    LinearOp,
    Op,
)
from csqcfs_deploy.ir.kinds import FloatArray


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _array(t: torch.Tensor) -> FloatArray:
    """A parameter as a float64 numpy copy."""
    out: FloatArray = t.detach().to(torch.float64).cpu().numpy().copy()
    return out


def _np(t: torch.Tensor | None) -> FloatArray | None:
    return None if t is None else _array(t)


def refuse(node: fx.Node, what: str, why: str = "is not supported") -> GraphError:
    """The error for an fx node the capture cannot translate, listing what it can."""
    return GraphError(f"node '{node.name}' ({what}) {why}; supported: Conv2d, Linear, "
                      "BatchNorm, CS-QCFS/QCFS, AvgPool2d, AdaptiveAvgPool2d, Flatten, "
                      "Dropout, residual +")


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class Site:
    """Where a leaf module is called: the fx node, its label and the shapes around it."""

    node: fx.Node
    kind: str                   # "Conv2d 'features.0'", for messages
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def activation_op(spec: ActivationSpec, site: Site) -> ActOp:
    """The ActOp of a recognised activation (:mod:`.activation`), checked against its site."""
    thr = spec.threshold
    channels = site.out_shape[0]
    if thr.numel() != channels:
        raise GraphError(f"node '{site.node.name}' ({site.kind}): threshold has {thr.numel()} "
                         f"values for {channels} channels")
    lam: FloatArray = thr.detach().to(torch.float64).numpy().copy()
    return ActOp(lam, spec.levels, spec.phi, lam.copy())


@functools.singledispatch
def module_op(m: nn.Module, site: Site) -> Op | None:
    """Translate one leaf module by its class; None means 'pass through' (Identity)."""
    raise refuse(site.node, site.kind)


@module_op.register
def _conv(m: nn.Conv2d, site: Site) -> Op | None:
    if m.padding_mode != "zeros":
        raise refuse(site.node, site.kind, f"uses padding_mode={m.padding_mode!r}")
    if _pair(m.dilation) != (1, 1):
        raise refuse(site.node, site.kind, "uses dilation")
    if isinstance(m.padding, str):
        raise refuse(site.node, site.kind, f"uses padding={m.padding!r}; give explicit padding")
    return ConvOp(_array(m.weight), _np(m.bias), _pair(m.stride), _pair(m.padding),
                  int(m.groups))


@module_op.register
def _linear(m: nn.Linear, site: Site) -> Op | None:
    return LinearOp(_array(m.weight), _np(m.bias))


@module_op.register(nn.BatchNorm1d)
@module_op.register(nn.BatchNorm2d)
def _batchnorm(m: nn.BatchNorm1d | nn.BatchNorm2d, site: Site) -> Op | None:
    """Eval-mode BN: ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``."""
    if m.running_mean is None or m.running_var is None:
        raise refuse(site.node, site.kind,
                      "has no running statistics (track_running_stats=False)")
    var = m.running_var.detach().to(torch.float64)
    mean = m.running_mean.detach().to(torch.float64)
    gamma = (m.weight.detach().to(torch.float64) if m.weight is not None
             else torch.ones_like(var))
    beta = m.bias.detach().to(torch.float64) if m.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + m.eps)
    return BatchNormOp(_array(scale), _array(beta - mean * scale))


@module_op.register
def _avgpool(m: nn.AvgPool2d, site: Site) -> Op | None:
    if m.ceil_mode:
        raise refuse(site.node, site.kind, "uses ceil_mode=True")
    if m.divisor_override is not None:
        raise refuse(site.node, site.kind, "uses divisor_override")
    pad = _pair(m.padding)
    if pad != (0, 0) and not m.count_include_pad:
        raise refuse(site.node, site.kind, "uses count_include_pad=False with padding")
    k = _pair(m.kernel_size)
    return AvgPoolOp(k, _pair(m.stride if m.stride is not None else k), pad)


@module_op.register
def _adaptive_pool(m: nn.AdaptiveAvgPool2d, site: Site) -> Op | None:
    """An adaptive pool to a size that divides the input is a plain average pool."""
    _, h, w = site.in_shape
    output_size: Any = m.output_size
    oh, ow = _pair(output_size if output_size is not None else (h, w))
    oh, ow = (oh or h), (ow or w)
    if h % oh or w % ow:
        raise refuse(site.node, site.kind,
                      f"pools {h}x{w} to {oh}x{ow}, which is not a whole division")
    return AvgPoolOp((h // oh, w // ow), (h // oh, w // ow), (0, 0))


@module_op.register
def _flatten_module(m: nn.Flatten, site: Site) -> Op | None:
    if m.start_dim != 1 or m.end_dim != -1:
        raise refuse(site.node, site.kind, f"flattens dims {m.start_dim}..{m.end_dim} "
                      "(only 1..-1)")
    return FlattenOp()


@module_op.register(nn.Dropout)
@module_op.register(nn.Dropout1d)
@module_op.register(nn.Dropout2d)
def _dropout(m: nn.Module, site: Site) -> Op | None:
    return DropoutOp()


@module_op.register
def _identity(m: nn.Identity, site: Site) -> Op | None:
    return None


def leaf_op(m: nn.Module, site: Site) -> Op | None:
    """A leaf module by class (activations are recognised before, by what they compute)."""
    return module_op(m, site)
