"""``csqcfs-deploy demo``: the whole job on the embedded digits dataset.

train -> convert (loihi2) -> export NIR -> run on int, Lava and Norse ->
verify spike for spike -> report SOPs and energy, then a short summary.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from csqcfs_deploy.cli import arg_types
from csqcfs_deploy.cli.commands.common import add_json_arg, console, print_json, table
from csqcfs_deploy.cli.commands.report import make_report, plot_report, print_tables
from csqcfs_deploy.cli.commands.verify import print_result
from csqcfs_deploy.cli.fidelity_args import (
    add_gate_args,
    add_scale_args,
    gates_from_args,
    plan_from_args,
)
from csqcfs_deploy.cli.model_io import FoldCheckOptions, calibration_from, graph_from_network
from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.files import check_output, check_output_dir, write_text_atomic
from csqcfs_deploy.ir import save_graph
from csqcfs_deploy.ir.schedule import RunConfig, Schedule
from csqcfs_deploy.report.energy import BUILTIN_ENERGY
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.evaluation import EvalSummary, evaluate
from csqcfs_deploy.run.fidelity import measure
from csqcfs_deploy.run.reference import ann_forward, input_units
from csqcfs_deploy.run.verify import verify
from csqcfs_deploy.train.checkpoint import save_checkpoint
from csqcfs_deploy.train.datasets import load_digits_dataset
from csqcfs_deploy.train.training import TrainOptions, train


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="train -> convert -> export -> run -> verify -> report",
                       description="The whole job on scikit-learn's digits (embedded, nothing "
                       "is downloaded): train digits-cnn at L=1, convert to the loihi2 profile, "
                       "export NIR, run on the integer simulator, Lava and Norse, verify every "
                       "spike, report SOPs and energy.")
    p.add_argument("--output-dir", default="demo-output", help="where files go (created)")
    p.add_argument("--epochs", type=arg_types.positive_int, default=20)
    p.add_argument("--seed", type=arg_types.seed, default=0)
    p.add_argument("--timesteps", "-T", type=arg_types.timesteps, default=1)
    p.add_argument("--presim", "-P", type=arg_types.presim_steps, default=0)
    p.add_argument("--lava-samples", type=arg_types.positive_int, default=40,
                   help="test samples for Lava (slow: about 3 per second); others use all 360")
    add_scale_args(p, rounding="gptq")  # cheap on digits-cnn; keeps 8-bit weights closest
    add_gate_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class DemoSummary:
    """What the demo found: accuracies, whether every spike agreed, SOPs and energy.

    ``runs``: back end -> its evaluation on the test split (``int``, ``norse``,
    ``lava``); ``seconds``: wall time of the whole demo; ``files``: what it wrote.
    """

    ann_test_accuracy: float
    quantized_ann_agreement: float
    runs: dict[str, EvalSummary]
    identical: bool
    verified_samples: int
    sops_per_sample: float
    ann_macs_per_sample: float
    energy_ann_over_snn_cmos45: float | None
    timesteps: int
    presim: int
    files: tuple[Path, ...]
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "ann_test_accuracy": self.ann_test_accuracy,
            "quantized_ann_agreement": self.quantized_ann_agreement,
            "snn_accuracy": {b: r.accuracy for b, r in self.runs.items()},
            "snn_samples": {b: r.samples for b, r in self.runs.items()},
            "identical": self.identical,
            "verified_samples": self.verified_samples,
            "sops_per_sample": self.sops_per_sample,
            "ann_macs_per_sample": self.ann_macs_per_sample,
            "energy_ann_over_snn_cmos45": self.energy_ann_over_snn_cmos45,
            "timesteps": self.timesteps, "presim": self.presim,
            "files": [str(f) for f in self.files],
            "seconds": round(self.seconds, 1),
        }


#: The files the demo writes into --output-dir.
DEMO_FILES = ("digits-cnn.pt", "digits-cnn.ifg", "digits-cnn.nir", "digits-cnn-native.nir",
              "verify.json", "report.json", "report.png")

#: Step 4: (back end, its schedule, whether it runs every test sample; else --lava-samples).
_RUNS: tuple[tuple[str, Schedule, bool], ...] = (
    ("int", "synchronous", True), ("norse", "synchronous", True), ("lava", "pipelined", False))


def run(args: argparse.Namespace) -> int:
    if args.lava_samples < 1 or args.epochs < 1:
        raise UsageError("--lava-samples and --epochs must be >= 1")
    start = time.perf_counter()
    out = check_output_dir(args.output_dir)
    for name in DEMO_FILES:  # before the work: none of them is a directory or a device
        check_output(out / name)
    con = console()
    quiet = bool(args.json)

    def say(text: str) -> None:
        if not quiet:
            con.print(text)

    files: list[Path] = []
    ds = load_digits_dataset()

    say("[1/6] train digits-cnn (L = 1) on scikit-learn's digits")
    trained = train(ds, TrainOptions(epochs=args.epochs, seed=args.seed, progress=not quiet))
    files.append(save_checkpoint(out / "digits-cnn.pt", trained.model, trained.config))
    say(f"      test accuracy {100 * trained.test_accuracy:.2f} % in {trained.seconds:.1f} s")

    say("[2/6] fold and quantize to the loihi2 profile")
    calibration = FoldCheckOptions(lambda config: calibration_from(ds))
    plan = plan_from_args(args)
    loaded = graph_from_network(trained.model, trained.config, "loihi2", None,
                                out / "digits-cnn.pt", "checkpoint", calibration, plan)
    fid = measure(loaded.graph, ds.x_test, ds.y_test, RunConfig(args.timesteps, args.presim),
                  float_graph=loaded.float_graph, model=trained.model,
                  encoding=trained.config.encoding, gates=gates_from_args(args))
    for line in fid.lines():
        say(f"      {line}")
    if loaded.fold_check is not None:
        say(f"      {loaded.fold_check.summary()}")
    graph, float_graph = loaded.graph, loaded.float_graph
    if float_graph is None:
        raise GraphError("the demo's network was not folded")
    files.append(save_graph(graph, out / "digits-cnn.ifg"))
    float_pred = ann_forward(float_graph, input_units(float_graph, ds.x_test)).predictions
    q_pred = ann_forward(graph, input_units(graph, ds.x_test)).predictions
    say(f"      quantized ANN agrees with the float network on "
        f"{100 * (float_pred == q_pred).mean():.2f} % of test samples")

    say("[3/6] export NIR (the default flavour, and native)")
    from csqcfs_deploy.exporters.nir import export_nir  # the NIR module is a core part

    exported = export_nir(graph, out / "digits-cnn.nir")
    files.append(exported.path)
    why = f" ({exported.fallback})" if exported.fallback else ""
    say(f"      digits-cnn.nir: {exported.flavor} flavour{why}; digits-cnn-native.nir: "
        "native (plain NIR readers refuse it)")
    files.append(export_nir(graph, out / "digits-cnn-native.nir", "native").path)

    cfg_t, cfg_p = args.timesteps, args.presim
    say(f"[4/6] run on the back ends (T = {cfg_t}, P = {cfg_p})")
    runs: dict[str, EvalSummary] = {}
    for backend, schedule, every_sample in _RUNS:
        n = len(ds.y_test) if every_sample else args.lava_samples
        cfg = RunConfig(cfg_t, cfg_p, schedule)
        runs[backend] = evaluate(backend, graph, ds.x_test[:n], ds.y_test[:n], cfg, 128,
                                 BackendOptions(progress=not quiet), progress=not quiet)
        r = runs[backend]
        say(f"      {backend:5s} {schedule:11s} {r.samples:4d} samples: accuracy "
            f"{100 * r.accuracy:.2f} %, {r.throughput:.1f} samples/s")

    say(f"[5/6] verify every spike: int, Lava, Norse on {args.lava_samples} samples")
    x = input_units(graph, ds.x_test[: args.lava_samples])
    verified = verify(graph, x, cfg_t, cfg_p, ["int", "lava", "norse"], batch_size=32,
                      progress=not quiet)
    if not quiet:
        print_result(verified, fid)
    files.append(write_text_atomic(out / "verify.json",
                                   json.dumps(verified.to_json(), indent=2) + "\n"))

    say("[6/6] report: SOPs, MACs and energy on the test split")
    report = make_report(graph, ds.x_test, ds.y_test, RunConfig(cfg_t, cfg_p), list(
        BUILTIN_ENERGY.values()), str(out / "digits-cnn.ifg"), "digits", progress=not quiet)
    files.append(write_text_atomic(out / "report.json",
                                   json.dumps(report.to_json(), indent=2) + "\n"))
    plot_report(report, str(out / "report.png"))
    files.append(out / "report.png")
    if not quiet:
        print_tables(report)

    summary = DemoSummary(
        ann_test_accuracy=trained.test_accuracy,
        quantized_ann_agreement=float((float_pred == q_pred).mean()),
        runs=runs, identical=verified.identical, verified_samples=len(x),
        sops_per_sample=report.totals.sops_per_sample,
        ann_macs_per_sample=report.totals.ann_macs_per_sample,
        energy_ann_over_snn_cmos45=report.energy_named("cmos45").ratio,
        timesteps=cfg_t, presim=cfg_p, files=tuple(files),
        seconds=time.perf_counter() - start)
    if quiet:
        print_json({"fidelity": fid.to_json(), **summary.to_json()})
    else:
        for line in fid.lines():
            con.print(line)
        print_summary(summary)
    if not verified.identical:
        return 6
    fid.check()
    return 0


def print_summary(summary: DemoSummary) -> None:
    """The demo's closing table."""
    runs = summary.runs
    rows = [
        ("ANN (float) test accuracy", f"{100 * summary.ann_test_accuracy:.2f} %"),
        ("quantized ANN agrees with float", f"{100 * summary.quantized_ann_agreement:.2f} %"),
        (f"SNN accuracy, int (T={summary.timesteps}, P={summary.presim})",
         f"{100 * runs['int'].accuracy:.2f} % ({runs['int'].samples} samples)"),
        ("SNN accuracy, norse",
         f"{100 * runs['norse'].accuracy:.2f} % ({runs['norse'].samples} samples)"),
        ("SNN accuracy, lava",
         f"{100 * runs['lava'].accuracy:.2f} % ({runs['lava'].samples} samples)"),
        ("spike for spike identical (int, lava, norse)",
         f"{'yes' if summary.identical else 'NO'} ({summary.verified_samples} samples, every "
         "layer and step)"),
        ("SOPs per sample", f"{summary.sops_per_sample:.4g}"),
        ("ANN MACs per sample", f"{summary.ann_macs_per_sample:.4g}"),
        ("energy ANN / SNN (45 nm CMOS)", f"{summary.energy_ann_over_snn_cmos45:.2f}x"),
        ("files written", ", ".join(str(f) for f in summary.files)),
        ("run time", f"{summary.seconds:.0f} s"),
    ]
    console().print(table("demo summary", ["name", "value"], rows, justify_numbers=False))
