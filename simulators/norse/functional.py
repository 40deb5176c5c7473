"""The Norse back end's pure step functions (Norse's ``functional`` layer).

**A deliberate independent copy of the neuron rule.** The specification is
:func:`csqcfs_deploy.ir.neuron.if_step` / :func:`~csqcfs_deploy.ir.neuron.readout_step`
(SPEC section 4). The rule is restated here on purpose, in Norse's own terms: float
tensors holding integers (exact by :mod:`.bounds`), Norse's ``threshold`` (with its
surrogate gradient) for the spike and Norse's ``reset_subtract`` / ``reset_value``
for the reset, so that what the spike-for-spike comparison with the integer
simulator verifies is Norse's parts, not a call back into the specification. When
the layer's state changes outside the rule (the pre-simulation mask, the return to
``v_init``, the readout's clear) is *not* restated: the parameters carry the layer's
:class:`~csqcfs_deploy.ir.neuron.LayerEvents` and the steps ask it.

Tensors: ``input_tensor`` / ``v`` / ``z`` are (N, *shape) in the module's float
dtype; per-channel constants are (1, C, 1, 1) or (1, C).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from norse.torch.functional.heaviside import heaviside
from norse.torch.functional.reset import reset_subtract, reset_value
from norse.torch.functional.threshold import threshold

from csqcfs_deploy.ir.neuron import LayerEvents
from csqcfs_deploy.ir.profiles import Profile

#: Norse threshold methods whose forward pass is the exact Heaviside step (the
#: stochastic ``logistic`` / ``circ_dist`` are excluded).
THRESHOLD_METHODS: tuple[str, ...] = ("super", "heaviside", "triangle", "tanh", "circ",
                                      "heavi_erfc")


class IFNeuronParameters(NamedTuple):
    """Constants of one IF group, tensors shaped (1, C, 1, 1) or (1, C).

    ``offset``: 0 for the strict comparison ``v > v_th`` (loihi2), 1 for ``v >= v_th``
    (int8/int16); ``events``: the layer's :class:`LayerEvents` (when the
    pre-simulation mask is taken and the membranes return to ``v_init``);
    ``method`` / ``alpha``: Norse's threshold function (its forward pass is the
    Heaviside step for every allowed method); ``may_wrap``: see
    :func:`synaptic_current`.
    """

    v_th: torch.Tensor
    v_init: torch.Tensor
    bias: torch.Tensor
    profile: Profile
    v_min: float
    v_max: float
    offset: float
    reset: str
    events: LayerEvents
    method: str = "super"
    alpha: float = 100.0
    may_wrap: bool = True


class IFNeuronState(NamedTuple):
    """``z``: output spikes of the last step (after the mask), (N, *shape);
    ``v``: membranes (N, *shape); ``mask``: None until the pre-simulation
    boundary, then (N, *shape) 0/1; ``t``: steps done."""

    z: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    t: int


class ReadoutParameters(NamedTuple):
    """Constants of the non-spiking readout: ``bias`` (1, F); ``events``: the layer's
    :class:`LayerEvents` (when the membrane is set to 0)."""

    bias: torch.Tensor
    profile: Profile
    v_min: float
    v_max: float
    events: LayerEvents
    may_wrap: bool = True


class ReadoutState(NamedTuple):
    """``v``: readout membranes (N, F); ``t``: steps done."""

    v: torch.Tensor
    t: int


def saturating_add(v: torch.Tensor, w: torch.Tensor, v_min: float, v_max: float
                   ) -> torch.Tensor:
    """``clamp(v + w, v_min, v_max)`` written as ``v + clamp(w, v_min - v, v_max - v)``.

    Equal over the integers; in floats it keeps every quantity inside the exactly
    representable range (see :mod:`.bounds`, "range").
    """
    return v + torch.clamp(w, v_min - v, v_max - v)


def synaptic_current(acc: torch.Tensor, profile: Profile, may_wrap: bool = True
                     ) -> torch.Tensor:
    """``profile.current(acc)`` (shift, then the wrap); ``may_wrap=False`` (the layer's
    bound shows ``|acc << act_shift| < 2**(current_bits - 1)``) skips the wrap, which
    could not fire."""
    if may_wrap:
        return profile.current(acc)
    return acc * float(1 << profile.act_shift) if profile.act_shift else acc


def if_feed_forward_step(input_tensor: torch.Tensor, state: IFNeuronState,
                         p: IFNeuronParameters, dt: float = 1.0
                         ) -> tuple[torch.Tensor, IFNeuronState]:
    """One step of an integer IF group, in floats holding integers.

    With ``acc = input_tensor`` the step's summed synaptic input (N, *shape) and
    ``t`` the step (1-based)::

        u    = profile.current(acc)                   # loihi2: acc << 6, 24-bit wrap
        v    = clamp(v + u + bias, v_min, v_max)      # saturate
        z    = heaviside(v - v_th + offset)           # v > v_th, or v >= v_th (offset 1)
        v    = v - z * v_th                           # reset "subtract" (or v = (1-z) v)
        out  = z * mask                               # mask: 1 until it is taken
        if events.masks_after(t):   mask = heaviside(v)
        if events.reinit_after(t):  v = v_init

    Returns ``(out, new state)``; ``dt`` is unused (Norse's signature).
    """
    t = state.t + 1
    u = synaptic_current(input_tensor, p.profile, p.may_wrap)
    v = saturating_add(state.v, u + p.bias, p.v_min, p.v_max)
    z = threshold(v - p.v_th + p.offset if p.offset else v - p.v_th, p.method, p.alpha)
    zero = v.new_zeros(())
    if p.reset == "subtract":
        v = reset_subtract(z, v, zero, p.v_th)
    else:
        v = reset_value(z, v, zero, p.v_th)
    out = z if state.mask is None else z * state.mask
    mask = state.mask
    if p.events.masks_after(t):
        mask = heaviside(v)
    if p.events.reinit_after(t):
        v = p.v_init.expand_as(v).clone()
    return out, IFNeuronState(z=out, v=v, mask=mask, t=t)


def readout_feed_forward_step(input_tensor: torch.Tensor, state: ReadoutState,
                              p: ReadoutParameters, dt: float = 1.0
                              ) -> tuple[torch.Tensor, ReadoutState]:
    """One step of the readout (N, F), in floats holding integers::

        v = clamp(v + profile.current(acc) + bias, v_min, v_max)
        if events.clears_after(t):  v = 0

    Returns ``(v, new state)``.
    """
    t = state.t + 1
    u = synaptic_current(input_tensor, p.profile, p.may_wrap)
    v = saturating_add(state.v, u + p.bias, p.v_min, p.v_max)
    if p.events.clears_after(t):
        v = torch.zeros_like(v)
    return v, ReadoutState(v=v, t=t)
