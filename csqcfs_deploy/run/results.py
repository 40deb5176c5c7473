"""What a back end returns for one batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RunResult:
    """What a back end returns for one batch of N samples.

    ``readout``: (N, F) int64 readout membrane at the end; ``logits`` =
    ``readout * scale / T``; ``spikes`` (if recorded): per IF layer a bool
    tensor (steps, N, *shape) of its *output* spikes (after the mask);
    ``spike_counts``: per IF layer (N, *shape) output spikes over all steps;
    ``window_counts``: the same over the layer's counted window only;
    ``masks``: per IF layer (N, *shape) bool after pre-simulation (None if P = 0).
    """

    readout: torch.Tensor
    logits: torch.Tensor
    steps: int
    spikes: dict[str, torch.Tensor] | None
    spike_counts: dict[str, torch.Tensor]
    window_counts: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(dim=1).cpu().numpy()
