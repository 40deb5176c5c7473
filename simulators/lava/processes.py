"""Our Lava processes: integer input source, loihi2 IF neurons, readout, spike delay.

Each is a Lava ``AbstractProcess`` plus a ``PyLoihiProcessModel`` tagged
``fixed_pt`` (run with ``Loihi2SimCfg(select_tag="fixed_pt")``). Synapses are
Lava's own ``Dense`` (PyDenseModelBitAcc) and ``Conv`` (PyConvModelFixed),
which deliver a step's input one step later (one hop = one step).

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

import numpy as np

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

# Loihi / lava-nc fixed-point constants (lava/proc/lif/models.py AbstractPyLifModelFixed)
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

    def open(self) -> np.memmap:
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


def to_lava(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """C-major flat values of a (C, H, W) group -> Lava's (W, H, C) array."""
    return flat.reshape(shape).transpose(2, 1, 0) if len(shape) == 3 else flat


def from_lava(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Lava's (W, H, C) array -> C-major flat values."""
    return arr.transpose(2, 1, 0).reshape(-1) if len(shape) == 3 else arr.reshape(-1)


# --------------------------------------------------------------------------- neuron rule


def loihi2_current(a_in: np.ndarray) -> np.ndarray:
    """Synaptic input -> current, int64: ``u = a_in << 6``, wrapped once at 24 bits.

    AbstractPyLifModelFixed with ``du = 4095`` (decay constant 4096: the current
    keeps nothing from the last step): ``u > 2**23 -> u - 2**24``,
    ``u <= -2**23 -> u + 2**24``.
    """
    u = np.left_shift(a_in.astype(np.int64), ACT_SHIFT)
    u = np.where(u > MAX_UV, u - 2 * MAX_UV, u)
    return np.where(u <= -MAX_UV, u + 2 * MAX_UV, u)


def loihi2_voltage(v: np.ndarray, u: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``v + u + bias`` saturated at +-(2**23 - 1) (``dv = 0``: no leak), int64."""
    return np.clip(v.astype(np.int64) + u + bias, -V_LIMIT, V_LIMIT)


def loihi2_if_update(a_in: np.ndarray, v: np.ndarray, bias: np.ndarray, v_th: np.ndarray,
                     reset_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """One step of an IF neuron in Loihi 2 fixed point; all arrays (n,) int64.

    ``v <- sat(v + wrap(a_in << 6) + bias)``; ``s = v > v_th``; then
    ``v <- v - s * v_th`` (reset by subtraction) or ``v <- 0 where s``.
    Returns (spikes as bool, new v).
    """
    v = loihi2_voltage(v, loihi2_current(a_in), bias)
    s = v > v_th
    v = np.where(s, 0, v) if reset_zero else v - s * v_th
    return s, v


def effective_bias(bias_mant: np.ndarray, bias_exp: np.ndarray) -> np.ndarray:
    """``bias_mant << bias_exp`` as AbstractPyLifModelFixed.scale_bias (exp >= 0 here)."""
    return np.left_shift(bias_mant.astype(np.int64), bias_exp.astype(np.int64))


# --------------------------------------------------------------------------- processes


class GradedInput(AbstractProcess):
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
class PyGradedInputModel(PyLoihiProcessModel):
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_out_flat: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.clock: SampleClock = proc_params["clock"]
        self.inputs_spec: SharedArray = proc_params["inputs"]
        self.inputs: np.memmap | None = None

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


@dataclass(frozen=True)
class IFTiming:
    """Per-layer steps (see csqcfs_deploy.ir.schedule): counted window ``boundary+1 ..
    boundary+timesteps``, pre-simulation mask at ``boundary`` when ``presim > 0``,
    fill reset at ``fill`` (0: never)."""

    boundary: int
    fill: int
    timesteps: int
    presim: int


class IFNeurons(AbstractProcess):
    """Integrate-and-fire group in Loihi 2 fixed point (see :func:`loihi2_if_update`).

    Per neuron (n,) Vars: ``v`` membrane, ``v_th`` threshold, ``v_init`` initial
    membrane, ``bias_mant``/``bias_exp``. ``reset_zero``: hard reset instead of
    subtraction. Pre-simulation mask and fill reset follow ``timing``.
    """

    def __init__(self, *, shape: tuple[int, ...], v_th: np.ndarray, v_init: np.ndarray,
                 bias_mant: np.ndarray, bias_exp: np.ndarray, reset_zero: bool,
                 clock: SampleClock, timing: IFTiming, recording: IFRecording,
                 name: str | None = None) -> None:
        super().__init__(shape=shape, reset_zero=reset_zero, clock=clock, timing=timing,
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
class PyIFNeuronsModelFixed(PyLoihiProcessModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64, precision=32)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool, precision=1)
    s_out_flat: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool, precision=1)
    v: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    v_th: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    v_init: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.int16, precision=13)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.int16, precision=3)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.reset_zero: bool = proc_params["reset_zero"]
        self.clock: SampleClock = proc_params["clock"]
        self.timing: IFTiming = proc_params["timing"]
        self.recording: IFRecording = proc_params["recording"]
        self.files: dict[str, np.memmap] | None = None
        self.mask: np.ndarray | None = None

    def _open(self) -> dict[str, np.memmap]:
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
        timing = self.timing
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
        if timing.boundary < local <= timing.boundary + timing.timesteps:
            self.files["window"][slot] += out
        if "spikes" in self.files:
            self.files["spikes"][slot, local - 1] = out
        if timing.presim > 0 and local == timing.boundary:
            self.mask = v > 0
            self.files["masks"][slot] = self.mask
            v = self.v_init.astype(np.int64)
        elif local == timing.fill:
            v = self.v_init.astype(np.int64)
        self.v[:] = v
        if local == self.clock.steps:
            out = np.zeros_like(out)
        self.s_out.send(to_lava(out, self.shape))
        self.s_out_flat.send(out)


class ReadoutNeurons(AbstractProcess):
    """Non-spiking readout (F,): ``v <- sat(v + wrap(a_in << 6) + bias)``; ``v = 0`` at
    the end of local step ``boundary`` (if >= 1); the final v goes to ``result``
    (SharedArray (slots, F) int64)."""

    def __init__(self, *, size: int, bias_mant: np.ndarray, bias_exp: np.ndarray,
                 clock: SampleClock, boundary: int, result: SharedArray,
                 name: str | None = None) -> None:
        super().__init__(clock=clock, boundary=boundary, result=result, name=name)
        self.a_in = InPort(shape=(size,))
        self.v = Var(shape=(size,), init=0)
        self.bias_mant = Var(shape=(size,), init=bias_mant)
        self.bias_exp = Var(shape=(size,), init=bias_exp)


@implements(proc=ReadoutNeurons, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyReadoutNeuronsModelFixed(PyLoihiProcessModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64, precision=32)
    v: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.int16, precision=13)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.int16, precision=3)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.clock: SampleClock = proc_params["clock"]
        self.boundary: int = proc_params["boundary"]
        self.result_spec: SharedArray = proc_params["result"]
        self.result: np.memmap | None = None

    def run_spk(self) -> None:
        if self.result is None:
            self.result = self.result_spec.open()
        local, slot = self.clock.local(self.time_step)
        a_in = self.a_in.recv().reshape(-1)
        v = np.zeros(self.v.shape, np.int64) if local == 1 else self.v.astype(np.int64)
        v = loihi2_voltage(v, loihi2_current(a_in), effective_bias(self.bias_mant,
                                                                   self.bias_exp))
        if local == self.boundary:
            v = np.zeros_like(v)
        self.v[:] = v
        if local == self.clock.steps:
            self.result[slot] = v


class SpikeDelay(AbstractProcess):
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
class PySpikeDelayModel(PyLoihiProcessModel):
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


class SpikeRecorder(AbstractProcess):
    """Writes what it receives each step to ``record`` (SharedArray (slots, S, n), C-major
    neurons): a probe for processes that are not ours (e.g. lava-dl netx's neurons)."""

    def __init__(self, *, shape: tuple[int, ...], clock: SampleClock, record: SharedArray,
                 name: str | None = None) -> None:
        super().__init__(shape=shape, clock=clock, record=record, name=name)
        self.s_in = InPort(shape=lava_shape(shape))


@implements(proc=SpikeRecorder, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySpikeRecorderModel(PyLoihiProcessModel):
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)

    def __init__(self, proc_params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(proc_params)
        self.shape: tuple[int, ...] = proc_params["shape"]
        self.clock: SampleClock = proc_params["clock"]
        self.record_spec: SharedArray = proc_params["record"]
        self.record: np.memmap | None = None

    def run_spk(self) -> None:
        if self.record is None:
            self.record = self.record_spec.open()
        local, slot = self.clock.local(self.time_step)
        self.record[slot, local - 1] = from_lava(self.s_in.recv(), self.shape)
