"""Pure step functions of the integer neuron rules (SPEC section 4).

Every tensor is int64 and broadcasts to (N, *shape); ``current`` is the
step's synaptic input already passed through the profile's ``current()``
(shift and wrap). One step of an IF neuron group::

    v <- saturate(v + current + bias)
    s <- v > v_th   (strict profiles)   or   v >= v_th
    v <- v - s * v_th                   (reset "subtract")
    v <- 0 where s                      (reset "zero")

One step of the non-spiking readout: ``v <- saturate(v + current + bias)``.

:func:`if_step` is the rule as written. The batched simulator runs the same
rule through :func:`if_fire_reset_` and :func:`if_fire_final`, which compute
identical spikes and membranes with fewer memory passes (in place, in int32 or
float32 where the caller proved that the dtype holds every value exactly);
``tests/test_simulator.py`` checks them against :func:`if_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csqcfs_deploy.ir.profiles import Profile


@dataclass(frozen=True)
class IFParams:
    """Per-neuron constants, shaped to broadcast against (N, *shape)."""

    v_th: torch.Tensor
    v_init: torch.Tensor
    bias: torch.Tensor
    reset: str
    profile: Profile


def if_step(current: torch.Tensor, v: torch.Tensor, params: IFParams
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance membranes ``v`` by one step; returns (spikes as bool, new v)."""
    prof = params.profile
    v = prof.saturate(v + current + params.bias)
    spikes = prof.fires(v, params.v_th)
    if params.reset == "subtract":
        v = v - spikes.to(v.dtype) * params.v_th
    else:
        v = torch.where(spikes, torch.zeros_like(v), v)
    return spikes, v


def readout_step(current: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                 profile: Profile) -> torch.Tensor:
    """Accumulate one step into the readout membrane."""
    return profile.saturate(v + current + bias)
