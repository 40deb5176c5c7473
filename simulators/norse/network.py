"""The whole graph as one stateful Norse module: :class:`NorseIFNetwork` and :func:`to_norse`.

The module runs the **synchronous** schedule (SPEC sections 4 and 6, timing in
:mod:`csqcfs_deploy.ir.schedule`): every step, each non-input layer in topological
order sums its incoming projections' outputs of the same step (the input's sums,
constant over steps, are computed once) and steps its cell. It follows Norse's
``SequentialState`` conventions (``forward(x, state=None) -> (output, state)``,
``state=None`` starts from the initial state) for a DAG: residual networks have
several projections into one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import LayerEvents, graph_events
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.results import check_integer_input
from csqcfs_deploy.simulators.devices import ieee_float32
from csqcfs_deploy.simulators.norse.bounds import (
    LayerBound,
    check_exact,
    exact_dtype,
    layer_bounds,
)
from csqcfs_deploy.simulators.norse.cells import IFNeuronCell, ReadoutCell
from csqcfs_deploy.simulators.norse.functional import (
    THRESHOLD_METHODS,
    IFNeuronState,
    ReadoutState,
)
from csqcfs_deploy.simulators.norse.synapses import synapse_module


class NetworkState(NamedTuple):
    """State of a :class:`NorseIFNetwork`: ``t`` steps done and one cell state per
    non-input layer (in :attr:`NorseIFNetwork.layer_names` order)."""

    t: int
    layers: tuple[IFNeuronState | ReadoutState, ...]


def _key(name: str) -> str:
    return name.replace(".", "_")


def module_events(graph: IFGraph, presim: int) -> dict[str, LayerEvents]:
    """Every non-input layer's :class:`LayerEvents` in the synchronous schedule with P = ``presim``.

    The cells ask only ``masks_after`` / ``reinit_after`` / ``clears_after``, which
    depend on P alone; T only ends the counted window, which a runner takes from its
    own :class:`RunConfig`. So T = 1 here stands for any T.
    """
    return graph_events(graph, RunConfig(timesteps=1, presim=presim))


class NorseIFNetwork(nn.Module):
    """An integer IF graph as a stateful Norse module (synchronous schedule).

    ``forward(x, state=None) -> (readout_v, NetworkState)`` runs one step on
    integer inputs ``x`` (N, *input_shape) (any integer or integral float
    dtype); ``readout_v`` (N, F) holds integers in the module's dtype. The
    spikes of every IF layer of that step: :meth:`layer_spikes`. Several steps
    with the constant input's synaptic sums computed once: :meth:`steps`.
    ``graph`` is the graph it was built from.
    """

    def __init__(self, graph: IFGraph, bounds: tuple[LayerBound, ...], dtype: torch.dtype,
                 presim: int, max_steps: int | None, input_max_abs: int, method: str,
                 alpha: float) -> None:
        super().__init__()
        profile = get_profile(str(graph.meta.profile))
        self.graph = graph
        self.profile = profile
        self.input_name = graph.input.name
        self.input_shape = graph.input.shape
        self.input_max_abs = int(input_max_abs)
        self.presim = int(presim)
        self.max_steps = max_steps
        self.bounds = bounds
        self.readout_scale = float(graph.readout.scale)
        order = graph.topological_order()[1:]
        self.layer_names: tuple[str, ...] = order
        self.if_layer_names: tuple[str, ...] = tuple(
            n for n in order if isinstance(graph.layer(n), IFLayer))
        self.readout_name = graph.readout.name
        keys = [_key(p.name) for p in graph.projections] + [_key(n) for n in order]
        if len(set(keys)) != len(keys):
            raise GraphError("node names collide once '.' is replaced by '_'")
        self.synapses = nn.ModuleDict({_key(p.name): synapse_module(p, dtype)
                                       for p in graph.projections})
        self.incoming: dict[str, tuple[tuple[str, str], ...]] = {
            n: tuple((_key(p.name), p.src) for p in graph.incoming(n)) for n in order}
        by_name = {b.layer: b for b in bounds}
        events = module_events(graph, self.presim)
        cells: dict[str, nn.Module] = {}
        for n in order:
            layer = graph.layer(n)
            if isinstance(layer, IFLayer):
                cells[_key(n)] = IFNeuronCell(layer, profile, by_name[n], events[n], max_steps,
                                              dtype, method, alpha)
            elif isinstance(layer, ReadoutLayer):
                cells[_key(n)] = ReadoutCell(layer, profile, by_name[n], events[n], max_steps,
                                             dtype)
            else:  # pragma: no cover - IFGraph validates its layers
                raise GraphError(f"layer {n}: {type(layer).__name__} is not a neuron layer")
        self.cells = nn.ModuleDict(cells)

    # ---- dtype / device ------------------------------------------------------
    def _readout_bias(self) -> torch.Tensor:
        return self.get_buffer(f"cells.{_key(self.readout_name)}.bias")

    @property
    def dtype(self) -> torch.dtype:
        return self._readout_bias().dtype

    @property
    def device(self) -> torch.device:
        return self._readout_bias().device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> nn.Module:
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        check_exact(self.bounds, probe.dtype, self.max_steps)  # before anything converts
        moved: nn.Module = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return moved  # (torch leaves Module._apply unannotated)

    # ---- stepping --------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """InputDataError (a GraphError) unless ``x`` is (N, *input_shape) integers within
        ``input_max_abs`` (:func:`csqcfs_deploy.run.results.check_integer_input`)."""
        check_integer_input(self.graph, x, "norse", max_abs=self.input_max_abs)

    def input_currents(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synaptic sums of every projection from the input (constant over steps)."""
        xf = x.to(device=self.device, dtype=self.dtype)
        out: dict[str, torch.Tensor] = {}
        for dst in self.layer_names:
            for key, src in self.incoming[dst]:
                if src == self.input_name:
                    out[key] = self.synapses[key](xf)
        return out

    def _step(self, currents: dict[str, torch.Tensor], state: NetworkState | None
              ) -> tuple[torch.Tensor, NetworkState]:
        t = 0 if state is None else state.t
        if self.max_steps is not None and t >= self.max_steps:
            raise GraphError(f"the module was built for at most {self.max_steps} steps "
                             "(to_norse(..., max_steps=...))")
        outputs: dict[str, torch.Tensor] = {}
        new_states: list[IFNeuronState | ReadoutState] = []
        readout = None
        for i, name in enumerate(self.layer_names):
            acc: torch.Tensor | None = None
            for key, src in self.incoming[name]:
                part = currents[key] if src == self.input_name else self.synapses[key](
                    outputs[src])
                acc = part if acc is None else acc + part
            assert acc is not None  # every non-input layer has an incoming projection
            out, s = self.cells[_key(name)](acc, None if state is None else state.layers[i])
            outputs[name] = out
            new_states.append(s)
            if name == self.readout_name:
                readout = out
        assert readout is not None
        return readout, NetworkState(t=t + 1, layers=tuple(new_states))

    def forward(self, x: torch.Tensor, state: NetworkState | None = None
                ) -> tuple[torch.Tensor, NetworkState]:
        """One step: integer input ``x`` (N, *input_shape) -> (readout v (N, F), state)."""
        self.check_input(x)
        with ieee_float32(self.device):
            return self._step(self.input_currents(x), state)

    def steps(self, x: torch.Tensor, count: int, state: NetworkState | None = None
              ) -> Iterator[tuple[torch.Tensor, NetworkState]]:
        """Run ``count`` steps on the same input; yields (readout v, state) after each."""
        if count < 0:
            raise UsageError(f"step count must be >= 0, got {count}")
        self.check_input(x)
        with ieee_float32(self.device):
            currents = self.input_currents(x)
        for _ in range(count):
            with ieee_float32(self.device):
                readout, state = self._step(currents, state)
            yield readout, state

    def layer_spikes(self, state: NetworkState) -> dict[str, torch.Tensor]:
        """Output spikes (after the mask) of every IF layer in the last step, (N, *shape)."""
        return {n: s.z for n, s in zip(self.layer_names, state.layers, strict=True)
                if isinstance(s, IFNeuronState)}

    def layer_masks(self, state: NetworkState) -> dict[str, torch.Tensor]:
        """Pre-simulation masks (N, *shape) of every IF layer (empty before the boundary)."""
        return {n: s.mask for n, s in zip(self.layer_names, state.layers, strict=True)
                if isinstance(s, IFNeuronState) and s.mask is not None}

    def extra_repr(self) -> str:
        return (f"profile={self.profile.name}, presim={self.presim}, "
                f"max_steps={self.max_steps}, input_max_abs={self.input_max_abs}")


def to_norse(graph: IFGraph, *, presim: int = 0, dtype: torch.dtype | None = None,
             max_steps: int | None = None, input_max_abs: int | None = None,
             method: str = "super", alpha: float = 100.0) -> NorseIFNetwork:
    """Build the Norse module of an integer IF graph (synchronous schedule).

    Example (``x_int``: integer input units (N, *input_shape); ``load_graph`` from
    :mod:`csqcfs_deploy.ir`)::

        >>> net = to_norse(load_graph("digits.ifg"))      # an integer IF graph file
        >>> readout_v, state = net(x_int)                  # one step, (N, classes)
        >>> spikes = net.layer_spikes(state)               # {layer: (N, *shape) 0/1}

    ``presim``: pre-simulation steps P (the mask is taken at the end of step P);
    ``dtype``: float32 / float64; None picks float32 where every layer is
    provably exact in it, else float64; a dtype whose bound fails is refused
    with :class:`GraphError`. ``max_steps``: the longest run the module will
    do (None: unlimited); a known length can make float32 exact for 32-bit
    membranes. ``input_max_abs``: largest input magnitude (default: the
    graph's input encoding's). ``method`` / ``alpha``: Norse's surrogate
    threshold (forward: the Heaviside step) for gradients.
    """
    if not isinstance(graph, IFGraph):
        raise UsageError(f"to_norse needs an IFGraph, got {type(graph).__name__}")
    if presim < 0:
        raise UsageError(f"presim must be >= 0, got {presim}")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"max_steps must be >= 1, got {max_steps}")
    if method not in THRESHOLD_METHODS:
        raise UsageError(f"threshold method must be one of {', '.join(THRESHOLD_METHODS)}, "
                         f"got {method!r}")
    bounds = layer_bounds(graph, input_max_abs)
    if dtype is None:
        dtype = exact_dtype(bounds, max_steps)
    else:
        check_exact(bounds, dtype, max_steps)
    in_max = graph.input.encoding.max_abs_int if input_max_abs is None else int(input_max_abs)
    net = NorseIFNetwork(graph, bounds, dtype, presim, max_steps, in_max, method, alpha)
    return net.eval()
