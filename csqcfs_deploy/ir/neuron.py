"""The one specification of the neuron rule (SPEC section 4).

Three things live here and nowhere else:

1. **The pure step functions** :func:`if_step` and :func:`readout_step`. Every
   tensor is int64 and broadcasts to (N, *shape); ``current`` is the step's
   summed synaptic input ``acc`` already passed through ``profile.current()``
   (shift by ``act_shift`` and the one wrap). One step of an IF neuron group::

       v <- saturate(v + current + bias)
       s <- v > v_th   (strict profiles)   or   v >= v_th
       v <- v - s * v_th                   (reset "subtract")
       v <- 0 where s                      (reset "zero")

   One step of the non-spiking readout: ``v <- saturate(v + current + bias)``.
   Their closed forms: :func:`first_step_cut` (one step from ``v_init``) and
   :func:`if_count` (the ANN-mode spike count over ``L`` steps).
2. **The per-layer event timing** :class:`LayerEvents` (from the run
   configuration and :mod:`csqcfs_deploy.ir.schedule`): when a layer's mask is
   taken, when its membranes return to ``v_init``, when the readout is cleared,
   and which steps are counted.
3. **The exactness bounds** that every float-arithmetic back end relies on:
   :func:`exact_float_bound`, :func:`shifted_bound`, :func:`current_bound` and
   :func:`membrane_reach`.

Every back end either uses these or says in its docstring that it holds a
*deliberate independent copy* and why: the Lava processes (the rule must run
inside Lava's own process models, in numpy), the Norse cells (the rule in Norse's
functional form, with Norse's surrogate threshold, so that Norse itself is
checked), and the simulator's in-place forms (:mod:`csqcfs_deploy.simulators.integer.fast`,
checked against :func:`if_step` in ``tests/test_simulator.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.ir.graph import IFGraph
from csqcfs_deploy.ir.nodes import IFLayer
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.ir.schedule import RunConfig, boundary, fill_reset_step

# --------------------------------------------------------------------------- step functions


@dataclass(frozen=True)
class IFParams:
    """Per-neuron constants, shaped to broadcast against (N, *shape)."""

    v_th: torch.Tensor
    v_init: torch.Tensor
    bias: torch.Tensor
    reset: str
    profile: Profile


def per_channel(values: npt.ArrayLike, ndim: int, dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """Per-channel values (C,) as a (1, C, 1, ..., 1) tensor of ``ndim`` dimensions, to
    broadcast against (N, C, ...) (``ndim = 1 + len(shape)``); ``dtype`` None keeps the
    array's."""
    t = torch.tensor(np.asarray(values), dtype=dtype)
    return t.view(1, -1, *([1] * (ndim - 2)))


def if_params(layer: IFLayer, profile: Profile) -> IFParams:
    """The :class:`IFParams` of an integer IF layer: int64 (1, C, 1, 1) or (1, C)."""
    ndim = len(layer.shape) + 1
    return IFParams(v_th=per_channel(layer.v_th, ndim, torch.int64),
                    v_init=per_channel(layer.v_init, ndim, torch.int64),
                    bias=per_channel(layer.bias, ndim, torch.int64),
                    reset=layer.reset, profile=profile)


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


# --------------------------------------------------------------------------- closed forms


def first_step_cut(v_th: torch.Tensor, v_init: torch.Tensor, bias: torch.Tensor,
                   profile: Profile) -> torch.Tensor:
    """The closed form of one IF step from ``v = v_init`` (integers, per channel).

    With no wrap and a saturation that cannot change the comparison, the step
    ``v = v_init + (acc << act_shift) + bias`` fires exactly when
    ``acc > cut`` with ``cut = floor((v_th - delta - bias - v_init) / 2**act_shift)``
    (``delta = 0`` for ``v > v_th``, 1 for ``v >= v_th``), because ``acc`` is an
    integer. Used by the simulator's one-step runs and by the netx export
    (whose layers see one counted step each).
    """
    delta = 0 if profile.strict else 1
    margin = v_th - delta - bias - v_init
    return torch.div(margin, 1 << profile.act_shift, rounding_mode="floor")


def if_count(z: torch.Tensor, v_th: torch.Tensor, levels: int, profile: Profile | None
             ) -> torch.Tensor:
    """The ANN-mode closed form: spikes of an IF neuron over ``L = levels`` steps.

    ``z`` is ``v_init + current(acc) + L * bias`` (the L-step total, saturated by the
    caller on an integer graph)::

        c = clip(floor((z - delta) / v_th), 0, L)       # delta = 1 for v > v_th, else 0

    On a float graph (``profile`` None, ``v_th = 1``, ``v_init = phi``) this is the
    CS-QCFS activation ``clip(floor(L z + phi), 0, L)``. Returns float64 counts.
    """
    if profile is not None:
        delta = 1 if profile.strict else 0
        c = torch.div(z - delta, v_th.to(torch.int64), rounding_mode="floor")
    else:
        c = torch.floor(z / v_th)
    return torch.clamp(c, 0, levels).to(torch.float64)


# --------------------------------------------------------------------------- event timing


@dataclass(frozen=True)
class LayerEvents:
    """When one layer's state changes outside the update rule (steps ``1 .. total``).

    ``boundary`` is ``b_j`` (the last step before the layer's counted window
    ``b_j + 1 .. b_j + timesteps``). At the *end* of step:

    * ``mask_step`` (``b_j`` when ``P > 0``, else 0 = never): an IF layer takes its
      pre-simulation mask ``v > 0`` (its output is ``s * mask`` from the next step
      on) and its membranes return to ``v_init``;
    * ``fill_step`` (``d_j`` in the pipelined schedule, else 0 = never): an IF
      layer's membranes return to ``v_init`` (the fill reset);
    * ``clear_step`` (``b_j``; 0 = never): the readout's membrane is set to 0.

    Steps are 1-based; 0 never matches a step.
    """

    boundary: int
    timesteps: int
    mask_step: int
    fill_step: int

    @property
    def clear_step(self) -> int:
        return self.boundary

    def masks_after(self, step: int) -> bool:
        """True when the mask is taken (and v re-initialised) at the end of ``step``."""
        return self.mask_step > 0 and step == self.mask_step

    def reinit_after(self, step: int) -> bool:
        """True when an IF layer's membranes return to ``v_init`` at the end of ``step``."""
        return self.masks_after(step) or (self.fill_step > 0 and step == self.fill_step)

    def clears_after(self, step: int) -> bool:
        """True when the readout's membrane is set to 0 at the end of ``step``."""
        return self.clear_step > 0 and step == self.clear_step

    def counted(self, step: int) -> bool:
        """True for a step in the counted window ``boundary + 1 .. boundary + timesteps``."""
        return self.boundary < step <= self.boundary + self.timesteps

    @property
    def window(self) -> slice:
        """The counted window as a slice of 0-based step indices."""
        return slice(self.boundary, self.boundary + self.timesteps)


def layer_events(graph: IFGraph, cfg: RunConfig, layer: str) -> LayerEvents:
    """The :class:`LayerEvents` of ``layer`` under ``cfg``."""
    b = boundary(graph, cfg, layer)
    is_if = isinstance(graph.layer(layer), IFLayer)
    return LayerEvents(boundary=b, timesteps=cfg.timesteps,
                       mask_step=b if (cfg.presim > 0 and is_if) else 0,
                       fill_step=fill_reset_step(graph, cfg, layer) if is_if else 0)


def graph_events(graph: IFGraph, cfg: RunConfig) -> dict[str, LayerEvents]:
    """The :class:`LayerEvents` of every non-input layer."""
    return {name: layer_events(graph, cfg, name) for name in graph.topological_order()[1:]}


# --------------------------------------------------------------------------- exactness bounds


def exact_float_bound(dtype: torch.dtype) -> int:
    """Largest integer magnitude ``M`` up to which every integer is exact in ``dtype``.

    A float sum, difference or product of integers is exact while its true value
    stays within ``[-M, M]``.
    """
    return {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24,
            torch.float64: 2**53}[dtype]


def shifted_bound(bound: float, weight_exp: int) -> float:
    """Bound of ``|shift(x, weight_exp)|`` when ``|x| <= bound`` (right shifts floor)."""
    if weight_exp >= 0:
        return bound * 2.0**weight_exp
    return float(math.ceil(bound / 2.0**-weight_exp))


def current_bound(sum_bound: float, profile: Profile) -> tuple[float, bool]:
    """(bound of ``|profile.current(acc)|``, whether the wrap can fire) for ``|acc| <= sum_bound``.

    ``u = acc << act_shift``; a wrapping current stage of ``b`` bits maps
    ``u > 2**(b-1)`` to ``u - 2**b`` once, so a wrapped value is bounded by
    ``max(2**(b-1), |u| - 2**b)``.
    """
    before = sum_bound * 2.0**profile.act_shift
    if profile.current_bits is None:
        return before, False
    half = 2.0 ** (profile.current_bits - 1)
    if before < half:
        return before, False
    return max(half, before - 2 * half), True


def membrane_reach(v_start_max: float, steps: int, current: float, bias_max: float) -> float:
    """Bound of ``|v|`` after ``steps`` steps: ``v_start_max + steps * (current + bias_max)``.

    A reset only moves ``v`` towards 0 or back to ``v_init``, so it never raises the
    bound; ``v_start_max`` bounds ``|v_init|`` (and ``v_th`` where the caller needs it).
    """
    return v_start_max + steps * (current + bias_max)
