"""The fold check: the folded float IF graph against the user's own model (SPEC 4b).

:func:`check_fold` runs the user's torch model itself (eval mode, ``no_grad``, ANN
mode ``T = 0``; in float64 on a deep copy where the model allows it, else as it
is, in float32) on calibration inputs, with forward hooks on the modules the
activations were captured from (each :class:`~csqcfs_deploy.ir.ann.ActOp` node's
``origin``), and evaluates the float IF graph on the same inputs. Nothing of the
capture or the folding is reused on the model's side: a threshold read wrongly,
a BatchNorm merged wrongly or a synapse scaled wrongly shows up as a difference.

Units: the graph's counts ``c`` (0..L per neuron, threshold 1 after threshold
scaling) stand for ``c * lambda_c / L`` in the model's units, so the model's
activation output ``h`` is compared as ``h * L / lambda_c`` (levels), with
``lambda_c`` the graph's ``threshold_real``.

Per layer the graph is evaluated **teacher-forced**: every layer gets, as the
input from its sources, the model's own outputs of those layers (converted to
counts as above), so a difference is the layer's own and the first diverging
layer is where the conversion went wrong. The readout is compared the same way
(its logits, relative to the sample's largest logit). The **free-running** graph
(its own counts all the way) gives the end-to-end figure
:attr:`FoldCheck.matches_model`: how often its argmax equals the model's.

Tolerance (:data:`TOLERANCES`): a value *differs* when it is off by more than
``1e-6`` levels (float64; ``1e-3`` when the model ran in float32). Float rounding
can only move a value across a floor boundary, i.e. by one level, and only when
it lies within rounding error of the boundary; so a layer **diverges** when more
than 0.1 % of its values differ, or any value is off by more than one level. The
readout diverges when a logit is off by more than ``1e-6`` (float32: ``1e-3``) of
the sample's largest logit, or when the free-running argmax agrees on fewer than
99.9 % (float32: 99 %) of the samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from csqcfs_deploy.convert.activation import ann_mode
from csqcfs_deploy.convert.fold import FoldResult
from csqcfs_deploy.errors import FoldMismatch, GraphError
from csqcfs_deploy.ir import IFGraph, IFLayer
from csqcfs_deploy.ir.kinds.generic import apply_projection
from csqcfs_deploy.ir.neuron import if_count, per_channel

#: Calibration samples a command checks on (at most).
DEFAULT_SAMPLES = 256
BATCH = 64


@dataclass(frozen=True)
class Tolerance:
    """What float rounding at floor boundaries can explain (module docstring)."""

    levels: float          # a value differs when off by more than this many levels
    max_share: float       # at most this share of a layer's values may differ,
    max_levels: float      # each by at most this many levels
    readout_rel: float     # readout logits, relative to the sample's largest |logit|
    min_agreement: float   # free-running argmax agreement with the model

    def to_json(self) -> dict[str, float]:
        return {"levels": self.levels, "max_share": self.max_share,
                "max_levels": self.max_levels, "readout_rel": self.readout_rel,
                "min_agreement": self.min_agreement}


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(levels=1e-6, max_share=1e-3, max_levels=1.0, readout_rel=1e-6,
                         min_agreement=0.999),
    "float32": Tolerance(levels=1e-3, max_share=1e-3, max_levels=1.0, readout_rel=1e-3,
                         min_agreement=0.99),
}


@dataclass(frozen=True)
class LayerCheck:
    """One IF layer: the graph's counts against the model's activation output.

    ``observed`` is False when the model's output of that layer could not be
    hooked (``note`` says why); then nothing was compared.
    """

    name: str
    origin: str
    levels: int
    elements: int
    differing: int
    max_levels: float          # the largest deviation, in levels (lambda / L)
    observed: bool
    tolerance: Tolerance
    note: str = ""

    @property
    def share(self) -> float:
        """Share of values that differ by more than float tolerance."""
        return self.differing / self.elements if self.elements else 0.0

    @property
    def max_threshold(self) -> float:
        """The largest deviation relative to the layer's threshold (levels / L)."""
        return self.max_levels / self.levels

    @property
    def diverges(self) -> bool:
        if not self.observed:
            return False
        t = self.tolerance
        return (self.differing > t.max_share * self.elements
                or self.max_levels > t.max_levels + t.levels)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "origin": self.origin, "observed": self.observed,
                "elements": self.elements, "differing": self.differing, "share": self.share,
                "max_levels": self.max_levels, "max_threshold": self.max_threshold,
                "diverges": self.diverges, "note": self.note}


@dataclass(frozen=True)
class ReadoutCheck:
    """The readout: teacher-forced logits and the free-running argmax agreement."""

    name: str
    origin: str
    max_rel_diff: float        # max over samples of max |logit diff| / max |model logit|
    agreement: float           # free-running graph argmax == model argmax (fraction)
    tolerance: Tolerance

    @property
    def diverges(self) -> bool:
        return (self.max_rel_diff > self.tolerance.readout_rel
                or self.agreement < self.tolerance.min_agreement)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "origin": self.origin, "max_rel_diff": self.max_rel_diff,
                "agreement": self.agreement, "diverges": self.diverges}


@dataclass(frozen=True)
class FoldCheck:
    """The folded float graph against the model on ``samples`` calibration inputs."""

    samples: int
    dtype: str                 # "float64" or "float32": how the model ran
    source: str                # where the inputs came from ("digits training split")
    layers: tuple[LayerCheck, ...]
    readout: ReadoutCheck

    @property
    def matches_model(self) -> float:
        """Share of samples on which the float graph's argmax is the model's."""
        return self.readout.agreement

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]

    @property
    def first_divergence(self) -> str | None:
        """The first diverging layer (topological order), the readout last; None if none."""
        bad = self.first_diverging
        return None if bad is None else bad.name

    @property
    def first_diverging(self) -> LayerCheck | ReadoutCheck | None:
        for la in self.layers:
            if la.diverges:
                return la
        return self.readout if self.readout.diverges else None

    @property
    def diverging_layers(self) -> tuple[str, ...]:
        names = [la.name for la in self.layers if la.diverges]
        return (*names, self.readout.name) if self.readout.diverges else tuple(names)

    @property
    def max_levels(self) -> float:
        """The largest deviation of any observed layer, in levels."""
        return max((la.max_levels for la in self.layers if la.observed), default=0.0)

    @property
    def unobserved(self) -> tuple[str, ...]:
        return tuple(la.name for la in self.layers if not la.observed)

    @property
    def samples_text(self) -> str:
        """``256 calibration samples (float64, digits training split)``."""
        where = f", {self.source}" if self.source else ""
        return f"{self.samples} calibration samples ({self.dtype}{where})"

    def summary(self) -> str:
        """``folded graph vs model: 100.00 % agreement on 256 calibration samples
        (float64, digits training split), max deviation 0 levels``."""
        dev = self.max_levels
        dev_text = "0 levels" if dev <= self.tolerance.levels else f"{dev:.3g} levels"
        differing = sum(la.differing for la in self.layers)
        if differing:
            total = sum(la.elements for la in self.layers if la.observed)
            dev_text += f" ({differing} of {total} values)"
        text = (f"folded graph vs model: {100 * self.matches_model:.2f} % agreement on "
                f"{self.samples_text}, max deviation {dev_text}")
        if self.unobserved:
            text += f"; not observed: {', '.join(self.unobserved)}"
        return text

    def message(self) -> str:
        """The one-line error for a diverging check (empty when it matches)."""
        bad = self.first_diverging
        if bad is None:
            return ""
        where = f"first divergence at layer '{bad.name}' (module '{bad.origin or '?'}')"
        agree = f"argmax agrees on {100 * self.matches_model:.2f} % of {self.samples_text}"
        if isinstance(bad, LayerCheck):
            return (f"folded graph does not match the model: {where}: "
                    f"{100 * bad.share:.1f} % of outputs differ (max "
                    f"{bad.max_threshold:.2f} threshold); {agree}; the activation was "
                    "probably not recognised correctly (its threshold, levels or shift), "
                    "or a synapse into it was folded wrongly")
        return (f"folded graph does not match the model: {where}: logits differ by up to "
                f"{100 * bad.max_rel_diff:.3g} % of the largest; {agree}; the readout or a "
                "synapse into it was folded wrongly")

    def to_json(self) -> dict[str, object]:
        return {"samples": self.samples, "dtype": self.dtype, "source": self.source,
                "matches_model": self.matches_model,
                "first_divergence": self.first_divergence, "max_levels": self.max_levels,
                "tolerance": self.tolerance.to_json(),
                "layers": [la.to_json() for la in self.layers],
                "readout": self.readout.to_json()}


# --------------------------------------------------------------------------- the model


@dataclass
class _Hooks:
    """The outputs of the hooked modules, per module in call order, for one batch."""

    outputs: dict[str, list[torch.Tensor]]

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self.outputs[name].append(out.detach().to("cpu", torch.float64))
        return record


@contextmanager
def _hooked(model: nn.Module, origins: list[str]) -> Iterator[_Hooks]:
    modules = dict(model.named_modules())
    hooks = _Hooks({name: [] for name in origins if name and name in modules})
    handles = [modules[name].register_forward_hook(hooks.hook(name)) for name in hooks.outputs]
    try:
        yield hooks
    finally:
        for h in handles:
            h.remove()


def _float64_copy(model: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(model).double().eval()
    except Exception:  # noqa: BLE001 - a model that cannot be copied runs as it is
        return None


class _ModelRunner:
    """Runs the user's model batch by batch, in float64 where it allows it."""

    def __init__(self, model: nn.Module, origins: list[str], float64: bool) -> None:
        self.original = model
        self.origins = origins
        self.candidates: list[tuple[nn.Module, torch.dtype]] = []
        double = _float64_copy(model) if float64 else None
        if double is not None:
            self.candidates.append((double, torch.float64))
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.candidates.append((model, dtype))

    @property
    def dtype_name(self) -> str:
        return "float64" if self.candidates[0][1] == torch.float64 else "float32"

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The model's output and hooked outputs on ``x``; settles the dtype on first use."""
        while True:
            module, dtype = self.candidates[0]
            try:
                return self._run(module, dtype, x)
            except Exception as exc:  # noqa: BLE001 - the user's forward may fail in float64
                if len(self.candidates) == 1:
                    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise GraphError(f"the model's own forward fails on the calibration "
                                     f"inputs ({type(exc).__name__}: {text[:160]})") from None
                self.candidates.pop(0)

    def _run(self, module: nn.Module, dtype: torch.dtype, x: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = module.training
        module.eval()
        try:
            with _hooked(module, self.origins) as hooks, ann_mode(module), torch.no_grad():
                out = module(x.to(device, dtype))
        finally:
            module.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise GraphError("the model does not return a single tensor")
        return out.detach().to("cpu", torch.float64), hooks.outputs


# --------------------------------------------------------------------------- the graph


def _evaluate(graph: IFGraph, x: torch.Tensor, forced: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The float graph in ANN mode on real input x: each layer's own counts, the logits.

    A layer named in ``forced`` passes those counts on to its consumers instead of
    its own (teacher forcing).
    """
    levels = int(graph.meta.levels)
    passed: dict[str, torch.Tensor] = {graph.input.name: x * levels}
    own: dict[str, torch.Tensor] = {}
    logits: torch.Tensor | None = None
    for name in graph.topological_order()[1:]:
        layer = graph.neuron_group(name)
        acc: torch.Tensor | None = None
        for p in graph.incoming(name):
            part = apply_projection(p, passed[p.src])
            acc = part if acc is None else acc + part
        if acc is None:
            raise GraphError(f"layer {name} has no incoming projection")
        bias = per_channel(layer.bias, acc.dim(), torch.float64)
        if isinstance(layer, IFLayer):
            z = per_channel(layer.v_init, acc.dim(), torch.float64) + acc + levels * bias
            own[name] = if_count(z, per_channel(layer.v_th, acc.dim(), torch.float64), levels,
                                 None)
            passed[name] = forced.get(name, own[name])
        else:
            logits = (acc + levels * bias) * layer.scale / levels
    if logits is None:
        raise GraphError("the graph has no readout")
    return own, logits


@dataclass
class _LayerStats:
    elements: int = 0
    differing: int = 0
    max_levels: float = 0.0
    note: str = ""


def _origins(fold_result: FoldResult) -> dict[str, str]:
    """IF layer name -> the module (qualified name) its activation came from."""
    return {n.name: n.origin for n in fold_result.folded.nodes}


def _observed(graph: IFGraph, origin: dict[str, str], outputs: dict[str, list[torch.Tensor]],
              batch: int, notes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The model's output of each IF layer whose module was hooked, as the graph's counts."""
    by_origin: dict[str, list[IFLayer]] = {}
    for la in graph.if_layers:
        by_origin.setdefault(origin.get(la.name, ""), []).append(la)
    levels = int(graph.meta.levels)
    found: dict[str, torch.Tensor] = {}
    for name, layers in by_origin.items():
        calls = outputs.get(name)
        if calls is None:
            why = f"no module named {name!r} in the model" if name else "no module of its own"
            for la in layers:
                notes[la.name] = why
            continue
        if len(calls) != len(layers):
            for la in layers:
                notes[la.name] = (f"module {name!r} ran {len(calls)} times for "
                                  f"{len(layers)} layers")
            continue
        for la, h in zip(layers, calls, strict=True):
            if tuple(h.shape) != (batch, *la.shape):
                notes[la.name] = (f"module {name!r} returns {tuple(h.shape[1:])}, the layer "
                                  f"is {la.shape}")
                continue
            lam = per_channel(la.threshold_real, h.dim(), torch.float64)
            found[la.name] = h * levels / lam
    return found


def check_fold(model: nn.Module, fold_result: FoldResult, x: npt.NDArray[Any] | torch.Tensor,
               source: str = "", float64: bool = True,
               raise_on_mismatch: bool = True, batch_size: int = BATCH) -> FoldCheck:
    """Compare ``fold_result.graph`` with ``model`` on normalised real inputs ``x``
    (N, *input_shape); raise :class:`FoldMismatch` when they diverge (module docstring).

    ``float64=False`` runs the model as it is (its own dtype) instead of a float64 copy.
    """
    graph = fold_result.graph
    if graph.is_integer:
        raise GraphError("the fold check takes the float IF graph, not a quantized one")
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if xt.dim() < 2 or len(xt) == 0:
        raise GraphError("the fold check needs at least one calibration sample")
    if tuple(xt.shape[1:]) != graph.input.shape:
        raise GraphError(f"calibration inputs have shape {tuple(xt.shape[1:])}, the graph "
                         f"takes {graph.input.shape}")
    origin = _origins(fold_result)
    readout = graph.readout
    readout_origin = origin.get(fold_result.folded.output, "")
    runner = _ModelRunner(model, sorted({origin.get(la.name, "") for la in graph.if_layers}),
                          float64)
    stats = {la.name: _LayerStats() for la in graph.if_layers}
    notes: dict[str, str] = {}
    agree, rel = 0, 0.0
    for i in range(0, len(xt), batch_size):
        xb = xt[i : i + batch_size]
        out, hooked = runner(xb)
        tol = TOLERANCES[runner.dtype_name]
        forced = _observed(graph, origin, hooked, len(xb), notes)
        x64 = xb.to(torch.float64)
        free, free_logits = _evaluate(graph, x64, {})
        # where the free-running graph already meets every observed layer, teacher
        # forcing would feed it the same values: the free run is the forced run
        own, logits = free, free_logits
        if any(float((free[n] - ref).abs().max()) > tol.levels for n, ref in forced.items()):
            own, logits = _evaluate(graph, x64, forced)
        for name, ref in forced.items():
            dev = (own[name] - ref).abs()
            s = stats[name]
            s.elements += dev.numel()
            s.differing += int((dev > tol.levels).sum())
            s.max_levels = max(s.max_levels, float(dev.max()) if dev.numel() else 0.0)
        if out.shape != logits.shape:
            raise GraphError(f"the model returns {tuple(out.shape[1:])}, the graph's readout "
                             f"is {readout.shape}")
        scale = out.abs().amax(dim=1).clamp_min(1e-12)
        rel = max(rel, float(((logits - out).abs().amax(dim=1) / scale).max()))
        agree += int((free_logits.argmax(1) == out.argmax(1)).sum())
    dtype = runner.dtype_name
    tol = TOLERANCES[dtype]
    layers = tuple(
        LayerCheck(name, origin.get(name, ""), int(graph.meta.levels), stats[name].elements,
                   stats[name].differing, stats[name].max_levels, name not in notes, tol,
                   notes.get(name, ""))
        for name in graph.topological_order() if name in stats)
    result = FoldCheck(len(xt), dtype, source, layers,
                       ReadoutCheck(readout.name, readout_origin, rel, agree / len(xt), tol))
    if raise_on_mismatch and result.first_diverging is not None:
        exc = FoldMismatch(result.message())
        exc.check = result
        raise exc
    return result


__all__ = ["DEFAULT_SAMPLES", "TOLERANCES", "FoldCheck", "LayerCheck", "ReadoutCheck",
           "Tolerance", "check_fold"]
