"""The bit-accurate integer simulator of a whole graph: the golden reference (SPEC section 4).

:func:`simulate` runs one batch of integer inputs through an integer IF graph
under a :class:`~csqcfs_deploy.ir.schedule.RunConfig`; timing is defined in
:mod:`csqcfs_deploy.ir.schedule` and :func:`csqcfs_deploy.ir.neuron.layer_events`,
the neuron rule in :mod:`csqcfs_deploy.ir.neuron`. :class:`Simulator` does the
same with the graph's weights prepared once (what the ``int`` back end keeps
between batches).

Evaluation order: layers in topological order, each over *all* steps at once.
This is exact in both schedules because a layer's input at step ``t`` only
depends on its sources' outputs at steps ``t - delay`` (delay >= 0), which are
complete by then. Per layer: every incoming projection's synaptic sums for
all steps in one batched operation (:mod:`.synapses`; a projection from the
input layer once, since the input is the same every step), then the per-step
neuron scan (:mod:`.scan`), in dtypes proven exact by :mod:`.arithmetic`.

Tensor layout: a layer of shape (C, H, W) is held as (S*N, C, H, W) in
channels-last memory (rows ``t*N .. t*N + N - 1`` are step ``t + 1``), a (F,)
layer as (S*N, F). Spikes are held as float32 0/1 (the next kernel's input).
In :class:`RunResult`, recorded spikes are contiguous bool (steps, N, *shape),
masks contiguous bool (N, *shape); the int32 counts keep the channels-last
layout (compare with ``torch.equal``, flatten with ``reshape``). ``wrapped`` and
``saturated`` hold, per IF layer and the readout, the neuron-steps of this batch
(all steps, all N samples, masked neurons included) whose current wrapped or
whose membrane saturated (:class:`~.scan.Overflow`; 0 without any work where the
layer's :class:`~.arithmetic.LayerArithmetic` proves neither can happen).
"""

from __future__ import annotations

import time

import torch

from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import graph_events
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig, projection_delay, total_steps
from csqcfs_deploy.ir.synapses import max_abs_output
from csqcfs_deploy.run.memory import check_recording_memory
from csqcfs_deploy.run.results import RunResult, check_integer_input, make_run_result
from csqcfs_deploy.simulators.integer.arithmetic import (
    LayerArithmetic,
    shifted_total,
    sum_dtype_for,
)
from csqcfs_deploy.simulators.integer.device import DevicePlan, PrecisionFlags, exact_kernels
from csqcfs_deploy.simulators.integer.kernels import KernelChoice, Timer
from csqcfs_deploy.simulators.integer.scan import (
    LayerConstants,
    Part,
    count_spikes,
    merge_parts,
    scan_if,
    scan_readout,
)
from csqcfs_deploy.simulators.integer.synapses import (
    KERNELS,
    Source,
    SynapseKernel,
    Synapses,
    channels_last,
)


class Simulator:
    """The integer simulator of one graph, weights prepared once.

    ``kernel``: how synaptic sums are computed. ``"auto"`` (default): by
    measurement -- the first time this simulator computes a projection for a
    given number of rows and sum dtype it times every exact candidate (float32
    where the layer's bound allows it, float64, int8 ``torch._int_mm`` where
    :meth:`~.synapses.Synapses.int8_exact` proves it exact) on the actual shapes
    and keeps the fastest for its lifetime (:mod:`.kernels`; ``timer`` is the
    clock). ``"float"``: float32/float64 kernels chosen per layer by the
    exactness bound; ``"int8"``: ``torch._int_mm`` (int8 x int8 -> int32) for
    every projection whose weights (per weight step) and source values fit int8,
    float kernels elsewhere. All kernels give identical integers; they differ in
    speed only (on CPUs without int8 dot-product instructions ``_int_mm`` is far
    slower than float32, so ``"auto"`` ends up with float kernels there).
    :attr:`kernel_choice`: per projection, the latest run's choice.

    ``device``: cpu (default) or a CUDA device; inputs, weights, sums and scan state
    live there, the RunResult comes back on the CPU (:mod:`.device`: which kernels
    are exact there).
    """

    def __init__(self, graph: IFGraph, kernel: SynapseKernel = "auto",
                 device: torch.device | None = None,
                 timer: Timer = time.perf_counter) -> None:
        if not graph.is_integer:
            raise GraphError("the simulator runs quantized graphs; convert with a --profile "
                             "first")
        if kernel not in KERNELS:
            raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.graph = graph
        self.kernel = kernel
        self.profile = get_profile(str(graph.meta.profile))
        self.device = torch.device("cpu") if device is None else device
        self.synapses = Synapses(self.profile, kernel, device=self.device, timer=timer)
        self.constants = LayerConstants(self.profile, self.device)
        self._order = graph.topological_order()
        self._consumers = {la.name: len(graph.outgoing(la.name)) for la in graph.layers}

    @torch.no_grad()
    def run(self, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
        """Run integer inputs ``x_int`` (N, *input_shape) for ``total_steps`` steps on the
        simulator's device, under :func:`~.device.exact_kernels`; the result is on the CPU.

        ``x_int`` may be any integer dtype or a float tensor of integral values.
        """
        with exact_kernels(self.device):
            return self._run(x_int, cfg)

    def _run(self, x_int: torch.Tensor, cfg: RunConfig) -> RunResult:
        """:meth:`run` inside the device's exact settings."""
        graph = self.graph
        check_integer_input(graph, x_int, "integer simulator")
        self.synapses.start_run()
        n = int(x_int.shape[0])
        steps = total_steps(graph, cfg)
        if cfg.record:
            check_recording_memory(graph, cfg, n)
        events = graph_events(graph, cfg)
        x_abs = float(x_int.abs().max()) if x_int.numel() else 0.0
        # PyTorch's precision settings, read per run (inside exact_kernels)
        plan = DevicePlan.for_device(self.device, PrecisionFlags.read())
        sources: dict[str, Source] = {
            graph.input.name: Source(channels_last(x_int.to(self.device, torch.int64)), x_abs)}
        pending = dict(self._consumers)
        spikes: dict[str, torch.Tensor] = {}
        spike_counts: dict[str, torch.Tensor] = {}
        window_counts: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        wrapped: dict[str, int] = {}
        saturated: dict[str, int] = {}
        readout_v: torch.Tensor | None = None

        for name in self._order[1:]:
            layer = graph.neuron_group(name)
            projs = graph.incoming(name)
            bounds = [(max_abs_output(p, sources[p.src].max_abs), p.weight_exp)
                      for p in projs]
            sum_dtype = sum_dtype_for(name, bounds, plan.float32_exact, plan.float64_exact)
            parts: list[Part] = []
            # elementwise (identity) shortcuts last: they can be added in place into a
            # conv's sums
            for p in sorted(projs, key=self.synapses.elementwise):
                src = sources[p.src]
                constant = p.src == graph.input.name
                delay = projection_delay(graph, cfg, p.name)
                rows = n if constant else (steps - delay) * n
                same = next((pt for pt in parts if (pt.delay, pt.constant) == (delay, constant)),
                            None)
                src_shape = graph.layer(p.src).shape
                if rows > 0 and same is not None and self.synapses.adds_in_place(p, src):
                    self.synapses.add_into(same.sums, p, src, src_shape, rows)
                elif rows > 0:
                    sums = self.synapses.project(p, src, src_shape, sum_dtype, rows)
                    parts.append(Part(sums, delay, constant))
                pending[p.src] -= 1
                if pending[p.src] == 0 and not constant:
                    del sources[p.src]
            arith = self._arithmetic(layer, parts, shifted_total(bounds), sum_dtype, steps)
            parts = merge_parts(parts)
            ev = events[name]
            if isinstance(layer, IFLayer):
                out, overflow = scan_if(layer, parts, arith, steps, n, ev, self.constants,
                                        masks)
                window_counts[name] = count_spikes(out, n, ev.window)
                spike_counts[name] = (window_counts[name] if steps == cfg.timesteps
                                      else count_spikes(out, n, slice(0, steps)))
                if cfg.record:
                    spikes[name] = out.view(steps, n, *layer.shape).to(
                        torch.bool, memory_format=torch.contiguous_format).cpu()
                sources[name] = Source(out, 1.0)
            elif isinstance(layer, ReadoutLayer):
                readout_v, overflow = scan_readout(layer, parts, arith, steps, n, ev,
                                                   self.constants)
            else:  # pragma: no cover - every non-input layer is one of the two
                raise GraphError(f"layer {name} is neither an IF layer nor a readout")
            wrapped[name], saturated[name] = overflow.wrapped, overflow.saturated
        if readout_v is None:  # pragma: no cover - IFGraph validates its readout
            raise GraphError("the graph has no readout layer")
        return make_run_result(graph, cfg, steps, readout_v.cpu(), _on_cpu(spike_counts),
                               _on_cpu(window_counts), spikes=spikes,
                               masks=_on_cpu({k: v.contiguous() for k, v in masks.items()}),
                               wrapped=wrapped, saturated=saturated,
                               kernels={k: c.to_json()
                                        for k, c in self.synapses.run_choices.items()})

    @property
    def kernel_choice(self) -> dict[str, KernelChoice]:
        """Per projection, the kernel of the latest run (``"float32"``, ``"float64"``
        or ``"int8"``) and the milliseconds measured per candidate (:mod:`.kernels`)."""
        return dict(self.synapses.run_choices)

    def _arithmetic(self, layer: IFLayer | ReadoutLayer, parts: list[Part],
                    static_bound: float, sum_dtype: torch.dtype, steps: int
                    ) -> LayerArithmetic:
        """The layer's proof from the weights' bound, tightened by this batch's actual
        sums when the weights' bound leaves a wrap, a clamp or a conversion in the scan."""
        consts = self.constants.extremes(layer)
        arith = LayerArithmetic.derive(static_bound, sum_dtype, self.profile, *consts, steps)
        return LayerArithmetic.tightened(arith, [pt.sums for pt in parts], self.profile,
                                         *consts, steps)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` moved to the CPU (unchanged when they are there)."""
    return {k: v.cpu() for k, v in tensors.items()}


def simulate(graph: IFGraph, x_int: torch.Tensor, cfg: RunConfig,
             kernel: SynapseKernel = "auto") -> RunResult:
    """Run integer inputs ``x_int`` (N, *input_shape) through ``graph``."""
    return Simulator(graph, kernel).run(x_int, cfg)
