"""Benchmark at scale: ratios measured side by side in one run (issue 15, item 4).

In one process, on vgg16 and resnet20 (random weights, thresholds calibrated as in
``bench_simulator.py``, whose model, graph and timing helpers this imports):

1. the integer simulator at T = 1 / one float ANN forward, and at T = 4 / four
   forwards (``bench_simulator.time_case``: interleaved, median of ``--reps``), with
   the kernel the simulator chose (``Simulator.kernel_choice``, where it exists);
2. SpikingJelly 2.0's float multi-step IF network of the same graph (the folded float
   IF graph's weights, ``IFNode(step_mode='m', v_reset=None)`` with its thresholds and
   initial membranes, synapses in ``layer.SeqToANNContainer``) at T = 4 / our simulator
   at T = 4, interleaved, with the agreement of its predictions with ours and with our
   float64 float-IF-graph run (so that the ratio is honest about the work done);
3. Lava samples per second with 1, 2 and 4 local workers and on a local Ray cluster
   (``run --backend lava --workers N`` / ``--ray local``: the Python API under them),
   on digits-cnn and resnet20, as the parent's wall time from opening the workers to
   the merged result (start-up included: worker processes, Ray, Lava's compile);
4. on a GPU, when there is one: the simulator / the ANN on the same device.

The header gives the CPU model and flags, cores, load average, versions and date.

    bash benchmarks/sj_env.sh                      # SpikingJelly 2.0.0 into /tmp/sjenv
    .venv/bin/python benchmarks/bench_scale.py --json scale.json
    .venv/bin/python benchmarks/bench_scale.py --quick        # about 3 minutes
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import io
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_simulator import Case, build_case, time_case, timed  # noqa: E402
from benchmarks.sj_peer import (  # noqa: E402
    FLOAT_CHECK_SAMPLES,
    SJ_HINT,
    SJRow,
    load_spikingjelly,
    package_version,
    sj_row,
)
from csqcfs_deploy.cli.commands.common import table  # noqa: E402
from csqcfs_deploy.cli.sharded import evaluate_on, sharding  # noqa: E402
from csqcfs_deploy.cli.workers import Parallel  # noqa: E402
from csqcfs_deploy.errors import CsqcfsError, UsageError  # noqa: E402
from csqcfs_deploy.files import write_text_atomic  # noqa: E402
from csqcfs_deploy.ir import IFGraph  # noqa: E402
from csqcfs_deploy.ir.schedule import RunConfig  # noqa: E402
from csqcfs_deploy.run.backends import BackendOptions  # noqa: E402
from csqcfs_deploy.simulators.integer import Simulator  # noqa: E402
from csqcfs_deploy.train.datasets import load_digits_dataset  # noqa: E402

#: /proc/cpuinfo flags that decide which kernels win (int8 dot products, AMX tiles)
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


# ---------------------------------------------------------------- header


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model, logical processors and the :data:`RELEVANT_FLAGS` present, from the
    text of /proc/cpuinfo (the first processor's model and flags)."""
    model, flags, processors = "unknown", None, 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    present = [f for f in RELEVANT_FLAGS if f in (flags or set())]
    return {"cpu": model, "processors": processors, "flags": present,
            "int8_dot_product": any(f in present for f in ("avx512_vnni", "avx_vnni",
                                                           "amx_int8"))}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, to two decimals."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_header(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """What the numbers depend on: CPU, flags, cores, load, versions, date."""
    try:
        text = Path(cpuinfo_path).read_text()
    except OSError:
        text = ""
    return {**parse_cpuinfo(text), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "torch": torch.__version__, "numpy": np.__version__,
            "lava": package_version("lava-nc"), "ray": package_version("ray"),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ---------------------------------------------------------------- 1. simulator vs ANN


@dataclass(frozen=True)
class SimRow:
    arch: str
    profile: str
    batch: int
    ann_ms: float
    sim_t1_ms: float
    sim_t4_ms: float
    ratio_t1: float          # median over reps of sim(T=1) / ANN
    ratio_t4: float          # median over reps of sim(T=4) / (4 ANN)
    rate_t1: float
    rate_t4: float
    kernel_choice: str


def describe_kernel_choice(choice: object) -> str:
    """``Simulator.kernel_choice`` (projection -> its choice, whose ``chosen`` names the
    kernel) in a few words: the projections counted by kernel."""
    if choice is None:
        return "n/a (Simulator has no kernel_choice)"
    if isinstance(choice, Mapping):
        counts = Counter(str(getattr(v, "chosen", v)) for v in choice.values())
        return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none"
    return str(choice)


def kernel_choice_of(graph: IFGraph, x_int: torch.Tensor) -> str:
    """The automatic kernel choice after one run at T = 1 on ``x_int``."""
    sim = Simulator(graph)
    sim.run(x_int, RunConfig(1))
    return describe_kernel_choice(getattr(sim, "kernel_choice", None))


def simulator_row(case: Case, profile: str, reps: int) -> SimRow:
    r = time_case(case, profile, reps)
    return SimRow(r.arch, r.profile, r.batch, 1e3 * r.ann_s, 1e3 * r.sim_t1_s,
                  1e3 * r.sim_t4_s, r.ratio_t1, r.ratio_t4, r.rate_t1, r.rate_t4,
                  kernel_choice_of(case.graphs[profile], case.x_int))


# ---------------------------------------------------------------- 3. Lava, sharded


@dataclass(frozen=True)
class LavaRow:
    model: str
    mode: str                # "1 process", "N workers", "Ray local N"
    workers: int
    samples: int
    timesteps: int
    wall_s: float            # the parent's wall time, start-up included
    s_per_sample: float
    samples_per_s: float
    same_as_one_process: bool | None    # predictions equal to the 1-process run's


def lava_row(model: str, graph: IFGraph, raw: np.ndarray, workers: int, ray: bool,
             timesteps: int, reference: np.ndarray | None) -> tuple[LavaRow, np.ndarray]:
    """One ``run --backend lava`` (pipelined, T = ``timesteps``) over ``raw``, sharded as
    asked; timed from opening the workers to the merged summary."""
    parallel = Parallel(workers if workers > 1 or ray else None, "local" if ray else None)
    batch = math.ceil(len(raw) / workers)
    labels = np.zeros(len(raw), dtype=np.int64)
    cfg = RunConfig(timesteps, 0, "pipelined")
    start = time.perf_counter()
    with sharding(parallel, graph) as sharder:
        summary = evaluate_on(sharder, "lava", graph, raw, labels, cfg, batch,
                              BackendOptions(), progress=False)
    wall = time.perf_counter() - start
    mode = f"Ray local {workers}" if ray else ("1 process" if workers == 1
                                              else f"{workers} workers")
    same = None if reference is None else bool(np.array_equal(summary.predictions, reference))
    return LavaRow(model, mode, workers, len(raw), timesteps, wall, wall / len(raw),
                   len(raw) / wall, same), summary.predictions


def cifar_like_raw(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 3x32x32 pixel images (8x8 noise upsampled 4x, plus pixel noise),
    the kind of images bench_simulator calibrates its random networks on."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32)
    raw = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)
    return np.clip(raw + rng.normal(0, 12, raw.shape), 0, 255).astype(np.float32)


def lava_rows(model: str, graph: IFGraph, raw: np.ndarray, workers: list[int],
              ray_workers: int, timesteps: int) -> list[LavaRow]:
    """Lava with every worker count in ``workers`` (1 first: the reference) and on Ray."""
    rows: list[LavaRow] = []
    reference = None
    for w in sorted(set(workers)):
        row, preds = lava_row(model, graph, raw, w, False, timesteps, reference)
        reference = preds if reference is None else reference
        rows.append(row)
        print(f"  lava {model} {row.mode}: {row.s_per_sample:.2f} s/sample", flush=True)
    if ray_workers > 0:
        row, _ = lava_row(model, graph, raw, ray_workers, True, timesteps, reference)
        rows.append(row)
        print(f"  lava {model} {row.mode}: {row.s_per_sample:.2f} s/sample", flush=True)
    return rows


# ---------------------------------------------------------------- 4. GPU


@dataclass(frozen=True)
class GpuRow:
    arch: str
    device: str
    ann_ms: float
    ratio_t1: float
    ratio_t4: float


def gpu_note() -> str | None:
    """Why no GPU row is measured, or None when one can be."""
    if not torch.cuda.is_available():
        return "no GPU: not measured"
    if "device" not in inspect.signature(Simulator).parameters:
        return "no CUDA int simulator (Simulator takes no device): not measured"
    return None


def timed_cuda(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    seconds = timed(fn)
    torch.cuda.synchronize()
    return seconds


def gpu_row(case: Case, profile: str, reps: int) -> GpuRow:
    """Simulator (``device='cuda'``) / the ANN on the same GPU, interleaved."""
    import copy

    model = copy.deepcopy(case.model).cuda()
    x_float, x_int = case.x_float.cuda(), case.x_int.cuda()
    sim = Simulator(case.graphs[profile], device="cuda")  # type: ignore[call-arg]

    def ann() -> None:
        with torch.no_grad():
            model(x_float)

    sim.run(x_int, RunConfig(4))
    ann()
    q1, q4, anns = [], [], []
    for _ in range(reps):
        a = timed_cuda(ann)
        s1 = timed_cuda(lambda: sim.run(x_int, RunConfig(1)))
        s4 = timed_cuda(lambda: sim.run(x_int, RunConfig(4)))
        a = (a + timed_cuda(ann)) / 2
        anns.append(a)
        q1.append(s1 / a)
        q4.append(s4 / (4 * a))
    med = statistics.median
    return GpuRow(case.arch, torch.cuda.get_device_name(), 1e3 * med(anns), med(q1), med(q4))


# ---------------------------------------------------------------- report


@dataclass
class Report:
    machine: dict[str, Any]
    options: dict[str, Any]
    simulator: list[SimRow] = field(default_factory=list)
    spikingjelly: list[SJRow] = field(default_factory=list)
    lava: list[LavaRow] = field(default_factory=list)
    gpu: list[GpuRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(report: Report, width: int = 160) -> str:
    """The header, the four tables and the notes, as text."""
    from rich.console import Console

    m, o = report.machine, report.options
    con = Console(file=io.StringIO(), width=width, highlight=False, color_system=None)
    con.print(f"CPU {m['cpu']}: {m['cores']} cores ({m['usable_cores']} usable), flags "
              f"{' '.join(m['flags']) or 'none of ' + ' '.join(RELEVANT_FLAGS)}; int8 dot "
              f"products: {'yes' if m['int8_dot_product'] else 'no'}", soft_wrap=True)
    con.print(f"torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}, lava-nc "
              f"{m['lava']}, ray {m['ray']}; {m['date']}; load average {m['load_average']}"
              + (f" -> {m['load_average_end']} at the end" if "load_average_end" in m else ""),
              soft_wrap=True)
    con.print(table(
        f"1. integer simulator / float ANN forward (batch {o.get('batch')}, median of "
        f"{o.get('reps')} interleaved reps; < 1: the simulator is faster)",
        ["arch", "profile", "batch", "ANN ms", "T=1 ms", "T=1 / ANN", "T=4 ms", "T=4 / 4 ANN",
         "rate T=1", "rate T=4", "kernels chosen (projections)"],
        [(r.arch, r.profile, r.batch, r.ann_ms, r.sim_t1_ms, _num(r.ratio_t1), r.sim_t4_ms,
          _num(r.ratio_t4), r.rate_t1, r.rate_t4, r.kernel_choice) for r in report.simulator]))
    con.print(table(
        "2. SpikingJelly float multi-step IF / our integer simulator, same graph and input, "
        "interleaved (> 1: SpikingJelly is slower); agreement of predictions with ours, "
        f"and with our float64 float IF graph on the first {FLOAT_CHECK_SAMPLES} samples",
        ["arch", "SJ", "batch", "T", "SJ ms", "ours ms", "SJ / ours", "agree with ours",
         "agree with float IF", "rate SJ", "rate ours"],
        [(r.arch, r.version or r.status, r.batch or "-", r.timesteps, _num(r.sj_ms, 1),
          _num(r.sim_ms, 1), _num(r.ratio), _num(r.agree_with_ours, 3),
          _num(r.agree_with_float_if, 3), _num(r.rate_sj, 4), _num(r.rate_ours, 4))
         for r in report.spikingjelly]))
    con.print(table(
        "3. Lava (pipelined) samples per second: the parent's wall time from opening the "
        "workers to the merged result, start-up (processes, Ray, Lava compile) included",
        ["model", "mode", "samples", "T", "wall s", "s / sample", "samples / s",
         "same as 1 process"],
        [(r.model, r.mode, r.samples, r.timesteps, r.wall_s, r.s_per_sample, r.samples_per_s,
          "-" if r.same_as_one_process is None else r.same_as_one_process)
         for r in report.lava]))
    if report.gpu:
        con.print(table("4. GPU: integer simulator / float ANN on the same device",
                        ["arch", "device", "ANN ms", "T=1 / ANN", "T=4 / 4 ANN"],
                        [(r.arch, r.device, r.ann_ms, _num(r.ratio_t1), _num(r.ratio_t4))
                         for r in report.gpu]))
    for note in report.notes:
        con.print(note)
    return con.file.getvalue()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="vgg16,resnet20")
    ap.add_argument("--profile", default="loihi2", help="profile of the simulator rows")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (--quick: 16)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sj-path", default=None, help=f"SpikingJelly folder ({SJ_HINT})")
    ap.add_argument("--lava-models", default="digits-cnn,resnet20")
    ap.add_argument("--lava-workers", default="1,2,4")
    ap.add_argument("--ray-workers", type=int, default=2, help="0: no Ray row")
    ap.add_argument("--lava-samples", default="digits-cnn=32,resnet20=8")
    ap.add_argument("--lava-timesteps", type=int, default=4)
    ap.add_argument("--quick", action="store_true",
                    help="reps 2, batch 16, Lava on 16 digits samples only (about 3 min)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.lava_models, args.lava_samples = 2, "digits-cnn", "digits-cnn=16"
    args.batch = args.batch or (16 if args.quick else 64)
    return args


def _names(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def lava_sample_counts(text: str) -> dict[str, int]:
    """``--lava-samples`` ("digits-cnn=32,resnet20=8") as model -> samples."""
    counts: dict[str, int] = {}
    for item in _names(text):
        model, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"--lava-samples: {item!r} is not MODEL=N with N >= 1")
        counts[model.strip()] = int(n)
    return counts


def lava_inputs(model: str, cases: dict[str, Case], n: int, profile: str = "loihi2"
                ) -> tuple[IFGraph, np.ndarray]:
    """The loihi2 graph of ``model`` (built here if the simulator rows did not) and
    ``n`` raw samples (digits test images; CIFAR-like images otherwise)."""
    if model not in cases or profile not in cases[model].graphs:
        cases[model] = build_case(model, [profile], 64, 0.9)
    if model == "digits-cnn":
        return cases[model].graphs[profile], load_digits_dataset().x_test[:n]
    return cases[model].graphs[profile], cifar_like_raw(n)


def measure(args: argparse.Namespace) -> Report:
    report = Report(machine_header(), {k: v for k, v in vars(args).items()})
    sj, sj_version = load_spikingjelly(args.sj_path)
    if sj is None:
        print(f"SpikingJelly {sj_version}", flush=True)
    note = gpu_note()
    cases: dict[str, Case] = {}
    for arch in _names(args.archs):
        print(f"preparing {arch} (batch {args.batch}) ...", flush=True)
        cases[arch] = case = build_case(arch, sorted({args.profile, "loihi2"}), args.batch, 0.9)
        report.simulator.append(row := simulator_row(case, args.profile, args.reps))
        print(f"  {arch}: T=1/ANN {row.ratio_t1:.2f}, T=4/4ANN {row.ratio_t4:.2f}", flush=True)
        if sj is None:
            report.spikingjelly.append(SJRow(arch, "not installed"))
        else:
            report.spikingjelly.append(r := sj_row(case, args.profile, sj, sj_version,
                                                   args.reps))
            print(f"  {arch}: SJ/ours at T=4 {r.ratio:.2f}", flush=True)
        if note is None:
            report.gpu.append(gpu_row(case, args.profile, args.reps))
    samples = lava_sample_counts(args.lava_samples)
    workers = [int(w) for w in _names(args.lava_workers)]
    for model in _names(args.lava_models):
        graph, raw = lava_inputs(model, cases, samples.get(model, 8))
        report.lava += lava_rows(model, graph, raw, workers, args.ray_workers,
                                 args.lava_timesteps)
    report.machine["load_average_end"] = load_average()
    if sj is None:
        report.notes.append(f"SpikingJelly {sj_version}")
    if args.quick:
        report.notes.append("--quick: batch, reps and Lava models reduced (resnet20 on Lava "
                            "takes 7-40 s per sample); run without it for the issue's rows.")
    report.notes.append(note or "GPU measured")
    report.notes.append("goals (issue 15): T=1 / ANN <= 0.5 for vgg16 at batch 64 on a VNNI "
                        "machine; SJ / ours >= 3 at T = 4 on a VNNI machine.")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = measure(args)
    except CsqcfsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render(report), end="")
    if args.json:
        write_text_atomic(args.json, report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
