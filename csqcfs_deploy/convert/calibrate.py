"""The float IF graph as an SNN, and the ranges it reaches on calibration data (SPEC 4b).

:func:`float_run` runs a *float* IF graph (``v_th = 1``, ``v_init = phi``,
biases and weights in threshold units; SPEC section 3) as the SNN it stands
for, in float64, synchronous schedule, with pre-simulation. Per step ``t`` and
IF layer ``j``, in topological order::

    a_t = sum_p W_p (*) pool_p(s_src[t])      # s_input[t] = x (the real input), every step
    v   = v + a_t + b;  s = v >= 1;  v = v - s  (reset "subtract"; v = 0 where s for "zero")
    out = s * mask                               # mask = 1 until pre-simulation ends

At the end of step ``P`` (``P > 0``): ``mask = v > 0``, ``v = phi``; the readout
(``r = r + a_t + b``) is set to 0, so it accumulates the ``T`` counted steps;
the prediction is ``argmax r``. This is the float reference of the quantization
fidelity (SPEC 4b): the integer graph's only differences from it are the
profile's rounding, wrap and saturation, and ``v > v_th`` with ``v_init + 1``
on strict profiles. (A deliberate, plain float copy of the rule of
:mod:`csqcfs_deploy.ir.neuron`, whose step functions are integer; the pipelined
schedule is this run shifted by each layer's depth, SPEC section 4.)

While it runs, it records per layer and output channel (:class:`LayerRange`)
the largest ``|a_t|`` of any step and position (what one step's current must
hold), the largest ``v`` after the update (before the reset), and the largest
``-v``; for the readout the largest ``|r|`` at any step; and per projection the
mean of its source's values over samples and steps. :mod:`.quantize` chooses
each layer's integer scale from these (:class:`Ranges`) and corrects each bias
for the mean error of its rounded weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.convert.rounding import SecondMoments
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import IFGraph, IFLayer, ReadoutLayer
from csqcfs_deploy.ir.neuron import per_channel
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.ir.synapses import apply_projection

#: Samples per float batch (bounds memory: one step of every layer for this many inputs).
BATCH = 64


@dataclass(frozen=True)
class LayerRange:
    """Observed extremes of one neuron group, per output channel (C,), threshold units.

    ``step_input``: max ``|a_t|`` (one step's synaptic input, no bias);
    ``v_max``: max ``v`` after the update (IF) or max ``|r|`` (readout);
    ``v_min``: max ``-v`` after the update (IF; 0 for the readout).
    """

    step_input: npt.NDArray[np.float64]
    v_max: npt.NDArray[np.float64]
    v_min: npt.NDArray[np.float64]

    def merge(self, other: LayerRange) -> LayerRange:
        return LayerRange(np.maximum(self.step_input, other.step_input),
                          np.maximum(self.v_max, other.v_max),
                          np.maximum(self.v_min, other.v_min))


@dataclass(frozen=True)
class Ranges:
    """What the float SNN reached on ``samples`` calibration inputs at ``timesteps`` T and
    ``presim`` P; ``layers`` per neuron group; ``source`` names the data."""

    timesteps: int
    presim: int
    samples: int
    source: str
    layers: dict[str, LayerRange]
    #: per projection, the mean of its source's values (*src_shape) over samples and
    #: steps (the input's real values; spikes' rates): what bias correction needs
    input_mean: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    #: per projection, ``E[x x^T]`` of its input features (:mod:`.rounding`), when gathered
    hessians: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, object]:
        return {"timesteps": self.timesteps, "presim": self.presim, "samples": self.samples,
                "source": self.source,
                "layers": {k: {"step_input": float(r.step_input.max(initial=0)),
                               "v_max": float(r.v_max.max(initial=0)),
                               "v_min": float(r.v_min.max(initial=0))}
                           for k, r in self.layers.items()}}


@dataclass(frozen=True)
class FloatRun:
    """Predictions (N,) and logits (N, F) of the float SNN, and the ranges it reached."""

    predictions: npt.NDArray[np.int64]
    logits: torch.Tensor
    ranges: Ranges


def _channel_max(t: torch.Tensor) -> npt.NDArray[np.float64]:
    """Max over every dimension but the channel (axis 1) of (N, C, ...) -> (C,)."""
    dims = [d for d in range(t.dim()) if d != 1]
    out: npt.NDArray[np.float64] = torch.amax(t, dim=dims).numpy().astype(np.float64)
    return out


@torch.no_grad()
def _run_batch(graph: IFGraph, x: torch.Tensor, cfg: RunConfig,
               moments: SecondMoments | None = None
               ) -> tuple[torch.Tensor, dict[str, LayerRange], dict[str, torch.Tensor]]:
    order = graph.topological_order()
    names = order[1:]
    steps = cfg.presim + cfg.timesteps
    n = x.shape[0]
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}
    consts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranges: dict[str, LayerRange] = {}
    from_input: dict[str, torch.Tensor] = {}
    for name in names:
        layer = graph.neuron_group(name)
        ndim = len(layer.shape) + 1
        bias = per_channel(np.asarray(layer.bias, np.float64), ndim, torch.float64)
        v0 = (per_channel(np.asarray(layer.v_init, np.float64), ndim, torch.float64)
              if isinstance(layer, IFLayer) else torch.zeros(1, dtype=torch.float64))
        consts[name] = (bias, v0)
        state[name] = v0.expand(n, *layer.shape).clone()
        if isinstance(layer, ReadoutLayer):
            state[name] = torch.zeros((n, *layer.shape), dtype=torch.float64)
        masks[name] = None
        c = layer.channels
        ranges[name] = LayerRange(np.zeros(c), np.zeros(c), np.zeros(c))
        parts = [apply_projection(p, x) for p in graph.incoming(name)
                 if p.src == graph.input.name]
        if parts:
            from_input[name] = torch.stack(parts).sum(0)
    out: dict[str, torch.Tensor] = {graph.input.name: x}
    sums: dict[str, torch.Tensor] = {}
    for t in range(1, steps + 1):
        for name in names:
            layer = graph.neuron_group(name)
            a = from_input.get(name)
            for p in graph.incoming(name):
                total = out[p.src].sum(0)
                sums[p.name] = total if p.name not in sums else sums[p.name] + total
                if moments is not None and (t == 1 or p.src != graph.input.name):
                    moments.add(p.name, out[p.src])
                if p.src != graph.input.name:
                    part = apply_projection(p, out[p.src])
                    a = part if a is None else a + part
            if a is None:  # pragma: no cover - IFGraph validates connectivity
                raise GraphError(f"layer {name} has no input")
            bias, v0 = consts[name]
            v = state[name] + a + bias
            r = ranges[name]
            if isinstance(layer, IFLayer):
                ranges[name] = r.merge(LayerRange(_channel_max(a.abs()), _channel_max(v),
                                                  _channel_max(-v)))
                s = (v >= 1.0).to(torch.float64)
                v = v - s if layer.reset == "subtract" else v * (1.0 - s)
                mask = masks[name]
                out[name] = s if mask is None else s * mask
                if cfg.presim > 0 and t == cfg.presim:
                    masks[name] = (v > 0).to(torch.float64)
                    v = v0.expand_as(v).clone()
            else:
                ranges[name] = r.merge(LayerRange(_channel_max(a.abs()), _channel_max(v.abs()),
                                                  np.zeros(layer.channels)))
                if cfg.presim > 0 and t == cfg.presim:
                    v = torch.zeros_like(v)
            state[name] = v
    return state[graph.readout.name], ranges, sums


def float_run(graph: IFGraph, x: torch.Tensor, cfg: RunConfig, source: str = "",
              batch: int = BATCH, second_moments: bool = False) -> FloatRun:
    """Run the float graph on real inputs ``x`` (N, *input_shape) (see module docstring);
    ``second_moments``: also gather each projection's ``E[x x^T]`` (:mod:`.rounding`)."""
    if graph.is_integer:
        raise GraphError("float_run takes the float IF graph (before quantization)")
    xs = x.to(torch.float64)
    readouts: list[torch.Tensor] = []
    merged: dict[str, LayerRange] | None = None
    totals: dict[str, torch.Tensor] = {}
    moments = (SecondMoments(graph, len(xs), cfg.presim + cfg.timesteps) if second_moments
               else None)
    for i in range(0, len(xs), batch):
        r, ranges, sums = _run_batch(graph, xs[i:i + batch], cfg, moments)
        readouts.append(r)
        merged = ranges if merged is None else {k: merged[k].merge(v) for k, v in ranges.items()}
        totals = sums if not totals else {k: totals[k] + v for k, v in sums.items()}
    if merged is None:
        raise GraphError("float_run needs at least one input")
    readout = torch.cat(readouts)
    logits = readout * graph.readout.scale / cfg.timesteps
    preds: npt.NDArray[np.int64] = logits.argmax(dim=1).numpy().astype(np.int64)
    count = len(xs) * (cfg.presim + cfg.timesteps)
    means = {k: (v / count).numpy() for k, v in totals.items()}
    return FloatRun(preds, logits, Ranges(cfg.timesteps, cfg.presim, int(len(xs)), source,
                                          merged, means,
                                          {} if moments is None else moments.result()))


def real_input(graph: IFGraph, raw: npt.NDArray[Any]) -> torch.Tensor:
    """Raw samples (N, *input_shape) -> the float graph's real input (float64)."""
    return torch.from_numpy(graph.input.encoding.normalize(raw).astype(np.float64))


def integer_input(graph: IFGraph, raw: npt.NDArray[Any]) -> torch.Tensor:
    """Raw samples -> the real value of the integer input the quantized graph is fed,
    ``x_int * scale`` (float64): the float graph's input when it is compared with the
    integer graph on the *same* input. Equal to :func:`real_input` when the encoding is
    exact (mean 0, std 1, integer raw values)."""
    enc = graph.input.encoding
    return torch.from_numpy(enc.to_int(raw).astype(np.float64) * enc.scale)
