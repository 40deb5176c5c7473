"""Calibrated quantization with a measured check, and the ``--optimize`` search (SPEC 4b).

:func:`calibrated_quantize`:

1. runs the float IF graph on the calibration samples at the intended ``T`` and
   ``P`` (:func:`~csqcfs_deploy.convert.calibrate.float_run`) and records the
   ranges each layer reaches;
2. quantizes with scales chosen from those ranges
   (:class:`~csqcfs_deploy.convert.quantize.ScaleOptions`, headroom ``margin``);
3. runs the integer simulator on the same samples (synchronous, same ``T``, ``P``)
   and, while any layer's current wrapped or the readout saturated, halves the
   scale of those layers and quantizes again (at most :data:`MAX_ROUNDS` rounds);
   what is left is reported, never hidden;
4. with ``optimize``, tries for each layer in turn the scale factors
   :data:`CANDIDATES` (headroom 1, 2 and 4 at the default margin 2) and keeps the
   one with the best agreement with the float IF graph on the calibration
   samples (ties keep the default), showing a progress bar and returning the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from csqcfs_deploy.convert.calibrate import Ranges, float_run, integer_input
from csqcfs_deploy.convert.quantize import (
    DEFAULT_MARGIN,
    QuantReport,
    ScaleOptions,
    quantize,
)
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.evaluation import EvalSummary, evaluate

MAX_ROUNDS = 6
#: ``--optimize``'s per-layer factors on the calibrated scale (x2: headroom 1 at margin 2).
CANDIDATES = (2.0, 1.0, 0.5)


@dataclass(frozen=True)
class CalibrationPlan:
    """What to calibrate for: ``timesteps`` T and ``presim`` P of the intended runs,
    the headroom ``margin``, ``netx`` (fit lava-dl netx too), ``optimize`` (the
    search); ``enabled=False`` keeps the weight-only scales (``--scales weights``)."""

    timesteps: int = 1
    presim: int = 0
    margin: float = DEFAULT_MARGIN
    enabled: bool = True
    netx: bool = False
    optimize: bool = False
    progress: bool = False
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise UsageError(f"--timesteps must be >= 1, got {self.timesteps}")
        if self.presim < 0:
            raise UsageError(f"--presim must be >= 0, got {self.presim}")
        if not self.margin >= 1.0:
            raise UsageError(f"--calibration-margin must be >= 1, got {self.margin}")

    @property
    def config(self) -> RunConfig:
        return RunConfig(self.timesteps, self.presim, "synchronous")


@dataclass(frozen=True)
class Trial:
    """One ``--optimize`` candidate: layer, factor, calibration fidelity, overflow."""

    layer: str
    factor: float
    fidelity: float
    wrapped: int
    readout_saturated: int
    kept: bool = False

    def to_json(self) -> dict[str, object]:
        return {"layer": self.layer, "factor": self.factor, "fidelity": self.fidelity,
                "wrapped": self.wrapped, "readout_saturated": self.readout_saturated,
                "kept": self.kept}


@dataclass(frozen=True)
class Calibrated:
    """The result: the ranges, the final scale options, the rounds of the measured check
    (layers whose scale was halved, per round), the calibration-set fidelity and the
    integer run's overflow counters on it, and the ``--optimize`` trials."""

    ranges: Ranges
    options: ScaleOptions
    rounds: tuple[tuple[str, ...], ...]
    fidelity: float
    wrapped: dict[str, int]
    saturated: dict[str, int]
    trials: tuple[Trial, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {"ranges": self.ranges.to_json(), "margin": self.options.margin,
                "factors": [list(f) for f in self.options.factors],
                "halved": [list(r) for r in self.rounds], "fidelity": self.fidelity,
                "wrapped": self.wrapped, "saturated": self.saturated,
                "trials": [t.to_json() for t in self.trials]}


def _overflow(s: EvalSummary) -> tuple[dict[str, int], dict[str, int]]:
    return dict(s.layer_wrapped or {}), dict(s.layer_saturated or {})


def _simulate(graph: IFGraph, raw: npt.NDArray[Any], cfg: RunConfig) -> EvalSummary:
    return evaluate("int", graph, raw, np.zeros(len(raw), dtype=np.int64), cfg, progress=False)


def calibrated_quantize(float_graph: IFGraph, profile: Profile, per_channel: bool | None,
                        raw: npt.NDArray[Any], source: str, plan: CalibrationPlan
                        ) -> tuple[IFGraph, QuantReport, Calibrated]:
    """Quantize ``float_graph`` with scales calibrated on raw samples (N, *shape)."""
    cfg = plan.config
    ref = float_run(float_graph, integer_input(float_graph, raw), cfg, source,
                    second_moments=plan.rounding == "gptq")
    opts = ScaleOptions(ranges=ref.ranges, margin=plan.margin, netx=plan.netx,
                        rounding=plan.rounding)
    readout = float_graph.readout.name
    rounds: list[tuple[str, ...]] = []

    def attempt(o: ScaleOptions) -> tuple[IFGraph, QuantReport, EvalSummary]:
        g, rep = quantize(float_graph, profile, per_channel, o)
        return g, rep, _simulate(g, raw, cfg)

    graph, report, summary = attempt(opts)
    for _ in range(MAX_ROUNDS):
        wrapped, saturated = _overflow(summary)
        bad = tuple(k for k, v in wrapped.items() if v) + (
            (readout,) if saturated.get(readout, 0) and not wrapped.get(readout, 0) else ())
        if not bad:
            break
        rounds.append(bad)
        opts = opts.scaled(bad, 0.5)
        graph, report, summary = attempt(opts)
    trials: list[Trial] = []
    if plan.optimize:
        graph, report, summary, opts, trials = _search(float_graph, profile, per_channel,
                                                       raw, cfg, ref.predictions, opts,
                                                       (graph, report, summary), plan)
    wrapped, saturated = _overflow(summary)
    fid = float((summary.predictions == ref.predictions).mean())
    return graph, report, Calibrated(ref.ranges, opts, tuple(rounds), fid, wrapped,
                                     saturated, tuple(trials))


def _score(s: EvalSummary, ref: npt.NDArray[np.int64], readout: str) -> tuple[float, int, int]:
    wrapped, saturated = _overflow(s)
    return (float((s.predictions == ref).mean()), sum(wrapped.values()),
            int(saturated.get(readout, 0)))


def _search(float_graph: IFGraph, profile: Profile, per_channel: bool | None,
            raw: npt.NDArray[Any], cfg: RunConfig, ref: npt.NDArray[np.int64],
            opts: ScaleOptions, best: tuple[IFGraph, QuantReport, EvalSummary],
            plan: CalibrationPlan
            ) -> tuple[IFGraph, QuantReport, EvalSummary, ScaleOptions, list[Trial]]:
    """Greedy, layer by layer: keep the factor with the best calibration fidelity (no
    wrap and no readout saturation first); ties keep the current one."""
    readout = float_graph.readout.name
    layers = float_graph.topological_order()[1:]
    trials: list[Trial] = []
    bar = tqdm(total=len(layers) * len(CANDIDATES), desc="optimize scales", unit="try",
               disable=not plan.progress, leave=False)
    graph, report, summary = best
    best_score = _score(summary, ref, readout)
    for name in layers:
        base = opts.factor(name)
        kept_factor = base
        for f in CANDIDATES:
            bar.update(1)
            factor = min(base * f, opts.margin)
            if factor == base:
                fid, w, sat = best_score
                trials.append(Trial(name, factor, fid, w, sat))
                continue
            cand = opts.with_factor(name, factor)
            g, rep = quantize(float_graph, profile, per_channel, cand)
            s = _simulate(g, raw, cfg)
            score = _score(s, ref, readout)
            trials.append(Trial(name, factor, *score))
            if (score[1] + score[2] == 0, score[0]) > (best_score[1] + best_score[2] == 0,
                                                         best_score[0]):
                graph, report, summary, best_score = g, rep, s, score
                kept_factor = factor
        opts = opts.with_factor(name, kept_factor)
        trials = [Trial(t.layer, t.factor, t.fidelity, t.wrapped, t.readout_saturated,
                        t.layer == name and t.factor == kept_factor) if t.layer == name else t
                  for t in trials]
    bar.close()
    return graph, report, summary, opts, trials
