"""``--backend lava``: the integer IF graph as lava-nc processes on Loihi2SimCfg.

The graph becomes (one Lava process each, see :mod:`.lava_processes`):

* the input: :class:`GradedInput`, the integer input as graded spikes every step;
* every projection: Lava's ``Conv`` (PyConvModelFixed) into a (C, H, W) layer,
  Lava's ``Dense`` (PyDenseModelBitAcc) into a (F,) layer; an identity shortcut
  is a depthwise 1x1 ``Conv`` (or a diagonal ``Dense``); a sum pool in front of
  a projection is folded into its weights (exact for non-overlapping, unpadded
  pools: ``W'[o, i, a, b] = W[o, i, a // k, b // k]``; others are refused);
* every IF layer: :class:`IFNeurons` (loihi2 fixed point, reset by
  subtraction, per-neuron thresholds, initial membrane, pre-simulation mask,
  pipeline fill reset), the readout: :class:`ReadoutNeurons`;
* a projection whose delay ``d_dst - d_src`` exceeds one step (a residual
  shortcut) goes through a :class:`SpikeDelay` of ``delay - 1`` steps.

Every Lava hop takes one step, so this is the *pipelined* schedule of
:mod:`csqcfs_deploy.ir.schedule`. Only the ``loihi2`` profile is Lava's arithmetic.

Running: the network is compiled and its processes started once
(:func:`open_runner`); samples then run back to back, ``S = P + T + D`` steps
each, with every process restoring its state at each sample's first step (no
recompilation, no ``Var.set``). Inputs and results pass through memory-mapped
files (see :mod:`.lava_processes`). :meth:`LavaRunner.close` stops Lava's
processes, also after an error or Ctrl-C (Lava's processes ignore SIGINT; the
host stops them, terminating any that do not stop in time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.convert.quantize import check_profile
from csqcfs_deploy.errors import BackendUnavailable, GraphError, UsageError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    IFLayer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import (
    RunConfig,
    boundary,
    fill_reset_step,
    projection_delay,
    total_steps,
)
from csqcfs_deploy.ir.synapses import max_abs_output
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.lava.compat import INSTALL_HINT, import_lava
from csqcfs_deploy.simulators.lava.processes import (
    GradedInput,
    IFNeurons,
    IFRecording,
    IFTiming,
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

from lava.magma.core.run_conditions import RunSteps  # noqa: E402
from lava.magma.core.run_configs import Loihi2SimCfg  # noqa: E402
from lava.magma.runtime.mgmt_token_enums import MGMT_RESPONSE, enum_equal  # noqa: E402
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

CONV_EXACT = 2**23      # PyConvModelFixed wraps its output to 24 signed bits
DENSE_EXACT = 2**31     # PyDenseModelBitAcc accumulates in int32
RECORD_BUDGET_BYTES = 256 * 2**20
MAX_SLOTS = 64
SAMPLES_PER_RUN = 8     # samples per Lava run call (the progress bar moves in these steps)
STOP_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- weights


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
        raise GraphError(
            f"projection {p.name}: its sum pool (kernel {pool.kernel}, stride {pool.stride}, "
            f"padding {pool.padding}) overlaps or is padded; the Lava exporter folds only "
            "non-overlapping, unpadded pools into the next weights")
    kh, kw = pool.kernel
    c, h, w = src_shape
    if isinstance(p, ConvProjection):
        if p.padding != (0, 0) and (h % kh or w % kw):
            raise GraphError(
                f"projection {p.name}: a padded conv after a {kh}x{kw} sum pool on a {h}x{w} "
                "map that the pool does not tile cannot be folded into one Lava Conv")
        weight = np.repeat(np.repeat(p.weight, kh, axis=2), kw, axis=3)
        return dataclasses.replace(
            p, weight=weight, pool=None,
            stride=(p.stride[0] * kh, p.stride[1] * kw),
            padding=(p.padding[0] * kh, p.padding[1] * kw))
    if isinstance(p, DenseProjection):
        q, r = h // kh, w // kw
        wt = p.weight.reshape(-1, c, q, r)
        wt = np.repeat(np.repeat(wt, kh, axis=2), kw, axis=3)
        full = np.zeros((wt.shape[0], c, h, w), dtype=wt.dtype)
        full[:, :, : q * kh, : r * kw] = wt
        return dataclasses.replace(p, weight=full.reshape(wt.shape[0], -1), pool=None)
    if isinstance(p, IdentityProjection):
        weight = np.broadcast_to(p.weight.reshape(-1, 1, 1, 1), (c, 1, kh, kw)).copy()
        return ConvProjection(p.name, p.src, p.dst, weight, None, p.weight_exp,
                              stride=(kh, kw), padding=(0, 0), groups=c)
    raise GraphError(f"projection {p.name}: unsupported type {type(p).__name__}")


def lava_projection(p: ProjectionT, src_shape: tuple[int, ...]) -> ProjectionT:
    """A pool-free conv (into a 3-D layer) or dense (into a 1-D layer) equivalent of ``p``."""
    q = fold_pool(p, src_shape)
    if isinstance(q, IdentityProjection):
        n = q.weight.shape[0]
        if len(src_shape) == 3:
            return ConvProjection(q.name, q.src, q.dst, q.weight.reshape(n, 1, 1, 1), None,
                                  q.weight_exp, stride=(1, 1), padding=(0, 0), groups=n)
        return DenseProjection(q.name, q.src, q.dst, np.diag(q.weight), None, q.weight_exp)
    return q


def lava_conv_weight(weight: np.ndarray) -> np.ndarray:
    """(O, I, kH, kW) cross-correlation weights -> Lava Conv's (O, kW, kH, I) convolution
    weights (Lava's Conv flips the kernel, as a true convolution does)."""
    return np.ascontiguousarray(weight.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :])


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class LavaLayout:
    """Sample clock and result files of one Lava network."""

    clock: SampleClock
    inputs: SharedArray
    recordings: dict[str, IFRecording]
    readout: SharedArray


@dataclass
class LavaNetwork:
    """The processes of one graph; ``root`` is the process Lava runs the graph from."""

    graph: IFGraph
    cfg: RunConfig
    layout: LavaLayout
    processes: dict[str, Any]
    root: Any


def check_lava_graph(graph: IFGraph) -> None:
    """Refuse a graph that Lava's fixed-point models cannot run bit-exactly."""
    if not graph.is_integer:
        raise GraphError("the Lava back end runs quantized graphs; convert with --profile loihi2")
    if graph.meta.profile != "loihi2":
        raise GraphError(f"the Lava back end runs the loihi2 profile only (Lava's fixed-point "
                         f"arithmetic); this graph is quantized for {graph.meta.profile}")
    check_profile(graph)
    max_src = {la.name: 1.0 for la in graph.layers}
    max_src[graph.input.name] = float(graph.input.encoding.max_abs_int)
    for p in graph.projections:
        src_shape = graph.node(p.src).shape
        q = lava_projection(p, src_shape)
        bound = max_abs_output(q, max_src[p.src])
        limit = CONV_EXACT if isinstance(q, ConvProjection) else DENSE_EXACT
        if bound >= limit:
            kind = "Conv (24-bit output)" if limit == CONV_EXACT else "Dense (int32)"
            raise GraphError(f"projection {p.name}: one step's synaptic sum may reach "
                             f"{bound:.3g}, beyond Lava's {kind} exact range {limit}")


def _split_bias(bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prof = get_profile("loihi2")
    pairs = [prof.encode_bias(int(b)) for b in bias.tolist()]
    return (np.array([m for m, _ in pairs], dtype=np.int64),
            np.array([e for _, e in pairs], dtype=np.int64))


def _per_neuron(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C,) per-channel values -> (n,) per neuron, C-major."""
    per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return np.repeat(np.asarray(values, dtype=np.int64), per)


def _shared(directory: Path, name: str, shape: tuple[int, ...], dtype: str) -> SharedArray:
    path = directory / f"{name}.bin"
    arr = np.memmap(path, dtype=np.dtype(dtype), mode="w+", shape=shape)
    arr.flush()
    del arr
    return SharedArray(str(path), shape, dtype)


def slots_for(graph: IFGraph, cfg: RunConfig) -> int:
    """Samples held at once in the result files (bounded by RECORD_BUDGET_BYTES)."""
    neurons = sum(la.neurons for la in graph.if_layers)
    per_sample = neurons * (9 + (total_steps(graph, cfg) if cfg.record else 0))
    return int(max(1, min(MAX_SLOTS, RECORD_BUDGET_BYTES // max(per_sample, 1))))


def build_network(graph: IFGraph, cfg: RunConfig, directory: Path,
                  slots: int | None = None) -> LavaNetwork:
    """Create (not compile) the Lava processes of ``graph`` under ``cfg`` (pipelined)."""
    if cfg.schedule != "pipelined":
        raise UsageError("Lava runs the pipelined schedule (every hop takes one step)")
    check_lava_graph(graph)
    slots = slots or slots_for(graph, cfg)
    steps = total_steps(graph, cfg)
    clock = SampleClock(steps=steps, slots=slots)
    inp = graph.input
    n_in = int(np.prod(inp.shape))
    inputs = _shared(directory, "input", (slots, n_in), "int32")
    procs: dict[str, Any] = {inp.name: GradedInput(shape=inp.shape, clock=clock, inputs=inputs,
                                                   name=inp.name)}
    recordings: dict[str, IFRecording] = {}
    readout_file: SharedArray | None = None
    for layer in graph.layers:
        if isinstance(layer, IFLayer):
            n = layer.neurons
            rec = IFRecording(
                counts=_shared(directory, f"{layer.name}.counts", (slots, n), "int32"),
                window=_shared(directory, f"{layer.name}.window", (slots, n), "int32"),
                masks=_shared(directory, f"{layer.name}.masks", (slots, n), "bool"),
                spikes=(_shared(directory, f"{layer.name}.spikes", (slots, steps, n), "bool")
                        if cfg.record else None))
            recordings[layer.name] = rec
            mant, exp = _split_bias(_per_neuron(layer.bias, layer.shape))
            timing = IFTiming(boundary=boundary(graph, cfg, layer.name),
                              fill=fill_reset_step(graph, cfg, layer.name),
                              timesteps=cfg.timesteps, presim=cfg.presim)
            procs[layer.name] = IFNeurons(
                shape=layer.shape, v_th=_per_neuron(layer.v_th, layer.shape),
                v_init=_per_neuron(layer.v_init, layer.shape), bias_mant=mant, bias_exp=exp,
                reset_zero=layer.reset == "zero", clock=clock, timing=timing,
                recording=rec, name=layer.name)
        elif isinstance(layer, ReadoutLayer):
            readout_file = _shared(directory, "readout", (slots, layer.neurons), "int64")
            mant, exp = _split_bias(np.asarray(layer.bias))
            procs[layer.name] = ReadoutNeurons(
                size=layer.neurons, bias_mant=mant, bias_exp=exp, clock=clock,
                boundary=boundary(graph, cfg, layer.name), result=readout_file,
                name=layer.name)
    assert readout_file is not None
    input_bits = get_profile("loihi2").input_bits
    for p in graph.projections:
        src_layer = graph.node(p.src)
        q = lava_projection(p, src_layer.shape)
        graded = p.src == inp.name
        src = procs[p.src]
        port = src.s_out if isinstance(q, ConvProjection) else src.s_out_flat
        delay = projection_delay(graph, cfg, p.name)
        if delay > 1:
            line = SpikeDelay(shape=tuple(port.shape), delay=delay - 1, clock=clock,
                              name=f"{p.name}.delay")
            port.connect(line.s_in)
            port = line.s_out
            procs[line.name] = line
        bits = input_bits if graded else 0
        conn: Any
        if isinstance(q, ConvProjection):
            conn = Conv(weight=lava_conv_weight(q.weight), input_shape=lava_shape(src_layer.shape),
                        padding=(q.padding[1], q.padding[0]), stride=(q.stride[1], q.stride[0]),
                        groups=q.groups, num_weight_bits=8, num_message_bits=bits, name=p.name)
            if tuple(conn.output_shape) != lava_shape(graph.node(p.dst).shape):
                raise GraphError(f"projection {p.name}: Lava Conv gives {conn.output_shape}, "
                                 f"layer {p.dst} needs {lava_shape(graph.node(p.dst).shape)}")
        else:
            conn = Dense(weights=np.asarray(q.weight, dtype=np.int64), num_message_bits=bits,
                         num_weight_bits=8, sign_mode=SignMode.MIXED, weight_exp=q.weight_exp,
                         name=p.name)
        procs[p.name] = conn
        port.connect(conn.s_in)
        conn.a_out.connect(procs[p.dst].a_in)
    layout = LavaLayout(clock=clock, inputs=inputs, recordings=recordings, readout=readout_file)
    return LavaNetwork(graph, cfg, layout, procs, root=procs[graph.readout.name])


def process_models(network: LavaNetwork) -> dict[Any, type]:
    """The fixed-point ProcessModel of every process, keyed by process and by class.

    Lava's compiler consults this map for a process before it searches for
    models; without it, it executes every module in the directories of the
    processes' packages (all of ``csqcfs_deploy.exporters``) on each compile.
    """
    table: dict[Any, type] = {}
    for proc in network.processes.values():
        model = FIXED_PT_MODELS[type(proc)]
        table[proc] = model
        table[type(proc)] = model
    return table


# --------------------------------------------------------------------------- runner


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes forked inside inherit SIGINT ignored (the host stops them on Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _actors(runtime: Any) -> list[Any]:
    infra = getattr(runtime, "_messaging_infrastructure", None)
    return list(getattr(infra, "actors", []) or [])


def _child_errors(runtime: Any) -> list[str]:
    """One line per exception raised inside Lava's processes."""
    lines = []
    for actor in _actors(runtime):
        with contextlib.suppress(ValueError, OSError, EOFError):
            exc = actor.exception
            if exc:
                err = exc[0]
                lines.append(f"{type(err).__name__}: {err}")
    return lines


def _alive(proc: Any) -> bool:
    try:
        return bool(proc.is_alive())
    except ValueError:  # closed: Lava already joined it
        return False


def shutdown_runtime(runtime: Any, polite: bool = True,
                     timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop a Lava runtime and make sure every process it started has ended.

    ``polite``: first ask Lava to stop (in a helper thread, so a wedged runtime
    cannot hang the host; skipped after a failure, when Lava's own stop would
    wait for processes that are blocked on a dead neighbour). Then terminates,
    by handle, any of its processes still alive, joins the host ends of its
    channels and shuts its shared-memory manager down. Returns the problems
    met, one line each.
    """
    problems: list[str] = []
    actors = _actors(runtime)
    infra = getattr(runtime, "_messaging_infrastructure", None)
    smm = getattr(infra, "smm", None)
    manager_proc = getattr(smm, "_process", None)

    def stop() -> None:
        try:
            runtime.stop()
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            problems.append(f"Lava stop: {type(exc).__name__}: {exc}")

    stopped = interrupted = False
    if polite and getattr(runtime, "_is_started", False):
        stopper = threading.Thread(target=stop, name="lava-stop", daemon=True)
        stopper.start()
        try:
            stopper.join(timeout_s)
        except KeyboardInterrupt:  # a second Ctrl-C: still end every process, then re-raise
            interrupted = True
        stopped = not stopper.is_alive()
        if not stopped:
            problems.append(f"Lava did not stop within {timeout_s:.0f} s; terminating its "
                            "processes")
    for proc in (*actors, manager_proc):
        if proc is None or not _alive(proc):
            continue
        proc.terminate()
        _join_quietly(proc, 2.0)
        if _alive(proc):
            proc.kill()
            _join_quietly(proc, 2.0)
    if not stopped:
        with contextlib.suppress(OSError, EOFError, ValueError, AttributeError, TypeError):
            runtime.join()  # the host ends of Lava's channels (their threads end)
        if smm is not None:
            with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
                smm.shutdown()
        watchdog = getattr(runtime, "_watchdog_manager", None)
        if watchdog is not None:
            with contextlib.suppress(OSError, EOFError, ValueError, AttributeError):
                watchdog.stop()
    if hasattr(runtime, "_is_started"):
        runtime._is_started = False
        runtime._is_running = False
    if interrupted:
        raise KeyboardInterrupt
    return problems


def await_run(runtime: Any, poll_max_s: float = 0.005) -> None:
    """Wait until Lava's runtime services report the run done, watching its processes.

    Lava's own blocking wait hangs when a process fails (its neighbours block on
    the dead process's channel, so no error ever reaches the host); here a
    process that ends during a run raises :class:`LavaProcessFailed` with its
    exception. Polls with a growing sleep (0.5 ms up to ``poll_max_s``), which
    also lets Ctrl-C through.
    """
    pending = list(runtime.service_to_runtime)
    actors = _actors(runtime)
    sleep_s = 0.0005
    while pending:
        for port in list(pending):
            if port.probe():
                data = port.recv()
                if not enum_equal(data, MGMT_RESPONSE.DONE):
                    raise LavaProcessFailed(_child_errors(runtime)
                                            or [f"Lava's runtime answered {data}"])
                pending.remove(port)
        if not pending:
            break
        dead = [a for a in actors if not _alive(a)]
        if dead:
            raise LavaProcessFailed(_child_errors(runtime)
                                    or [f"{len(dead)} Lava process(es) ended during the run"])
        time.sleep(sleep_s)
        sleep_s = min(2 * sleep_s, poll_max_s)
    runtime._is_running = False


class LavaProcessFailed(Exception):
    """A Lava process ended during a run (internal; the runner reports BackendUnavailable)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _join_quietly(proc: Any, timeout_s: float) -> None:
    """Join with a timeout (Lava's SystemProcess.join() has none: use multiprocessing's)."""
    with contextlib.suppress(ValueError, AssertionError):
        multiprocessing.Process.join(proc, timeout_s)


@dataclass(frozen=True)
class LavaTimings:
    """Seconds spent building the processes, compiling and starting Lava's runtime."""

    build_s: float
    compile_s: float
    start_s: float


def make_workdir() -> Path:
    """A fresh directory for result files (in /dev/shm when it is usable)."""
    return Path(tempfile.mkdtemp(prefix="csqcfs-lava-", dir=_shm_dir()))


class LavaSession:
    """The Lava processes connected to ``root``, compiled and started once.

    ``models``: the ProcessModel per process (see :func:`process_models`);
    ``workdir``: the result-file directory, removed by :meth:`close`. Lava's
    processes are forked with SIGINT ignored: Ctrl-C reaches only the host,
    which then stops them.
    """

    def __init__(self, root: Any, models: dict[Any, type], workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self._runtime: Any = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, workdir, None)
        try:
            t0 = time.perf_counter()
            run_cfg = Loihi2SimCfg(select_tag="fixed_pt", exception_proc_model_map=models)
            try:
                executable = root.compile(run_cfg)
            except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
                raise BackendUnavailable(f"Lava failed to compile the network "
                                         f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
                                         ) from None
            t1 = time.perf_counter()
            with _children_ignore_sigint():
                try:
                    root.create_runtime(executable=executable)
                except (RuntimeError, OSError, ValueError, EOFError) as exc:
                    raise BackendUnavailable(f"Lava failed to start its processes "
                                             f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
                                             ) from None
                finally:
                    self._runtime = root.runtime
                    self._finalizer.detach()
                    self._finalizer = weakref.finalize(self, _cleanup, workdir, self._runtime)
            t2 = time.perf_counter()
        except BaseException:
            self.close(polite=False)
            raise
        self.compile_s = t1 - t0
        self.start_s = t2 - t1

    @property
    def closed(self) -> bool:
        return self._closed

    def run_steps(self, steps: int) -> None:
        """Advance every process by ``steps`` steps; a failure stops Lava and raises
        BackendUnavailable naming the error raised inside Lava."""
        if self._closed:
            raise BackendUnavailable("the Lava runner is closed (Lava was stopped)")
        try:
            self.root.run(condition=RunSteps(num_steps=steps, blocking=False))
            await_run(self._runtime)
        except LavaProcessFailed as exc:
            self.close(polite=False)
            raise BackendUnavailable(f"Lava failed during the run ({exc}); its processes "
                                     "were stopped") from None
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            self.close(polite=False)
            raise BackendUnavailable(f"Lava failed during the run ({type(exc).__name__}: "
                                     f"{exc}); its processes were stopped") from None

    def close(self, polite: bool = True) -> list[str]:
        """Stop Lava's processes and remove the work directory; idempotent.

        ``polite``: ask Lava to stop first (False after a failure: terminate).
        """
        if self._closed:
            return []
        self._closed = True
        problems = []
        if self._runtime is not None:
            problems = shutdown_runtime(self._runtime, polite=polite)
        self._finalizer.detach()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


class LavaRunner:
    """A compiled, started Lava network; :meth:`run` runs batches of integer inputs."""

    def __init__(self, graph: IFGraph, cfg: RunConfig, options: BackendOptions,
                 slots: int | None = None, samples_per_run: int = SAMPLES_PER_RUN) -> None:
        if options.device != "cpu":
            raise UsageError("the Lava back end simulates on the CPU (--device cpu)")
        if samples_per_run < 1:
            raise UsageError(f"samples_per_run must be >= 1, got {samples_per_run}")
        self.graph = graph
        self.cfg = cfg
        self.progress = options.progress
        self._samples_run = 0
        workdir = make_workdir()
        try:
            t0 = time.perf_counter()
            self.network = build_network(graph, cfg, workdir, slots)
            build_s = time.perf_counter() - t0
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.session = LavaSession(self.network.root, process_models(self.network), workdir)
        self.timings = LavaTimings(build_s=build_s, compile_s=self.session.compile_s,
                                   start_s=self.session.start_s)
        self.layout = self.network.layout
        # samples per Lava run call: at most one slot each (a slot is reused only after
        # the host has read it)
        self.samples_per_run = min(samples_per_run, self.layout.clock.slots)
        self._views: _Views | None = _Views.open(self.layout)

    @property
    def steps(self) -> int:
        return self.layout.clock.steps

    def run(self, x_int: torch.Tensor) -> RunResult:
        """Run inputs (N, *input_shape) and return what the simulator's ``simulate`` returns."""
        if self.session.closed or self._views is None:
            raise BackendUnavailable("the Lava runner is closed (Lava was stopped)")
        views = self._views
        graph, cfg = self.graph, self.cfg
        x = _check_input(graph, x_int)
        n = x.shape[0]
        slots = self.layout.clock.slots
        steps = self.steps
        readout = np.zeros((n, graph.readout.neurons), dtype=np.int64)
        layers = graph.if_layers
        counts = {la.name: np.zeros((n, la.neurons), np.int32) for la in layers}
        window = {la.name: np.zeros((n, la.neurons), np.int32) for la in layers}
        masks = {la.name: np.zeros((n, la.neurons), bool) for la in layers}
        spikes = ({la.name: np.zeros((steps, n, la.neurons), bool) for la in layers}
                  if cfg.record else None)
        bar = tqdm(total=n, desc=f"lava T={cfg.timesteps} P={cfg.presim}", unit="sample",
                   disable=not self.progress, leave=False)
        try:
            for first in range(0, n, self.samples_per_run):
                chunk = range(first, min(n, first + self.samples_per_run))
                slot_of = {i: (self._samples_run + k) % slots for k, i in enumerate(chunk)}
                for i, slot in slot_of.items():
                    views.inputs[slot] = x[i]
                self.session.run_steps(steps * len(chunk))
                self._samples_run += len(chunk)
                for i, slot in slot_of.items():
                    readout[i] = views.readout[slot]
                    for la in layers:
                        view = views.layers[la.name]
                        counts[la.name][i] = view["counts"][slot]
                        window[la.name][i] = view["window"][slot]
                        masks[la.name][i] = view["masks"][slot]
                        if spikes is not None:
                            spikes[la.name][:, i] = view["spikes"][slot]
                bar.update(len(chunk))
        finally:
            bar.close()
        return _result(graph, cfg, steps, readout, counts, window, masks, spikes)

    def close(self, polite: bool = True) -> list[str]:
        """Stop Lava's processes and remove the result files; idempotent."""
        self._views = None
        return self.session.close(polite=polite)


def _cleanup(directory: Path, runtime: Any) -> None:
    """Finalizer of a runner that was never closed (interpreter exit or garbage)."""
    if runtime is not None:
        shutdown_runtime(runtime, timeout_s=5.0)
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class _Views:
    """The host's maps of the result files."""

    inputs: np.memmap
    readout: np.memmap
    layers: dict[str, dict[str, np.memmap]]

    @classmethod
    def open(cls, layout: LavaLayout) -> _Views:
        layers = {}
        for name, rec in layout.recordings.items():
            files = {"counts": rec.counts.open(), "window": rec.window.open(),
                     "masks": rec.masks.open()}
            if rec.spikes is not None:
                files["spikes"] = rec.spikes.open()
            layers[name] = files
        return cls(layout.inputs.open(), layout.readout.open(), layers)


def _shm_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and _writable(shm) else None


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _check_input(graph: IFGraph, x_int: torch.Tensor) -> np.ndarray:
    if tuple(x_int.shape[1:]) != graph.input.shape:
        raise GraphError(f"input has shape {tuple(x_int.shape[1:])}, graph expects "
                         f"{graph.input.shape}")
    if x_int.is_floating_point() or x_int.is_complex():
        raise GraphError("the Lava back end takes integer input")
    x = x_int.detach().cpu().to(torch.int64).reshape(x_int.shape[0], -1).numpy()
    lo, hi = graph.input.encoding.int_range
    if x.size and (x.min() < lo or x.max() > hi):
        raise GraphError(f"input values {int(x.min())}..{int(x.max())} outside the graph's "
                         f"integer input range {lo}..{hi}")
    return x.astype(np.int32)


def _result(graph: IFGraph, cfg: RunConfig, steps: int, readout: np.ndarray,
            counts: dict[str, np.ndarray], window: dict[str, np.ndarray],
            masks: dict[str, np.ndarray], spikes: dict[str, np.ndarray] | None) -> RunResult:
    def shaped(arr: np.ndarray, name: str) -> torch.Tensor:
        return torch.from_numpy(arr.reshape(*arr.shape[:-1], *graph.node(name).shape))

    readout_t = torch.from_numpy(readout)
    logits = readout_t.to(torch.float64) * graph.readout.scale / cfg.timesteps
    return RunResult(
        readout=readout_t, logits=logits, steps=steps,
        spikes=({k: shaped(v, k) for k, v in spikes.items()} if spikes is not None else None),
        spike_counts={k: shaped(v, k) for k, v in counts.items()},
        window_counts={k: shaped(v, k) for k, v in window.items()},
        masks=({k: shaped(v, k) for k, v in masks.items()} if cfg.presim > 0 else None),
    )


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> LavaRunner:
    """The back-end entry point (see :mod:`csqcfs_deploy.run.backends`)."""
    return LavaRunner(graph, cfg, options)
