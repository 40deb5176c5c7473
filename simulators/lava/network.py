"""The Lava processes of one integer IF graph (created here, compiled by the session).

One Lava process each (see :mod:`.processes` and :mod:`.layout`):

* the input: :class:`GradedInput`, the integer input as graded spikes every step;
* every projection: Lava's ``Conv`` (PyConvModelFixed) into a (C, H, W) layer or
  Lava's ``Dense`` (PyDenseModelBitAcc) into a (F,) layer, after
  :func:`~.layout.lava_projection` (pools folded, identities as depthwise conv or
  diagonal dense);
* every IF layer: :class:`IFNeurons`, the readout: :class:`ReadoutNeurons`, each
  with its :class:`~csqcfs_deploy.ir.neuron.LayerEvents` from
  :func:`~csqcfs_deploy.ir.neuron.layer_events` (the host computes the timing
  once, the processes only follow it);
* a projection whose delay ``d_dst - d_src`` exceeds one step (a residual
  shortcut) goes through a :class:`SpikeDelay` of ``delay - 1`` steps.

Every Lava hop takes one step, so this is the *pipelined* schedule of
:mod:`csqcfs_deploy.ir.schedule`. Results pass through :class:`SharedArray`
files of ``slots`` sample slots: per IF layer (slots, n) int32 counts and
window counts, (slots, n) bool masks and, when recorded, (slots, S, n) bool
spikes; the readout (slots, F) int64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.neuron import layer_events
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig, projection_delay, total_steps
from csqcfs_deploy.simulators.lava.compat import import_lava
from csqcfs_deploy.simulators.lava.layout import (
    SYNAPSES,
    check_lava_graph,
    lava_conv_weight,
    lava_projection,
)
from csqcfs_deploy.simulators.lava.processes import (
    GradedInput,
    IFNeurons,
    IFRecording,
    PyGradedInputModel,
    PyIFNeuronsModelFixed,
    PyReadoutNeuronsModelFixed,
    PySpikeDelayModel,
    ReadoutNeurons,
    SampleClock,
    SharedArray,
    SpikeDelay,
    lava_shape,
)

import_lava()

from lava.proc.conv.models import PyConvModelFixed  # noqa: E402
from lava.proc.conv.process import Conv  # noqa: E402
from lava.proc.dense.models import PyDenseModelBitAcc  # noqa: E402
from lava.proc.dense.process import Dense  # noqa: E402
from lava.utils.weightutils import SignMode  # noqa: E402

FIXED_PT_MODELS: dict[type, type] = {
    GradedInput: PyGradedInputModel, IFNeurons: PyIFNeuronsModelFixed,
    ReadoutNeurons: PyReadoutNeuronsModelFixed, SpikeDelay: PySpikeDelayModel,
    Conv: PyConvModelFixed, Dense: PyDenseModelBitAcc,
}

RECORD_BUDGET_BYTES = 256 * 2**20
MAX_SLOTS = 64

# (pool-free projection of that kind, graph, graded-input message bits) -> Lava process
SynapseBuilder = Callable[[Any, IFGraph, int], Any]
_SYNAPSE_PROCESSES: KindTable[SynapseBuilder] = KindTable("lava")


@dataclass(frozen=True)
class LavaFiles:
    """Sample clock and shared files of one Lava network: ``inputs`` (slots, n_in) int32
    C-major, per IF layer its :class:`IFRecording`, ``readout`` (slots, F) int64."""

    clock: SampleClock
    inputs: SharedArray
    recordings: dict[str, IFRecording]
    readout: SharedArray


@dataclass
class LavaNetwork:
    """The processes of one graph; ``root`` is the process Lava runs the graph from."""

    graph: IFGraph
    cfg: RunConfig
    files: LavaFiles
    processes: dict[str, Any]
    root: Any


def _split_bias(bias: NDArray[Any]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Integer biases (n,) -> loihi2 (mantissa, exponent) pairs, each (n,) int64."""
    prof = get_profile("loihi2")
    pairs = [prof.encode_bias(int(b)) for b in bias.tolist()]
    return (np.array([m for m, _ in pairs], dtype=np.int64),
            np.array([e for _, e in pairs], dtype=np.int64))


def _per_neuron(values: NDArray[Any], shape: tuple[int, ...]) -> NDArray[np.int64]:
    """(C,) per-channel values -> (n,) per neuron, C-major."""
    per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return np.repeat(np.asarray(values, dtype=np.int64), per)


def slots_for(graph: IFGraph, cfg: RunConfig) -> int:
    """Samples held at once in the result files (bounded by RECORD_BUDGET_BYTES)."""
    neurons = sum(la.neurons for la in graph.if_layers)
    per_sample = neurons * (9 + (total_steps(graph, cfg) if cfg.record else 0))
    return int(max(1, min(MAX_SLOTS, RECORD_BUDGET_BYTES // max(per_sample, 1))))


def _if_neurons(layer: IFLayer, graph: IFGraph, cfg: RunConfig, clock: SampleClock,
                directory: Path) -> tuple[IFNeurons, IFRecording]:
    slots, steps, n = clock.slots, clock.steps, layer.neurons
    rec = IFRecording(
        counts=SharedArray.create(directory, f"{layer.name}.counts", (slots, n), "int32"),
        window=SharedArray.create(directory, f"{layer.name}.window", (slots, n), "int32"),
        masks=SharedArray.create(directory, f"{layer.name}.masks", (slots, n), "bool"),
        spikes=(SharedArray.create(directory, f"{layer.name}.spikes", (slots, steps, n),
                                   "bool") if cfg.record else None))
    mant, exp = _split_bias(_per_neuron(layer.bias, layer.shape))
    proc = IFNeurons(
        shape=layer.shape, v_th=_per_neuron(layer.v_th, layer.shape),
        v_init=_per_neuron(layer.v_init, layer.shape), bias_mant=mant, bias_exp=exp,
        reset_zero=layer.reset == "zero", clock=clock,
        events=layer_events(graph, cfg, layer.name), recording=rec, name=layer.name)
    return proc, rec


def _readout_neurons(layer: ReadoutLayer, graph: IFGraph, cfg: RunConfig, clock: SampleClock,
                     directory: Path) -> tuple[ReadoutNeurons, SharedArray]:
    result = SharedArray.create(directory, "readout", (clock.slots, layer.neurons), "int64")
    mant, exp = _split_bias(np.asarray(layer.bias))
    proc = ReadoutNeurons(size=layer.neurons, bias_mant=mant, bias_exp=exp, clock=clock,
                          events=layer_events(graph, cfg, layer.name), result=result,
                          name=layer.name)
    return proc, result


@_SYNAPSE_PROCESSES.register(ConvProjection)
def _conv_process(q: ConvProjection, graph: IFGraph, message_bits: int) -> Any:
    """Lava Conv: weights in Lava's (O, kW, kH, I) layout, padding and stride as (X, Y)."""
    src_shape, dst_shape = graph.layer(q.src).shape, graph.layer(q.dst).shape
    conn = Conv(weight=lava_conv_weight(q.weight), input_shape=lava_shape(src_shape),
                padding=(q.padding[1], q.padding[0]), stride=(q.stride[1], q.stride[0]),
                groups=q.groups, num_weight_bits=8, num_message_bits=message_bits,
                name=q.name)
    if tuple(conn.output_shape) != lava_shape(dst_shape):
        raise GraphError(f"projection {q.name}: Lava Conv gives {conn.output_shape}, "
                         f"layer {q.dst} needs {lava_shape(dst_shape)}")
    return conn


@_SYNAPSE_PROCESSES.register(DenseProjection)
def _dense_process(q: DenseProjection, graph: IFGraph, message_bits: int) -> Any:
    """Lava Dense (mixed sign, 8-bit weights, the projection's weight exponent)."""
    return Dense(weights=np.asarray(q.weight, dtype=np.int64), num_message_bits=message_bits,
                 num_weight_bits=8, sign_mode=SignMode.MIXED, weight_exp=q.weight_exp,
                 name=q.name)


def build_network(graph: IFGraph, cfg: RunConfig, directory: Path,
                  slots: int | None = None) -> LavaNetwork:
    """Create (not compile) the Lava processes of ``graph`` under ``cfg`` (pipelined);
    the shared files go to ``directory``."""
    if cfg.schedule != "pipelined":
        raise UsageError("Lava runs the pipelined schedule (every hop takes one step)")
    check_lava_graph(graph)
    clock = SampleClock(steps=total_steps(graph, cfg), slots=slots or slots_for(graph, cfg))
    inp = graph.input
    inputs = SharedArray.create(directory, "input", (clock.slots, int(np.prod(inp.shape))),
                                "int32")
    procs: dict[str, Any] = {inp.name: GradedInput(shape=inp.shape, clock=clock, inputs=inputs,
                                                   name=inp.name)}
    recordings: dict[str, IFRecording] = {}
    for layer in graph.if_layers:
        procs[layer.name], recordings[layer.name] = _if_neurons(layer, graph, cfg, clock,
                                                                directory)
    readout = graph.readout
    procs[readout.name], readout_file = _readout_neurons(readout, graph, cfg, clock, directory)
    input_bits = get_profile("loihi2").input_bits
    for p in graph.projections:
        q = lava_projection(p, graph.layer(p.src).shape)
        src = procs[p.src]
        port = src.s_out_flat if SYNAPSES.lookup(q).flat_input else src.s_out
        delay = projection_delay(graph, cfg, p.name)
        if delay > 1:
            line = SpikeDelay(shape=tuple(port.shape), delay=delay - 1, clock=clock,
                              name=f"{p.name}.delay")
            port.connect(line.s_in)
            port = line.s_out
            procs[line.name] = line
        bits = input_bits if p.src == inp.name else 0
        conn = _SYNAPSE_PROCESSES.lookup(q)(q, graph, bits)
        procs[p.name] = conn
        port.connect(conn.s_in)
        conn.a_out.connect(procs[p.dst].a_in)
    files = LavaFiles(clock=clock, inputs=inputs, recordings=recordings, readout=readout_file)
    return LavaNetwork(graph, cfg, files, procs, root=procs[readout.name])


def process_models(network: LavaNetwork) -> dict[Any, type]:
    """The fixed-point ProcessModel of every process, keyed by process and by class.

    Lava's compiler consults this map for a process before it searches for
    models; without it, it executes every module in the directories of the
    processes' packages (all of ``csqcfs_deploy.simulators``) on each compile.
    """
    table: dict[Any, type] = {}
    for proc in network.processes.values():
        model = FIXED_PT_MODELS[type(proc)]
        table[proc] = model
        table[type(proc)] = model
    return table
