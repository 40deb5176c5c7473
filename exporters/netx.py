"""``export --target lava-netx``: lava-dl's netx HDF5, the Loihi 2 deployment file.

lava-dl's ``netx.hdf5.Network`` builds a feed-forward chain of blocks (a
Dense/Conv synapse into CUBA LIF neurons) from the file; with ``iDecay 4096``
(the current keeps nothing) and ``vDecay 0`` (no leak) a CUBA neuron is the
loihi2 IF neuron with *reset to zero*, one threshold ``vThMant << 6`` per
layer, bias ``mant << 6`` and membranes starting at 0.

What the file can express exactly is the network at ``T = 1`` without
pre-simulation: at ``T = 1`` each IF layer ``j`` has one counted step
(``d_j + 1``, pipelined) that starts, after the pipeline-fill reset, from
``v_init``; it spikes iff ``u + b_c > v_th,c - v_init,c`` where the current
``u`` is a multiple of 64. So with ``G_c = floor((v_th,c - v_init,c - b_c) / 64)``
(:func:`csqcfs_deploy.ir.neuron.first_step_cut`, the closed form of one step) the
same spike is ``u + 64 * beta_c > 64 * theta`` for any layer threshold ``theta``
with ``beta_c = theta - G_c`` (exact, saturation included). The file
stores ``vThMant = theta`` (centred so the 13-bit bias mantissas ``beta_c`` fit) and
``bias = beta_c``. The readout is a CUBA layer with ``vThMant`` 2**17 - 1 whose
bias is ``floor(b / 64)``; ``readout_offset = b mod 64`` (stored in the file's
``csqcfs_netx`` attribute) added to its membrane gives our readout. It must never
spike (a CUBA neuron fires when ``v > 131071 << 6 = 8388544`` and is reset to 0):
a readout whose worst case one step can reach that, wrap or saturate is refused
(:func:`_check_readout_range`). The IF layers' summed inputs are bounded as for
the Lava back end (Lava's ``a_in << 6`` in int32, :func:`check_lava_graph`).

The fill reset is netx's own ``reset_interval``/``reset_offset`` (LIFReset,
block ``i`` resets at step ``reset_offset + 1 + i``): load the file with
``Network(path, input_message_bits=8, reset_interval=1 + D, reset_offset=1)``
(:func:`load_kwargs`), feed the integer input as graded spikes at the first
``D`` steps of each ``1 + D``-step sample, and every layer's counted step and
the readout equal the integer simulator's (hard reset, pipelined) for each
sample. Steps outside the counted ones are not the simulator's: netx cannot
hold an initial membrane, and a layer's steps before its data arrive continue
from the previous sample (both are discarded by the pipelined schedule anyway).

netx has no pooling: sum pools are folded into the next weights as for the
Lava back end (:mod:`csqcfs_deploy.simulators.lava.layout`); residual (non-chain)
graphs are refused.

This module plans and writes the file; reading it back (probed, checked) is
:mod:`csqcfs_deploy.exporters.netx_file`; running it on Lava and
comparing it with the simulator is :mod:`csqcfs_deploy.simulators.lava.netx`, and
what the command line prints about it is :mod:`csqcfs_deploy.cli.netx_text`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from numpy.typing import NDArray

from csqcfs_deploy.errors import QuantizationError, TargetError
from csqcfs_deploy.exporters.h5write import write_array
from csqcfs_deploy.exporters.netx_file import (  # noqa: F401 (the read side, re-exported)
    FORMAT_VERSION,
    NETX_ATTR,
    load_kwargs,
    read_netx_plan,
)
from csqcfs_deploy.files import write_atomic
from csqcfs_deploy.interrupts import deferred_signals
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph, IFLayer
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.neuron import first_step_cut
from csqcfs_deploy.ir.profiles import Profile, get_profile
from csqcfs_deploy.simulators.lava.compat import import_lava, import_lava_dl
from csqcfs_deploy.simulators.lava.layout import (
    check_lava_graph,
    lava_projection,
    source_range,
    synaptic_input_rows,
)

UNIT = 64                      # vThMant and bias mantissas are << 6 in a CUBA neuron
THETA_MAX = 2**17 - 1          # 17-bit unsigned threshold mantissa
BIAS_MANT_MAX = 2**12 - 1      # 13-bit signed bias mantissa
BIAS_MANT_MIN = -(2**12)
CUBA = {"iDecay": 4096, "vDecay": 0, "refDelay": 1}
WRAP_LIMIT = 2**23             # a CUBA current u wraps when u > 2**23 or u <= -2**23


@dataclass(frozen=True)
class NetxLayer:
    """One netx block: ``kind`` "conv" (weight (O, I/g, kH, kW), stride/padding (H, W)) or
    "dense" (weight (O, F)); ``shape`` CHW or (F,); per channel ``bias_mant`` (C,)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    weight: NDArray[np.int64]
    theta_mant: int
    bias_mant: NDArray[np.int64]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    groups: int = 1
    flatten_before: bool = False


@dataclass(frozen=True)
class NetxPlan:
    """Everything the file holds, plus what it takes to load and read it."""

    input_shape: tuple[int, ...]
    input_bits: int
    layers: tuple[NetxLayer, ...]
    readout_offset: NDArray[np.int64]   # (F,) add to the netx readout membrane
    source: str = ""

    @property
    def depth(self) -> int:
        """D: the readout's depth; a sample takes ``1 + D`` steps."""
        return len(self.layers)

    @property
    def steps_per_sample(self) -> int:
        return 1 + self.depth

    def load_kwargs(self) -> dict[str, int]:
        return load_kwargs(self.input_bits, self.depth)

    def meta(self) -> dict[str, Any]:
        return {
            "format": "csqcfs-netx", "version": FORMAT_VERSION, "source": self.source,
            "input_shape": list(self.input_shape), "input_bits": self.input_bits,
            "layers": [{"name": la.name, "shape": list(la.shape), "kind": la.kind}
                       for la in self.layers],
            "readout_offset": [int(v) for v in self.readout_offset],
            "exact": "T = 1, P = 0: every layer's counted step and the readout",
            "load_kwargs": self.load_kwargs(),
        }


@dataclass(frozen=True)
class NetxExport:
    """What :func:`write_netx` wrote (``csqcfs_deploy.cli.netx_text`` says it in words)."""

    path: Path
    plan: NetxPlan

    def to_json(self) -> dict[str, Any]:
        return {"target": "lava-netx", "output": str(self.path), **self.plan.meta()}


# --------------------------------------------------------------------------- planning


def _chain(graph: IFGraph) -> list[str]:
    """Layer names input -> ... -> readout, refusing anything that is not a chain."""
    order = list(graph.topological_order())
    for prev, name in zip(order, order[1:], strict=False):
        inc = graph.incoming(name)
        if len(inc) != 1 or inc[0].src != prev or len(graph.outgoing(prev)) != 1:
            raise TargetError(f"netx describes a feed-forward chain; layer {name} has a "
                             "residual or branching connection (export it as NIR or run it "
                             "with --backend lava)")
    return order


def _theta_and_bias(name: str, g: NDArray[np.int64], per_channel: bool
                    ) -> tuple[int, NDArray[np.int64]]:
    lo, hi = int(g.min()), int(g.max())
    theta = int(np.clip(round((lo + hi) / 2), 0, THETA_MAX))
    beta = theta - g
    if beta.max() > BIAS_MANT_MAX or beta.min() < BIAS_MANT_MIN:
        hint = ("; export the checkpoint itself with --target lava-netx (its scales are then "
                "chosen to fit netx), or convert with --per-layer-thresholds" if per_channel
                else "; export the checkpoint itself with --target lava-netx, which lowers "
                "this layer's threshold scale until its bias mantissas fit")
        raise QuantizationError(
            f"layer {name}: at T = 1 its thresholds, initial membranes and biases need bias "
            f"mantissas {int(beta.min())}..{int(beta.max())} around one netx threshold, beyond "
            f"netx's 13-bit range {BIAS_MANT_MIN}..{BIAS_MANT_MAX}{hint}")
    return theta, beta.astype(np.int64)


def _check_dense_weights(name: str, weight: NDArray[np.int64]) -> None:
    """netx rescales dense weights at load time (``optimize_weight_bits``: ``w << k`` with
    weight exponent ``-k``) and Lava's Dense clips and truncates them: make sure every
    weight survives, so the synaptic sum (``(w << k) . s >> k``) is unchanged."""
    netx_utils = import_lava_dl("lava.lib.dl.netx.utils")
    weightutils = import_lava("lava.utils.weightutils")

    w, bits, exp, _ = netx_utils.optimize_weight_bits(weight.copy())
    mode = weightutils.determine_sign_mode(w)
    used = weightutils.truncate_weights(weightutils.clip_weights(w, mode, num_bits=8), mode,
                                        bits).astype(np.int64)
    if exp > 0 or not np.array_equal(used, weight.astype(np.int64) << -exp):
        raise QuantizationError(f"projection into {name}: netx's weight optimisation would "
                                "change these dense weights")


# (name, kind-specific projection, layer shape, theta, beta, source shape) -> NetxLayer
BlockBuilder = Callable[[str, Any, tuple[int, ...], int, NDArray[np.int64], tuple[int, ...]],
                        NetxLayer]
_BLOCKS: KindTable[BlockBuilder] = KindTable("lava-netx")


@_BLOCKS.register(ConvProjection)
def _conv_block(name: str, q: ConvProjection, shape: tuple[int, ...], theta: int,
                beta: NDArray[np.int64], src_shape: tuple[int, ...]) -> NetxLayer:
    return NetxLayer(name, "conv", shape, np.asarray(q.weight, np.int64), theta, beta,
                     q.stride, q.padding, q.groups, flatten_before=False)


@_BLOCKS.register(DenseProjection)
def _dense_block(name: str, q: DenseProjection, shape: tuple[int, ...], theta: int,
                 beta: NDArray[np.int64], src_shape: tuple[int, ...]) -> NetxLayer:
    weight = np.asarray(q.weight, np.int64)
    _check_dense_weights(name, weight)
    return NetxLayer(name, "dense", shape, weight, theta, beta,
                     flatten_before=len(src_shape) == 3)


def _layer_cut(layer: IFLayer, prof: Profile) -> NDArray[np.int64]:
    """``G_c = floor((v_th,c - v_init,c - b_c) / 64)`` per channel: one step from ``v_init``
    fires iff the summed input exceeds ``G_c`` (:func:`first_step_cut`, strict profile)."""
    v_th, v_init, bias = (torch.tensor(np.asarray(a, dtype=np.int64))
                          for a in (layer.v_th, layer.v_init, layer.bias))
    return first_step_cut(v_th, v_init, bias, prof).numpy()


def _check_readout_range(name: str, q: Any, src_range: tuple[int, int],
                         beta: NDArray[np.int64]) -> None:
    """Refuse a readout whose netx membrane could fire, wrap or saturate at its step.

    netx's readout is a CUBA neuron that spikes (and is reset to 0) when
    ``v > vThMant << 6 = 64 * THETA_MAX``; at ``T = 1`` it is read after one step
    from 0: ``v = wrap(a << 6) + 64 * beta``. It equals our readout only while
    ``a << 6`` does not wrap and ``|a + beta| <= THETA_MAX`` (no spike, no saturation)
    for every input the graph takes: bounded here per neuron by
    :func:`~csqcfs_deploy.simulators.lava.layout.synaptic_input_rows`.
    """
    bottom, top = (np.asarray(r, dtype=np.int64) for r in synaptic_input_rows(q, *src_range))
    if bottom.size != beta.size:       # per channel rows: bound with the extreme biases
        bottom, top = np.full(beta.size, bottom.min()), np.full(beta.size, top.max())
    no_wrap = (UNIT * top <= WRAP_LIMIT) & (UNIT * bottom > -WRAP_LIMIT)
    high, low = top + beta, bottom + beta
    if np.all(no_wrap) and high.max(initial=0) <= THETA_MAX and low.min(initial=0) >= -THETA_MAX:
        return
    worst = int(max(high.max(), -low.min())) * UNIT
    reach = (f"one step's input can wrap the current ({int(max(top.max(), -bottom.min()))} "
             f"x 64 beyond 2**23)" if not np.all(no_wrap)
             else f"its membrane can reach {'-' if -low.min() > high.max() else ''}{worst}")
    raise QuantizationError(
        f"readout {name}: at T = 1 {reach}, but netx's CUBA readout fires and resets to 0 "
        f"when v > {UNIT * THETA_MAX} (vThMant {THETA_MAX} << 6), so the file would not be "
        "exact; lower the readout's scale (convert with a larger --calibration-margin) or "
        "export NIR")


def plan_netx(graph: IFGraph) -> NetxPlan:
    """The netx layers of ``graph`` (loihi2, a chain); raises what cannot be exported."""
    check_lava_graph(graph)
    order = _chain(graph)
    prof = get_profile("loihi2")
    layers: list[NetxLayer] = []
    readout_offset = np.zeros(0, dtype=np.int64)
    for name in order[1:]:
        layer = graph.neuron_group(name)
        p = graph.incoming(name)[0]
        src_shape = graph.layer(p.src).shape
        q = lava_projection(p, src_shape)
        if q.weight_exp != 0:
            raise TargetError(f"projection {p.name}: netx chooses dense weight exponents itself; "
                             "a graph weight exponent cannot be exported")
        if isinstance(layer, IFLayer):
            g = _layer_cut(layer, prof)
            theta, beta = _theta_and_bias(name, g, bool(np.any(layer.v_th != layer.v_th[0])))
        else:
            bias = np.asarray(layer.bias, dtype=np.int64)
            beta = np.floor_divide(bias, UNIT)
            readout_offset = bias - UNIT * beta
            theta = THETA_MAX
            if beta.max(initial=0) > BIAS_MANT_MAX or beta.min(initial=0) < BIAS_MANT_MIN:
                raise QuantizationError(f"readout {name}: bias beyond netx's 13-bit mantissa")
            _check_readout_range(name, q, source_range(graph, p.src), beta)
        layers.append(_BLOCKS.lookup(q)(name, q, layer.shape, theta, beta, src_shape))
    return NetxPlan(tuple(graph.input.shape), prof.input_bits, tuple(layers), readout_offset,
                    source=graph.meta.arch)


# --------------------------------------------------------------------------- file


def _string(group: h5py.Group, key: str, value: str) -> None:
    group.create_dataset(key, (1,), f"S{max(len(value), 1)}", [value.encode("ascii")])


def _neuron(group: h5py.Group, theta: int) -> None:
    neuron = group.create_group("neuron")
    _string(neuron, "type", "CUBA")
    for key, value in CUBA.items():
        neuron.create_dataset(key, data=value)
    neuron.create_dataset("vThMant", data=theta)
    neuron.create_dataset("gradedSpike", data=False)


def _write(path: Path, plan: NetxPlan) -> None:
    with h5py.File(path, "w") as f:
        f.attrs[NETX_ATTR] = json.dumps(plan.meta())
        root = f.create_group("layer")
        entry = 0

        def group() -> h5py.Group:
            nonlocal entry
            g = root.create_group(str(entry))
            entry += 1
            return g

        g = group()
        _string(g, "type", "input")
        g.create_dataset("shape", data=np.asarray(plan.input_shape))
        for la in plan.layers:
            if la.flatten_before:
                _string(group(), "type", "flatten")
            g = group()
            _string(g, "type", la.kind)
            g.create_dataset("shape", data=np.asarray(la.shape))
            write_array(g, "weight", la.weight)
            write_array(g, "bias", la.bias_mant)
            if la.kind == "conv":
                g.create_dataset("inChannels", data=la.weight.shape[1] * la.groups)
                g.create_dataset("outChannels", data=la.weight.shape[0])
                g.create_dataset("kernelSize", data=np.asarray(la.weight.shape[2:]))
                g.create_dataset("stride", data=np.asarray(la.stride))
                g.create_dataset("padding", data=np.asarray(la.padding))
                g.create_dataset("dilation", data=np.asarray((1, 1)))
                g.create_dataset("groups", data=la.groups)
            _neuron(g, la.theta_mant)


def _write_interruptibly(path: Path, plan: NetxPlan) -> None:
    """:func:`_write` with Ctrl-C and SIGTERM checked between slices of the weights."""
    with deferred_signals():
        _write(path, plan)


def write_netx(graph: IFGraph, path: str | Path) -> NetxExport:
    """Write ``graph`` as a netx HDF5 file (atomically); see the module docstring."""
    import_lava_dl("lava.lib.dl.netx.utils")
    plan = plan_netx(graph)
    out = write_atomic(path, lambda tmp: _write_interruptibly(tmp, plan))
    return NetxExport(out, plan)

