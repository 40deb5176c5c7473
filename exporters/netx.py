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
the same spike is ``u + 64 * beta_c > 64 * theta`` for any layer threshold
``theta`` with ``beta_c = theta - G_c`` (exact, saturation included). The file
stores ``vThMant = theta`` (centred so the 13-bit bias mantissas ``beta_c`` fit) and
``bias = beta_c``. The readout is a CUBA layer that never spikes (``vThMant``
2**17 - 1) whose bias is ``floor(b / 64)``; ``readout_offset = b mod 64`` (stored
in the file's ``csqcfs_netx`` attribute) added to its membrane gives our readout.

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
Lava back end; residual (non-chain) graphs are refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.errors import GraphError, InputFileError, QuantizationError
from csqcfs_deploy.files import require_file, write_atomic
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph, IFLayer
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.simulators.lava.compat import import_lava_dl

NETX_ATTR = "csqcfs_netx"
FORMAT_VERSION = 1
UNIT = 64                      # vThMant and bias mantissas are << 6 in a CUBA neuron
THETA_MAX = 2**17 - 1          # 17-bit unsigned threshold mantissa
BIAS_MANT_MAX = 2**12 - 1      # 13-bit signed bias mantissa
BIAS_MANT_MIN = -(2**12)
CUBA = {"iDecay": 4096, "vDecay": 0, "refDelay": 1}


@dataclass(frozen=True)
class NetxLayer:
    """One netx block: ``kind`` "conv" (weight (O, I/g, kH, kW), stride/padding (H, W)) or
    "dense" (weight (O, F)); ``shape`` CHW or (F,); per channel ``bias_mant`` (C,)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    weight: np.ndarray
    theta_mant: int
    bias_mant: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    flatten_before: bool = False


@dataclass(frozen=True)
class NetxPlan:
    """Everything the file holds, plus what it takes to load and read it."""

    input_shape: tuple[int, ...]
    input_bits: int
    layers: tuple[NetxLayer, ...]
    readout_offset: np.ndarray   # (F,) add to the netx readout membrane
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


def load_kwargs(input_bits: int, depth: int) -> dict[str, int]:
    """Arguments of ``lava.lib.dl.netx.hdf5.Network`` that make the file run as exported."""
    return {"input_message_bits": input_bits, "reset_interval": 1 + depth, "reset_offset": 1}


@dataclass(frozen=True)
class NetxExport:
    """What :func:`write_netx` wrote (printed by ``csqcfs-deploy export``)."""

    path: Path
    plan: NetxPlan

    def __str__(self) -> str:
        kwargs = ", ".join(f"{k}={v}" for k, v in self.plan.load_kwargs().items())
        return (f"wrote {self.path} (lava-dl netx HDF5, {len(self.plan.layers)} CUBA layers). "
                "netx neurons reset to zero and start at 0: the file is exact at T = 1 "
                "without pre-simulation only (every layer's counted step and the readout "
                "equal the integer simulator's, hard reset, pipelined); load it with "
                f"lava.lib.dl.netx.hdf5.Network('{self.path}', {kwargs}) and add "
                f"readout_offset {self.plan.readout_offset.tolist()} to the last layer's "
                "membrane to get the readout.")

    def to_json(self) -> dict[str, Any]:
        return {"target": "lava-netx", "output": str(self.path), **self.plan.meta()}


# --------------------------------------------------------------------------- planning


def _chain(graph: IFGraph) -> list[str]:
    """Layer names input -> ... -> readout, refusing anything that is not a chain."""
    order = list(graph.topological_order())
    for prev, name in zip(order, order[1:], strict=False):
        inc = graph.incoming(name)
        if len(inc) != 1 or inc[0].src != prev or len(graph.outgoing(prev)) != 1:
            raise GraphError(f"netx describes a feed-forward chain; layer {name} has a "
                             "residual or branching connection (export it as NIR or run it "
                             "with --backend lava)")
    return order


def _theta_and_bias(name: str, g: np.ndarray, per_channel: bool) -> tuple[int, np.ndarray]:
    lo, hi = int(g.min()), int(g.max())
    theta = int(np.clip(round((lo + hi) / 2), 0, THETA_MAX))
    beta = theta - g
    if beta.max() > BIAS_MANT_MAX or beta.min() < BIAS_MANT_MIN:
        hint = (" (convert with --per-layer-thresholds)" if per_channel else "")
        raise QuantizationError(
            f"layer {name}: at T = 1 its thresholds, initial membranes and biases need bias "
            f"mantissas {int(beta.min())}..{int(beta.max())} around one netx threshold, beyond "
            f"netx's 13-bit range {BIAS_MANT_MIN}..{BIAS_MANT_MAX}{hint}")
    return theta, beta.astype(np.int64)


def _check_dense_weights(name: str, weight: np.ndarray) -> None:
    """netx rescales dense weights at load time (``optimize_weight_bits``: ``w << k`` with
    weight exponent ``-k``) and Lava's Dense clips and truncates them: make sure every
    weight survives, so the synaptic sum (``(w << k) . s >> k``) is unchanged."""
    from lava.lib.dl.netx.utils import optimize_weight_bits
    from lava.utils.weightutils import clip_weights, determine_sign_mode, truncate_weights

    w, bits, exp, _ = optimize_weight_bits(weight.copy())
    mode = determine_sign_mode(w)
    used = truncate_weights(clip_weights(w, mode, num_bits=8), mode, bits).astype(np.int64)
    if exp > 0 or not np.array_equal(used, weight.astype(np.int64) << -exp):
        raise QuantizationError(f"projection into {name}: netx's weight optimisation would "
                                "change these dense weights")


def plan_netx(graph: IFGraph) -> NetxPlan:
    """The netx layers of ``graph`` (loihi2, a chain); raises what cannot be exported."""
    from csqcfs_deploy.simulators.lava.runner import check_lava_graph, lava_projection

    check_lava_graph(graph)
    order = _chain(graph)
    prof = get_profile("loihi2")
    layers: list[NetxLayer] = []
    readout_offset = np.zeros(0, dtype=np.int64)
    for name in order[1:]:
        layer = graph.node(name)
        p = graph.incoming(name)[0]
        src_shape = graph.node(p.src).shape
        q = lava_projection(p, src_shape)
        if q.weight_exp != 0:
            raise GraphError(f"projection {p.name}: netx chooses dense weight exponents itself; "
                             "a graph weight exponent cannot be exported")
        if isinstance(layer, IFLayer):
            v_th, v_init, bias = (np.asarray(a, dtype=np.int64)
                                  for a in (layer.v_th, layer.v_init, layer.bias))
            g = np.floor_divide(v_th - v_init - bias, UNIT)
            theta, beta = _theta_and_bias(name, g, bool(np.any(v_th != v_th[0])))
        else:
            bias = np.asarray(layer.bias, dtype=np.int64)
            beta = np.floor_divide(bias, UNIT)
            readout_offset = bias - UNIT * beta
            theta = THETA_MAX
            if beta.max(initial=0) > BIAS_MANT_MAX or beta.min(initial=0) < BIAS_MANT_MIN:
                raise QuantizationError(f"readout {name}: bias beyond netx's 13-bit mantissa")
        flatten = len(src_shape) == 3 and isinstance(q, DenseProjection)
        if isinstance(q, ConvProjection):
            layers.append(NetxLayer(name, "conv", layer.shape, np.asarray(q.weight, np.int64),
                                    theta, beta, q.stride, q.padding, q.groups, flatten))
        else:
            _check_dense_weights(name, np.asarray(q.weight, np.int64))
            layers.append(NetxLayer(name, "dense", layer.shape, np.asarray(q.weight, np.int64),
                                    theta, beta, flatten_before=flatten))
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
            g.create_dataset("weight", data=la.weight)
            g.create_dataset("bias", data=la.bias_mant)
            if la.kind == "conv":
                g.create_dataset("inChannels", data=la.weight.shape[1] * la.groups)
                g.create_dataset("outChannels", data=la.weight.shape[0])
                g.create_dataset("kernelSize", data=np.asarray(la.weight.shape[2:]))
                g.create_dataset("stride", data=np.asarray(la.stride))
                g.create_dataset("padding", data=np.asarray(la.padding))
                g.create_dataset("dilation", data=np.asarray((1, 1)))
                g.create_dataset("groups", data=la.groups)
            _neuron(g, la.theta_mant)


def write_netx(graph: IFGraph, path: str | Path) -> NetxExport:
    """Write ``graph`` as a netx HDF5 file (atomically); see the module docstring."""
    import_lava_dl("lava.lib.dl.netx.utils")
    plan = plan_netx(graph)
    out = write_atomic(path, lambda tmp: _write(tmp, plan))
    return NetxExport(out, plan)


def read_netx_plan(path: str | Path) -> dict[str, Any]:
    """The ``csqcfs_netx`` description of a file written by :func:`write_netx`."""
    p = require_file(path, "netx file")
    try:
        with h5py.File(p, "r") as f:
            text = f.attrs.get(NETX_ATTR)
    except OSError as exc:
        raise InputFileError(f"{p} is not an HDF5 file ({exc})") from None
    if text is None:
        raise InputFileError(f"{p} was not written by csqcfs-deploy (no {NETX_ATTR} attribute)")
    meta = json.loads(text)
    if meta.get("version") != FORMAT_VERSION:
        raise InputFileError(f"{p}: netx description version {meta.get('version')!r} is not "
                             f"supported")
    return meta


# --------------------------------------------------------------------------- running


@dataclass
class NetxRun:
    """netx on Lava: per layer (readout included) spikes (steps, N, *shape) bool; the readout
    membrane at the end of each sample plus the offset (N, F) int64."""

    steps: int
    spikes: dict[str, torch.Tensor]
    readout: torch.Tensor
    window_step: dict[str, int]        # 0-based index of each layer's counted step
    seconds: float


def run_netx(path: str | Path, x_int: torch.Tensor, progress: bool = False) -> NetxRun:
    """Load ``path`` with lava-dl's ``netx.hdf5.Network`` (with :func:`load_kwargs`), run it
    on ``Loihi2SimCfg(select_tag="fixed_pt")`` with the integer input as graded spikes, one
    ``1 + D``-step sample after the other, and record every layer's spikes."""
    import time

    import_lava_dl("lava.lib.dl.netx.hdf5")
    from lava.lib.dl.netx import hdf5

    from csqcfs_deploy.simulators.lava.processes import (
        GradedInput,
        PyGradedInputModel,
        PySpikeRecorderModel,
        SampleClock,
        SpikeRecorder,
    )
    from csqcfs_deploy.simulators.lava.runner import LavaSession, _shared, make_workdir

    meta = read_netx_plan(path)
    input_shape = tuple(meta["input_shape"])
    if tuple(x_int.shape[1:]) != input_shape:
        raise GraphError(f"input has shape {tuple(x_int.shape[1:])}, the netx file expects "
                         f"{input_shape}")
    x = x_int.detach().cpu().to(torch.int64).reshape(x_int.shape[0], -1).numpy()
    n = x.shape[0]
    layer_meta = meta["layers"]
    steps = 1 + len(layer_meta)
    slots = max(1, min(n, 64))
    clock = SampleClock(steps=steps, slots=slots)
    workdir = make_workdir()
    try:
        inputs = _shared(workdir, "input", (slots, x.shape[1]), "int32")
        net = hdf5.Network(net_config=str(path), **meta["load_kwargs"])
        if len(net.layers) != len(layer_meta):
            raise InputFileError(f"{path}: netx built {len(net.layers)} layers, the file "
                                 f"describes {len(layer_meta)}")
        source = GradedInput(shape=input_shape, clock=clock, inputs=inputs, name="input")
        source.s_out.connect(net.inp)
        models: dict[Any, type] = {source: PyGradedInputModel}
        records = {}
        for block, la in zip(net.layers, layer_meta, strict=True):
            shape = tuple(la["shape"])
            rec = _shared(workdir, f"{la['name']}.spikes", (slots, steps, int(np.prod(shape))),
                          "int32")
            recorder = SpikeRecorder(shape=shape, clock=clock, record=rec,
                                     name=f"{la['name']}.probe")
            block.neuron.s_out.connect(recorder.s_in)
            models[recorder] = PySpikeRecorderModel
            records[la["name"]] = rec
    except BaseException:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        raise
    session = LavaSession(source, models, workdir)
    offset = np.asarray(meta["readout_offset"], dtype=np.int64)
    spikes = {name: np.zeros((steps, n, rec.shape[2]), bool) for name, rec in records.items()}
    readout = np.zeros((n, len(offset)), dtype=np.int64)
    start = time.perf_counter()
    try:
        views = {name: rec.open() for name, rec in records.items()}
        in_view = inputs.open()
        readout_var = net.layers[-1].neuron.v
        for i in tqdm(range(n), desc="netx", unit="sample", disable=not progress, leave=False):
            slot = i % slots
            in_view[slot] = x[i]
            session.run_steps(steps)
            for name, view in views.items():
                spikes[name][:, i] = view[slot] != 0
            readout[i] = np.rint(np.asarray(readout_var.get(), dtype=np.float64)).astype(
                np.int64).reshape(-1) + offset
    finally:
        session.close()
    seconds = time.perf_counter() - start
    shaped = {la["name"]: torch.from_numpy(spikes[la["name"]].reshape(
        steps, n, *la["shape"])) for la in layer_meta}
    window = {la["name"]: k + 1 for k, la in enumerate(layer_meta)}
    return NetxRun(steps, shaped, torch.from_numpy(readout), window, seconds)


# --------------------------------------------------------------------------- checking


def hard_reset(graph: IFGraph) -> IFGraph:
    """A copy of ``graph`` whose IF layers reset to zero (what netx neurons do)."""
    layers = tuple(dataclasses.replace(la, reset="zero") if isinstance(la, IFLayer) else la
                   for la in graph.layers)
    return graph.replace(layers=layers)


@dataclass(frozen=True)
class NetxCheck:
    """netx against the integer simulator (hard reset, pipelined, T = 1, P = 0)."""

    samples: int
    layers: int
    compared: int            # spike slots compared: samples x neurons in counted steps
    mismatches: int          # in counted steps (must be 0)
    readout_equal: bool
    predictions_equal: bool
    other_step_differences: int   # outside counted steps (not defined by netx; informative)
    netx_seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_netx(graph: IFGraph, path: str | Path, x_int: torch.Tensor,
               progress: bool = False) -> NetxCheck:
    """Run the netx file of ``graph`` and compare it with the simulator (see NetxCheck)."""
    run = run_netx(path, x_int, progress)
    ref = simulate(hard_reset(graph), x_int,
                   RunConfig(timesteps=1, presim=0, schedule="pipelined", record=True))
    assert ref.spikes is not None
    compared = mismatches = other = 0
    for name, step in run.window_step.items():
        if name not in ref.spikes:
            continue
        got, want = run.spikes[name], ref.spikes[name]
        compared += want[step].numel()
        mismatches += int((got[step] != want[step]).sum())
        other += int((got != want).sum()) - int((got[step] != want[step]).sum())
    readout_equal = torch.equal(run.readout, ref.readout)
    preds_equal = torch.equal(run.readout.argmax(1), ref.readout.argmax(1))
    return NetxCheck(samples=int(x_int.shape[0]), layers=len(ref.spikes), compared=compared,
                     mismatches=mismatches, readout_equal=readout_equal,
                     predictions_equal=preds_equal, other_step_differences=other,
                     netx_seconds=run.seconds)
