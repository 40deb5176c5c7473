"""The integer simulator's exactness proof: which dtype may hold which integer.

Every number the simulator computes is an integer; it is held in float32,
float64, int32 or int64, whichever is fastest *and provably exact*, from the
bounds of :mod:`csqcfs_deploy.ir.neuron`:

* **synaptic sums** (:func:`sum_dtype_for`): every partial sum of
  ``W (*) pool(s)`` is an integer of magnitude at most
  ``sum|W| * pool window * max|s|`` (:func:`~csqcfs_deploy.ir.synapses.max_abs_output`);
  the layer's total after each projection's ``weight_exp`` is bounded by
  :func:`shifted_total` (:func:`~csqcfs_deploy.ir.neuron.shifted_bound`). Below
  ``exact_float_bound(float32) = 2**24`` float32 kernels are exact (while PyTorch
  computes them in IEEE float32: :func:`float32_kernels_exact`), below 2**53
  float64 kernels are, beyond that the simulator refuses.
* **neuron state** (:class:`LayerArithmetic`): with ``U`` the bound of the
  current after the profile's shift and wrap
  (:func:`~csqcfs_deploy.ir.neuron.current_bound`), ``B = max|bias|`` and
  ``V0 = max|v_init|``, every membrane obeys ``|v_t| <= V0 + t * (U + B)``
  (:func:`~csqcfs_deploy.ir.neuron.membrane_reach`). The scan runs in the sums'
  own float dtype when every intermediate stays inside its exact-integer range,
  else in int32 when none can reach 2**31, else in int64; it skips the wrap and
  the saturation when they cannot trigger.
  ``U`` comes from the weights' bound or, when that leaves a wrap, clamp or
  conversion, from this batch's actual sums (one min/max pass:
  :meth:`LayerArithmetic.tightened`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csqcfs_deploy.errors import TargetError
from csqcfs_deploy.ir.neuron import (
    current_bound,
    exact_float_bound,
    membrane_reach,
    shifted_bound,
)
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.simulators.integer.device import DevicePlan, PrecisionFlags

INT32_MAX = 2**31 - 1

#: per incoming projection: (bound of ``|W (*) pool(x)|``, weight_exp)
ProjectionBounds = list[tuple[float, int]]


def float32_kernels_exact(device: torch.device | None = None) -> bool:
    """True while PyTorch computes float32 conv/matmul exactly on ``device`` (default
    cpu): IEEE float32, no bf16/tf32 modes, and on CUDA cuDNN off
    (:meth:`~.device.DevicePlan.for_device`); read per run, since a user may change
    the settings."""
    device = torch.device("cpu") if device is None else device
    return DevicePlan.for_device(device, PrecisionFlags.read()).float32_exact


def shifted_total(projection_bounds: ProjectionBounds) -> float:
    """Bound of the layer's summed input after every projection's weight_exp."""
    return sum(shifted_bound(b, e) for b, e in projection_bounds)


def sum_dtype_for(name: str, projection_bounds: ProjectionBounds,
                  float32_ok: bool | None = None, float64_ok: bool = True) -> torch.dtype:
    """float32 or float64: the dtype in which one layer's synaptic sums are provably exact.

    ``projection_bounds``: per incoming projection, (bound of ``|W (*) pool(x)|``,
    weight_exp). Every projection's own sums and their shifted total must stay
    below the dtype's exact-integer range; GraphError beyond float64's.
    ``float32_ok``/``float64_ok``: that dtype's kernels are exact on the run's device
    (:class:`~.device.DevicePlan`; ``float32_ok`` None: read for the CPU now).
    """
    raw = max((b for b, _ in projection_bounds), default=0.0)
    need = max(raw, shifted_total(projection_bounds))
    if float32_ok is None:
        float32_ok = float32_kernels_exact()
    if need < exact_float_bound(torch.float32) and float32_ok:
        return torch.float32
    if need < exact_float_bound(torch.float64) and float64_ok:
        return torch.float64
    if not float64_ok:
        raise TargetError(f"layer {name}: no float kernel is exact on this device with "
                          "the current settings (cuDNN on?)")
    raise TargetError(f"layer {name}: synaptic sums may reach {need:.3g}, beyond exact "
                     "float64 arithmetic")


@dataclass(frozen=True)
class LayerArithmetic:
    """The exactness proof of one layer's neuron scan for one run (module docstring).

    ``sum_bound``: bound of the step's summed synaptic input (after weight_exp,
    from the weights or observed in this batch); ``sum_dtype``: float32 or
    float64, the dtype the sums are held in; ``current_bound``: bound of the
    current after shift and wrap; ``wraps``: whether the profile's wrap can
    trigger; ``state_dtype``: the dtype of the scan (the sums' own float dtype
    when every value stays inside its exact-integer range, else int32 when
    below 2**31, else int64); ``clamp``: whether saturation can trigger.
    """

    sum_bound: float
    sum_dtype: torch.dtype
    current_bound: float
    wraps: bool
    state_dtype: torch.dtype
    clamp: bool

    @classmethod
    def derive(cls, sum_bound: float, sum_dtype: torch.dtype, profile: Profile,
               bias_max: int, v_init_max: int, v_th_max: int, steps: int) -> LayerArithmetic:
        """The proof for sums ``|acc| <= sum_bound`` over ``steps`` steps.

        The widest intermediate is the largest of ``|acc << act_shift|`` (before
        the wrap), ``|v| + U + B`` (the update) and ``v_th + |v|`` (the reset),
        with ``|v|`` the membrane reach, capped by the saturation range.
        """
        before_wrap = shifted_bound(sum_bound, profile.act_shift)
        current, wraps = current_bound(sum_bound, profile)
        reach = membrane_reach(v_init_max, steps, current, bias_max)
        clamp = reach > min(profile.voltage_max, -profile.voltage_min)
        v_abs = min(reach, max(profile.voltage_max, -profile.voltage_min))
        widest = max(before_wrap, v_abs + current + bias_max, v_th_max + v_abs)
        if widest < exact_float_bound(sum_dtype):
            state = sum_dtype
        elif widest <= INT32_MAX:
            state = torch.int32
        else:
            state = torch.int64
        return cls(sum_bound, sum_dtype, current, wraps, state, clamp)

    @classmethod
    def tightened(cls, static: LayerArithmetic, sums: list[torch.Tensor], profile: Profile,
                  bias_max: int, v_init_max: int, v_th_max: int, steps: int
                  ) -> LayerArithmetic:
        """``static`` (the proof from the weights' bound), or the proof from this batch's
        actual sums when that is tighter: only worth one min/max pass when ``static``
        leaves a wrap, a clamp or a conversion in the scan."""
        if static.ideal or not sums:
            return static
        observed = 0.0
        for s in sums:
            if s.numel():
                lo, hi = torch.aminmax(memory_order(s))
                observed += max(-float(lo), float(hi))
        if observed >= static.sum_bound:
            return static
        return cls.derive(observed, static.sum_dtype, profile, bias_max, v_init_max, v_th_max,
                          steps)

    @property
    def ideal(self) -> bool:
        """Nothing a tighter bound could improve: no wrap, no clamp, no conversion."""
        return not self.wraps and not self.clamp and self.state_dtype == self.sum_dtype


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view in memory order (reductions over channels-last tensors are slow)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)
