"""Benchmark: the Norse back end against the integer simulator on the same batch.

For each network the same integer batch runs through the synchronous integer
simulator (``simulate``) and through the Norse module (``--backend norse``),
interleaved, ``--repeats`` times after one warm-up; the script prints the
median seconds of each and the ratio ``norse / int`` (> 1: Norse is slower),
and checks on the way that both produced identical spike counts and readouts.

    .venv/bin/python benchmarks/bench_norse.py
    .venv/bin/python benchmarks/bench_norse.py --digits-checkpoint digits.pt --json

Without ``--digits-checkpoint`` the digits-cnn is untrained (random weights
and batch norm, like vgg16 here): the dense convolutions and the per-step
work of both back ends do not depend on the training, the spike counts do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.cli.commands.common import console, print_json, table
from csqcfs_deploy.cli.model_io import load_model
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import CsqcfsError, VerificationFailed
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.profiles import PROFILES
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.simulators.norse.runner import open_runner
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, DIGITS_ENCODING, load_digits_dataset
from csqcfs_deploy.train.zoo import arch_spec, build_model, randomize_batchnorm


@dataclass(frozen=True)
class Case:
    """One network and the batch both back ends run."""

    name: str
    graph: IFGraph
    x_int: torch.Tensor



def zoo_graph(arch: str, profile: str, encoding, init_threshold: float | None) -> IFGraph:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(arch, 4, init_threshold=init_threshold), 1)
    folded = fold(model, arch_spec(arch).input_shape, encoding, arch=arch, num_classes=10)
    return quantize(folded.graph, profile)[0]


def make_cases(args: argparse.Namespace) -> list[Case]:
    digits = load_digits_dataset()
    if args.digits_checkpoint:
        dgraph = load_model(args.digits_checkpoint, profile=args.profile).graph
        dname = "digits-cnn (trained)"
    else:
        dgraph = zoo_graph("digits-cnn", args.profile, DIGITS_ENCODING, None)
        dname = "digits-cnn (untrained)"
    cases = [Case(dname, dgraph, input_units(dgraph, digits.x_test[: args.digits_batch]))]
    vgraph = zoo_graph("vgg16", args.profile, CIFAR10_ENCODING, 1.0)
    lo, hi = vgraph.input.encoding.int_range
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(lo, hi + 1, size=(args.vgg_batch, *vgraph.input.shape)))
    cases.append(Case("vgg16 (untrained)", vgraph, x))
    return cases


def same(a: RunResult, b: RunResult) -> bool:
    return torch.equal(a.readout, b.readout) and all(
        torch.equal(a.spike_counts[k], b.spike_counts[k]) for k in a.spike_counts)


def timed(fn: Callable[[], RunResult]) -> tuple[float, RunResult]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench(case: Case, cfg: RunConfig, repeats: int, device: str) -> dict[str, object]:
    start = time.perf_counter()
    runner = open_runner(case.graph, cfg, BackendOptions(device=device))
    build_s = time.perf_counter() - start
    x = case.x_int
    int_s: list[float] = []
    norse_s: list[float] = []
    expected = simulate(case.graph, x, cfg)           # warm-up, and the reference
    if not same(expected, runner.run(x)):
        raise VerificationFailed(f"{case.name}: norse and the simulator disagree")
    for _ in tqdm(range(repeats), desc=case.name, leave=False, file=sys.stderr):
        t, _ = timed(lambda: simulate(case.graph, x, cfg))
        int_s.append(t)
        t, got = timed(lambda: runner.run(x))
        norse_s.append(t)
        if not same(expected, got):
            raise VerificationFailed(f"{case.name}: norse and the simulator disagree")
    runner.close()
    int_med, norse_med = statistics.median(int_s), statistics.median(norse_s)
    return {
        "network": case.name, "profile": case.graph.meta.profile, "batch": int(len(x)),
        "timesteps": cfg.timesteps, "device": device, "dtype": str(runner.net.dtype),
        "int_s": int_med, "norse_s": norse_med, "ratio": norse_med / int_med,
        "build_s": build_s, "repeats": repeats, "spikes_identical": True,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timesteps", "-T", type=int, default=4)
    p.add_argument("--profile", choices=sorted(PROFILES), default="loihi2")
    p.add_argument("--digits-batch", type=int, default=360, help="digits test samples")
    p.add_argument("--vgg-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the Norse module's device)")
    p.add_argument("--digits-checkpoint", metavar="FILE",
                   help="a trained digits-cnn checkpoint (default: an untrained one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both back ends (default: torch's)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 8
        torch.set_num_threads(args.threads)
    try:
        cfg = RunConfig(timesteps=args.timesteps)
        rows = [bench(case, cfg, args.repeats, args.device) for case in make_cases(args)]
    except CsqcfsError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print_json({"torch_threads": torch.get_num_threads(), "rows": rows})
        return 0
    console().print(table(
        f"Norse back end / integer simulator, same batch, T = {args.timesteps} "
        f"(median of {args.repeats}, torch threads {torch.get_num_threads()})",
        ["network", "profile", "batch", "device", "dtype", "int s", "norse s", "norse / int",
         "spikes identical"],
        [(r["network"], r["profile"], r["batch"], r["device"], r["dtype"], r["int_s"],
          r["norse_s"], r["ratio"], "yes") for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
