"""``csqcfs-deploy convert``: fold and quantize a network into an IF graph file.

The scales are calibrated for ``--timesteps``/``--presim`` on the calibration
samples (:mod:`csqcfs_deploy.run.calibration`). Printed first: the two fidelity
figures on the test split at that ``T``, ``P`` (:mod:`csqcfs_deploy.run.fidelity`;
``--json``: ``fidelity``), then the fold check (``fold_check``; its argmax
agreement also as ``check.folded_matches_model``) and the per-layer table. A
failed fidelity gate writes no file and exits 9.

MODEL may also be a float NIR graph from another tool (``--source-semantics``; see
:mod:`csqcfs_deploy.cli.nir_import`): it is quantized the same way, its float IF graph
(with that neuron rule) standing in for the folded network (``--json``: ``nir_import``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_json_arg,
    add_model_args,
    console,
    print_json,
    resolve_dataset,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.commands.run import add_run_args
from csqcfs_deploy.cli.dataset_args import DatasetMismatch
from csqcfs_deploy.cli.fidelity_args import (
    add_gate_args,
    add_scale_args,
    fidelity_of,
    gates_from_args,
    print_fidelity,
)
from csqcfs_deploy.cli.model_io import warn
from csqcfs_deploy.convert.check import FoldCheck
from csqcfs_deploy.convert.quantize import QuantReport
from csqcfs_deploy.errors import DatasetError, FidelityGateFailed, UsageError
from csqcfs_deploy.files import check_output
from csqcfs_deploy.ir import IFGraph, InputEncoding, save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.calibration import Calibrated
from csqcfs_deploy.run.fidelity import Fidelity
from csqcfs_deploy.run.reference import ann_forward, input_units


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="fold + quantize a network into an IF graph (.ifg)",
                       description="Fold (BN merge, threshold scaling, pooling) and quantize a "
                       "trained network (or a float NIR graph) to a hardware profile; print the "
                       "per-layer table and "
                       "the float-vs-quantized agreement on the test split.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("-o", "--output", required=True, help="IF graph file to write (.ifg)")
    p.add_argument("--no-check", action="store_true",
                   help="skip measuring fidelity and agreement on the test split (the "
                   "gates then cannot hold: not advised)")
    add_run_args(p)
    add_scale_args(p)
    add_gate_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Agreement:
    """The float network, its folded graph and the quantized graph on ``samples``
    test samples: accuracies and how often the predictions agree (fractions)."""

    samples: int
    float_accuracy: float
    quantized_accuracy: float
    agreement: float                 # quantized ANN == folded float graph
    folded_matches_model: float      # folded float graph == the network itself (the fold
                                     # check's figure, on the calibration samples)

    def to_json(self) -> dict[str, object]:
        return {"samples": self.samples, "float_accuracy": self.float_accuracy,
                "quantized_accuracy": self.quantized_accuracy, "agreement": self.agreement,
                "folded_matches_model": self.folded_matches_model}


@dataclass(frozen=True)
class ConvertSummary:
    """What ``convert --json`` prints: the quantization report, the file written, the
    folding passes applied (pass -> count), the agreement check (or why not) and the
    fold check (None with --no-fold-check)."""

    report: QuantReport
    output: str
    passes: dict[str, int]
    check: Agreement | str | None
    fold_check: FoldCheck | None = None
    fidelity: Fidelity | None = None
    calibration: Calibrated | None = None
    nir_import: dict[str, object] | None = None  # a float NIR graph: its semantics, folds

    def to_json(self) -> dict[str, object]:
        check = self.check.to_json() if isinstance(self.check, Agreement) else self.check
        return {"fidelity": None if self.fidelity is None else self.fidelity.to_json(),
                **self.report.to_json(), "output": self.output, "passes": self.passes,
                "nir_import": self.nir_import,
                "check": check,
                "fold_check": None if self.fold_check is None else self.fold_check.to_json(),
                "calibrated": None if self.calibration is None
                else self.calibration.to_json()}


def agreement(model: nn.Module, encoding: InputEncoding, float_graph: IFGraph,
              graph: IFGraph, raw: NDArray[Any], labels: NDArray[np.integer[Any]],
              fold_check: FoldCheck | None = None) -> Agreement:
    """Float ANN vs quantized ANN (integer, ANN mode) on raw samples (N, *input_shape).

    ``folded_matches_model`` is the fold check's (calibration samples) where there is
    one, else measured on these samples."""
    f_pred = ann_forward(float_graph, input_units(float_graph, raw)).predictions
    q_pred = ann_forward(graph, input_units(graph, raw)).predictions
    with torch.no_grad():
        x = torch.from_numpy(encoding.normalize(raw))
        m_pred = model(x).argmax(1).numpy()
    return Agreement(
        samples=int(len(labels)),
        float_accuracy=float((m_pred == labels).mean()),
        quantized_accuracy=float((q_pred == labels).mean()),
        agreement=float((q_pred == f_pred).mean()),
        folded_matches_model=(fold_check.matches_model if fold_check is not None
                              else float((f_pred == m_pred).mean())),
    )


def run(args: argparse.Namespace) -> int:
    check_output(args.output, "IF graph")  # before the work, not after it
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    gates_from_args(args)  # a bad --min-agreement fails before the work
    loaded = resolve_model(args)
    report, float_graph = loaded.report, loaded.float_graph
    model, config = loaded.model, loaded.config
    if report is None or float_graph is None or model is None or config is None:
        raise UsageError(f"{args.model} is already an IF graph; convert takes a trained network "
                         "(or a float NIR graph; give --profile to quantize a plain one)")
    check: Agreement | str | None = None
    fid: Fidelity | None = None
    if not args.no_check:
        try:
            ds = resolve_dataset(args, loaded)
            if ds.input_shape != loaded.graph.input.shape:
                raise DatasetError(f"dataset {ds.name} has shape {ds.input_shape}")
            n = len(ds.y_test) if args.samples is None else args.samples
            if n < 1:
                raise UsageError(f"--samples must be >= 1, got {n}")
            raw, labels = ds.x_test[:n], ds.y_test[:n]
            cfg = RunConfig(args.timesteps, args.presim)
            fid = fidelity_of(args, loaded, raw, labels, cfg)
            check = agreement(model, config.encoding, float_graph, loaded.graph, raw, labels,
                              loaded.fold_check)
        except DatasetMismatch:
            raise  # data that does not fit the model is an error, not a skipped check
        except DatasetError as exc:
            check = f"not measured: {exc}"
    passed = fid is not None and fid.passed
    if passed:
        save_graph(loaded.graph, args.output)
    summary = ConvertSummary(report, args.output if passed else "", loaded.passes, check,
                             loaded.fold_check, fid, loaded.calibration,
                             None if loaded.imported is None else loaded.imported.to_json())
    if args.json:
        print_json(summary.to_json())
    else:
        con = console()
        if fid is not None:
            print_fidelity(fid, con)
        if loaded.fold_check is not None:
            con.print(loaded.fold_check.summary())
        print_conversion(report, loaded.passes, check, fid, loaded.calibration)
    if fid is None:
        gates = gates_from_args(args)
        if not args.no_check and (gates.min_agreement or gates.min_source_agreement):
            raise FidelityGateFailed(f"fidelity not measured ({check}); {args.output} not "
                                     "written: the gates cannot hold without test data "
                                     "(give it with --dataset/--data, or --min-agreement 0)")
        warn("fidelity not measured: the deployed network is NOT checked against the float "
             "graph or your model")
        save_graph(loaded.graph, args.output)
    elif not passed:
        fid.check()
    if not args.json:
        console().print(f"wrote {args.output}")
    return 0


def print_conversion(report: QuantReport, passes: dict[str, int],
                     check: Agreement | str | None, fid: Fidelity | None = None,
                     calibration: Calibrated | None = None) -> None:
    """The per-layer table (with the limit that set each scale and, calibrated, the data's
    largest one-step input), the folding passes, warnings, what the measured check and
    ``--optimize`` did, and (without fidelity figures) the agreement line."""
    con = console()
    rows = [
        (la.name, la.kind, la.shape, la.neurons, la.weight_bits_used,
         f"{la.threshold_min}" if la.threshold_min == la.threshold_max
         else f"{la.threshold_min}..{la.threshold_max}",
         la.scale, la.quant_error, la.bound,
         "-" if la.observed_step_input is None else la.observed_step_input,
         la.max_step_input, "; ".join(la.notes))
        for la in report.layers
    ]
    how = (f"scales calibrated on {report.ranges.samples} samples for T = "
           f"{report.ranges.timesteps}, P = {report.ranges.presim}, margin {report.margin:g}"
           if report.ranges is not None else "scales from the weights alone (uncalibrated)")
    con.print(table(
        f"IF graph for profile {report.profile} "
        f"({'per-channel' if report.per_channel else 'per-layer'} thresholds; {how})",
        ["layer", "kind", "shape", "neurons", "weight bits", "threshold", "scale",
         "quant error", "scale set by", "data step input", "worst step input", "notes"], rows))
    con.print(f"folding passes: {', '.join(f'{k} x{v}' for k, v in passes.items()) or 'none'}")
    if calibration is not None:
        for i, layers in enumerate(calibration.rounds, 1):
            con.print(f"measured check, round {i}: halved the scale of {', '.join(layers)} "
                      "(its current wrapped or the readout saturated on the calibration data)")
        if calibration.trials:
            print_trials(calibration)
    for w in report.warnings:
        con.print(f"warning: {w}")
    if isinstance(check, Agreement) and fid is None:
        con.print(
            f"test split ({check.samples} samples): float ANN "
            f"{100 * check.float_accuracy:.2f} %, quantized ANN "
            f"{100 * check.quantized_accuracy:.2f} %, agreement "
            f"{100 * check.agreement:.2f} %")
    elif isinstance(check, str):
        con.print(f"fidelity {check}")


def print_trials(calibration: Calibrated) -> None:
    """The ``--optimize`` table: every candidate tried and the one kept."""
    rows = [(t.layer, t.factor, 100 * t.fidelity, t.wrapped, t.readout_saturated,
             "kept" if t.kept else "") for t in calibration.trials]
    console().print(table("--optimize: scale factors tried per layer (calibration samples)",
                          ["layer", "factor", "fidelity %", "wrapped", "readout saturated",
                           "notes"], rows))
