"""Our Lava processes: integer input source, loihi2 IF neurons, readout, spike delay.

Each is a Lava ``AbstractProcess`` plus a ``PyLoihiProcessModel`` tagged
``fixed_pt`` (run with ``Loihi2SimCfg(select_tag="fixed_pt")``). Synapses are
Lava's own ``Dense`` (PyDenseModelBitAcc) and ``Conv`` (PyConvModelFixed),
which deliver a step's input one step later (one hop = one step).

**A deliberate independent copy of the neuron rule.** :func:`loihi2_current`,
:func:`loihi2_voltage`, :func:`loihi2_if_update`, :func:`effective_bias` and the
event logic in the models' ``run_spk`` (count, counted window, mask and
re-initialisation, fill reset, readout clear, in that order) restate the rule
whose one specification is :mod:`csqcfs_deploy.ir.neuron` (``if_step``,
``readout_step``, ``LayerEvents``), for the loihi2 profile only. They must run
inside Lava's process models, in numpy, on the arrays Lava's ports deliver, in
Lava's forked processes, with Lava's own constants (AbstractPyLifModelFixed),
so they cannot call the torch specification; kept as a copy, they are also a
check of it: ``tests/test_lava.py`` compares them with Lava's own LIF model
and the whole network with the integer simulator, spike for spike. *When* the
events happen is not copied: every IF and readout process receives the spec's
:class:`~csqcfs_deploy.ir.neuron.LayerEvents`, computed by the host with
``layer_events(graph, cfg, name)`` (steps are each sample's local steps).

Samples run back to back, ``S = P + T + D`` steps each, in ``slots`` numbered
sample slots: at step ``t`` (Lava's ``time_step``, from 1) a process is in
local step ``l = (t - 1) % S + 1`` of slot ``((t - 1) // S) % slots``. Every
process restores its state at ``l = 1`` and sends nothing at ``l = S`` (what it
would send then would reach the next sample), so consecutive samples are
independent runs. Inputs and results go through files mapped into memory
(:class:`SharedArray`) that the host writes before and reads after a run,
because Lava's ``Var.get`` moves one element per message.

Layouts: a neuron group of shape (C, H, W) keeps its state in C-major order
(our graph's order) and talks to Lava's ``Conv`` in Lava's (X, Y, C) = (W, H, C)
order (``s_out``, ``a_in``); ``s_out_flat`` sends the C-major flattening that a
``Dense`` expects. A 1-D group (F,) uses (F,) everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from csqcfs_deploy.ir.neuron import LayerEvents
from csqcfs_deploy.simulators.lava.compat import import_lava

import_lava()

from lava.magma.core.decorator import implements, requires, tag  # noqa: E402
from lava.magma.core.model.py.model import PyLoihiProcessModel  # noqa: E402
from lava.magma.core.model.py.ports import PyInPort, PyOutPort  # noqa: E402
from lava.magma.core.model.py.type import LavaPyType  # noqa: E402
from lava.magma.core.process.ports.ports import InPort, OutPort  # noqa: E402
from lava.magma.core.process.process import AbstractProcess  # noqa: E402
from lava.magma.core.process.variable import Var  # noqa: E402
from lava.magma.core.resources import CPU  # noqa: E402
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol  # noqa: E402

# Loihi / lava-nc fixed-point constants (lava/proc/lif/models.py AbstractPyLifModelFixed);
# part of the deliberate copy (the loihi2 profile states the same numbers)
UV_BITS = 24
MAX_UV = 2 ** (UV_BITS - 1)            # current wraps past +-2**23
V_LIMIT = MAX_UV - 1                   # voltage saturates at +-(2**23 - 1)
ACT_SHIFT = 6                          # synaptic input << 6 into the current


@dataclass(frozen=True)
class SharedArray:
    """A host file mapped into memory by the host and by Lava's (forked) processes."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def create(cls, directory: Path, name: str, shape: tuple[int, ...], dtype: str
               ) -> SharedArray:
        """A new zero-filled file ``directory/name.bin`` of ``shape`` and ``dtype``."""
        path = directory / f"{name}.bin"
        arr: np.memmap[Any, Any] = np.memmap(path, dtype=np.dtype(dtype), mode="w+",
                                             shape=shape)
        arr.flush()
        del arr
        return cls(str(path), shape, dtype)

    def open(self) -> np.memmap[Any, Any]:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r+", shape=self.shape)


@dataclass(frozen=True)
class SampleClock:
    """Where global step ``t`` falls: samples of ``steps`` steps in ``slots`` slots."""

    steps: int
    slots: int

    def local(self, t: int) -> tuple[int, int]:
        """(local step 1..steps, slot) of Lava time step ``t`` (from 1)."""
        return (t - 1) % self.steps + 1, ((t - 1) // self.steps) % self.slots


# --------------------------------------------------------------------------- layouts


def lava_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Lava's port shape for a group of ``shape``: (C, H, W) -> (W, H, C); (F,) stays."""
    return tuple(reversed(shape)) if len(shape) == 3 else tuple(shape)


def to_lava(flat: NDArray[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    """C-major flat values of a (C, H, W) group -> Lava's (W, H, C) array."""
    return flat.reshape(shape).transpose(2, 1, 0) if len(shape) == 3 else flat


def from_lava(arr: NDArray[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    """Lava's (W, H, C) array -> C-major flat values."""
    return arr.transpose(2, 1, 0).reshape(-1) if len(shape) == 3 else arr.reshape(-1)


# --------------------------------------------------------------------------- neuron rule
# A deliberate independent copy of csqcfs_deploy.ir.neuron's rule for the loihi2 profile
# (see the module docstring): numpy, inside Lava's process models.


def loihi2_current(a_in: NDArray[Any]) -> NDArray[np.int64]:
    """Synaptic input -> current, int64: ``u = a_in << 6``, wrapped once at 24 bits.

    AbstractPyLifModelFixed with ``du = 4095`` (decay constant 4096: the current
    keeps nothing from the last step): ``u > 2**23 -> u - 2**24``,
    ``u <= -2**23 -> u + 2**24``.
    """
    u: NDArray[np.int64] = np.left_shift(a_in.astype(np.int64), ACT_SHIFT)
    u = np.where(u > MAX_UV, u - 2 * MAX_UV, u)
    return np.where(u <= -MAX_UV, u + 2 * MAX_UV, u)


def loihi2_voltage(v: NDArray[Any], u: NDArray[np.int64], bias: NDArray[np.int64]
                   ) -> NDArray[np.int64]:
    """``v + u + bias`` saturated at +-(2**23 - 1) (``dv = 0``: no leak), int64."""
    return np.clip(v.astype(np.int64) + u + bias, -V_LIMIT, V_LIMIT)


def loihi2_if_update(a_in: NDArray[Any], v: NDArray[np.int64], bias: NDArray[np.int64],
                     v_th: NDArray[np.int64], reset_zero: bool
                     ) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """One step of an IF neuron in Loihi 2 fixed point; all arrays (n,) int64.

    ``v <- sat(v + wrap(a_in << 6) + bias)``; ``s = v > v_th``; then
    ``v <- v - s * v_th`` (reset by subtraction) or ``v <- 0 where s``.
    Returns (spikes as bool, new v). The copy of ``ir.neuron.if_step`` on the
    loihi2 profile (strict comparison, 24-bit wrap and saturation).
    """
    v = loihi2_voltage(v, loihi2_current(a_in), bias)
    s = v > v_th
    v = np.where(s, 0, v) if reset_zero else v - s * v_th
    return s, v


def effective_bias(bias_mant: NDArray[Any], bias_exp: NDArray[Any]) -> NDArray[np.int64]:
    """``bias_mant << bias_exp`` as AbstractPyLifModelFixed.scale_bias (exp >= 0 here)."""
    return np.left_shift(bias_mant.astype(np.int64), bias_exp.astype(np.int64))


# --------------------------------------------------------------------------- processes


class GradedInput(AbstractProcess):  # type: ignore[misc]
    """Sends a sample's integer input as graded spikes at local steps 1..S-1.

    ``inputs``: SharedArray (slots, n) int32, C-major; written by the host.
    Ports: ``s_out`` Lava-shaped, ``s_out_flat`` (n,).
    """

    def __init__(self, *, shape: tuple[int, ...], clock: SampleClock, inputs: SharedArray,
                 name: str | None = None) -> None:
        super().__init__(shape=shape, clock=clock, inputs=inputs, name=name)
        n = int(np.prod(shape))
        self.s_out = OutPort(shape=lava_shape(shape))
        self.s_out_flat = OutPort(shape=(n,))


@implements(proc=GradedInput, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyGradedInputModel(PyLoihiProcessModel):  # type: ignore[misc]
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_out_flat: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.clock: SampleClock = proc_params["clock"]
        self.inputs_spec: SharedArray = proc_params["inputs"]
        self.inputs: np.memmap[Any, Any] | None = None

    def run_spk(self) -> None:
        if self.inputs is None:
            self.inputs = self.inputs_spec.open()
        local, slot = self.clock.local(self.time_step)
        if local < self.clock.steps:
            x = np.asarray(self.inputs[slot], dtype=np.int32)
        else:
            x = np.zeros(self.inputs.shape[1], dtype=np.int32)
        self.s_out.send(to_lava(x, self.shape))
        self.s_out_flat.send(x)


@dataclass(frozen=True)
class IFRecording:
    """Where an IF group writes its results (each (slots, ...), C-major neurons).

    ``counts``/``window``: int32 output spikes over all steps / the counted
    window; ``masks``: bool pre-simulation masks; ``spikes``: bool
    (slots, S, n) every step's output, or None when not recorded.
    """

    counts: SharedArray
    window: SharedArray
    masks: SharedArray
    spikes: SharedArray | None


class IFNeurons(AbstractProcess):  # type: ignore[misc]
    """Integrate-and-fire group in Loihi 2 fixed point (see :func:`loihi2_if_update`).

    Per neuron (n,) Vars: ``v`` membrane, ``v_th`` threshold, ``v_init`` initial
    membrane, ``bias_mant``/``bias_exp``. ``reset_zero``: hard reset instead of
    subtraction. ``events``: the layer's :class:`~csqcfs_deploy.ir.neuron.LayerEvents`
    (counted window, pre-simulation mask, fill reset), in local steps.
    """

    def __init__(self, *, shape: tuple[int, ...], v_th: NDArray[np.int64],
                 v_init: NDArray[np.int64], bias_mant: NDArray[np.int64],
                 bias_exp: NDArray[np.int64], reset_zero: bool, clock: SampleClock,
                 events: LayerEvents, recording: IFRecording, name: str | None = None) -> None:
        super().__init__(shape=shape, reset_zero=reset_zero, clock=clock, events=events,
                         recording=recording, name=name)
        n = int(np.prod(shape))
        self.a_in = InPort(shape=lava_shape(shape))
        self.s_out = OutPort(shape=lava_shape(shape))
        self.s_out_flat = OutPort(shape=(n,))
        self.v = Var(shape=(n,), init=v_init)
        self.v_th = Var(shape=(n,), init=v_th)
        self.v_init = Var(shape=(n,), init=v_init)
        self.bias_mant = Var(shape=(n,), init=bias_mant)
        self.bias_exp = Var(shape=(n,), init=bias_exp)


@implements(proc=IFNeurons, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyIFNeuronsModelFixed(PyLoihiProcessModel):  # type: ignore[misc]
    """One local step ``l`` (the event logic is part of the deliberate copy)::

        l = 1: v <- v_init, mask cleared, the slot's counts zeroed
        s, v <- loihi2_if_update(...);  out = s (and mask)
        counts += out;  window += out if events.counted(l)
        events.masks_after(l):  mask <- v > 0;  v <- v_init
        else events.reinit_after(l) (the fill reset):  v <- v_init
        send out (nothing at l = S)
    """

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64, precision=32)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool, precision=1)
    s_out_flat: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool, precision=1)
    v: NDArray[Any] = LavaPyType(np.ndarray, np.int32, precision=24)
    v_th: NDArray[Any] = LavaPyType(np.ndarray, np.int32, precision=24)
    v_init: NDArray[Any] = LavaPyType(np.ndarray, np.int32, precision=24)
    bias_mant: NDArray[Any] = LavaPyType(np.ndarray, np.int16, precision=13)
    bias_exp: NDArray[Any] = LavaPyType(np.ndarray, np.int16, precision=3)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.reset_zero: bool = proc_params["reset_zero"]
        self.clock: SampleClock = proc_params["clock"]
        self.events: LayerEvents = proc_params["events"]
        self.recording: IFRecording = proc_params["recording"]
        self.files: dict[str, np.memmap[Any, Any]] | None = None
        self.mask: NDArray[np.bool_] | None = None

    def _open(self) -> dict[str, np.memmap[Any, Any]]:
        rec = self.recording
        files = {"counts": rec.counts.open(), "window": rec.window.open(),
                 "masks": rec.masks.open()}
        if rec.spikes is not None:
            files["spikes"] = rec.spikes.open()
        return files

    def run_spk(self) -> None:
        if self.files is None:
            self.files = self._open()
        local, slot = self.clock.local(self.time_step)
        events = self.events
        a_in = from_lava(self.a_in.recv(), self.shape)
        v = self.v.astype(np.int64)
        if local == 1:
            v = self.v_init.astype(np.int64)
            self.mask = None
            self.files["counts"][slot] = 0
            self.files["window"][slot] = 0
        bias = effective_bias(self.bias_mant, self.bias_exp)
        s, v = loihi2_if_update(a_in, v, bias, self.v_th.astype(np.int64), self.reset_zero)
        out = s if self.mask is None else s & self.mask
        self.files["counts"][slot] += out
        if events.counted(local):
            self.files["window"][slot] += out
        if "spikes" in self.files:
            self.files["spikes"][slot, local - 1] = out
        if events.masks_after(local):
            self.mask = v > 0
            self.files["masks"][slot] = self.mask
            v = self.v_init.astype(np.int64)
        elif events.reinit_after(local):
            v = self.v_init.astype(np.int64)
        self.v[:] = v
        if local == self.clock.steps:
            out = np.zeros_like(out)
        self.s_out.send(to_lava(out, self.shape))
        self.s_out_flat.send(out)


class ReadoutNeurons(AbstractProcess):  # type: ignore[misc]
    """Non-spiking readout (F,): ``v <- sat(v + wrap(a_in << 6) + bias)``; ``v = 0`` at
    the end of local step ``events.clear_step`` (``events.clears_after``); the final v
    goes to ``result`` (SharedArray (slots, F) int64)."""

    def __init__(self, *, size: int, bias_mant: NDArray[np.int64],
                 bias_exp: NDArray[np.int64], clock: SampleClock, events: LayerEvents,
                 result: SharedArray, name: str | None = None) -> None:
        super().__init__(clock=clock, events=events, result=result, name=name)
        self.a_in = InPort(shape=(size,))
        self.v = Var(shape=(size,), init=0)
        self.bias_mant = Var(shape=(size,), init=bias_mant)
        self.bias_exp = Var(shape=(size,), init=bias_exp)


@implements(proc=ReadoutNeurons, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyReadoutNeuronsModelFixed(PyLoihiProcessModel):  # type: ignore[misc]
    """One local step (part of the deliberate copy): ``v <- 0`` at ``l = 1``;
    ``v <- loihi2_voltage(v, loihi2_current(a_in), bias)``; ``v <- 0`` when
    ``events.clears_after(l)``; at ``l = S`` the slot's result is ``v``."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64, precision=32)
    v: NDArray[Any] = LavaPyType(np.ndarray, np.int32, precision=24)
    bias_mant: NDArray[Any] = LavaPyType(np.ndarray, np.int16, precision=13)
    bias_exp: NDArray[Any] = LavaPyType(np.ndarray, np.int16, precision=3)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.clock: SampleClock = proc_params["clock"]
        self.events: LayerEvents = proc_params["events"]
        self.result_spec: SharedArray = proc_params["result"]
        self.result: np.memmap[Any, Any] | None = None

    def run_spk(self) -> None:
        if self.result is None:
            self.result = self.result_spec.open()
        local, slot = self.clock.local(self.time_step)
        a_in = self.a_in.recv().reshape(-1)
        v = np.zeros(self.v.shape, np.int64) if local == 1 else self.v.astype(np.int64)
        v = loihi2_voltage(v, loihi2_current(a_in), effective_bias(self.bias_mant,
                                                                   self.bias_exp))
        if self.events.clears_after(local):
            v = np.zeros_like(v)
        self.v[:] = v
        if local == self.clock.steps:
            self.result[slot] = v


class SpikeDelay(AbstractProcess):  # type: ignore[misc]
    """Delays spikes (or graded input) by ``delay`` steps: a delay line for residual paths.

    At local step ``l`` it sends what it received at ``l - delay`` (nothing for
    ``l <= delay`` and at ``l = S``), so ``source -> SpikeDelay(k) -> Dense/Conv``
    takes ``k + 1`` steps.
    """

    def __init__(self, *, shape: tuple[int, ...], delay: int, clock: SampleClock,
                 name: str | None = None) -> None:
        super().__init__(shape=shape, delay=delay, clock=clock, name=name)
        self.s_in = InPort(shape=shape)
        self.s_out = OutPort(shape=shape)


@implements(proc=SpikeDelay, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySpikeDelayModel(PyLoihiProcessModel):  # type: ignore[misc]
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.delay: int = proc_params["delay"]
        self.clock: SampleClock = proc_params["clock"]
        self.history = np.zeros((self.clock.steps, *proc_params["shape"]), dtype=np.int32)

    def run_spk(self) -> None:
        local, _ = self.clock.local(self.time_step)
        self.history[local - 1] = self.s_in.recv()
        if self.delay < local < self.clock.steps:
            self.s_out.send(self.history[local - 1 - self.delay])
        else:
            self.s_out.send(np.zeros(self.history.shape[1:], dtype=np.int32))


class SpikeRecorder(AbstractProcess):  # type: ignore[misc]
    """Writes what it receives each step to ``record`` (SharedArray (slots, S, n), C-major
    neurons): a probe for processes that are not ours (e.g. lava-dl netx's neurons)."""

    def __init__(self, *, shape: tuple[int, ...], clock: SampleClock, record: SharedArray,
                 name: str | None = None) -> None:
        super().__init__(shape=shape, clock=clock, record=record, name=name)
        self.s_in = InPort(shape=lava_shape(shape))


@implements(proc=SpikeRecorder, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySpikeRecorderModel(PyLoihiProcessModel):  # type: ignore[misc]
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.clock: SampleClock = proc_params["clock"]
        self.record_spec: SharedArray = proc_params["record"]
        self.record: np.memmap[Any, Any] | None = None

    def run_spk(self) -> None:
        if self.record is None:
            self.record = self.record_spec.open()
        local, slot = self.clock.local(self.time_step)
        self.record[slot, local - 1] = from_lava(self.s_in.recv(), self.shape)
