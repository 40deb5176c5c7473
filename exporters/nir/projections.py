"""Reading one projection: a chain of NIR synapse nodes -> an IF graph projection.

A chain is ``[SumPool2d] [Flatten]`` followed by one weighted node, dispatched by
its NIR node type through :data:`WEIGHTED_NODES` (a :class:`KindTable`):

    nir.Conv2d   -> ConvProjection (metadata ``groups`` restores a grouped conv stored
                    dense), or IdentityProjection (kind "identity": a 1x1 Conv2d
                    with a diagonal weight)
    nir.Affine   -> DenseProjection, or IdentityProjection (a square diagonal Affine)
    nir.Linear   -> as Affine, without a bias

A NIR weight is in membrane units: the stored integer weight is ``W_nir >>
weight_shift`` (refused unless ``W_nir`` is a multiple of ``2**weight_shift``); a
float graph being imported (``Semantics.real``) keeps real weights and biases. The
weighted node's bias (C,) is the bias the projection adds to its destination
layer every step (the reader sums those of every projection into one layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nir
import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.nir.groups import compress_groups
from csqcfs_deploy.exporters.nir.semantics import Chain, Semantics, plain_spike_edge
from csqcfs_deploy.exporters.nir.validate import (
    int_values,
    md_int,
    md_kind,
    pair,
    real_values,
    shape_of,
)
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    ProjectionT,
    SumPool,
)
from csqcfs_deploy.ir.kinds import KindTable

PROJECTION_KINDS = ("conv", "dense", "identity")


@dataclass(frozen=True)
class Weighted:
    """The weighted node of one chain, read up to its kind-specific checks.

    ``shape`` is its input shape (after the pool and flatten prefix), ``weight``
    the stored integer weight (``W_nir >> weight_shift``, int64), ``kind`` the
    metadata kind ("" for plain NIR).
    """

    name: str
    node: Any
    src: str
    dst: str
    shape: tuple[int, ...]
    flattened: bool
    pool: SumPool | None
    kind: str
    ours: bool
    weight: npt.NDArray[Any]
    weight_exp: int


@dataclass(frozen=True)
class WeightedReader:
    """How one NIR node type is read: whether it carries a bias, and the projection."""

    has_bias: bool
    build: Callable[[Weighted], ProjectionT]


WEIGHTED_NODES: KindTable[WeightedReader] = KindTable("the NIR reader")


# --------------------------------------------------------------------------- Conv2d


def _conv_padding(name: str, value: Any, kernel: tuple[int, ...], stride: tuple[int, int]
                  ) -> tuple[int, int]:
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        if text == "valid":
            return (0, 0)
        if text == "same" and stride == (1, 1) and all(k % 2 == 1 for k in kernel):
            return (int(kernel[0]) // 2, int(kernel[1]) // 2)
        raise GraphError(f"node {name}: padding {text!r} is not supported here")
    return pair(name, "padding", value)


def _check_conv_input(wn: Weighted) -> None:
    name, node, shape = wn.name, wn.node, wn.shape
    if wn.flattened:
        raise GraphError(f"node {name}: a Conv2d after a Flatten")
    if len(shape) != 3:
        raise GraphError(f"node {name}: a Conv2d needs a (C, H, W) input, gets {shape}")
    if node.input_shape is not None and tuple(int(d) for d in np.asarray(
            node.input_shape).reshape(-1)) != shape[1:]:
        raise GraphError(f"node {name}: declares input {tuple(np.asarray(node.input_shape))}"
                         f" but receives {shape[1:]} from {wn.src}")
    if pair(name, "dilation", node.dilation) != (1, 1):
        raise GraphError(f"node {name}: dilation is not supported")
    if wn.weight.ndim != 4:
        raise GraphError(f"node {name}: a Conv2d weight must be 4-D, got {wn.weight.shape}")


def _conv_identity(wn: Weighted, stride: tuple[int, int], padding: tuple[int, int],
                   groups: int) -> IdentityProjection:
    """Kind "identity" on (C, H, W): a 1x1 Conv2d with a diagonal C x C weight."""
    w, c = wn.weight, wn.shape[0]
    diag = np.diag(w.reshape(w.shape[0], -1)) if w.shape[2:] == (1, 1) else None
    if (diag is None or w.shape[:2] != (c, c) or groups != 1 or stride != (1, 1)
            or padding != (0, 0) or np.any(w.reshape(c, c) != np.diag(diag))):
        raise InputFileError(f"node {wn.name}: an identity projection must be a 1x1 "
                             f"Conv2d with a diagonal {c}x{c} weight")
    return IdentityProjection(name=wn.name, src=wn.src, dst=wn.dst, weight=diag.copy(),
                              pool=wn.pool, weight_exp=wn.weight_exp)


def _conv(wn: Weighted, stride: tuple[int, int], padding: tuple[int, int],
          groups: int) -> ConvProjection:
    """A conv; in our files a grouped conv is stored dense with metadata ``groups``."""
    w = wn.weight
    if wn.ours:
        if groups != 1:
            raise InputFileError(f"node {wn.name}: csqcfs-deploy files store grouped "
                                 "convolutions dense (groups = 1 in the node)")
        groups = md_int(wn.name, wn.node, "groups")
        w = compress_groups(wn.name, w, groups)
    return ConvProjection(name=wn.name, src=wn.src, dst=wn.dst, weight=w, pool=wn.pool,
                          stride=stride, padding=padding, groups=groups,
                          weight_exp=wn.weight_exp)


def _read_conv2d(wn: Weighted) -> ProjectionT:
    _check_conv_input(wn)
    stride = pair(wn.name, "stride", wn.node.stride)
    padding = _conv_padding(wn.name, wn.node.padding, wn.weight.shape[2:], stride)
    groups = int(wn.node.groups)
    if wn.kind == "identity":
        return _conv_identity(wn, stride, padding, groups)
    return _conv(wn, stride, padding, groups)


# --------------------------------------------------------------------------- Affine, Linear


def _read_matrix(wn: Weighted) -> ProjectionT:
    """Affine or Linear on (F,): dense, or (kind "identity") a square diagonal matrix."""
    name, w = wn.name, wn.weight
    if len(wn.shape) != 1:
        raise GraphError(f"node {name}: a dense node needs a 1-D input, gets {wn.shape} (add "
                         "a nir.Flatten with start_dim=0)")
    if w.ndim != 2:
        raise GraphError(f"node {name}: weight must be 2-D, got {w.shape}")
    if wn.kind == "identity":
        if w.shape[0] != w.shape[1] or np.any(w != np.diag(np.diag(w))):
            raise InputFileError(f"node {name}: an identity projection must be a square "
                                 "diagonal Affine")
        return IdentityProjection(name=name, src=wn.src, dst=wn.dst,
                                  weight=np.diag(w).copy(), pool=wn.pool,
                                  weight_exp=wn.weight_exp)
    return DenseProjection(name=name, src=wn.src, dst=wn.dst, weight=w, pool=wn.pool,
                           weight_exp=wn.weight_exp)


WEIGHTED_NODES.add(nir.Conv2d, WeightedReader(has_bias=True, build=_read_conv2d))
WEIGHTED_NODES.add(nir.Affine, WeightedReader(has_bias=True, build=_read_matrix))
WEIGHTED_NODES.add(nir.Linear, WeightedReader(has_bias=False, build=_read_matrix))


# --------------------------------------------------------------------------- the chain


def _pool_prefix(nodes: Mapping[str, Any], rest: list[str], shape: tuple[int, ...]
                 ) -> tuple[SumPool | None, tuple[int, ...]]:
    """Pop a leading SumPool2d off ``rest``: (the pool or None, the shape after it)."""
    if not isinstance(nodes[rest[0]], nir.SumPool2d):
        return None, shape
    name = rest.pop(0)
    node = nodes[name]
    try:
        pool = SumPool(kernel=pair(name, "kernel_size", node.kernel_size),
                       stride=pair(name, "stride", node.stride),
                       padding=pair(name, "padding", node.padding))
        return pool, pool.out_shape(shape)
    except GraphError as exc:
        raise GraphError(f"node {name}: {exc}") from None


def _flatten_prefix(nodes: Mapping[str, Any], rest: list[str], shape: tuple[int, ...]
                    ) -> tuple[bool, tuple[int, ...]]:
    """Pop a leading full Flatten off ``rest``: (whether there was one, the shape after it)."""
    if not rest or not isinstance(nodes[rest[0]], nir.Flatten):
        return False, shape
    name = rest.pop(0)
    node = nodes[name]
    declared = node.input_type.get("input") if isinstance(node.input_type, dict) else None
    if declared is not None and shape_of(name, declared) != shape:
        raise GraphError(f"node {name}: flattens shape {shape_of(name, declared)} but "
                         f"receives {shape}")
    if int(node.start_dim) != 0 or int(node.end_dim) not in (-1, len(shape) - 1):
        raise GraphError(f"node {name}: only a full flatten (start_dim=0, end_dim=-1; NIR "
                         "shapes exclude the batch) is supported")
    return True, (int(np.prod(shape)),)


def _stored_weight(name: str, node: Any, sem: Semantics) -> npt.NDArray[Any]:
    """``W_nir >> weight_shift`` as int64, refusing a weight that is not a multiple."""
    w = int_values(name, "weight", node.weight)
    unit = 1 << sem.weight_shift
    if np.any(w % unit):
        raise GraphError(f"node {name}: weights are not multiples of 2**{sem.weight_shift} "
                         f"(profile {sem.profile.name} shifts synaptic input by "
                         f"{sem.weight_shift})")
    return w // unit


def _dst_bias(name: str, bias: npt.NDArray[Any] | None, channels: int) -> npt.NDArray[Any]:
    """The weighted node's bias as (C,) int64 (zeros without one)."""
    if bias is None:
        bias = np.zeros(channels, dtype=np.int64)  # int64 zeros add to real biases too
    bias = bias.reshape(-1) if bias.size == channels else bias
    if bias.shape != (channels,):
        raise GraphError(f"node {name}: bias has shape {bias.shape}, expected ({channels},)")
    return bias


def read_projection(ng: nir.NIRGraph, sem: Semantics, chain: Chain,
                    shapes: Mapping[str, tuple[int, ...]]) -> tuple[ProjectionT, npt.NDArray[Any]]:
    """The projection of one chain and the bias it adds to its destination (int64)."""
    nodes = ng.nodes
    shape, dst_shape = shapes[chain.src], shapes[chain.dst]
    rest = list(chain.nodes)
    if not rest:  # plain NIR: a spike edge = identity synapse of weight 1
        if not sem.ours and shape == dst_shape:
            return plain_spike_edge(chain, shape)
        raise GraphError(f"edge {chain.src} -> {chain.dst}: connects shapes {shape} and "
                         f"{dst_shape} without a synapse node")
    pool, shape = _pool_prefix(nodes, rest, shape)
    flattened, shape = _flatten_prefix(nodes, rest, shape)
    if len(rest) != 1 or not WEIGHTED_NODES.supports(nodes[rest[0]]):
        where = rest[0] if rest else chain.nodes[-1]
        raise GraphError(f"node {where}: a projection must be [SumPool2d] [Flatten] followed by "
                         "one Conv2d, Affine or Linear node before the next neuron group")
    name = rest[0]
    node = nodes[name]
    kind = md_kind(node) if sem.ours else ""
    if sem.ours and kind not in PROJECTION_KINDS:
        raise InputFileError(f"node {name}: metadata kind {kind!r} is not a projection kind")
    weight_exp = md_int(name, node, "weight_exp") if sem.ours else 0
    values = real_values if sem.real else int_values
    w = real_values(name, "weight", node.weight) if sem.real else _stored_weight(name, node, sem)
    reader = WEIGHTED_NODES.lookup(node)
    bias = values(name, "bias", node.bias) if reader.has_bias else None
    proj = reader.build(Weighted(name=name, node=node, src=chain.src, dst=chain.dst,
                                 shape=shape, flattened=flattened, pool=pool, kind=kind,
                                 ours=sem.ours, weight=w, weight_exp=weight_exp))
    try:
        out = proj.out_shape(shapes[chain.src])
    except GraphError as exc:
        raise GraphError(f"node {name}: {exc}") from None
    if out != dst_shape:
        raise GraphError(f"node {name}: produces shape {out} but {chain.dst} has shape "
                         f"{dst_shape}")
    return proj, _dst_bias(name, bias, out[0])
