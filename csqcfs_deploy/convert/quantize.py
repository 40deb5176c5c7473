"""Integer quantization of a float IF graph to a hardware profile (SPEC sections 3, 5).

For every neuron group ``j`` the real synapses ``W`` (in units of ``j``'s
threshold per source spike, or per integer input unit for the first layer)
are scaled by an integer ``K_c`` per output channel (one ``K`` per layer when
the profile, or the user, asks for per-layer thresholds)::

    K_c     = min(floor(weight_max / max|W[c]|), threshold_mant_max, bias limit)
    W_int   = round(W * K_c)                   (loihi2: 2 * round(W * K_c / 2))
    v_th    = K_c << act_shift                 (membrane units)
    bias    = nearest representable(b_c * v_th)
    v_init  = round(phi * v_th) (+1 when the profile fires on v > v_th, so that
              v > v_th happens exactly when the ANN's floor(x + phi) >= 1)

The readout takes one ``K`` for all classes (argmax must not change) and
``scale = 1 / (K << act_shift)``. A value that cannot fit raises a
:class:`QuantizationError` naming the layer, the value and the limit; a
threshold lowered so that a bias fits is reported as a rescale.

**Calibrated scales** (SPEC 4b). With the :class:`~.calibrate.Ranges` the float
SNN reached on calibration data (per channel: ``a_c`` the largest one-step
synaptic input, ``v_c`` the largest membrane, readout: the largest ``|r|``),
two more limits hold ``K_c`` below what the profile can carry on that data,
with headroom ``margin`` (default 2)::

    K_c <= current_max / (a_c * margin)          # current_max = (2**23 - 1) >> 6: no wrap
    K_c <= (voltage_max >> act_shift) / (v_c * margin)   # no saturation (readout: over P+T)

The first layer's ``K`` multiplies the input scale (its synapses act on
integer pixels), so the first limit is also the input scale that keeps its
current from wrapping. Per-layer factors (:class:`ScaleOptions`) move a layer's
``K`` (what the measured check of :mod:`csqcfs_deploy.run.calibration` and
``--optimize`` use).
Without ranges the scales come from the weights alone (``--scales weights``, the
uncalibrated choice). Each :class:`LayerReport` names the limit that set ``K``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from csqcfs_deploy.convert.calibrate import Ranges
from csqcfs_deploy.convert.rounding import gptq_round
from csqcfs_deploy.errors import GraphError, QuantizationError, UsageError
from csqcfs_deploy.ir import (
    IFGraph,
    IFLayer,
    InputLayer,
    Layer,
    ProjectionT,
    ReadoutLayer,
)
from csqcfs_deploy.ir.kinds import kind_name, max_abs_output
from csqcfs_deploy.ir.nodes import Array
from csqcfs_deploy.ir.profiles import Profile, get_profile
from csqcfs_deploy.ir.synapses import apply_projection

#: Headroom of calibrated scales over the ranges seen on the calibration data.
DEFAULT_MARGIN = 2.0


@dataclass(frozen=True)
class LayerReport:
    """One row of the conversion table."""

    name: str
    kind: str
    shape: tuple[int, ...]
    neurons: int
    weight_bits_used: int
    threshold_min: int
    threshold_max: int
    scale: float            # real value of one membrane unit (per threshold: lambda / v_th)
    quant_error: float      # ||W_int / K - W|| / ||W|| over incoming synapses
    max_step_input: int     # bound on |current| in one step (membrane units)
    notes: tuple[str, ...] = ()
    bound: str = ""         # the limit that set the threshold scale (see _k_limits)
    observed_step_input: int | None = None  # calibrated: the data's largest one-step input
                                            # (membrane units), None when not calibrated

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "shape": list(self.shape),
            "neurons": self.neurons, "weight_bits_used": self.weight_bits_used,
            "threshold_min": self.threshold_min, "threshold_max": self.threshold_max,
            "scale": self.scale, "quant_error": self.quant_error,
            "max_step_input": self.max_step_input, "notes": list(self.notes),
            "bound": self.bound, "observed_step_input": self.observed_step_input,
        }


@dataclass(frozen=True)
class QuantReport:
    """Every layer's row, the warnings, and how the scales were chosen: ``scales``
    "calibrated" (with ``ranges``) or "weights"."""

    profile: str
    per_channel: bool
    layers: tuple[LayerReport, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    scales: str = "weights"
    margin: float = DEFAULT_MARGIN
    ranges: Ranges | None = None

    def to_json(self) -> dict[str, object]:
        return {"profile": self.profile, "per_channel_thresholds": self.per_channel,
                "scales": self.scales, "margin": self.margin,
                "calibration": None if self.ranges is None else self.ranges.to_json(),
                "layers": [la.to_json() for la in self.layers], "warnings": list(self.warnings)}


def signed_bits(max_abs: float) -> int:
    """Bits of a signed integer that holds magnitudes up to ``max_abs``."""
    return int(math.ceil(math.log2(max_abs + 1))) + 1 if max_abs > 0 else 1


def _row_max(w: Array) -> Array:
    """Per output channel (axis 0, every kind), the largest ``|w|`` of its synapses (O,)."""
    a = np.abs(w)
    rows: Array = a.reshape(a.shape[0], -1).max(axis=1) if a.ndim > 1 else a
    return rows


def _round_weights(w: Array, k: Array, profile: Profile, hessian: Array | None = None
                   ) -> Array:
    """``round(w * K_c)`` per output channel (axis 0), on the profile's weight step; with
    ``hessian`` (the inputs' second moment), error-compensating (:func:`gptq_round`)."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    step = profile.weight_step
    target = w * k.reshape(shape) / step
    if hessian is not None and hessian.shape[0] == int(np.prod(w.shape[1:])):
        q = gptq_round(target.reshape(w.shape[0], -1), hessian,
                       profile.weight_min // step, profile.weight_max // step)
        gq: Array = (q.reshape(w.shape) * step).astype(np.int64)
        return gq
    out: Array = (np.rint(target) * step).astype(np.int64)
    return out


def _neuron_group(graph: IFGraph, name: str) -> IFLayer | ReadoutLayer:
    layer = graph.layer(name)
    if not isinstance(layer, (IFLayer, ReadoutLayer)):
        raise GraphError(f"layer {name} has incoming projections but is not a neuron group")
    return layer


@dataclass(frozen=True)
class ScaleOptions:
    """How :func:`quantize` chooses each layer's threshold scale ``K``.

    ``ranges``: what the float SNN reached on calibration data (None: from the
    weights alone); ``margin``: headroom over those ranges (>= 1); ``factors``:
    per layer, a factor ``f`` in (0, margin]: ``K = min(K_hw, K_cal) * f`` for
    ``f <= 1``, else ``min(K_hw, K_cal * f)`` (``K_hw``: the weight, threshold and bias
    limits, never exceeded; ``K_cal``: the calibrated ones); ``bias_correction``
    (with ranges): subtract from each bias the mean error its rounded weights add on
    the calibration data's mean input; ``rounding``: "nearest", or "gptq" (with
    ranges that hold second moments: :mod:`.rounding`); ``netx``: also
    fit lava-dl netx's form (one threshold per layer with 13-bit bias mantissas
    around it, readout bias ``floor(b / 64)`` in 13 bits).
    """

    ranges: Ranges | None = None
    margin: float = DEFAULT_MARGIN
    factors: tuple[tuple[str, float], ...] = ()
    netx: bool = False
    bias_correction: bool = True
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 1.0):
            raise UsageError(f"the calibration margin must be a number >= 1, got {self.margin}")
        for name, f in self.factors:
            if not 0 < f <= self.margin:
                raise UsageError(f"scale factor for {name} must be in (0, {self.margin:g}], "
                                 f"got {f}")

    def factor(self, layer: str) -> float:
        """The product of ``layer``'s factors (1.0 when it has none)."""
        return float(np.prod([f for n, f in self.factors if n == layer]))

    def scaled(self, layers: Iterable[str], factor: float) -> ScaleOptions:
        """These options with ``layers``' factors multiplied by ``factor``."""
        return dataclasses.replace(self, factors=self.factors
                                   + tuple((n, factor) for n in layers))

    def with_factor(self, layer: str, factor: float) -> ScaleOptions:
        """These options with ``layer``'s factor set to ``factor``."""
        kept = tuple((n, f) for n, f in self.factors if n != layer)
        return dataclasses.replace(self, factors=kept + ((layer, factor),))


#: The limits of :func:`_k_limits` that come from the calibration data.
CALIBRATED = ("current", "voltage")
#: netx's bias mantissa range (13-bit signed, lava-dl 0.6 CUBA blocks), kept 2 short
#: of the limit for the rounding of the per-channel cut.
NETX_BIAS_SPAN = 2 * 4095 - 2


def _refuse(name: str, ch: int, limits: dict[str, Array], bias: Array,
            projs: tuple[ProjectionT, ...], real_w: dict[str, Array], prof: Profile,
            opts: ScaleOptions) -> None:
    """Raise the QuantizationError for a layer whose ``K`` fell below 1 in channel ``ch``:
    which quantity, its value and the profile's limit."""
    which = min(limits, key=lambda key: float(limits[key][ch]))
    r = opts.ranges.layers.get(name) if opts.ranges is not None else None
    if which == "bias":
        raise QuantizationError(
            f"layer {name}: bias {bias[ch]:.4g} (x threshold) in channel {ch} exceeds "
            f"profile {prof.name}'s bias limit {prof.bias_max} even at threshold 1")
    if which == "current" and r is not None and opts.ranges is not None:
        cur = ((1 << (prof.current_bits or 1) - 1) - 1) >> prof.act_shift
        raise QuantizationError(
            f"layer {name}: one step's synaptic input reaches {r.step_input[ch]:.4g} "
            f"thresholds in channel {ch} on the calibration data ({opts.ranges.source}); "
            f"profile {prof.name}'s {prof.current_bits}-bit current holds {cur} synaptic "
            f"units per step, so with margin {opts.margin:g} even threshold 1 would wrap")
    if which == "voltage" and r is not None and opts.ranges is not None:
        raise QuantizationError(
            f"layer {name}: the membrane reaches {r.v_max[ch]:.4g} thresholds in channel "
            f"{ch} over P + T = {opts.ranges.presim + opts.ranges.timesteps} steps on the "
            f"calibration data; profile {prof.name}'s {prof.voltage_bits}-bit voltage "
            f"saturates even at threshold 1 (margin {opts.margin:g}); use fewer steps")
    if which == "netx bias":
        raise QuantizationError(f"readout {name}: bias {bias[ch]:.4g} in channel {ch} does not "
                                "fit netx's 13-bit readout bias mantissa even at threshold 1")
    if which not in ("weights", "threshold range"):
        raise QuantizationError(f"layer {name}: no threshold scale >= 1 fits ({which})")
    worst = max(projs, key=lambda p: float(_row_max(real_w[p.name])[ch]))
    w = float(_row_max(real_w[worst.name])[ch])
    raise QuantizationError(
        f"layer {name}: weight {w:.4g} (in threshold units) of {worst.name} in channel "
        f"{ch} needs more than the {prof.weight_bits}-bit weights of profile "
        f"{prof.name} allow (limit {prof.weight_max} at threshold 1)")


def _k_limits(layer: IFLayer | ReadoutLayer, row_max: Array, prof: Profile,
              opts: ScaleOptions) -> dict[str, Array]:
    """Per channel (C,), the largest threshold mantissa ``K`` each limit allows."""
    unit = prof.threshold_unit
    bias = np.asarray(layer.bias, dtype=np.float64)
    c = layer.channels
    inf = np.full(c, np.inf)
    with np.errstate(divide="ignore"):
        limits = {
            "weights": np.where(row_max > 0, prof.weight_max / row_max, np.inf),
            "threshold range": np.full(c, float(prof.threshold_mant_max)),
            "bias": np.where(np.abs(bias) > 0, prof.bias_max / (np.abs(bias) * unit), np.inf),
        }
        r = opts.ranges.layers.get(layer.name) if opts.ranges is not None else None
        if r is not None:
            m = opts.margin
            if prof.current_bits is not None:
                cur = float(((1 << (prof.current_bits - 1)) - 1) >> prof.act_shift)
                limits["current"] = np.where(r.step_input > 0, cur / (r.step_input * m), inf)
            vmax = float(prof.voltage_max >> prof.act_shift)
            limits["voltage"] = np.where(r.v_max > 0, vmax / (r.v_max * m), inf)
        if opts.netx and isinstance(layer, ReadoutLayer):
            limits["netx bias"] = np.where(np.abs(bias) > 0, 4095 / (np.abs(bias) * unit), inf)
    return limits


def _mean_error(p: ProjectionT, delta: Array, mean_src: Array) -> Array:
    """Per output channel (C,), the mean over output positions of the error that weight
    errors ``delta`` (the float graph's units) add on the mean source values (*src_shape)."""
    q = dataclasses.replace(p, weight=np.asarray(delta, dtype=np.float64))
    out = apply_projection(q, torch.from_numpy(np.asarray(mean_src, np.float64))[None])
    dims = [d for d in range(out.dim()) if d != 1]
    err: Array = out.mean(dim=dims).numpy() if dims else out[0].numpy()
    return err


def _netx_fit(k: Array, layer: IFLayer, phi: float) -> Array:
    """Scale ``k`` (C,) down so the netx cut ``G_c ~ K_c (1 - phi - b_c)`` spans at most
    :data:`NETX_BIAS_SPAN` (one netx threshold per layer, 13-bit bias mantissas)."""
    g = 1.0 - phi - np.asarray(layer.bias, dtype=np.float64)
    cut = k * g
    span = float(cut.max() - cut.min())
    s = 1.0 if span <= NETX_BIAS_SPAN else NETX_BIAS_SPAN / span
    if cut.max() * s < -4090:
        s = min(s, 4090 / float(-cut.max()))
    out: Array = np.floor(k * s)
    return out


def quantize(graph: IFGraph, profile: Profile | str, per_channel: bool | None = None,
             options: ScaleOptions | None = None) -> tuple[IFGraph, QuantReport]:
    """Quantize a float IF graph; returns the integer graph and the per-layer report.

    ``options``: how the scales are chosen (:class:`ScaleOptions`; default: from the
    weights alone)."""
    opts = options or ScaleOptions()
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if graph.is_integer:
        raise QuantizationError("graph is already quantized (profile "
                                f"{graph.meta.profile}); convert from the float model")
    if per_channel is None:
        per_channel = prof.per_channel_threshold
    elif per_channel and not prof.per_channel_threshold:
        raise QuantizationError(f"profile {prof.name} allows one threshold per layer only")
    enc = graph.input.encoding
    if enc.bits > prof.input_bits:
        raise QuantizationError(f"input encoding uses {enc.bits} bits; profile {prof.name} "
                                f"takes at most {prof.input_bits}-bit input")
    in_scale = enc.scale
    unit = prof.threshold_unit
    max_input = enc.max_abs_int

    new_layers: dict[str, Layer] = {}
    new_projs: dict[str, ProjectionT] = {}
    reports: list[LayerReport] = []
    warnings: list[str] = []
    inp = graph.input
    new_layers[inp.name] = InputLayer(inp.name, inp.shape, in_scale, inp.raw_max, inp.mean,
                                      inp.std, inp.bits)
    max_src = {inp.name: float(max_input)}

    for name in graph.topological_order()[1:]:
        layer = _neuron_group(graph, name)
        projs = graph.incoming(name)
        real_w = {p.name: p.weight * (in_scale if p.src == inp.name else 1.0) for p in projs}
        c = layer.channels
        row_max = np.zeros(c)
        for p in projs:
            row_max = np.maximum(row_max, _row_max(real_w[p.name]))
        bias = np.asarray(layer.bias, dtype=np.float64)
        notes: list[str] = []
        limits = _k_limits(layer, row_max, prof, opts)
        stacked = np.stack(list(limits.values()))
        hw = np.stack([v for key, v in limits.items() if key not in CALIBRATED]).min(axis=0)
        f = opts.factor(name)
        k_all = stacked.min(axis=0) * f if f <= 1 else np.minimum(
            hw, np.stack([v for key, v in limits.items() if key in CALIBRATED]
                         + [np.full(c, np.inf)]).min(axis=0) * f)
        if isinstance(layer, IFLayer) and per_channel:
            k = np.floor(k_all)
        else:
            k = np.full(c, np.floor(float(k_all.min())))
        if isinstance(layer, IFLayer) and opts.netx:
            before = k
            k = _netx_fit(k, layer, graph.meta.phi)
            if np.any(k < before):
                notes.append("threshold lowered to fit netx's 13-bit bias mantissas")
        ch = int(np.argmin(k))
        bound = list(limits)[int(np.argmin(stacked[:, int(np.argmin(k_all))]))]
        if limits["bias"][ch] < min(limits["weights"][ch], limits["threshold range"][ch]) \
                and isinstance(layer, IFLayer):
            notes.append("threshold lowered so the bias fits")
        if np.any(k < 1):
            _refuse(name, ch, limits, bias, projs, real_w, prof, opts)
        err_num = err_den = 0.0
        w_max_int = 0
        step_bound = 0.0
        for p in projs:
            hess = (opts.ranges.hessians.get(p.name) if opts.ranges is not None
                    and opts.rounding == "gptq" else None)
            w_int = _round_weights(real_w[p.name], k, prof, hess)
            shape = (-1,) + (1,) * (w_int.ndim - 1)
            diff = w_int / k.reshape(shape) - real_w[p.name]
            err_num += float(np.sum(diff**2))
            err_den += float(np.sum(real_w[p.name] ** 2))
            if opts.bias_correction and opts.ranges is not None \
                    and p.name in opts.ranges.input_mean:
                per_unit = in_scale if p.src == inp.name else 1.0
                bias = bias - _mean_error(p, diff / per_unit, opts.ranges.input_mean[p.name])
            w_max_int = max(w_max_int, int(np.abs(w_int).max(initial=0)))
            q = dataclasses.replace(p, weight=w_int)
            new_projs[p.name] = q
            step_bound += max_abs_output(q, max_src[p.src])
        step_bound *= unit
        if isinstance(layer, IFLayer):
            v_th = (k.astype(np.int64) * unit)
            # the bias limit on K holds before bias correction; a corrected bias saturates
            b_int = np.array([prof.round_bias(_clip_bias(b * t, prof))
                              for b, t in zip(bias, v_th, strict=True)], dtype=np.int64)
            v_init = np.rint(graph.meta.phi * v_th).astype(np.int64)
            if prof.strict:
                v_init = v_init + 1
            new_layers[name] = IFLayer(name, layer.shape, v_th, v_init, b_int,
                                       layer.threshold_real, layer.reset)
            scale = layer.threshold_real / v_th
            max_src[name] = 1.0
            th_min, th_max = int(v_th.min()), int(v_th.max())
        else:
            kk = float(k[0])
            b_int = np.array([prof.round_bias(_clip_bias(b * kk * unit, prof)) for b in bias],
                             dtype=np.int64)
            new_layers[name] = ReadoutLayer(name, layer.shape, b_int, layer.scale / (kk * unit))
            scale = np.array([layer.scale / (kk * unit)])
            th_min = th_max = 0
        current_limit = (2 ** (prof.current_bits - 1) if prof.current_bits is not None
                         else prof.voltage_max)
        r = opts.ranges.layers.get(name) if opts.ranges is not None else None
        if r is None and step_bound > current_limit:
            warnings.append(
                f"layer {name}: one step's input can reach {step_bound:.3g} in the worst case, "
                f"over the profile's {current_limit} (it would "
                f"{'wrap' if prof.current_bits else 'saturate'}); the simulator and every back "
                "end model this exactly")
        reports.append(LayerReport(
            name=name, kind=("readout" if isinstance(layer, ReadoutLayer)
                             else "+".join(sorted({kind_name(p) for p in projs}))),
            shape=layer.shape, neurons=int(np.prod(layer.shape)),
            weight_bits_used=signed_bits(w_max_int / prof.weight_step),
            threshold_min=th_min, threshold_max=th_max, scale=float(np.mean(scale)),
            quant_error=math.sqrt(err_num / err_den) if err_den > 0 else 0.0,
            max_step_input=int(step_bound), notes=tuple(notes), bound=bound,
            observed_step_input=(None if r is None else
                                 int(math.ceil(float(np.max(r.step_input * k)) * unit))),
        ))

    meta = dataclasses.replace(graph.meta, profile=prof.name)
    qgraph = IFGraph(
        layers=tuple(new_layers[la.name] for la in graph.layers),
        projections=tuple(new_projs[p.name] for p in graph.projections),
        meta=meta,
    )
    check_profile(qgraph)
    return qgraph, QuantReport(prof.name, bool(per_channel), tuple(reports), tuple(warnings),
                               "weights" if opts.ranges is None else "calibrated",
                               opts.margin, opts.ranges)


def _clip_bias(value: float, prof: Profile) -> float:
    """A real bias (membrane units) saturated to the profile's representable range."""
    return float(min(max(value, -prof.bias_max), prof.bias_max))


def check_profile(graph: IFGraph) -> None:
    """Raise QuantizationError unless every integer of ``graph`` fits its profile."""
    if not graph.is_integer:
        return
    prof = get_profile(str(graph.meta.profile))
    for p in graph.projections:
        w = np.asarray(p.weight)
        if w.dtype.kind != "i":
            raise QuantizationError(f"projection {p.name}: weights are not integers")
        if w.size and (w.max() > prof.weight_max or w.min() < prof.weight_min):
            bad = int(w.max() if w.max() > prof.weight_max else w.min())
            raise QuantizationError(f"projection {p.name}: weight {bad} outside profile "
                                    f"{prof.name}'s range {prof.weight_min}..{prof.weight_max}")
        if prof.weight_step > 1 and np.any(w % prof.weight_step):
            raise QuantizationError(f"projection {p.name}: weights must be multiples of "
                                    f"{prof.weight_step} in profile {prof.name}")
        if p.weight_exp != 0 and p.weight_exp_refusal is not None:
            raise QuantizationError(f"projection {p.name}: {p.weight_exp_refusal}")
    unit = prof.threshold_unit
    for la in graph.layers:
        if isinstance(la, IFLayer):
            for f in ("v_th", "v_init", "bias"):
                if np.asarray(getattr(la, f)).dtype.kind != "i":
                    raise QuantizationError(f"layer {la.name}: {f} is not integer")
            v_th = la.v_th
            if np.any(v_th % unit) or v_th.min() < unit or v_th.max() > prof.threshold_mant_max \
                    * unit:
                raise QuantizationError(
                    f"layer {la.name}: threshold {int(v_th.max())} outside profile {prof.name}'s "
                    f"range {unit}..{prof.threshold_mant_max * unit} (step {unit})")
            if not prof.per_channel_threshold and np.any(v_th != v_th[0]):
                raise QuantizationError(f"layer {la.name}: profile {prof.name} allows one "
                                        "threshold per layer")
            if la.v_init.min() < prof.voltage_min or la.v_init.max() > prof.voltage_max:
                raise QuantizationError(f"layer {la.name}: initial membrane outside the "
                                        f"{prof.voltage_bits}-bit voltage range")
        if isinstance(la, (IFLayer, ReadoutLayer)):
            for b in np.asarray(la.bias).tolist():
                if not prof.bias_representable(int(b)):
                    raise QuantizationError(f"layer {la.name}: bias {b} is not representable "
                                            f"in profile {prof.name} (limit {prof.bias_max})")
    lo, hi = graph.input.encoding.int_range
    if max(abs(lo), abs(hi)) > 2 ** (prof.input_bits - 1) * (1 if lo < 0 else 2) - 1:
        raise QuantizationError(f"input range {lo}..{hi} does not fit profile {prof.name}'s "
                                f"{prof.input_bits}-bit input")
