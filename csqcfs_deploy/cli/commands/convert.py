"""``csqcfs-deploy convert``: fold and quantize a network into an IF graph file."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_json_arg,
    add_model_args,
    console,
    print_json,
    resolve_dataset,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.model_io import LoadedModel
from csqcfs_deploy.errors import DatasetError, UsageError
from csqcfs_deploy.ir import save_graph
from csqcfs_deploy.run.reference import ann_forward, input_units


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="fold + quantize a network into an IF graph (.ifg)",
                       description="Fold (BN merge, threshold scaling, pooling) and quantize a "
                       "trained network to a hardware profile; print the per-layer table and "
                       "the float-vs-quantized agreement on the test split.")
    add_model_args(p)
    add_dataset_args(p)
    p.add_argument("-o", "--output", required=True, help="IF graph file to write (.ifg)")
    p.add_argument("--no-check", action="store_true",
                   help="skip measuring float-vs-quantized agreement on the test split")
    add_json_arg(p)
    p.set_defaults(func=run)


def agreement(loaded: LoadedModel, raw: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Float ANN vs quantized ANN (integer, ANN mode) on raw samples."""
    assert loaded.fold is not None and loaded.config is not None
    float_graph = loaded.fold.graph
    f_pred = ann_forward(float_graph, input_units(float_graph, raw)).predictions
    q_pred = ann_forward(loaded.graph, input_units(loaded.graph, raw)).predictions
    with torch.no_grad():
        assert loaded.model is not None
        x = torch.from_numpy(loaded.config.encoding.normalize(raw))
        m_pred = loaded.model(x).argmax(1).numpy()
    return {
        "samples": int(len(labels)),
        "float_accuracy": float((m_pred == labels).mean()),
        "quantized_accuracy": float((q_pred == labels).mean()),
        "agreement": float((q_pred == f_pred).mean()),
        "folded_matches_model": float((f_pred == m_pred).mean()),
    }


def run(args: argparse.Namespace) -> int:
    loaded = resolve_model(args)
    if loaded.report is None:
        raise UsageError(f"{args.model} is already an IF graph; convert takes a trained network")
    check: dict[str, float] | str | None = None
    if not args.no_check:
        try:
            ds = resolve_dataset(args, loaded)
            if ds.input_shape != loaded.graph.input.shape:
                raise DatasetError(f"dataset {ds.name} has shape {ds.input_shape}")
            check = agreement(loaded, ds.x_test, ds.y_test)
        except DatasetError as exc:
            check = f"not measured: {exc}"
    save_graph(loaded.graph, args.output)
    report = loaded.report
    if args.json:
        out = report.to_json()
        out["output"] = args.output
        out["passes"] = loaded.fold.log.counts() if loaded.fold else {}
        out["check"] = check
        print_json(out)
        return 0
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
    if loaded.fold is not None:
        passes = ", ".join(f"{k} x{v}" for k, v in loaded.fold.log.counts().items())
        con.print(f"folding passes: {passes}")
    for w in report.warnings:
        con.print(f"warning: {w}")
    if isinstance(check, dict):
        con.print(
            f"test split ({check['samples']} samples): float ANN "
            f"{100 * check['float_accuracy']:.2f} %, quantized ANN "
            f"{100 * check['quantized_accuracy']:.2f} %, agreement "
            f"{100 * check['agreement']:.2f} %")
    elif isinstance(check, str):
        con.print(f"agreement {check}")
    con.print(f"wrote {args.output}")
    return 0
