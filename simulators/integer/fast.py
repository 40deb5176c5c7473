"""The simulator's optimised, in-place form of :func:`csqcfs_deploy.ir.neuron.if_step`.

A **deliberate independent copy** of the IF rule, kept because the batched scan
must update membranes in place in the scan's own dtype (float32, float64,
int32 or int64, proven exact by :class:`~.arithmetic.LayerArithmetic`) with as
few memory passes as possible, which the pure int64 :func:`~csqcfs_deploy.ir.neuron.if_step`
cannot do. It computes the same spikes and membranes as that one
specification; ``tests/test_simulator.py`` checks it against ``if_step`` in
every dtype, and the whole simulator against :func:`~.reference.reference_simulate`
(which uses ``if_step`` itself).

With ``v`` already holding ``v + current + bias`` (N, *shape)::

    v <- clamp(v, v_min, v_max)      (skipped when the caller proved it cannot trigger)
    s <- v > fire_th                 (fire_th = v_th on strict profiles, else v_th - 1)
    v <- v - s * v_th   or   v <- 0 where s
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csqcfs_deploy.ir.neuron import IFParams


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
