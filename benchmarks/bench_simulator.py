"""Benchmark: the integer simulator against the float PyTorch forward pass of the same network.

For every architecture (random weights, randomized batch norm, thresholds
calibrated so every layer fires at a moderate rate) and profile, on the same
batch, in one process:

* ``T=1 / ANN``: one synchronous simulator run at T = 1 divided by one forward
  pass of the float network (the ``nn.Module`` as a user runs it, NCHW);
* ``T=4 / 4 ANN``: a run at T = 4 divided by four forward passes;
* both with ``kernel="auto"`` (the default: the kernel of each layer chosen by
  measurement in the simulator's first run at that T, which is a warm-up here)
  and, side by side, with ``kernel="float"`` (float32/float64 by the bound
  alone); the kernel chosen per projection is printed with its measured
  milliseconds per candidate;
* the same against the ANN in channels-last memory (the layout the simulator
  itself uses), for context;
* the firing rate of the run (results depend on it);
* peak memory: each case once in a fresh subprocess (``ru_maxrss``), the
  resident set after loading and the peak while running.

Runs are interleaved (ANN, simulator, ANN, ...) and the median ratio over
``--reps`` repetitions is printed, because other processes on a shared machine
change absolute times from one second to the next; the load average is printed
too. With ``--int8`` it also times the exact ``torch._int_mm`` kernel against
float32 (the simulator's ``kernel="int8"``), which wins only on CPUs with
int8 dot-product instructions.

    .venv/bin/python benchmarks/bench_simulator.py                 # all three archs
    .venv/bin/python benchmarks/bench_simulator.py --archs vgg16 --reps 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from csqcfs_deploy.cli.commands.common import console, table
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.files import write_text_atomic
from csqcfs_deploy.ir import IFGraph, load_graph, save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer import Simulator
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, load_digits_dataset
from csqcfs_deploy.train.zoo import arch_spec, build_model, randomize_batchnorm


def calibrate_thresholds(model: nn.Module, x: torch.Tensor, quantile: float) -> None:
    """In one forward pass, set each CS-QCFS channel's threshold to a quantile of its
    positive inputs just before the activation runs (so later layers see calibrated
    inputs): a random network then fires at a moderate rate in every layer."""

    def hook(act: CSQCFS, inputs: tuple[torch.Tensor, ...]) -> None:
        pre = inputs[0].detach().transpose(0, 1).reshape(act.channels, -1)
        lam = []
        for row in pre:
            pos = row[row > 0]
            if pos.numel() > 200_000:
                pos = pos[torch.randperm(pos.numel(), generator=gen)[:200_000]]
            lam.append(torch.quantile(pos, quantile) if pos.numel() else torch.tensor(1.0))
        value = torch.stack(lam).clamp(min=0.05).to(act.up.dtype)
        act.up.data.copy_(torch.log(torch.expm1(value)))

    gen = torch.Generator().manual_seed(0)
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, CSQCFS)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Case:
    """One network and its inputs, prepared once and shared by the timing and memory runs."""

    arch: str
    model: nn.Module
    x_float: torch.Tensor          # normalized input (N, C, H, W) float32
    x_int: torch.Tensor            # integer input (N, C, H, W) int64
    graphs: dict[str, IFGraph]


def build_case(arch: str, profiles: list[str], batch: int, quantile: float) -> Case:
    spec = arch_spec(arch)
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(arch, levels=1), 0)
    if arch == "digits-cnn":
        ds = load_digits_dataset()
        enc = ds.encoding
        raw = ds.x_test[:batch]
        if len(raw) < batch:
            raw = np.concatenate([raw] * (batch // len(raw) + 1))[:batch]
    else:
        enc = CIFAR10_ENCODING
        rng = np.random.default_rng(0)
        # smooth random images (block-upsampled noise) rather than white noise
        low = rng.integers(0, 256, (batch, *spec.input_shape[:1], 8, 8)).astype(np.float32)
        raw = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)
        raw = np.clip(raw + rng.normal(0, 12, raw.shape), 0, 255).astype(np.float32)
    x_float = torch.from_numpy(enc.normalize(raw))
    calibrate_thresholds(model, x_float, quantile)
    folded = fold(model, spec.input_shape, enc, arch=arch, num_classes=10)
    graphs = {p: quantize(folded.graph, p)[0] for p in profiles}
    x_int = torch.from_numpy(enc.to_int(raw))
    return Case(arch, model, x_float, x_int, graphs)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def firing_rate(graph: IFGraph, result: RunResult, timesteps: int, n: int) -> float:
    spikes = sum(int(c.to(torch.int64).sum()) for c in result.window_counts.values())
    neurons = sum(la.neurons for la in graph.if_layers)
    return spikes / (neurons * timesteps * n)


@dataclass(frozen=True)
class Row:
    arch: str
    profile: str
    batch: int
    ann_s: float                 # median seconds of one ANN forward (NCHW)
    ann_cl_s: float              # the same in channels-last memory
    sim_t1_s: float              # kernel="auto" (the default)
    sim_t4_s: float
    ratio_t1: float              # median over reps of sim(T=1) / ann
    ratio_t4: float              # median over reps of sim(T=4) / (4 ann)
    ratio_t1_cl: float
    ratio_t4_cl: float
    rate_t1: float
    rate_t4: float
    float_t1_s: float            # kernel="float", timed in the same reps
    float_t4_s: float
    ratio_t1_float: float        # median over reps of sim_float(T=1) / ann
    ratio_t4_float: float
    kernels_t1: dict[str, dict[str, object]]   # auto's choice per projection at T=1
    kernels_t4: dict[str, dict[str, object]]
    ann_rss_mib: float | None = None    # resident before the measured run
    ann_peak_mib: float | None = None
    sim_t1_peak_mib: float | None = None
    sim_t4_peak_mib: float | None = None


def time_case(case: Case, profile: str, reps: int) -> Row:
    graph = case.graphs[profile]
    sim = Simulator(graph)
    flt = Simulator(graph, kernel="float")
    model_cl = _channels_last_copy(case.model)
    x_cl = case.x_float.contiguous(memory_format=torch.channels_last)
    n = len(case.x_int)

    def ann() -> None:
        with torch.no_grad():
            case.model(case.x_float)

    def ann_cl() -> None:
        with torch.no_grad():
            model_cl(x_cl)

    r1 = sim.run(case.x_int, RunConfig(1))           # auto measures its kernels here
    r4 = sim.run(case.x_int, RunConfig(4))
    flt.run(case.x_int, RunConfig(1))
    flt.run(case.x_int, RunConfig(4))
    ann()
    ann_cl()                                         # warm-up of all six
    t_ann, t_cl, t1, t4, q1, q4, q1c, q4c, f1, f4, qf1, qf4 = (
        [] for _ in range(12))  # type: ignore[var-annotated]
    for _ in range(reps):
        a = timed(ann)
        s1 = timed(lambda: sim.run(case.x_int, RunConfig(1)))
        g1 = timed(lambda: flt.run(case.x_int, RunConfig(1)))
        c = timed(ann_cl)
        s4 = timed(lambda: sim.run(case.x_int, RunConfig(4)))
        g4 = timed(lambda: flt.run(case.x_int, RunConfig(4)))
        a2 = timed(ann)
        ab = (a + a2) / 2                            # the ANN around the simulator runs
        t_ann.append(ab)
        t_cl.append(c)
        t1.append(s1)
        t4.append(s4)
        q1.append(s1 / ab)
        q4.append(s4 / (4 * ab))
        q1c.append(s1 / c)
        q4c.append(s4 / (4 * c))
        f1.append(g1)
        f4.append(g4)
        qf1.append(g1 / ab)
        qf4.append(g4 / (4 * ab))
    med = statistics.median
    return Row(case.arch, profile, n, med(t_ann), med(t_cl), med(t1), med(t4), med(q1),
               med(q4), med(q1c), med(q4c), firing_rate(graph, r1, 1, n),
               firing_rate(graph, r4, 4, n), med(f1), med(f4), med(qf1), med(qf4),
               r1.kernels or {}, r4.kernels or {})


def kernel_lines(row: Row) -> list[str]:
    """One line per projection: the kernel auto chose at T=1 and T=4 and the measured
    milliseconds per candidate (an estimate from a slice for one dropped early)."""

    def ms(k: dict[str, object]) -> str:
        times = k.get("ms") or {}
        assert isinstance(times, dict)
        return ", ".join(f"{c} {v:.1f}" for c, v in times.items()) or "one candidate"

    lines = []
    for name, k1 in row.kernels_t1.items():
        k4 = row.kernels_t4.get(name, {})
        lines.append(f"    {name}: T=1 {k1['chosen']} ({ms(k1)} ms); "
                     f"T=4 {k4.get('chosen', '-')} ({ms(k4)} ms)")
    return lines


def _channels_last_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


# ---------------------------------------------------------------- memory (subprocesses)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(kind: str, directory: Path, profile: str) -> dict[str, float]:
    """Load one prepared case and run ``kind`` twice (the second is measured, as in use:
    weights prepared, allocator warm). Returns the resident MiB before the measured run
    and the peak during it (VmHWM after resetting it; else ru_maxrss since start)."""
    x_float = torch.load(directory / "x_float.pt")
    x_int = torch.load(directory / "x_int.pt")
    model = torch.load(directory / "model.pt", weights_only=False)
    graph = load_graph(directory / f"{profile}.ifg")
    sim = Simulator(graph)

    def once() -> None:
        with torch.no_grad():
            if kind == "ann":
                model(x_float)
            else:
                sim.run(x_int, RunConfig(int(kind[-1])))

    once()
    resident = _status_kib("VmRSS")
    if _reset_peak() and resident is not None:
        once()
        peak = _status_kib("VmHWM")
        assert peak is not None
        return {"resident_mib": resident / 1024, "peak_mib": peak / 1024}
    once()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"resident_mib": (resident or 0) / 1024, "peak_mib": peak_rss / 1024}


def measure_memory(case: Case, profile: str, directory: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in ("ann", "sim_t1", "sim_t4"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--dir", str(directory),
             "--profiles", profile, "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {kind} failed: {proc.stderr.strip()[-400:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def save_case(case: Case, directory: Path) -> None:
    torch.save(case.x_float, directory / "x_float.pt")
    torch.save(case.x_int, directory / "x_int.pt")
    torch.save(case.model, directory / "model.pt")
    for profile, graph in case.graphs.items():
        save_graph(graph, directory / f"{profile}.ifg")


# ---------------------------------------------------------------- kernels


def int_mm_versus_float(reps: int) -> dict[str, float]:
    """The issue's 4096x1152 by 1152x256 product: int8 _int_mm vs float32 mm."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (4096, 1152), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (1152, 256), generator=gen, dtype=torch.int8)
    af, bf = a.float(), b.float()
    assert torch.equal(torch._int_mm(a, b).long(), (af @ bf).long())
    ti = statistics.median(timed(lambda: torch._int_mm(a, b)) for _ in range(reps))
    tf = statistics.median(timed(lambda: af @ bf) for _ in range(reps))
    return {"int_mm_s": ti, "float32_mm_s": tf, "int_mm_over_float": ti / tf}


def int8_kernel_versus_float(case: Case, profile: str, reps: int) -> dict[str, float]:
    graph = case.graphs[profile]
    fast, exact8 = Simulator(graph), Simulator(graph, kernel="int8")
    a = fast.run(case.x_int, RunConfig(1))
    b = exact8.run(case.x_int, RunConfig(1))
    assert torch.equal(a.readout, b.readout)
    tf = statistics.median(timed(lambda: fast.run(case.x_int, RunConfig(1))) for _ in range(reps))
    ti = statistics.median(timed(lambda: exact8.run(case.x_int, RunConfig(1)))
                           for _ in range(reps))
    return {"arch": case.arch, "profile": profile, "float_kernel_s": tf, "int8_kernel_s": ti,  # type: ignore[dict-item]
            "int8_over_float": ti / tf}


# ---------------------------------------------------------------- main


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="digits-cnn,resnet20,vgg16")
    ap.add_argument("--profiles", default="loihi2,int8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quantile", type=float, default=0.9,
                    help="threshold calibration quantile (higher: sparser spikes)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--int8", action="store_true", help="also time the int8 _int_mm kernel")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), profiles[0])))
        return 0
    con = console()
    info = machine()
    con.print(f"CPU {info['cpu']} ({info['cores']} cores), torch {info['torch']} with "
              f"{info['torch_threads']} threads, load average {info['load_average']}")
    rows: list[Row] = []
    kernels: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
            con.print(f"preparing {arch} ...")
            case = build_case(arch, profiles, args.batch, args.quantile)
            directory = Path(tmp) / arch
            directory.mkdir()
            if not args.no_memory:
                save_case(case, directory)
            for profile in profiles:
                row = time_case(case, profile, args.reps)
                if not args.no_memory:
                    mem = measure_memory(case, profile, directory)
                    row = Row(**{**asdict(row),
                                 "ann_rss_mib": mem["ann"]["resident_mib"],
                                 "ann_peak_mib": mem["ann"]["peak_mib"],
                                 "sim_t1_peak_mib": mem["sim_t1"]["peak_mib"],
                                 "sim_t4_peak_mib": mem["sim_t4"]["peak_mib"]})
                rows.append(row)
                con.print(f"  {arch} {profile}: T=1/ANN {row.ratio_t1:.2f} "
                          f"(float kernels {row.ratio_t1_float:.2f}), T=4/4ANN "
                          f"{row.ratio_t4:.2f} (float kernels {row.ratio_t4_float:.2f})")
            if args.int8 and arch == "digits-cnn":
                kernels.append(int8_kernel_versus_float(case, profiles[0], args.reps))
    if args.int8:
        mm = int_mm_versus_float(args.reps)
    info["load_average_end"] = list(os.getloadavg())

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    con.print(table(
        f"integer simulator vs float ANN forward (batch {args.batch}, median of {args.reps}; "
        "ratio < 1: the simulator is faster)",
        ["arch", "profile", "ANN ms", "T=1 ms", "T=1 / ANN", "float T=1 / ANN", "T=4 ms",
         "T=4 / 4 ANN", "float T=4 / 4 ANN", "T=1 / ANN-cl", "T=4 / 4 ANN-cl", "rate T=1",
         "rate T=4", "MiB at rest", "peak ANN", "peak T=1", "peak T=4"],
        [(r.arch, r.profile, 1e3 * r.ann_s, 1e3 * r.sim_t1_s, f"{r.ratio_t1:.2f}",
          f"{r.ratio_t1_float:.2f}", 1e3 * r.sim_t4_s, f"{r.ratio_t4:.2f}",
          f"{r.ratio_t4_float:.2f}", f"{r.ratio_t1_cl:.2f}", f"{r.ratio_t4_cl:.2f}",
          r.rate_t1, r.rate_t4, mib(r.ann_rss_mib), mib(r.ann_peak_mib),
          mib(r.sim_t1_peak_mib), mib(r.sim_t4_peak_mib)) for r in rows]))
    con.print("T=1 ms, T=4 ms and the unmarked ratios: kernel='auto' (the default, chosen "
              "by measurement); 'float': kernel='float', timed in the same repetitions.")
    for r in rows:
        con.print(f"kernels chosen by kernel='auto', {r.arch} {r.profile} (ms per call on "
                  "all rows per candidate):")
        for line in kernel_lines(r):
            con.print(line)
    con.print("goals: T=1 / ANN <= 1.3 (project goal 0.5), T=4 / 4 ANN <= 1.0. ANN-cl: the "
              "ANN in channels-last memory, the layout the simulator uses. Memory: resident "
              "MiB of a fresh process holding the model, the graph and the batch, and the "
              "peak while running once (MiB).")
    if args.int8:
        con.print(f"torch._int_mm 4096x1152 @ 1152x256: {1e3 * mm['int_mm_s']:.1f} ms, float32 "
                  f"{1e3 * mm['float32_mm_s']:.1f} ms (int8 / float = "
                  f"{mm['int_mm_over_float']:.2f})")
        for k in kernels:
            con.print(f"{k['arch']} {k['profile']} T=1 with kernel='int8': "
                      f"{1e3 * k['int8_kernel_s']:.1f} ms vs float kernels "
                      f"{1e3 * k['float_kernel_s']:.1f} ms (x{k['int8_over_float']:.2f})")
    con.print(f"load average at the end {info['load_average_end']}")
    if args.json:
        data = {"machine": info, "rows": [asdict(r) for r in rows],
                "int8": {"matmul": mm, "kernels": kernels} if args.int8 else None}
        write_text_atomic(args.json, json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
