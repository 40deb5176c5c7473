"""``csqcfs-deploy run``: run a deployed network on a back end and report accuracy."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from csqcfs_deploy.cli import arg_types
from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_json_arg,
    add_model_args,
    as_schedule,
    console,
    print_json,
    resolve_dataset,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.fidelity_args import (
    add_gate_args,
    add_scale_args,
    fidelity_of,
    gates_from_args,
    print_fidelity,
)
from csqcfs_deploy.cli.model_io import LoadedModel
from csqcfs_deploy.cli.sharded import evaluate_on, sharding
from csqcfs_deploy.cli.workers import add_parallel_args, parallel_of
from csqcfs_deploy.convert.check import FoldCheck
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir.schedule import SCHEDULES, RunConfig, recording_bytes
from csqcfs_deploy.run.backends import BACKENDS, BackendOptions, default_schedule
from csqcfs_deploy.run.evaluation import EvalSummary
from csqcfs_deploy.run.fidelity import Fidelity
from csqcfs_deploy.run.memory import format_bytes


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timesteps", "-T", type=arg_types.timesteps, default=1,
                   help=f"counted steps T, 1..{arg_types.MAX_STEPS}")
    p.add_argument("--presim", "-P", type=arg_types.presim_steps, default=0,
                   help="pre-simulation steps P (SRP; outputs discarded)")
    p.add_argument("--samples", type=arg_types.positive_int, default=None,
                   help="first N samples of the test split (default all)")
    p.add_argument("--batch-size", type=arg_types.positive_int, default=128)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the deployed network on a back end",
                       description="Run the IF graph on a back end (int: the integer simulator, "
                       "lava, norse) and print accuracy, latency, firing rate and throughput.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("--backend", choices=sorted(BACKENDS), default="int")
    add_run_args(p)
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="default: the back end's own (int: synchronous, lava: pipelined)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (norse, int)")
    add_scale_args(p)
    add_gate_args(p)
    add_parallel_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


class EvalSamples(NamedTuple):
    """The test samples a command runs: ``raw`` (N, *input_shape) as the dataset stores
    them, ``labels`` (N,) class indices, and the dataset's name."""

    raw: NDArray[Any]
    labels: NDArray[np.integer[Any]]
    dataset: str


@dataclass(frozen=True)
class RunReport:
    """What ``run`` reports: one back end's summary and where and how it ran.

    ``batch_size``: samples per batch actually run (``--batch-size``, at most all);
    ``recording_bytes_per_batch``: bytes that recording every spike would take;
    ``fold_check``: the folded graph against the model, when MODEL was a network.
    """

    summary: EvalSummary
    dataset: str
    profile: str | None
    batch_size: int
    recording_bytes_per_batch: int
    fold_check: FoldCheck | None = None
    fidelity: Fidelity | None = None

    def to_json(self) -> dict[str, object]:
        """The fidelity, the summary's JSON, dataset, profile, batch_size, recording bytes,
        the fold check (None when the model was not folded here) and ``kernels``: the int
        back end's kernel per projection in the first batch, ``{"chosen", "ms", "rows"}``
        (:class:`~csqcfs_deploy.simulators.integer.kernels.KernelChoice`; None for
        other back ends)."""
        return {"fidelity": None if self.fidelity is None else self.fidelity.to_json(),
                **self.summary.to_json(), "dataset": self.dataset, "profile": self.profile,
                "batch_size": self.batch_size,
                "recording_bytes_per_batch": self.recording_bytes_per_batch,
                "fold_check": fold_check_json(self.fold_check),
                "kernels": self.summary.kernels}


def fold_check_json(check: FoldCheck | None) -> dict[str, object] | None:
    """The fold check's headline figures for a command's JSON."""
    if check is None:
        return None
    return {"matches_model": check.matches_model, "samples": check.samples,
            "dtype": check.dtype, "source": check.source, "max_levels": check.max_levels,
            "first_divergence": check.first_divergence}


def print_fold_check(loaded: LoadedModel) -> None:
    """The fold check's one line, when MODEL was a network folded here."""
    if loaded.fold_check is not None:
        console().print(loaded.fold_check.summary())


def split(args: argparse.Namespace, loaded: LoadedModel) -> EvalSamples:
    """The test samples to run: (raw, labels, dataset name)."""
    ds = resolve_dataset(args, loaded)
    if ds.input_shape != loaded.graph.input.shape:
        raise UsageError(f"dataset {ds.name} has inputs {ds.input_shape}, the model takes "
                         f"{loaded.graph.input.shape}")
    n = len(ds.y_test) if args.samples is None else args.samples
    if n < 1:
        raise UsageError(f"--samples must be >= 1, got {n}")
    return EvalSamples(ds.x_test[:n], ds.y_test[:n], ds.name)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    gates_from_args(args)
    loaded = resolve_model(args)
    raw, labels, ds_name = split(args, loaded)
    schedule = as_schedule(args.schedule or default_schedule(args.backend))
    cfg = RunConfig(timesteps=args.timesteps, presim=args.presim, schedule=schedule)
    with sharding(parallel_of(args), loaded.graph) as sharder:
        summary = evaluate_on(sharder, args.backend, loaded.graph, raw, labels, cfg,
                              args.batch_size,
                              BackendOptions(device=args.device, progress=not args.json),
                              progress=not args.json)
    fid = fidelity_of(args, loaded, raw, labels, cfg, summary)
    batch = min(args.batch_size, summary.samples)
    report = RunReport(summary, ds_name, loaded.graph.meta.profile, batch,
                       recording_bytes(loaded.graph, cfg, batch), loaded.fold_check, fid)
    if args.json:
        print_json(report.to_json())
    else:
        print_fidelity(fid, console())
        print_fold_check(loaded)
        print_run(report, args.backend, sum(la.neurons for la in loaded.graph.if_layers))
    fid.check()
    return 0


def print_run(report: RunReport, backend: str, neurons: int) -> None:
    """The run table and the recording-memory note (``neurons``: IF neurons in the graph)."""
    summary, batch = report.summary, report.batch_size
    latency = f"{summary.latency_steps}"
    if summary.pipeline_depth:
        latency += (f" (P {summary.presim} + T {summary.timesteps} + pipeline depth "
                    f"{summary.pipeline_depth})")
    else:
        latency += f" (P {summary.presim} + T {summary.timesteps})"
    con = console()
    con.print(table(
        f"{backend} back end, {summary.schedule} schedule, profile {report.profile}",
        ["backend", "samples", "accuracy %", "latency steps", "firing rate", "samples/s"],
        [(backend, summary.samples, 100 * summary.accuracy, latency,
          summary.firing_rate, summary.throughput)]))
    if summary.kernels:
        con.print(kernels_line(summary.kernels))
    con.print(f"recording every spike of every layer (as verify does) would need "
              f"{format_bytes(report.recording_bytes_per_batch)} per batch of {batch} "
              f"({summary.latency_steps} steps x {neurons} neurons x {batch} samples, "
              "one byte each)")


def kernels_line(kernels: dict[str, dict[str, object]]) -> str:
    """E.g. ``kernels: float32 x15, float64 x0, int8 x0 (measured)``: how many projections
    ran on each kernel in the first batch, and whether any choice was measured."""
    chosen = [str(k["chosen"]) for k in kernels.values()]
    counts = ", ".join(f"{name} x{chosen.count(name)}" for name in ("float32", "float64", "int8"))
    measured = any(len(k.get("ms") or {}) > 1 for k in kernels.values())  # type: ignore[arg-type]
    return f"kernels: {counts} ({'measured' if measured else 'one candidate each'})"
