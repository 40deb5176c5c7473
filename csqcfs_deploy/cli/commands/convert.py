"""``csqcfs-deploy convert``: fold and quantize a network into an IF graph file.

The fold check (the float IF graph against the model on calibration samples) is
printed first; ``--json`` has it under ``fold_check`` and its argmax agreement as
``check.folded_matches_model``.
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
from csqcfs_deploy.cli.dataset_args import DatasetMismatch
from csqcfs_deploy.convert.check import FoldCheck
from csqcfs_deploy.convert.quantize import QuantReport
from csqcfs_deploy.errors import DatasetError, UsageError
from csqcfs_deploy.ir import IFGraph, InputEncoding, save_graph
from csqcfs_deploy.run.reference import ann_forward, input_units


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="fold + quantize a network into an IF graph (.ifg)",
                       description="Fold (BN merge, threshold scaling, pooling) and quantize a "
                       "trained network to a hardware profile; print the per-layer table and "
                       "the float-vs-quantized agreement on the test split.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("-o", "--output", required=True, help="IF graph file to write (.ifg)")
    p.add_argument("--no-check", action="store_true",
                   help="skip measuring float-vs-quantized agreement on the test split")
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

    def to_json(self) -> dict[str, object]:
        check = self.check.to_json() if isinstance(self.check, Agreement) else self.check
        return {**self.report.to_json(), "output": self.output, "passes": self.passes,
                "check": check,
                "fold_check": None if self.fold_check is None else self.fold_check.to_json()}


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
    loaded = resolve_model(args)
    report, fold, model, config = loaded.report, loaded.fold, loaded.model, loaded.config
    if report is None or fold is None or model is None or config is None:
        raise UsageError(f"{args.model} is already an IF graph; convert takes a trained network")
    check: Agreement | str | None = None
    if not args.no_check:
        try:
            ds = resolve_dataset(args, loaded)
            if ds.input_shape != loaded.graph.input.shape:
                raise DatasetError(f"dataset {ds.name} has shape {ds.input_shape}")
            check = agreement(model, config.encoding, fold.graph, loaded.graph, ds.x_test,
                              ds.y_test, loaded.fold_check)
        except DatasetMismatch:
            raise  # data that does not fit the model is an error, not a skipped check
        except DatasetError as exc:
            check = f"not measured: {exc}"
    save_graph(loaded.graph, args.output)
    if args.json:
        print_json(ConvertSummary(report, args.output, fold.log.counts(), check,
                                  loaded.fold_check).to_json())
        return 0
    if loaded.fold_check is not None:
        console().print(loaded.fold_check.summary())
    print_conversion(report, fold.log.counts(), check)
    console().print(f"wrote {args.output}")
    return 0


def print_conversion(report: QuantReport, passes: dict[str, int],
                     check: Agreement | str | None) -> None:
    """The per-layer table, the folding passes, warnings and the agreement line."""
    con = console()
    rows = [
        (la.name, la.kind, la.shape, la.neurons, la.weight_bits_used,
         f"{la.threshold_min}" if la.threshold_min == la.threshold_max
         else f"{la.threshold_min}..{la.threshold_max}",
         la.scale, la.quant_error, la.max_step_input, "; ".join(la.notes))
        for la in report.layers
    ]
    con.print(table(
        f"IF graph for profile {report.profile} "
        f"({'per-channel' if report.per_channel else 'per-layer'} thresholds)",
        ["layer", "kind", "shape", "neurons", "weight bits", "threshold", "scale",
         "quant error", "max step input", "notes"], rows))
    con.print(f"folding passes: {', '.join(f'{k} x{v}' for k, v in passes.items())}")
    for w in report.warnings:
        con.print(f"warning: {w}")
    if isinstance(check, Agreement):
        con.print(
            f"test split ({check.samples} samples): float ANN "
            f"{100 * check.float_accuracy:.2f} %, quantized ANN "
            f"{100 * check.quantized_accuracy:.2f} %, agreement "
            f"{100 * check.agreement:.2f} %")
    elif isinstance(check, str):
        con.print(f"agreement {check}")
