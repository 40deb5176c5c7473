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

from csqcfs_deploy.profiles import Profile


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


# --------------------------------------------------------------------------- fast forms


@dataclass(frozen=True)
class IFConstants:
    """Per-channel constants of one IF layer for the in-place step, in the scan's dtype.

    ``v_th``, ``v_init`` are (1, C, 1, 1) or (1, C); ``fire_th`` is the
    threshold of a strict comparison (``v_th`` on strict profiles, ``v_th - 1``
    otherwise, so ``s = v > fire_th`` in both cases); ``clamp`` is False when
    the caller proved that the membrane can never leave ``[v_min, v_max]``
    (then saturation is the identity and is skipped). The dtype may be int32,
    int64, float32 or float64: the caller proves that every value the step
    computes is an integer that the dtype holds exactly.
    """

    v_th: torch.Tensor
    v_init: torch.Tensor
    fire_th: torch.Tensor
    v_min: int
    v_max: int
    clamp: bool
    reset: str

    @classmethod
    def build(cls, params: IFParams, dtype: torch.dtype, clamp: bool) -> IFConstants:
        prof = params.profile
        fire_th = params.v_th if prof.strict else params.v_th - 1
        return cls(v_th=params.v_th.to(dtype), v_init=params.v_init.to(dtype),
                   fire_th=fire_th.to(dtype), v_min=prof.voltage_min, v_max=prof.voltage_max,
                   clamp=clamp, reset=params.reset)

    @property
    def final_exact(self) -> bool:
        """True when :func:`if_fire_final` may skip the clamp: no saturation can happen,
        or ``v_min <= fire_th < v_max`` in every channel (saturation is then invisible
        to the comparison)."""
        if not self.clamp:
            return True
        return bool((self.fire_th >= self.v_min).all() and (self.fire_th < self.v_max).all())


def if_fire_reset_(v: torch.Tensor, c: IFConstants, out: torch.Tensor) -> torch.Tensor:
    """The rest of :func:`if_step` once ``v`` holds ``v + current + bias``, in place.

    ``v`` (N, *shape) is updated and returned; spikes go into ``out`` (N, *shape),
    a bool tensor, or a float tensor of 0/1 when ``v`` is float::

        v <- clamp(v, v_min, v_max) ; s <- v > fire_th
        v <- v - s * v_th   or   v <- 0 where s
    """
    if c.clamp:
        v.clamp_(c.v_min, c.v_max)
    torch.gt(v, c.fire_th, out=out)
    if c.reset == "subtract":
        v.addcmul_(out, c.v_th, value=-1)
    else:
        v.masked_fill_(out if out.dtype == torch.bool else out.bool(), 0)
    return v


def if_fire_final(v: torch.Tensor, c: IFConstants, out: torch.Tensor) -> None:
    """Spikes of a step after which the membrane is never read again (the last step).

    ``v`` holds ``v + current + bias``. Only valid when ``c.final_exact``:
    saturation is monotone, and with ``v_min <= fire_th < v_max`` we have
    ``clamp(x, v_min, v_max) > fire_th`` exactly when ``x > fire_th``; so the
    spikes are ``v > fire_th`` with neither clamp nor reset.
    """
    torch.gt(v, c.fire_th, out=out)
