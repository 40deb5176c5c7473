"""Independent oracles for the tests: the IF graph's semantics written out again from SPEC.

This module is a **deliberate independent copy** of the neuron rule, the event timing
of both schedules and the profiles' integer arithmetic, kept as a check: a test that
compares the package with itself cannot see a mistake both sides share, so nothing here
may be replaced by a call into ``csqcfs_deploy.ir.neuron`` or the simulators.

Nothing here calls the package's arithmetic: no torch convolution or pooling, no
``Profile`` method, no schedule helper, nothing from ``csqcfs_deploy.ir.neuron`` or
``csqcfs_deploy.ir.synapses``, not even ``IFGraph.topological_order``/``depths``. The graph
is read as plain data (layer shapes, integer tensors, pool and conv geometry) and every
rule comes from ../shared/SPEC.md sections 2, 4 and 5 and the schedule contract in the
docstring of ``csqcfs_deploy/ir/schedule.py``:

* :func:`synapse_matrix` enumerates every synapse of a projection, one Python loop
  iteration per (source, target) tap, into a dense int64 matrix (targets, sources);
* :func:`ann_oracle` is the quantized ANN (ANN mode) on those matrices; a spike count is
  the number of threshold multiples ``k = 1 .. L`` the L-step total reaches (no floor, no
  clip);
* :func:`if_loop` steps the integer IF network one step at a time, in both schedules,
  with pre-simulation, the pipeline fill reset and the readout clear.

All arithmetic is numpy int64, exact: the test graphs stay far below 2**62.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numpy as np

from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ProjectionT,
    ReadoutLayer,
    SumPool,
)

# --------------------------------------------------------------------------- profile rules


@dataclass(frozen=True)
class Arithmetic:
    """One profile's integer rules, as SPEC section 5 states them (int64 arrays).

    ``u = acc << act_shift``, wrapped once on a ``wrap_bits`` register
    (``u > 2**(b-1) -> u - 2**b``, ``u <= -2**(b-1) -> u + 2**b``, Lava's asymmetric edge);
    the membrane saturates to ``[v_min, v_max]``; a spike is ``v > v_th`` when ``strict``,
    else ``v >= v_th``.
    """

    act_shift: int
    wrap_bits: int | None
    v_min: int
    v_max: int
    strict: bool

    def current(self, acc: np.ndarray) -> np.ndarray:
        u = acc * (1 << self.act_shift)
        if self.wrap_bits is None:
            return u
        half = 1 << (self.wrap_bits - 1)
        u = np.where(u > half, u - 2 * half, u)
        return np.where(u <= -half, u + 2 * half, u)

    def saturate(self, v: np.ndarray) -> np.ndarray:
        return np.clip(v, self.v_min, self.v_max)

    def fires(self, v: np.ndarray, v_th: np.ndarray) -> np.ndarray:
        return v > v_th if self.strict else v >= v_th


ARITHMETIC: dict[str, Arithmetic] = {
    # 24-bit current (wraps) and voltage (saturates symmetrically), synaptic input << 6
    "loihi2": Arithmetic(6, 24, -(2**23 - 1), 2**23 - 1, True),
    # ideal integer IF: 32-bit two's-complement saturating membrane, >=
    "int8": Arithmetic(0, None, -(2**31), 2**31 - 1, False),
    "int16": Arithmetic(0, None, -(2**31), 2**31 - 1, False),
}


def shift(acc: np.ndarray, weight_exp: int) -> np.ndarray:
    """A projection's sum shifted by its weight exponent (right shifts floor)."""
    return acc << weight_exp if weight_exp >= 0 else acc >> -weight_exp


# --------------------------------------------------------------------------- synapses


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def pool_matrix(pool: SumPool, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(pooled cells, source cells) 0/1 matrix of a zero-padded sum pool, and the pooled shape."""
    c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = pool.kernel, pool.stride, pool.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    m = np.zeros((c * oh * ow, c * h * w), dtype=np.int64)
    for ch in range(c):
        for y in range(oh):
            for x in range(ow):
                for a in range(kh):
                    for b in range(kw):
                        iy, ix = y * sh - ph + a, x * sw - pw + b
                        if 0 <= iy < h and 0 <= ix < w:
                            m[(ch * oh + y) * ow + x, (ch * h + iy) * w + ix] += 1
    return m, (c, oh, ow)


@singledispatch
def _taps(p: object, shape: tuple[int, ...]) -> np.ndarray:
    """(targets, sources) weight matrix of one projection on its (pooled) source map."""
    raise TypeError(f"oracle: no synapse enumeration for {type(p).__name__}")


@_taps.register
def _conv_taps(p: ConvProjection, shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = shape
    weight = np.asarray(p.weight, dtype=np.int64)
    outs, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw) = p.stride, p.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    per_group = outs // p.groups
    m = np.zeros((outs * oh * ow, c * h * w), dtype=np.int64)
    for o in range(outs):
        first = (o // per_group) * cin_g
        for y in range(oh):
            for x in range(ow):
                row = (o * oh + y) * ow + x
                for i in range(cin_g):
                    for a in range(kh):
                        for b in range(kw):
                            iy, ix = y * sh - ph + a, x * sw - pw + b
                            if 0 <= iy < h and 0 <= ix < w:
                                m[row, ((first + i) * h + iy) * w + ix] += weight[o, i, a, b]
    return m


@_taps.register
def _dense_taps(p: DenseProjection, shape: tuple[int, ...]) -> np.ndarray:
    weight = np.asarray(p.weight, dtype=np.int64)  # one synapse per (output, source) pair
    if weight.shape[1] != _size(shape):
        raise ValueError(f"oracle: {p.name} expects {weight.shape[1]} inputs, not {shape}")
    return weight.copy()  # the source map flattened in C order


@_taps.register
def _identity_taps(p: IdentityProjection, shape: tuple[int, ...]) -> np.ndarray:
    weight = np.asarray(p.weight, dtype=np.int64)
    n, per_channel = _size(shape), _size(shape[1:])
    m = np.zeros((n, n), dtype=np.int64)
    for j in range(n):
        m[j, j] = weight[j // per_channel]
    return m


def synapse_matrix(p: ProjectionT, src_shape: tuple[int, ...]) -> np.ndarray:
    """(target neurons, source neurons) int64: entry ``[j, i]`` sums the weights of every
    synapse path ``i -> (pool window) -> j``."""
    if p.pool is None:
        return _taps(p, src_shape)
    pooled, pooled_shape = pool_matrix(p.pool, src_shape)
    return _taps(p, pooled_shape) @ pooled


# --------------------------------------------------------------------------- graph walk


def order_and_depths(graph: IFGraph) -> tuple[list[str], dict[str, int]]:
    """Layers with every layer after its sources, and each one's longest hop count."""
    incoming = {la.name: [p.src for p in graph.projections if p.dst == la.name]
                for la in graph.layers}
    depth: dict[str, int] = {}
    order: list[str] = []
    while len(order) < len(graph.layers):
        for la in graph.layers:
            if la.name not in depth and all(s in depth for s in incoming[la.name]):
                depth[la.name] = max((depth[s] + 1 for s in incoming[la.name]), default=0)
                order.append(la.name)
    return order, depth


def per_neuron(values: object, shape: tuple[int, ...]) -> np.ndarray:
    """Per-channel values repeated over a layer's neurons (flattened in C order), (n,)."""
    return np.repeat(np.asarray(values, dtype=np.int64), _size(shape[1:]))


def _input_name(graph: IFGraph) -> str:
    return next(la.name for la in graph.layers if isinstance(la, InputLayer))


# --------------------------------------------------------------------------- ANN mode


@dataclass(frozen=True)
class AnnOracle:
    """Per IF layer spike counts (N, *shape) and the readout's L-step membrane (N, F)."""

    counts: dict[str, np.ndarray]
    readout: np.ndarray


def ann_oracle(graph: IFGraph, x: np.ndarray, levels: int) -> AnnOracle:
    """The quantized ANN at ``L = levels`` (the input ``x`` counts ``L * x``).

    For every layer: ``acc = sum_p shift(M_p @ c_src, weight_exp_p)`` with the enumerated
    synapse matrices; ``u = current(acc)`` (the L-step total, one wrap); an IF layer's
    L-step membrane ``z = sat(v_init + u + L * bias)`` and its count is the number of
    ``k = 1 .. L`` with ``z >= k * v_th`` (``>`` on strict profiles); the readout's value is
    ``sat(u + L * bias)``.
    """
    ar = ARITHMETIC[str(graph.meta.profile)]
    order, _ = order_and_depths(graph)
    n = x.shape[0]
    shapes = {la.name: la.shape for la in graph.layers}
    flat: dict[str, np.ndarray] = {order[0]: x.reshape(n, -1).astype(np.int64) * levels}
    counts: dict[str, np.ndarray] = {}
    readout = np.zeros((n, 0), dtype=np.int64)
    for name in order[1:]:
        layer = graph.node(name)
        acc = np.zeros((n, _size(layer.shape)), dtype=np.int64)
        for p in graph.projections:
            if p.dst == name:
                acc += shift(flat[p.src] @ synapse_matrix(p, shapes[p.src]).T, p.weight_exp)
        u = ar.current(acc)
        bias = per_neuron(layer.bias, layer.shape)
        if isinstance(layer, IFLayer):
            z = ar.saturate(per_neuron(layer.v_init, layer.shape) + u + levels * bias)
            v_th = per_neuron(layer.v_th, layer.shape)
            c = sum(ar.fires(z, k * v_th).astype(np.int64) for k in range(1, levels + 1))
            flat[name] = np.asarray(c, dtype=np.int64)
            counts[name] = flat[name].reshape(n, *layer.shape)
        elif isinstance(layer, ReadoutLayer):
            readout = ar.saturate(u + levels * bias)
    return AnnOracle(counts, readout)


# --------------------------------------------------------------------------- step by step


@dataclass(frozen=True)
class LoopRun:
    """``spikes``: per IF layer (steps, N, *shape) bool output spikes (after the mask);
    ``window``: per IF layer (N, *shape) spikes of its counted window; ``masks``: per IF
    layer (N, *shape) bool (None when P = 0); ``readout``: (N, F) int64 at the end."""

    steps: int
    spikes: dict[str, np.ndarray]
    window: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None
    readout: np.ndarray


def if_loop(graph: IFGraph, x: np.ndarray, timesteps: int, presim: int = 0,
            schedule: str = "synchronous") -> LoopRun:
    """Step the integer IF network one step at a time (SPEC section 4).

    Steps ``t = 1 .. P + T (+ D pipelined)``. Each step, every layer in order::

        acc <- sum_p shift(M_p @ out_src(t - delay_p), weight_exp_p)   # nothing before t = 1
        v   <- sat(v + current(acc) + bias)
        s   <- v >= v_th  (v > v_th strict);  v <- v - s * v_th  or  v <- 0 where s
        out <- s * mask

    ``delay_p = d_dst - d_src`` pipelined (longest hop counts), 0 synchronous; a layer's
    boundary is ``b = P + d``. At the end of step ``b`` (``P > 0``): ``mask <- v > 0`` and
    ``v <- v_init``; pipelined, at the end of step ``d >= 1``: ``v <- v_init``; the readout
    (``v <- sat(v + current(acc) + bias)``, no spikes) is set to 0 at the end of step
    ``b >= 1``. The counted window is ``b + 1 .. b + T``.
    """
    ar = ARITHMETIC[str(graph.meta.profile)]
    order, hops = order_and_depths(graph)
    depth = hops if schedule == "pipelined" else {name: 0 for name in hops}
    total = presim + timesteps + depth[graph.readout.name]
    n = x.shape[0]
    shapes = {la.name: la.shape for la in graph.layers}
    matrices = {p.name: synapse_matrix(p, shapes[p.src]) for p in graph.projections}
    out: dict[str, list[np.ndarray]] = {name: [] for name in order}
    v: dict[str, np.ndarray] = {}
    mask: dict[str, np.ndarray] = {}
    for la in graph.layers:
        if isinstance(la, IFLayer):
            v[la.name] = np.tile(per_neuron(la.v_init, la.shape), (n, 1))
            mask[la.name] = np.ones((n, _size(la.shape)), dtype=bool)
        elif isinstance(la, ReadoutLayer):
            v[la.name] = np.zeros((n, _size(la.shape)), dtype=np.int64)
    feed = x.reshape(n, -1).astype(np.int64)
    for t in range(1, total + 1):
        out[order[0]].append(feed)
        for name in order[1:]:
            layer = graph.node(name)
            acc = np.zeros((n, _size(layer.shape)), dtype=np.int64)
            for p in graph.projections:
                if p.dst != name:
                    continue
                src_t = t - (depth[p.dst] - depth[p.src])
                if src_t >= 1:
                    acc += shift(out[p.src][src_t - 1] @ matrices[p.name].T, p.weight_exp)
            bias = per_neuron(layer.bias, layer.shape)
            vv = ar.saturate(v[name] + ar.current(acc) + bias)
            b = presim + depth[name]
            if isinstance(layer, IFLayer):
                v_th = per_neuron(layer.v_th, layer.shape)
                s = ar.fires(vv, v_th)
                vv = vv - s * v_th if layer.reset == "subtract" else np.where(s, 0, vv)
                out[name].append((s & mask[name]).astype(np.int64))
                if presim > 0 and t == b:
                    mask[name] = vv > 0
                    vv = np.tile(per_neuron(layer.v_init, layer.shape), (n, 1))
                if depth[name] >= 1 and t == depth[name]:
                    vv = np.tile(per_neuron(layer.v_init, layer.shape), (n, 1))
            elif b >= 1 and t == b:
                vv = np.zeros_like(vv)
            v[name] = vv
    spikes, window, masks = {}, {}, {}
    for la in graph.if_layers:
        rec = np.stack(out[la.name]).astype(bool).reshape(total, n, *la.shape)
        spikes[la.name] = rec
        b = presim + depth[la.name]
        window[la.name] = rec[b:b + timesteps].sum(0)
        masks[la.name] = mask[la.name].reshape(n, *la.shape)
    return LoopRun(total, spikes, window, masks if presim > 0 else None,
                   v[graph.readout.name])
