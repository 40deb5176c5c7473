"""``csqcfs-deploy sweep``: accuracy of float ANN, quantized ANN and SNN over T and P.

For every pair (T, P) the integer simulator runs the test split; the float
ANN (the trained network, when MODEL is one) and the quantized ANN (the IF
graph in ANN mode at its trained ``L``, :func:`csqcfs_deploy.run.reference.ann_forward`)
are measured once. Prints a table (or ``--json``) and optionally a PNG of
accuracy against latency (``P + T``, plus the pipeline depth when pipelined).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from csqcfs_deploy.cli import arg_types
from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_json_arg,
    add_model_args,
    as_schedule,
    console,
    print_json,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.commands.run import fold_check_json, print_fold_check, split
from csqcfs_deploy.cli.fidelity_args import add_scale_args
from csqcfs_deploy.cli.model_io import LoadedModel
from csqcfs_deploy.cli.sharded import evaluate_on, sharding
from csqcfs_deploy.cli.workers import add_parallel_args, parallel_of
from csqcfs_deploy.convert.check import FoldCheck
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.files import check_output, write_atomic
from csqcfs_deploy.ir.schedule import SCHEDULES, RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.evaluation import EvalSummary
from csqcfs_deploy.run.reference import ann_forward, input_units


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sweep", help="accuracy table float ANN / quantized ANN / SNN over T, P",
                       description="Run the integer simulator for every T in --timesteps and "
                       "P in --presim; print the accuracy of the float ANN, the quantized ANN "
                       "and the SNN, and plot accuracy against latency.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("--timesteps", "-T", type=arg_types.step_list(1), default="1,2,4,8",
                   help="comma-separated counted steps, each 1.."
                   f"{arg_types.MAX_STEPS} (default 1,2,4,8)")
    p.add_argument("--presim", "-P", type=arg_types.step_list(0), default="0",
                   help="comma-separated pre-simulation steps (default 0), e.g. 0,4")
    p.add_argument("--schedule", choices=SCHEDULES, default="synchronous")
    p.add_argument("--samples", type=arg_types.positive_int, default=None,
                   help="first N samples of the test split (default all)")
    p.add_argument("--batch-size", type=arg_types.positive_int, default=128)
    add_scale_args(p)
    p.add_argument("--plot", metavar="FILE.png", help="write accuracy against latency as a PNG")
    add_parallel_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class AnnAccuracy:
    """Accuracy of the float network (None when MODEL is a bare graph) and of the
    quantized graph in ANN mode at its trained ``levels``."""

    float_ann: float | None
    quantized_ann: float
    levels: int
    float_source: str


def ann_accuracies(loaded: LoadedModel, raw: NDArray[Any], labels: NDArray[np.integer[Any]],
                   batch_size: int) -> AnnAccuracy:
    """Both ANN accuracies on raw samples (N, *input_shape), in batches of ``batch_size``."""
    graph = loaded.graph
    q_pred = np.concatenate([
        ann_forward(graph, input_units(graph, raw[i:i + batch_size])).predictions
        for i in range(0, len(raw), batch_size)])
    float_acc: float | None = None
    source = "none (MODEL is an IF graph)"
    if loaded.model is not None and loaded.config is not None:
        preds = []
        with torch.no_grad():
            for i in range(0, len(raw), batch_size):
                x = torch.from_numpy(loaded.config.encoding.normalize(raw[i:i + batch_size]))
                preds.append(loaded.model.eval()(x).argmax(1).numpy())
        float_acc = float((np.concatenate(preds) == labels).mean())
        source = "trained network"
    elif loaded.float_graph is not None:
        fg = loaded.float_graph
        f_pred = np.concatenate([
            ann_forward(fg, input_units(fg, raw[i:i + batch_size])).predictions
            for i in range(0, len(raw), batch_size)])
        float_acc = float((f_pred == labels).mean())
        source = "folded float graph"
    return AnnAccuracy(float_acc, float((q_pred == labels).mean()), graph.meta.levels, source)


def plot_sweep(path: str, rows: list[EvalSummary], ann: AnnAccuracy, title: str) -> None:
    """Accuracy (%) against latency in steps, one line per P; ANN levels as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for presim in sorted({r.presim for r in rows}):
        sel = sorted((r for r in rows if r.presim == presim), key=lambda r: r.latency_steps)
        ax.plot([r.latency_steps for r in sel], [100 * r.accuracy for r in sel], marker="o",
                label=f"SNN, P = {presim}")
        for r in sel:
            ax.annotate(f"T={r.timesteps}", (r.latency_steps, 100 * r.accuracy), fontsize=7,
                        textcoords="offset points", xytext=(3, -10))
    ax.axhline(100 * ann.quantized_ann, color="tab:red", linestyle="--",
               label=f"quantized ANN (L = {ann.levels})")
    if ann.float_ann is not None:
        ax.axhline(100 * ann.float_ann, color="black", linestyle=":", label="float ANN")
    ax.set_xlabel("latency (steps)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@dataclass(frozen=True)
class SweepReport:
    """Every (T, P) run of the integer simulator, and the ANN accuracies to compare with.

    ``rows``: one evaluation per configuration, P outer, T inner; ``plot``: the PNG
    written, if any; ``fold_check``: the folded graph against the model (None when
    MODEL is a bare graph).
    """

    model: str
    dataset: str
    profile: str | None
    schedule: str
    samples: int
    ann: AnnAccuracy
    rows: tuple[EvalSummary, ...]
    plot: str | None
    fold_check: FoldCheck | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model, "dataset": self.dataset, "profile": self.profile,
            "schedule": self.schedule, "samples": self.samples, "levels": self.ann.levels,
            "float_ann_accuracy": self.ann.float_ann, "float_ann_source": self.ann.float_source,
            "quantized_ann_accuracy": self.ann.quantized_ann,
            "rows": [{"timesteps": r.timesteps, "presim": r.presim,
                      "latency_steps": r.latency_steps, "pipeline_depth": r.pipeline_depth,
                      "accuracy": r.accuracy, "firing_rate": r.firing_rate,
                      "seconds": round(r.seconds, 4)} for r in self.rows],
            "plot": self.plot,
            "fold_check": fold_check_json(self.fold_check),
        }


def run(args: argparse.Namespace) -> int:
    timesteps, presims = tuple(args.timesteps), tuple(args.presim)  # cli.arg_types.step_list
    schedule = as_schedule(args.schedule)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.plot is not None:
        if not str(args.plot).lower().endswith(".png"):
            raise UsageError(f"--plot writes a PNG; give a .png file name, got {args.plot!r}")
        check_output(args.plot, "plot")  # say so before the sweep runs, not after
    loaded = resolve_model(args)
    raw, labels, ds_name = split(args, loaded)
    if not args.json:
        print_fold_check(loaded)
    ann = ann_accuracies(loaded, raw, labels, args.batch_size)
    configs = [RunConfig(timesteps=t, presim=p, schedule=schedule)
               for p in presims for t in timesteps]
    rows: list[EvalSummary] = []
    with sharding(parallel_of(args), loaded.graph) as sharder:
        for cfg in tqdm(configs, desc="sweep", unit="run", disable=args.json, leave=False):
            rows.append(evaluate_on(sharder, "int", loaded.graph, raw, labels, cfg,
                                    args.batch_size, BackendOptions(),
                                    progress=not args.json))
    model = str(loaded.source) if loaded.source is not None else str(args.user_model)
    title = (f"{loaded.graph.meta.arch or model} on {ds_name}, profile "
             f"{loaded.graph.meta.profile}, {schedule}, {len(labels)} samples")
    if args.plot is not None:
        plot_sweep(args.plot, rows, ann, title)
    report = SweepReport(model, ds_name, loaded.graph.meta.profile, schedule,
                         int(len(labels)), ann, tuple(rows), args.plot, loaded.fold_check)
    if args.json:
        print_json(report.to_json())
        return 0
    print_sweep(report, title)
    return 0


def print_sweep(report: SweepReport, title: str) -> None:
    """The ANN accuracies, then one table row per (T, P)."""
    con = console()
    ann = report.ann
    float_text = ("n/a" if ann.float_ann is None
                  else f"{100 * ann.float_ann:.2f} % ({ann.float_source})")
    con.print(f"float ANN {float_text}; quantized ANN (L = {ann.levels}) "
              f"{100 * ann.quantized_ann:.2f} %")
    float_cell: object = "n/a" if ann.float_ann is None else 100 * ann.float_ann
    con.print(table(title, ["T", "P", "latency steps", "float ANN %",
                            f"quantized ANN (L={ann.levels}) %", "SNN %", "firing rate",
                            "samples/s"],
                    [(r.timesteps, r.presim, r.latency_steps, float_cell,
                      100 * ann.quantized_ann, 100 * r.accuracy, r.firing_rate, r.throughput)
                     for r in report.rows]))
    if report.plot is not None:
        con.print(f"wrote {report.plot}")
