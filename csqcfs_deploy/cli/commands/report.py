"""``csqcfs-deploy report``: per-layer spikes, SOPs, MACs and energy of the deployed network.

The JSON report (``--json FILE``, or ``--json`` alone for stdout) has the
schema :data:`REPORT_SCHEMA_VERSION` documented in the README::

    {"schema": "csqcfs-deploy-report/1", "model": str, "profile": str,
     "dataset": str, "samples": int, "timesteps": int, "presim": int,
     "schedule": str, "latency_steps": int, "steps_simulated": int,
     "accuracy": float,
     "layers": [{"name", "kind", "neurons", "spikes", "firing_rate", "sops",
                 "input_macs", "input_graded_sops", "ann_macs"}],
     "totals": {"neurons", "spikes", "firing_rate", "sops", "input_macs",
                "sops_per_sample", "ann_macs_per_sample"},
     "energy": [{"name", "source", "constants", "snn_pj_per_sample",
                 "ann_pj_per_sample", "ann_over_snn"}],
     "fidelity": {...} | null}      # run.fidelity.Fidelity.to_json()

The fidelity lines head the tables; a wrapped current or saturated membrane
gets a warning, and a failed fidelity gate exits 9 after the report is written.

Counts are over all samples and all simulated steps (``steps_simulated``:
P + T, plus the pipeline depth when pipelined), except ``ann_macs`` (one
forward pass per sample, per layer) and the ``*_per_sample`` totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_model_args,
    as_schedule,
    console,
    print_json,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.commands.run import add_run_args, print_fold_check, split
from csqcfs_deploy.cli.fidelity_args import (
    add_gate_args,
    add_scale_args,
    fidelity_of,
    gates_from_args,
    print_fidelity,
)
from csqcfs_deploy.cli.model_io import warn
from csqcfs_deploy.cli.sharded import count_on, sharding
from csqcfs_deploy.cli.workers import add_parallel_args, parallel_of
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.files import check_output, write_atomic, write_text_atomic
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import SCHEDULES, RunConfig, latency_steps, total_steps
from csqcfs_deploy.report.energy import EnergyConstants, EnergyEstimate, estimate, resolve_energy
from csqcfs_deploy.report.sops import ActivityCounter, LayerActivity
from csqcfs_deploy.run.fidelity import Fidelity
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.shards import ReportCounts
from csqcfs_deploy.simulators.integer import simulate

REPORT_SCHEMA_VERSION = "csqcfs-deploy-report/1"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="SOPs, MACs, firing rates and energy per layer",
                       description="Run the integer simulator and report, per layer, neurons, "
                       "spikes, firing rate, synaptic operations (exact fan-outs from the "
                       "graph), the ANN's MACs, and energy under named constant sets.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    add_run_args(p)
    p.add_argument("--schedule", choices=SCHEDULES, default="synchronous")
    p.add_argument("--energy", default="cmos45,loihi",
                   help="comma-separated constant sets: cmos45, loihi, or a JSON file "
                        "{name, source, sop_pj, mac_pj?, neuron_active_pj?, "
                        "neuron_inactive_pj?} (default: cmos45,loihi)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the JSON report to FILE (or stdout with no FILE)")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG: firing rates, SOPs vs "
                                                      "MACs, energy")
    add_scale_args(p)
    add_gate_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ReportTotals:
    """Sums over the layers: ``neurons`` (IF layers only), ``spikes``, ``sops`` and
    ``input_macs`` over all samples and steps; ``firing_rate`` spikes per IF neuron
    per step; SOPs and ANN MACs per sample."""

    neurons: int
    spikes: int
    firing_rate: float
    sops: int
    input_macs: int
    sops_per_sample: float
    ann_macs_per_sample: float

    def to_json(self) -> dict[str, object]:
        return {"neurons": self.neurons, "spikes": self.spikes,
                "firing_rate": self.firing_rate, "sops": self.sops,
                "input_macs": self.input_macs, "sops_per_sample": self.sops_per_sample,
                "ann_macs_per_sample": self.ann_macs_per_sample}


@dataclass(frozen=True)
class Report:
    """The report of one integer-simulator run over ``samples`` inputs (module doc).

    ``layers``: one row per non-input layer in topological order; ``energy``: one
    estimate per constant set, in the order asked for.
    """

    model: str
    profile: str | None
    dataset: str
    samples: int
    timesteps: int
    presim: int
    schedule: str
    latency_steps: int
    steps_simulated: int
    accuracy: float
    layers: tuple[LayerActivity, ...]
    totals: ReportTotals
    energy: tuple[EnergyEstimate, ...]
    fidelity: Fidelity | None = None

    def energy_named(self, name: str) -> EnergyEstimate:
        """The estimate under constant set ``name``."""
        for e in self.energy:
            if e.constants.name == name:
                return e
        raise UsageError(f"the report has no energy set {name!r}")

    def to_json(self) -> dict[str, object]:
        """The JSON report, schema :data:`REPORT_SCHEMA_VERSION` (keys in this order)."""
        return {
            "schema": REPORT_SCHEMA_VERSION,
            "model": self.model,
            "profile": self.profile,
            "dataset": self.dataset,
            "samples": self.samples,
            "timesteps": self.timesteps,
            "presim": self.presim,
            "schedule": self.schedule,
            "latency_steps": self.latency_steps,
            "steps_simulated": self.steps_simulated,
            "accuracy": self.accuracy,
            "layers": [la.to_json() for la in self.layers],
            "totals": self.totals.to_json(),
            "energy": [e.to_json() for e in self.energy],
            "fidelity": None if self.fidelity is None else self.fidelity.to_json(),
        }


def build_report(args: argparse.Namespace) -> Report:
    energy_sets = resolve_energy(args.energy)
    gates_from_args(args)
    loaded = resolve_model(args)
    raw, labels, ds_name = split(args, loaded)
    cfg = RunConfig(timesteps=args.timesteps, presim=args.presim,
                    schedule=as_schedule(args.schedule))
    fid = fidelity_of(args, loaded, raw, labels, cfg)
    if args.json != "-":  # tables on stdout: the fidelity and the fold check head them
        print_fidelity(fid, console())
        print_fold_check(loaded)
    with sharding(parallel_of(args), loaded.graph) as sharder:
        counts = count_on(sharder, loaded.graph, raw, labels, cfg, args.batch_size,
                          progress=args.json != "-")
    report = report_of(loaded.graph, cfg, counts, energy_sets,
                       str(args.model or args.user_model), ds_name)
    return dataclasses.replace(report, fidelity=fid)


def make_report(graph: IFGraph, raw: NDArray[Any], labels: NDArray[np.integer[Any]],
                cfg: RunConfig, energy_sets: list[EnergyConstants], model_name: str,
                dataset: str, batch_size: int = 128, progress: bool = True) -> Report:
    """Simulate ``raw`` samples (N, *input_shape) with the integer simulator, in batches,
    and count activity, accuracy against ``labels`` (N,) and energy per constant set."""
    counts = count_report(graph, raw, labels, cfg, batch_size, progress)
    return report_of(graph, cfg, counts, energy_sets, model_name, dataset)


def count_report(graph: IFGraph, raw: NDArray[Any], labels: NDArray[np.integer[Any]],
                 cfg: RunConfig, batch_size: int = 128, progress: bool = True,
                 on_batch: Callable[[int], None] | None = None) -> ReportCounts:
    """What a report counts of ``raw`` samples (N, *input_shape), simulated in batches of
    ``batch_size`` (``on_batch(samples)`` after each): spikes per neuron, non-zero
    inputs, and the predictions that match ``labels`` (N,)."""
    x_all = input_units(graph, raw)
    counter = ActivityCounter(graph, total_steps(graph, cfg))
    correct = 0
    bar = tqdm(total=len(x_all), desc="report", unit="sample", disable=not progress,
               leave=False)
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size]
        result = simulate(graph, x, cfg)
        counter.add(result.spike_counts, x)
        correct += int((result.predictions == labels[i : i + len(x)]).sum())
        bar.update(len(x))
        if on_batch is not None:
            on_batch(len(x))
    bar.close()
    return ReportCounts.of(counter, correct)


def report_of(graph: IFGraph, cfg: RunConfig, counts: ReportCounts,
              energy_sets: list[EnergyConstants], model_name: str, dataset: str) -> Report:
    """The report of ``counts`` (one process's or merged shards')."""
    steps = total_steps(graph, cfg)
    activity = counts.counter(graph, steps).activity()
    correct = counts.correct
    neurons = sum(la.neurons for la in activity.layers if la.kind != "readout")
    n = activity.samples
    totals = ReportTotals(
        neurons=neurons, spikes=activity.spikes,
        firing_rate=activity.spikes / (neurons * steps * n), sops=activity.sops,
        input_macs=activity.input_macs, sops_per_sample=activity.sops / n,
        ann_macs_per_sample=activity.ann_macs / n)
    return Report(
        model=model_name, profile=graph.meta.profile, dataset=dataset, samples=n,
        timesteps=cfg.timesteps, presim=cfg.presim, schedule=cfg.schedule,
        latency_steps=latency_steps(graph, cfg), steps_simulated=steps, accuracy=correct / n,
        layers=activity.layers, totals=totals,
        energy=tuple(estimate(activity, c) for c in energy_sets))


def plot_report(report: Report, path: str) -> None:
    """Firing rate per layer, SOPs vs ANN MACs per layer, and the energy comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    names = [la.name for la in layers]
    n = report.samples
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(names))
    axes[0].bar(x, [la.firing_rate for la in layers], color="tab:blue")
    axes[0].set_title("firing rate (spikes / neuron / step)")
    sops = [la.sops / n for la in layers]
    macs = [la.ann_macs for la in layers]
    first = [la.input_macs / n for la in layers]
    axes[1].bar(x - 0.27, macs, 0.27, label="ANN MACs")
    axes[1].bar(x, sops, 0.27, label="SNN SOPs")
    axes[1].bar(x + 0.27, first, 0.27, label="SNN MACs (analog input)")
    axes[1].set_yscale("symlog")
    axes[1].set_title("operations per sample")
    axes[1].legend(fontsize=8, loc="lower left")
    for ax in axes[:2]:
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    labels: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    for e in report.energy:
        labels.append(f"{e.constants.name}\nSNN")
        values.append(e.snn_pj / 1e6)
        colors.append("tab:green")
        if e.ann_pj is not None:
            labels.append(f"{e.constants.name}\nANN")
            values.append(e.ann_pj / 1e6)
            colors.append("tab:red")
    axes[2].bar(range(len(values)), values, color=colors)
    axes[2].set_xticks(range(len(values)), labels, fontsize=8)
    axes[2].set_yscale("log")
    axes[2].set_title("energy per sample (uJ, log scale)")
    fig.suptitle(f"{report.model} - profile {report.profile}, T={report.timesteps}, "
                 f"P={report.presim}, {report.samples} samples", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None and not str(args.plot).lower().endswith(".png"):
        raise UsageError(f"--plot must name a .png file, got {args.plot}")
    for path, what in ((args.json, "JSON report"), (args.plot, "plot")):
        if path and path != "-":  # before the simulation, not after it
            check_output(path, what)
    report = build_report(args)
    if args.plot:
        plot_report(report, args.plot)
    if args.json == "-":
        print_json(report.to_json())
    else:
        if args.json:
            write_text_atomic(args.json, json.dumps(report.to_json(), indent=2) + "\n")
        print_tables(report)
        for path in (args.json, args.plot):
            if path:
                console().print(f"wrote {Path(path)}")
    fid = report.fidelity
    if fid is not None:
        over = {k: v for k, v in {**(fid.wrapped or {}), **(fid.saturated or {})}.items() if v}
        if over:
            warn(f"overflow in {', '.join(sorted(over))}: currents wrapped or membranes "
                 "saturated on these samples (see the fidelity lines); the figures above "
                 "include them")
        fid.check()
    return 0


def print_tables(report: Report) -> None:
    """The activity table (per sample) and the energy table."""
    con = console()
    n = report.samples
    rows: list[tuple[object, ...]] = [
        (la.name, la.kind, la.neurons, la.spikes / n, la.firing_rate, la.sops / n,
         la.input_macs / n, la.ann_macs) for la in report.layers]
    tot = report.totals
    rows.append(("total", "", tot.neurons, tot.spikes / n, tot.firing_rate,
                 tot.sops_per_sample, tot.input_macs / n, tot.ann_macs_per_sample))
    con.print(table(
        f"activity per sample: profile {report.profile}, {report.schedule}, "
        f"T={report.timesteps}, P={report.presim}, latency {report.latency_steps} "
        f"steps, {n} samples, accuracy {100 * report.accuracy:.2f} %",
        ["layer", "kind", "neurons", "spikes", "rate/neuron/step", "SOPs", "MACs (input)",
         "ANN MACs"], rows))
    erows = []
    for e in report.energy:
        ratio = e.ratio
        erows.append((e.constants.name, e.snn_pj / 1e6,
                      "n/a" if e.ann_pj is None else e.ann_pj / 1e6,
                      "n/a" if ratio is None else f"{ratio:.2f}x", e.constants.source))
    con.print(table("energy per sample", ["name", "SNN uJ", "ANN uJ", "ANN/SNN", "source"],
                    erows))
