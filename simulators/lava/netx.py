"""A lava-dl netx file on Lava, compared with the integer simulator.

:func:`run_netx` loads a file written by :func:`csqcfs_deploy.exporters.netx.write_netx`
with lava-dl's ``netx.hdf5.Network`` (with the file's ``load_kwargs``), runs it
on ``Loihi2SimCfg(select_tag="fixed_pt")`` with the integer input as graded
spikes, one ``1 + D``-step sample after the other, and records every layer's
spikes through a :class:`SpikeRecorder` per block. :func:`check_netx` compares
that with the integer simulator on :func:`hard_reset` of the graph (netx
neurons reset to zero), pipelined, ``T = 1``, ``P = 0``: in each layer's
counted step (step ``k + 1`` of the sample for the ``k``-th block, 0-based) and
the readout the two must be equal; the other steps are not defined by netx and
only counted.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.netx_file import NetxFile, opened_netx
from csqcfs_deploy.ir import IFGraph, IFLayer
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.simulators.lava.compat import import_lava_dl
from csqcfs_deploy.simulators.lava.processes import (
    GradedInput,
    PyGradedInputModel,
    PySpikeRecorderModel,
    SampleClock,
    SharedArray,
    SpikeRecorder,
)
from csqcfs_deploy.simulators.lava.session import LavaSession, make_workdir

MAX_SLOTS = 64


@dataclass
class NetxRun:
    """netx on Lava: per layer (readout included) spikes (steps, N, *shape) bool; the readout
    membrane at the end of each sample plus the offset (N, F) int64."""

    steps: int
    spikes: dict[str, torch.Tensor]
    readout: torch.Tensor
    window_step: dict[str, int]        # 0-based index of each layer's counted step
    seconds: float


#: What lava-dl's netx raises on a file whose layer groups it cannot build from.
_NETX_BUILD_ERRORS = (KeyError, ValueError, TypeError, IndexError, AttributeError,
                      AssertionError, OverflowError, ZeroDivisionError, OSError, RuntimeError)


def _network(hdf5: Any, path: str | Path, netx_file: NetxFile) -> Any:
    """lava-dl's ``netx.hdf5.Network`` of the probed file, with the layers it describes."""
    layers = netx_file.meta["layers"]
    try:
        net = hdf5.Network(net_config=netx_file.path, **netx_file.meta["load_kwargs"])
    except _NETX_BUILD_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputFileError(f"{path}: lava-dl netx cannot build this file ({detail})"
                             ) from None
    if len(net.layers) != len(layers):
        raise InputFileError(f"{path}: netx built {len(net.layers)} layers, the file "
                             f"describes {len(layers)}")
    return net


def run_netx(path: str | Path, x_int: torch.Tensor, progress: bool = False) -> NetxRun:
    """Load ``path`` with lava-dl's ``netx.hdf5.Network`` (with its ``load_kwargs``), run it
    on ``Loihi2SimCfg(select_tag="fixed_pt")`` with the integer input (N, *input_shape) as
    graded spikes, one ``1 + D``-step sample after the other, and record every layer's
    spikes."""
    hdf5 = import_lava_dl("lava.lib.dl.netx.hdf5")
    with opened_netx(path) as netx_file:
        meta = netx_file.meta
        net = _network(hdf5, path, netx_file)
    input_shape = tuple(meta["input_shape"])
    if tuple(x_int.shape[1:]) != input_shape:
        raise GraphError(f"input has shape {tuple(x_int.shape[1:])}, the netx file expects "
                         f"{input_shape}")
    x = x_int.detach().cpu().to(torch.int64).reshape(x_int.shape[0], -1).numpy()
    n = x.shape[0]
    layer_meta = meta["layers"]
    steps = 1 + len(layer_meta)
    slots = max(1, min(n, MAX_SLOTS))
    clock = SampleClock(steps=steps, slots=slots)
    workdir = make_workdir()
    try:
        inputs = SharedArray.create(workdir, "input", (slots, x.shape[1]), "int32")
        source = GradedInput(shape=input_shape, clock=clock, inputs=inputs, name="input")
        source.s_out.connect(net.inp)
        models: dict[Any, type] = {source: PyGradedInputModel}
        records = {}
        for block, la in zip(net.layers, layer_meta, strict=True):
            shape = tuple(la["shape"])
            rec = SharedArray.create(workdir, f"{la['name']}.spikes",
                                     (slots, steps, int(np.prod(shape))), "int32")
            recorder = SpikeRecorder(shape=shape, clock=clock, record=rec,
                                     name=f"{la['name']}.probe")
            block.neuron.s_out.connect(recorder.s_in)
            models[recorder] = PySpikeRecorderModel
            records[la["name"]] = rec
    except BaseException:
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
    ref_spikes = ref.spikes if ref.spikes is not None else {}   # recorded: record=True
    compared = mismatches = other = 0
    for name, step in run.window_step.items():
        if name not in ref_spikes:
            continue
        got, want = run.spikes[name], ref_spikes[name]
        compared += want[step].numel()
        mismatches += int((got[step] != want[step]).sum())
        other += int((got != want).sum()) - int((got[step] != want[step]).sum())
    readout_equal = torch.equal(run.readout, ref.readout)
    preds_equal = torch.equal(run.readout.argmax(1), ref.readout.argmax(1))
    return NetxCheck(samples=int(x_int.shape[0]), layers=len(ref_spikes), compared=compared,
                     mismatches=mismatches, readout_equal=readout_equal,
                     predictions_equal=preds_equal, other_step_differences=other,
                     netx_seconds=run.seconds)
