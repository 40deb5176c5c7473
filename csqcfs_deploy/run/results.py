"""What a back end returns for one batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from csqcfs_deploy.errors import InputDataError
from csqcfs_deploy.ir.graph import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig


@dataclass
class RunResult:
    """What a back end returns for one batch of N samples.

    ``readout``: (N, F) int64 readout membrane at the end; ``logits`` =
    ``readout * scale / T``; ``spikes`` (if recorded): per IF layer a bool
    tensor (steps, N, *shape) of its *output* spikes (after the mask);
    ``spike_counts``: per IF layer (N, *shape) output spikes over all steps;
    ``window_counts``: the same over the layer's counted window only;
    ``masks``: per IF layer (N, *shape) bool after pre-simulation (None if P = 0);
    ``wrapped`` / ``saturated``: per IF layer *and* the readout, the neuron-steps of this
    batch (every step ``1 .. steps``, all N samples, masked neurons included) whose
    current wrapped (``profile.current`` changed ``acc << act_shift``) / whose membrane
    saturated (``v + current + bias`` outside ``[voltage_min, voltage_max]``); None when
    the back end does not count them (Lava, Norse); ``kernels``: per projection, the
    integer simulator's kernel choice for this batch (:meth:`KernelChoice.to_json
    <csqcfs_deploy.simulators.integer.kernels.KernelChoice.to_json>`), None for other
    back ends.
    """

    readout: torch.Tensor
    logits: torch.Tensor
    steps: int
    spikes: dict[str, torch.Tensor] | None
    spike_counts: dict[str, torch.Tensor]
    window_counts: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None
    wrapped: dict[str, int] | None = None
    saturated: dict[str, int] | None = None
    kernels: dict[str, dict[str, object]] | None = None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(dim=1).cpu().numpy()


def check_integer_input(graph: IFGraph, x_int: torch.Tensor, backend: str, *,
                        floats: bool = True, max_abs: int | None = None,
                        in_range: bool = False) -> None:
    """The one check every runner makes of its integer input ``x_int`` (N, *input_shape).

    Raises :class:`~csqcfs_deploy.errors.InputDataError` (a ``GraphError``) naming
    ``backend`` when ``x_int`` is not a tensor, has the wrong shape, is complex or
    bool, holds a fractional value (or any float when ``floats`` is False), exceeds
    ``max_abs`` in magnitude, or (``in_range``) leaves the graph's integer input
    range ``encoding.int_range``.
    """
    if not isinstance(x_int, torch.Tensor):
        raise InputDataError(f"{backend}: input must be a torch.Tensor, got "
                             f"{type(x_int).__name__}")
    want = graph.input.shape
    if x_int.dim() != len(want) + 1 or tuple(x_int.shape[1:]) != want:
        raise InputDataError(f"input has shape {tuple(x_int.shape[1:])}, graph expects {want}")
    if x_int.is_complex() or x_int.dtype == torch.bool:
        raise InputDataError(f"{backend}: input must hold integers, got dtype "
                             f"{str(x_int.dtype).removeprefix('torch.')}")
    if x_int.is_floating_point():
        if not floats:
            raise InputDataError(f"the {backend} back end takes integer input")
        if x_int.numel() and not bool(torch.all(x_int == torch.round(x_int))):
            raise InputDataError(f"the {backend} back end needs integer inputs, found a "
                                 "fractional value")
    if x_int.numel() == 0:
        return
    if max_abs is not None:
        peak = int(x_int.abs().max())
        if peak > max_abs:
            raise InputDataError(f"{backend}: input magnitude {peak} exceeds {max_abs}")
    if in_range:
        lo, hi = graph.input.encoding.int_range
        x_lo, x_hi = int(x_int.min()), int(x_int.max())
        if x_lo < lo or x_hi > hi:
            raise InputDataError(f"input values {x_lo}..{x_hi} outside the graph's integer "
                                 f"input range {lo}..{hi}")


def make_run_result(graph: IFGraph, cfg: RunConfig, steps: int, readout: torch.Tensor,
                    spike_counts: dict[str, torch.Tensor],
                    window_counts: dict[str, torch.Tensor],
                    spikes: dict[str, torch.Tensor] | None = None,
                    masks: dict[str, torch.Tensor] | None = None,
                    wrapped: dict[str, int] | None = None,
                    saturated: dict[str, int] | None = None,
                    kernels: dict[str, dict[str, object]] | None = None) -> RunResult:
    """The one place a :class:`RunResult` is built.

    ``readout`` (N, F) int64 membranes at the end; ``logits = readout * scale / T``;
    ``spikes`` kept only when ``cfg.record``; ``masks`` only when ``cfg.presim > 0``;
    ``wrapped`` / ``saturated`` (neuron-steps per IF layer and readout) as the back end
    counted them, None when it does not count; ``kernels``: the simulator's kernel
    choice per projection (None for other back ends).
    """
    logits = readout.to(torch.float64) * graph.readout.scale / cfg.timesteps
    return RunResult(readout=readout, logits=logits, steps=steps,
                     spikes=spikes if cfg.record else None, spike_counts=spike_counts,
                     window_counts=window_counts,
                     masks=masks if cfg.presim > 0 else None,
                     wrapped=wrapped, saturated=saturated, kernels=kernels)
