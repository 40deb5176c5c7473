"""Run configuration and timing of the two schedules (SPEC sections 2 and 4).

Steps are numbered ``t = 1 .. total_steps``. The input layer emits its integer
input at every step. ``d_j`` is layer ``j``'s depth (longest number of
synaptic hops from the input, :meth:`IFGraph.depths`), ``D`` the readout's.

* **synchronous**: projection ``p`` delivers the source's output of the same
  step. ``total_steps = P + T``; every layer's boundary is ``b_j = P``.
* **pipelined**: every hop takes one step; projection ``p`` delivers the
  source's output of step ``t - delay_p`` with ``delay_p = d_dst - d_src``
  (>= 1: a shorter residual path is delay-matched to the longest one).
  ``total_steps = P + T + D``; layer ``j``'s boundary is ``b_j = P + d_j``.
  Biases act from step 1, as on Lava/Loihi. During the first ``d_j`` steps
  (the pipeline fill) a layer sees only its bias and its sources' own fill;
  so at the end of step ``d_j`` every IF membrane is set back to ``v_init``
  (the *fill reset*). With it the pipelined run is the synchronous one shifted
  by each layer's depth, spike for spike, biases included.

Pre-simulation (``P > 0``): at the end of step ``b_j`` every neuron of an IF
layer whose membrane is not positive is masked (its output is zero from then
on; it keeps integrating and resetting), and every membrane is set back to
``v_init``. The readout's membrane is set to 0 at the end of step ``b_j``
whenever ``b_j >= 1``, so it accumulates exactly its ``T`` counted steps
``b_j + 1 .. b_j + T``. The prediction is the argmax of the readout at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir.graph import IFGraph

Schedule = Literal["synchronous", "pipelined"]
SCHEDULES: tuple[str, ...] = ("synchronous", "pipelined")


@dataclass(frozen=True)
class RunConfig:
    """``timesteps`` counted steps T, ``presim`` discarded steps P, the schedule,
    and whether to record every layer's spikes at every step."""

    timesteps: int
    presim: int = 0
    schedule: Schedule = "synchronous"
    record: bool = False

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise UsageError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.presim < 0:
            raise UsageError(f"presim must be >= 0, got {self.presim}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.schedule!r}")


def layer_depths(graph: IFGraph, cfg: RunConfig) -> dict[str, int]:
    """Pipeline depth of every layer (all 0 in the synchronous schedule)."""
    if cfg.schedule == "synchronous":
        return {la.name: 0 for la in graph.layers}
    return graph.depths()


def pipeline_depth(graph: IFGraph, cfg: RunConfig) -> int:
    """D: extra steps the pipelined schedule needs before the readout counts."""
    return layer_depths(graph, cfg)[graph.readout.name]


def total_steps(graph: IFGraph, cfg: RunConfig) -> int:
    return cfg.presim + cfg.timesteps + pipeline_depth(graph, cfg)


def boundary(graph: IFGraph, cfg: RunConfig, layer: str) -> int:
    """b_j: the last step before layer ``layer``'s counted window."""
    return cfg.presim + layer_depths(graph, cfg)[layer]


def fill_reset_step(graph: IFGraph, cfg: RunConfig, layer: str) -> int:
    """Step after which a pipelined IF layer's membranes return to v_init (0: never)."""
    return layer_depths(graph, cfg)[layer]


def projection_delay(graph: IFGraph, cfg: RunConfig, projection: str) -> int:
    """Steps between a source's output and its arrival at the target."""
    if cfg.schedule == "synchronous":
        return 0
    p = graph.projection(projection)
    depth = graph.depths()
    return depth[p.dst] - depth[p.src]


def latency_steps(graph: IFGraph, cfg: RunConfig) -> int:
    """Steps from the first input to the prediction: ``P + T`` (+ ``D`` when pipelined)."""
    return total_steps(graph, cfg)


def recording_bytes(graph: IFGraph, cfg: RunConfig, batch: int) -> int:
    """Bytes needed to record every layer's spikes for one batch (one byte per spike slot)."""
    neurons = sum(la.neurons for la in graph.if_layers)
    return neurons * batch * total_steps(graph, cfg)
