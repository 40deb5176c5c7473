"""How an integer IF graph maps onto Lava's synapse processes (no Lava import here).

Lava has two synapse processes that compute bit-exactly what our projections do:
``Conv`` (PyConvModelFixed) into a (C, H, W) layer and ``Dense``
(PyDenseModelBitAcc) into a (F,) layer. Every projection becomes one of them:

* a sum pool in front of a projection is folded into its weights
  (:func:`fold_pool`; exact for non-overlapping, unpadded pools:
  ``W'[o, i, a, b] = W[o, i, a // kh, b // kw]``; others are refused);
* an identity shortcut is a depthwise 1x1 ``Conv`` (into a (C, H, W) layer) or a
  diagonal ``Dense`` (into a (F,) layer) (:func:`lava_projection`);
* conv weights (O, I, kH, kW) cross-correlation become Lava's (O, kW, kH, I)
  convolution weights (:func:`lava_conv_weight`).

:func:`check_lava_graph` refuses a graph Lava's fixed-point models cannot run
bit-exactly: one projection's sum beyond what its synapse process computes
exactly, or one step's synaptic input into a neuron group (the sum over its
projections, after the weight exponent) that Lava's neuron models would overflow
when they shift it into the current (``a_in << 6`` in int32: exact only for
``-2**25 <= a_in < 2**25``; stock Lava's LIF gives u = -2130706432 for
a_in = 2**25 where the simulator's int64 arithmetic gives +2**31 - 2**24). Every
per-kind rule goes through a :class:`KindTable` ("lava"): a kind without a rule
is a ``TargetError`` naming the projection and its kind. The lava-netx exporter
plans its file with the same functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from csqcfs_deploy.convert.quantize import check_profile
from csqcfs_deploy.errors import GraphError, TargetError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    ProjectionT,
    SumPool,
)
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.synapses import max_abs_output

CONV_EXACT = 2**23      # PyConvModelFixed wraps its output to 24 signed bits
DENSE_EXACT = 2**31     # PyDenseModelBitAcc accumulates in int32
ACT_SHIFT = 6           # AbstractPyLifModelFixed: a_in << 6 into the current, in int32
CURRENT_EXACT = 2 ** (31 - ACT_SHIFT)   # exact for -CURRENT_EXACT <= a_in < CURRENT_EXACT


@dataclass(frozen=True)
class LavaSynapse:
    """The Lava process that carries a pool-free projection kind.

    ``exact_limit``: one step's synaptic sum is exact while ``|sum| < exact_limit``
    (``range_label`` names that range in errors); ``flat_input``: the process takes
    the source's C-major flat spikes (``s_out_flat``) rather than Lava's (W, H, C)
    array (``s_out``).
    """

    process: str
    exact_limit: int
    range_label: str
    flat_input: bool


SYNAPSES: KindTable[LavaSynapse] = KindTable("lava")
SYNAPSES.add(ConvProjection, LavaSynapse("Conv", CONV_EXACT, "Conv (24-bit output)",
                                         flat_input=False))
SYNAPSES.add(DenseProjection, LavaSynapse("Dense", DENSE_EXACT, "Dense (int32)",
                                          flat_input=True))

# (projection of that kind, its sum pool, source shape (C, H, W)) -> pool-free projection
PoolFold = Callable[[Any, SumPool, tuple[int, ...]], ProjectionT]
_POOL_FOLDS: KindTable[PoolFold] = KindTable("lava")

# (pool-free projection of that kind, source shape) -> a Conv or Dense projection
AsSynapse = Callable[[Any, tuple[int, ...]], ProjectionT]
_AS_SYNAPSE: KindTable[AsSynapse] = KindTable("lava")


# --------------------------------------------------------------------------- pools


def fold_pool(p: ProjectionT, src_shape: tuple[int, ...]) -> ProjectionT:
    """The same projection with its sum pool folded into the weights (no pool left).

    Exact for non-overlapping, unpadded pools (kernel == stride, padding 0):
    conv ``W'[o, i, a, b] = W[o, i, a // kh, b // kw]`` with stride and padding
    times the pool kernel (a padded conv also needs the input to tile exactly);
    dense: the same repetition on the (C, H, W) source, zero where the pool
    drops a border; identity: a depthwise conv of the pool kernel.
    """
    pool = p.pool
    if pool is None:
        return p
    if pool.kernel != pool.stride or pool.padding != (0, 0):
        raise TargetError(
            f"projection {p.name}: its sum pool (kernel {pool.kernel}, stride {pool.stride}, "
            f"padding {pool.padding}) overlaps or is padded; the Lava exporter folds only "
            "non-overlapping, unpadded pools into the next weights")
    return _POOL_FOLDS.lookup(p)(p, pool, src_shape)


@_POOL_FOLDS.register(ConvProjection)
def _fold_into_conv(p: ConvProjection, pool: SumPool, src_shape: tuple[int, ...]
                    ) -> ProjectionT:
    kh, kw = pool.kernel
    _, h, w = src_shape
    if p.padding != (0, 0) and (h % kh or w % kw):
        raise TargetError(
            f"projection {p.name}: a padded conv after a {kh}x{kw} sum pool on a {h}x{w} "
            "map that the pool does not tile cannot be folded into one Lava Conv")
    weight = np.repeat(np.repeat(p.weight, kh, axis=2), kw, axis=3)
    return dataclasses.replace(
        p, weight=weight, pool=None,
        stride=(p.stride[0] * kh, p.stride[1] * kw),
        padding=(p.padding[0] * kh, p.padding[1] * kw))


@_POOL_FOLDS.register(DenseProjection)
def _fold_into_dense(p: DenseProjection, pool: SumPool, src_shape: tuple[int, ...]
                     ) -> ProjectionT:
    kh, kw = pool.kernel
    c, h, w = src_shape
    q, r = h // kh, w // kw
    wt = p.weight.reshape(-1, c, q, r)
    wt = np.repeat(np.repeat(wt, kh, axis=2), kw, axis=3)
    full = np.zeros((wt.shape[0], c, h, w), dtype=wt.dtype)
    full[:, :, : q * kh, : r * kw] = wt
    return dataclasses.replace(p, weight=full.reshape(wt.shape[0], -1), pool=None)


@_POOL_FOLDS.register(IdentityProjection)
def _fold_into_identity(p: IdentityProjection, pool: SumPool, src_shape: tuple[int, ...]
                        ) -> ProjectionT:
    kh, kw = pool.kernel
    c = src_shape[0]
    weight = np.broadcast_to(p.weight.reshape(-1, 1, 1, 1), (c, 1, kh, kw)).copy()
    return ConvProjection(p.name, p.src, p.dst, weight, None, p.weight_exp,
                          stride=(kh, kw), padding=(0, 0), groups=c)


# --------------------------------------------------------------------------- synapses


def lava_projection(p: ProjectionT, src_shape: tuple[int, ...]) -> ProjectionT:
    """A pool-free conv (into a 3-D layer) or dense (into a 1-D layer) equivalent of ``p``."""
    q = fold_pool(p, src_shape)
    return _AS_SYNAPSE.lookup(q)(q, src_shape)


def _as_is(q: ProjectionT, src_shape: tuple[int, ...]) -> ProjectionT:
    return q


_AS_SYNAPSE.register(ConvProjection, DenseProjection)(_as_is)


@_AS_SYNAPSE.register(IdentityProjection)
def _identity_as_synapse(q: IdentityProjection, src_shape: tuple[int, ...]) -> ProjectionT:
    """Depthwise 1x1 conv on a (C, H, W) source, diagonal dense on a (F,) source."""
    n = q.weight.shape[0]
    if len(src_shape) == 3:
        return ConvProjection(q.name, q.src, q.dst, q.weight.reshape(n, 1, 1, 1), None,
                              q.weight_exp, stride=(1, 1), padding=(0, 0), groups=n)
    return DenseProjection(q.name, q.src, q.dst, np.diag(q.weight), None, q.weight_exp)


def lava_conv_weight(weight: NDArray[Any]) -> NDArray[Any]:
    """(O, I, kH, kW) cross-correlation weights -> Lava Conv's (O, kW, kH, I) convolution
    weights (Lava's Conv flips the kernel, as a true convolution does)."""
    return np.ascontiguousarray(weight.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :])


# --------------------------------------------------------------------------- checks


def source_range(graph: IFGraph, name: str) -> tuple[int, int]:
    """(lowest, highest) value layer ``name`` sends in one step: spikes 0..1, the input its
    encoding's integers (within ``max_abs_int``, as the per-projection bound)."""
    if name != graph.input.name:
        return 0, 1
    enc = graph.input.encoding
    lo, hi = enc.int_range
    return max(lo, -enc.max_abs_int), min(hi, enc.max_abs_int)


def _shift(value: int, weight_exp: int) -> int:
    """Lava Dense's weight exponent on a sum (left shift, or flooring right shift)."""
    return value << weight_exp if weight_exp >= 0 else value >> -weight_exp


def synaptic_input_rows(q: ProjectionT, lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Per output channel of the pool-free projection ``q``, the (lowest, highest) one
    step's input can take, sources in ``lo..hi`` (lo <= 0 <= hi), weight exponent applied:
    ``-(sum(w-) * hi + sum(w+) * |lo|)`` and ``sum(w+) * hi + sum(w-) * |lo|`` (exact ints)."""
    w = np.asarray(q.weight, dtype=np.int64).reshape(q.weight.shape[0], -1)
    pos = np.clip(w, 0, None).sum(axis=1).tolist()
    neg = (-np.clip(w, None, 0)).sum(axis=1).tolist()
    bottom = [_shift(-(int(b) * hi + int(a) * -lo), q.weight_exp) for a, b in zip(pos, neg,
                                                                               strict=True)]
    top = [_shift(int(a) * hi + int(b) * -lo, q.weight_exp) for a, b in zip(pos, neg,
                                                                         strict=True)]
    return bottom, top


def synaptic_input_range(q: ProjectionT, lo: int, hi: int) -> tuple[int, int]:
    """(lowest, highest) of :func:`synaptic_input_rows` over all output channels."""
    bottom, top = synaptic_input_rows(q, lo, hi)
    return min(bottom, default=0), max(top, default=0)


def check_lava_graph(graph: IFGraph) -> None:
    """Refuse a graph that Lava's fixed-point models cannot run bit-exactly.

    Needs a loihi2-quantized graph within its profile; for every projection a
    bound of one step's synaptic sum (spikes are 0/1, the input at most its
    encoding's ``max_abs_int``) below the range its Lava process computes
    exactly; and for every neuron group the bound of one step's summed input
    (all its projections, weight exponents applied) within Lava's ``a_in << 6``
    int32 range (see the module docstring).
    """
    if not graph.is_integer:
        raise GraphError("the Lava back end runs quantized graphs; convert with --profile loihi2")
    if graph.meta.profile != "loihi2":
        raise TargetError(f"the Lava back end runs the loihi2 profile only (Lava's fixed-point "
                         f"arithmetic); this graph is quantized for {graph.meta.profile}")
    check_profile(graph)
    max_src = {la.name: 1.0 for la in graph.layers}
    max_src[graph.input.name] = float(graph.input.encoding.max_abs_int)
    into: dict[str, list[tuple[str, int, int]]] = {}
    for p in graph.projections:
        q = lava_projection(p, graph.layer(p.src).shape)
        synapse = SYNAPSES.lookup(q)
        bound = max_abs_output(q, max_src[p.src])
        if bound >= synapse.exact_limit:
            raise TargetError(f"projection {p.name}: one step's synaptic sum may reach "
                             f"{bound:.3g}, beyond Lava's {synapse.range_label} exact range "
                             f"{synapse.exact_limit}")
        into.setdefault(p.dst, []).append((p.name, *synaptic_input_range(
            q, *source_range(graph, p.src))))
    for dst, parts in into.items():
        _check_current_range(dst, parts)


def _check_current_range(dst: str, parts: list[tuple[str, int, int]]) -> None:
    """Refuse a layer whose summed one-step input can overflow Lava's int32 ``a_in << 6``."""
    bottom = sum(lo for _, lo, _ in parts)
    top = sum(hi for _, _, hi in parts)
    if -CURRENT_EXACT <= bottom and top < CURRENT_EXACT:
        return
    names = " + ".join(name for name, _, _ in parts)
    reach = top if top >= CURRENT_EXACT else bottom
    raise TargetError(
        f"projection {names} (into {dst}): one step's synaptic input may reach {reach}; "
        f"Lava's neurons shift it left by {ACT_SHIFT} in int32 (a_in << {ACT_SHIFT}), which "
        f"is exact only for -2**25..2**25 - 1 ({-CURRENT_EXACT}..{CURRENT_EXACT - 1}); "
        "lower the weights or their exponent (convert with calibration, the default)")
