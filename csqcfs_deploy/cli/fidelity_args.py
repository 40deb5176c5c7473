"""The calibration and fidelity-gate options, and the fidelity lines every command prints first.

``--scales calibrated|weights``, ``--calibration-margin``, ``--optimize``: how a
network's integer scales are chosen (:class:`~csqcfs_deploy.run.calibration.CalibrationPlan`,
for the command's ``--timesteps``/``--presim``). ``--min-agreement`` and
``--min-source-agreement``: the gates (:class:`~csqcfs_deploy.run.fidelity.Gates`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console

from csqcfs_deploy.cli.arg_types import float_in, percent
from csqcfs_deploy.cli.model_io import LoadedModel, warn
from csqcfs_deploy.convert.quantize import DEFAULT_MARGIN
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.calibration import CalibrationPlan
from csqcfs_deploy.run.evaluation import EvalSummary
from csqcfs_deploy.run.fidelity import DEFAULT_MIN_AGREEMENT, Fidelity, Gates, measure

SCALES = ("calibrated", "weights")
ROUNDINGS = ("nearest", "gptq")


def add_scale_args(p: argparse.ArgumentParser, rounding: str = "nearest") -> None:
    """How a network's integer scales are chosen (every command that quantizes one);
    ``rounding``: the command's default ``--rounding``."""
    p.add_argument("--scales", choices=SCALES, default="calibrated",
                   help="calibrated (default): per-layer scales from the ranges the float SNN "
                   "reaches on the calibration samples at --timesteps/--presim, so that no "
                   "current wraps and the readout does not saturate; weights: from the "
                   "weights alone (the uncalibrated choice)")
    p.add_argument("--calibration-margin", type=float_in(1.0), default=DEFAULT_MARGIN,
                   metavar="M",
                   help=f"headroom over the calibrated ranges (default {DEFAULT_MARGIN:g})")
    p.add_argument("--rounding", choices=ROUNDINGS, default=rounding,
                   help="how weights are rounded: nearest, or gptq: error-compensating from "
                   f"the calibration inputs' second moments (slower); default {rounding}")
    p.add_argument("--optimize", action="store_true",
                   help="try a few scales per layer and keep the best agreement with the "
                   "float IF graph on the calibration samples (prints what it tried)")


def add_gate_args(p: argparse.ArgumentParser) -> None:
    """The fidelity gates (exit 9 when one fails)."""
    p.add_argument("--min-agreement", type=percent, default=DEFAULT_MIN_AGREEMENT, metavar="PCT",
                   help="least quantization fidelity (integer SNN vs float IF graph), percent; "
                   f"exit 9 below it (default {DEFAULT_MIN_AGREEMENT:g})")
    p.add_argument("--min-source-agreement", type=percent, default=None, metavar="PCT",
                   help="least agreement of the integer SNN with your float ANN, percent "
                   "(default: not gated)")


def _largest(value: object, default: int) -> int:
    """An int option, or the largest of a comma-separated list (``sweep -T 1,2,4``)."""
    if value is None:
        return default
    if isinstance(value, tuple):  # sweep's lists, parsed (cli.arg_types.step_list)
        return max(value, default=default)
    if isinstance(value, str):
        try:
            return max(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            return default  # the command's own parser reports the bad list
    return int(value)  # type: ignore[call-overload]


def plan_from_args(args: argparse.Namespace) -> CalibrationPlan:
    """The calibration plan of parsed arguments: T and P from --timesteps/--presim (the
    largest of a list: a sweep calibrates for its longest run)."""
    return CalibrationPlan(
        timesteps=max(1, _largest(getattr(args, "timesteps", 1), 1)),
        presim=max(0, _largest(getattr(args, "presim", 0), 0)),
        margin=float(getattr(args, "calibration_margin", DEFAULT_MARGIN)),
        enabled=getattr(args, "scales", "calibrated") == "calibrated",
        netx=getattr(args, "target", None) == "lava-netx",
        optimize=bool(getattr(args, "optimize", False)),
        rounding=str(getattr(args, "rounding", "nearest")),
        progress=not getattr(args, "json", False) and sys.stderr.isatty())


def gates_from_args(args: argparse.Namespace) -> Gates:
    return Gates(getattr(args, "min_agreement", DEFAULT_MIN_AGREEMENT),
                 getattr(args, "min_source_agreement", None))


def fidelity_of(args: argparse.Namespace, loaded: LoadedModel, raw: npt.NDArray[Any],
                labels: npt.NDArray[np.integer[Any]], cfg: RunConfig,
                snn: EvalSummary | None = None) -> Fidelity:
    """The fidelity of the loaded graph on these samples; warns when an ``.ifg`` runs
    longer than its scales were calibrated for."""
    rec = loaded.graph.meta.calibration
    if loaded.fold is None and rec is not None and cfg.presim + cfg.timesteps > rec.steps:
        warn(f"{loaded.source} was calibrated for P + T = {rec.steps} steps (T {rec.timesteps}, "
             f"P {rec.presim}); this run takes {cfg.presim + cfg.timesteps}: the readout may "
             "saturate (see the overflow line); convert again with these --timesteps/--presim")
    elif loaded.fold is None and rec is None and loaded.graph.is_integer:
        warn(f"{loaded.source} has uncalibrated scales; its readout may saturate")
    why = ("MODEL is an IF graph file without its float graph; convert measured "
           f"{100 * rec.fidelity:.2f} % at T = {rec.timesteps}, P = {rec.presim}"
           if rec is not None else "MODEL is an IF graph file without its float graph")
    return measure(loaded.graph, raw, labels, cfg, float_graph=loaded.float_graph,
                   model=loaded.model,
                   encoding=None if loaded.config is None else loaded.config.encoding,
                   gates=gates_from_args(args), snn=snn, not_measured=why,
                   progress=not getattr(args, "json", False) and sys.stderr.isatty())


def print_fidelity(fid: Fidelity, con: Console) -> None:
    """The fidelity lines on ``con`` (what every command prints first)."""
    for line in fid.lines():
        con.print(line)
