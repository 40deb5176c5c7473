"""The neurons of the Norse module (Norse's ``module`` layer): one ``SNNCell`` per layer.

:class:`IFNeuronCell` runs :func:`~.functional.if_feed_forward_step` for one IF
group, :class:`ReadoutCell` runs :func:`~.functional.readout_feed_forward_step`
for the non-spiking readout. Each holds its layer's constants as buffers in the
module's float dtype (they move with ``.to()``), its
:class:`~csqcfs_deploy.ir.neuron.LayerEvents` (when the mask is taken, the
membranes re-initialised, the readout cleared) and its
:class:`~.bounds.LayerBound`, checked again whenever the cell changes dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from norse.torch.module.snn import SNNCell
from torch import nn

from csqcfs_deploy.ir import IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import LayerEvents, per_channel
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.simulators.norse.bounds import LayerBound, check_exact
from csqcfs_deploy.simulators.norse.functional import (
    IFNeuronParameters,
    IFNeuronState,
    ReadoutParameters,
    ReadoutState,
    if_feed_forward_step,
    readout_feed_forward_step,
)


class _CheckedCell(SNNCell):  # type: ignore[misc]  # norse ships no type information
    """A Norse cell that refuses a dtype under which its layer's bound fails."""

    bound: LayerBound
    max_steps: int | None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> nn.Module:
        probe = fn(torch.empty(0, dtype=self.bias.dtype, device=self.bias.device))
        check_exact((self.bound,), probe.dtype, self.max_steps)
        moved: nn.Module = super()._apply(fn, recurse)
        return moved


class IFNeuronCell(_CheckedCell):
    """Norse cell of one IF group (shape (C, H, W) or (F,)) over :func:`if_feed_forward_step`.

    ``forward(acc, state=None) -> (spikes, IFNeuronState)``; ``acc`` is the step's
    summed synaptic input (N, *shape). ``v_th``, ``v_init``, ``bias`` are buffers
    (they move with ``.to()``).
    """

    def __init__(self, layer: IFLayer, profile: Profile, bound: LayerBound,
                 events: LayerEvents, max_steps: int | None, dtype: torch.dtype,
                 method: str = "super", alpha: float = 100.0) -> None:
        super().__init__(activation=if_feed_forward_step, state_fallback=self.initial_state,
                         p=None, dt=1.0)
        ndim = 1 + len(layer.shape)  # (1, C, 1, 1) or (1, C) against (N, *shape)
        self.register_buffer("v_th", per_channel(layer.v_th, ndim, dtype))
        self.register_buffer("v_init", per_channel(layer.v_init, ndim, dtype))
        self.register_buffer("bias", per_channel(layer.bias, ndim, dtype))
        self.layer_name = layer.name
        self.shape = layer.shape
        self.profile = profile
        self.reset = layer.reset
        self.events = events
        self.method = method
        self.alpha = float(alpha)
        self.bound = bound
        self.max_steps = max_steps

    def neuron_parameters(self) -> IFNeuronParameters:
        return IFNeuronParameters(
            v_th=self.v_th, v_init=self.v_init, bias=self.bias, profile=self.profile,
            v_min=float(self.profile.voltage_min), v_max=float(self.profile.voltage_max),
            offset=0.0 if self.profile.strict else 1.0, reset=self.reset,
            events=self.events, method=self.method, alpha=self.alpha,
            may_wrap=self.bound.may_wrap,
        )

    def initial_state(self, input_tensor: torch.Tensor) -> IFNeuronState:
        v = self.v_init.expand_as(input_tensor).clone()
        return IFNeuronState(z=torch.zeros_like(v), v=v, mask=None, t=0)

    def forward(self, input_tensor: torch.Tensor, state: IFNeuronState | None = None
                ) -> tuple[torch.Tensor, IFNeuronState]:
        state = state if state is not None else self.initial_state(input_tensor)
        out: tuple[torch.Tensor, IFNeuronState] = self.activation(
            input_tensor, state, self.neuron_parameters(), self.dt)
        return out

    def extra_repr(self) -> str:
        cmp = ">" if self.profile.strict else ">="
        return (f"{self.layer_name}: shape={self.shape}, spike when v {cmp} v_th, "
                f"reset={self.reset}, profile={self.profile.name}, "
                f"boundary={self.events.boundary}, method={self.method}")


class ReadoutCell(_CheckedCell):
    """Norse cell of the non-spiking readout (F,) over :func:`readout_feed_forward_step`.

    ``forward(acc, state=None) -> (v, ReadoutState)``.
    """

    def __init__(self, layer: ReadoutLayer, profile: Profile, bound: LayerBound,
                 events: LayerEvents, max_steps: int | None, dtype: torch.dtype) -> None:
        super().__init__(activation=readout_feed_forward_step,
                         state_fallback=self.initial_state, p=None, dt=1.0)
        self.register_buffer("bias", per_channel(layer.bias, 2, dtype))  # (1, F)
        self.layer_name = layer.name
        self.shape = layer.shape
        self.profile = profile
        self.events = events
        self.bound = bound
        self.max_steps = max_steps

    def readout_parameters(self) -> ReadoutParameters:
        return ReadoutParameters(
            bias=self.bias, profile=self.profile, v_min=float(self.profile.voltage_min),
            v_max=float(self.profile.voltage_max), events=self.events,
            may_wrap=self.bound.may_wrap,
        )

    def initial_state(self, input_tensor: torch.Tensor) -> ReadoutState:
        return ReadoutState(v=torch.zeros_like(input_tensor), t=0)

    def forward(self, input_tensor: torch.Tensor, state: ReadoutState | None = None
                ) -> tuple[torch.Tensor, ReadoutState]:
        state = state if state is not None else self.initial_state(input_tensor)
        out: tuple[torch.Tensor, ReadoutState] = self.activation(
            input_tensor, state, self.readout_parameters(), self.dt)
        return out

    def extra_repr(self) -> str:
        return (f"{self.layer_name}: shape={self.shape}, non-spiking, "
                f"profile={self.profile.name}, boundary={self.events.boundary}")
