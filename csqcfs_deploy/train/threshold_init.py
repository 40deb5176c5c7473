"""Data-driven initial thresholds: each activation's ``lambda`` from the inputs it sees.

A fixed initial threshold (8.0, as in the QCFS code) suits activations whose
inputs come from a batch norm (std ~1). Where a layer has no batch norm in front,
as in VGG-16's 4096-wide classifier, its inputs are much smaller at
initialisation: measured on digits32, std 0.28 and 0.16 against ``lambda = 8``,
so with ``L = 8`` only 3.7 % and 0.5 % of those activations are non-zero and the
logits carry almost no signal (the loss stays at ln 10).

:func:`thresholds_from_data` sets, layer by layer in forward order, every
activation's threshold to a high quantile of its own input on a calibration
batch, after the thresholds before it have been set. Training then learns the
thresholds as usual; folding is unchanged (only the initial value differs).
"""

from __future__ import annotations

import torch
from torch import nn

from csqcfs_deploy.train.activations import CSQCFS, QCFS, _raw_for_threshold

#: quantile of an activation's input taken as its initial threshold
DEFAULT_QUANTILE = 0.99
#: at most this many input values are used for the quantile (torch.quantile's limit
#: is 2**24; a subsample keeps it fast)
MAX_VALUES = 1_000_000
#: thresholds below this are raised to it (a layer whose inputs are all <= 0)
MIN_THRESHOLD = 1e-3


def _activations(model: nn.Module) -> list[CSQCFS | QCFS]:
    return [m for m in model.modules() if isinstance(m, (CSQCFS, QCFS))]


def _input_quantile(model: nn.Module, act: nn.Module, x: torch.Tensor,
                    quantile: float) -> float:
    """The ``quantile`` of the values entering ``act`` when ``model`` runs on ``x``."""
    seen: list[torch.Tensor] = []
    handle = act.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    values = seen[0].detach().flatten().float()
    if values.numel() > MAX_VALUES:
        step = -(-values.numel() // MAX_VALUES)
        values = values[::step]
    return max(float(torch.quantile(values, quantile)), MIN_THRESHOLD)


@torch.no_grad()
def thresholds_from_data(model: nn.Module, x: torch.Tensor,
                         quantile: float = DEFAULT_QUANTILE) -> list[float]:
    """Set every activation's threshold to the ``quantile`` of its input on ``x``.

    ``x``: a batch (N, C, H, W) of normalised training inputs. The model runs in
    its current mode (training mode: batch norms use the batch's statistics, as in
    the first training step); batch-norm running statistics are restored after.
    Returns the thresholds set, in forward order.
    """
    saved = [(m, m.running_mean.clone(), m.running_var.clone())
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.running_mean is not None and m.running_var is not None]
    chosen: list[float] = []
    for act in _activations(model):
        lam = _input_quantile(model, act, x, quantile)
        if isinstance(act, CSQCFS):
            act.up.fill_(_raw_for_threshold(lam))
        else:
            act.up.fill_(lam)
        chosen.append(lam)
    for norm, mean, var in saved:
        norm.running_mean.copy_(mean)  # type: ignore[union-attr]
        norm.running_var.copy_(var)  # type: ignore[union-attr]
    return chosen
