"""Memory a run needs and the system has: the check made before recording every spike.

What the integer simulator holds for one recorded batch of N samples over S steps
(``simulators/integer/simulator.py``), per neuron and step ("neuron-step"), with the
element sizes it really uses:

* the recording: every IF layer's spikes as bool, :data:`RECORD_BYTES` (1), kept to
  the end (:func:`~csqcfs_deploy.ir.schedule.recording_bytes`);
* while a layer is computed: its synaptic sums, one tensor per incoming projection
  at most plus one transient copy (the weight_exp shift), in float32 or, where the
  weights' bound reaches 2**24, float64 (:func:`sum_bytes`: the simulator's own
  rule, SPEC section 4); the sum-pooled copy of each source it reads, in the same
  dtype; its output spikes as float32 0/1 (:data:`SPIKE_BYTES`, 4); the float32
  spikes of every earlier layer that a later layer still reads, plus their copy in
  a reader's float64 where there is one; and one step's scan state, a few
  (N, neurons) tensors, int64 at most (:data:`SCAN_BYTES` per neuron and sample);
* the input: N samples (not S x N) as int64, plus a copy in the sums' dtype.

:func:`recording_run_bytes` adds the recording to the largest of those working
sets: an upper bound of the peak (``tests/test_hostile_data.py`` measures it
against the tensors of a real run). :func:`check_recording_memory` refuses a run
whose bound exceeds :data:`MEMORY_FRACTION` of the available memory; the rest is
left for what else is held (``verify`` keeps the synchronous run's recording
while the pipelined one and the other back ends run).
"""

from __future__ import annotations

import math

import torch

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.neuron import exact_float_bound, shifted_bound
from csqcfs_deploy.ir.schedule import RunConfig, total_steps
from csqcfs_deploy.ir.synapses import max_abs_output

#: bytes of one recorded spike (bool)
RECORD_BYTES = 1
#: bytes of one spike while it is a source of later layers (float32 0/1)
SPIKE_BYTES = 4
#: bytes of one integer input value (int64)
INPUT_BYTES = 8
#: bytes per neuron and sample of one step's scan state (a few int64 tensors and masks)
SCAN_BYTES = 32
#: share of the available memory one recorded batch may take
MEMORY_FRACTION = 0.75


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``4.0 MiB``, ``2.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def sum_bytes(graph: IFGraph, layer: str) -> int:
    """Bytes of one synaptic sum of ``layer``: 4 (float32) while the bound of its sums
    stays below float32's exact range (2**24), else 8 (float64), as the simulator picks."""
    bounds = []
    for p in graph.incoming(layer):
        src_abs = graph.input.encoding.max_abs_int if p.src == graph.input.name else 1.0
        bounds.append((max_abs_output(p, src_abs), p.weight_exp))
    need = max([b for b, _ in bounds] + [sum(shifted_bound(b, e) for b, e in bounds)])
    return 4 if need < exact_float_bound(torch.float32) else 8


#: bytes per value of the float64 candidate kernel's copies while kernels are measured
MEASURE_BYTES = 8


def _working_bytes(graph: IFGraph, rows: int, batch: int) -> int:
    """The largest working set of one layer's computation (module doc), in bytes."""
    order = graph.topological_order()
    index = {name: i for i, name in enumerate(order)}
    last_reader = {name: max((index[p.dst] for p in graph.outgoing(name)), default=-1)
                   for name in order}
    size = {name: math.prod(graph.layer(name).shape) for name in order}
    sums = {name: sum_bytes(graph, name) for name in order[1:]}
    # a source's spikes, with the copy in its readers' dtype where that is float64
    held = {name: SPIKE_BYTES + max((sums[p.dst] for p in graph.outgoing(name)
                                     if sums[p.dst] != SPIKE_BYTES), default=0)
            for name in order}
    peak = 0
    for i, name in enumerate(order[1:], start=1):
        incoming = graph.incoming(name)
        own = rows * size[name] * ((len(incoming) + 1) * sums[name] + SPIKE_BYTES) + \
            batch * size[name] * SCAN_BYTES
        pooled = rows * sum(size[p.src] for p in incoming) * sums[name]
        live = rows * sum(size[s] * held[s] for s in order[1:i] if last_reader[s] >= i)
        inputs = batch * size[order[0]] * (INPUT_BYTES + sums[name])
        # kernel="auto" times its candidates once: one float64 copy of the sources and
        # one float64 result besides the layer's own sums (simulators/integer/kernels.py)
        measuring = rows * (size[name] + sum(size[p.src] for p in incoming)) * MEASURE_BYTES
        peak = max(peak, own + pooled + live + inputs + measuring)
    return peak


def recording_run_bytes(graph: IFGraph, cfg: RunConfig, batch: int) -> int:
    """Upper bound of the bytes the integer simulator holds at its peak while it runs
    and records a batch of ``batch`` samples (module doc)."""
    rows = total_steps(graph, cfg) * batch
    recorded = rows * sum(la.neurons for la in graph.if_layers) * RECORD_BYTES
    return recorded + _working_bytes(graph, rows, batch)


def check_recording_memory(graph: IFGraph, cfg: RunConfig, batch: int) -> int:
    """Bytes a recorded batch of ``batch`` samples needs at its peak
    (:func:`recording_run_bytes`); UsageError when that exceeds
    :data:`MEMORY_FRACTION` of the available memory."""
    need = recording_run_bytes(graph, cfg, batch)
    avail = available_memory_bytes()
    if avail is not None and need > avail * MEMORY_FRACTION:
        raise UsageError(
            f"recording every spike of a batch of {batch} for {total_steps(graph, cfg)} steps "
            f"needs up to {format_bytes(need)}, more than {MEMORY_FRACTION:.0%} of the "
            f"{format_bytes(avail)} available; use a smaller batch or fewer steps")
    return need
