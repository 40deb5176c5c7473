"""``--backend norse``: the Norse module of one graph, run for one :class:`RunConfig`.

:func:`open_runner` builds the module (:func:`~.network.to_norse`) for the run's
``P + T`` steps on the asked device; :meth:`NorseRunner.run` steps it over a
batch and returns the same :class:`~csqcfs_deploy.run.results.RunResult` as the
integer simulator, counting each layer's spikes over all steps and over its
counted window (:meth:`csqcfs_deploy.ir.neuron.LayerEvents.counted`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.neuron import LayerEvents, exact_float_bound, graph_events
from csqcfs_deploy.ir.schedule import RunConfig, total_steps
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.results import RunResult, make_run_result
from csqcfs_deploy.simulators import devices
from csqcfs_deploy.simulators.norse.bounds import dtype_name
from csqcfs_deploy.simulators.norse.network import NetworkState, NorseIFNetwork, to_norse


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``; BackendUnavailable when CUDA is asked for and absent
    (:func:`csqcfs_deploy.simulators.devices.resolve_device`)."""
    return devices.resolve_device(name, "norse")


@dataclass
class NorseRunner:
    """The Norse module of one graph, run for one :class:`RunConfig` (P + T steps).

    ``events``: every layer's :class:`LayerEvents` under ``cfg`` (set on creation).
    """

    net: NorseIFNetwork
    cfg: RunConfig
    seconds: float = 0.0
    events: dict[str, LayerEvents] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cfg.schedule != "synchronous":
            raise UsageError(f"the norse back end runs the synchronous schedule, not "
                             f"{self.cfg.schedule}")
        if self.steps_total > exact_float_bound(self.net.dtype):
            raise UsageError(f"{self.steps_total} steps: spike counts would not be exact in "
                             f"{dtype_name(self.net.dtype)}")
        if self.net.presim != self.cfg.presim:
            raise UsageError(f"the module was built for presim {self.net.presim}, the run "
                             f"asks for presim {self.cfg.presim}")
        self.events = graph_events(self.net.graph, self.cfg)

    @property
    def steps_total(self) -> int:
        """P + T: the synchronous schedule's steps."""
        return self.cfg.presim + self.cfg.timesteps

    @torch.no_grad()
    def run(self, x_int: torch.Tensor) -> RunResult:
        """Integer inputs (N, *input_shape) -> the same RunResult as the simulator's."""
        start = time.perf_counter()
        cfg, net = self.cfg, self.net
        recorded: dict[str, list[torch.Tensor]] = {name: [] for name in net.if_layer_names}
        counts: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        readout: torch.Tensor | None = None
        state: NetworkState | None = None
        for readout, state in net.steps(x_int, self.steps_total):  # noqa: B007 - last one used
            for name, z in net.layer_spikes(state).items():  # float counts: exact, P+T <= M
                counts[name] = z if name not in counts else counts[name] + z
                if self.events[name].counted(state.t):
                    window[name] = z if name not in window else window[name] + z
                if cfg.record:
                    recorded[name].append(z.to(torch.bool).cpu())
        assert readout is not None and state is not None  # steps_total >= 1
        readout_int = readout.round().to(device="cpu", dtype=torch.int64)
        masks = None
        if cfg.presim > 0:
            masks = {k: m.to(torch.bool).cpu() for k, m in net.layer_masks(state).items()}
        spikes = {k: torch.stack(v) for k, v in recorded.items()} if cfg.record else None
        result = make_run_result(
            net.graph, cfg, self.steps_total, readout_int,
            spike_counts={k: v.to(device="cpu", dtype=torch.int32) for k, v in counts.items()},
            window_counts={k: v.to(device="cpu", dtype=torch.int32) for k, v in window.items()},
            spikes=spikes, masks=masks,
        )
        self.seconds += time.perf_counter() - start
        return result

    def close(self) -> None:
        pass


def open_runner(graph: IFGraph, cfg: RunConfig, options: BackendOptions) -> NorseRunner:
    """Build the Norse module for ``graph`` and ``cfg`` (synchronous) on ``options.device``."""
    if cfg.schedule != "synchronous":
        raise UsageError(f"the norse back end runs the synchronous schedule, not {cfg.schedule}")
    device = resolve_device(options.device)
    # the runner needs no gradients: the plain Heaviside step is Norse's cheapest threshold
    net = to_norse(graph, presim=cfg.presim, max_steps=total_steps(graph, cfg),
                   method="heaviside").to(device)
    return NorseRunner(net=net, cfg=cfg)
