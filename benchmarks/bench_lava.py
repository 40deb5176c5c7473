"""Benchmark: the Lava back end (and the netx file) against the integer simulator.

For each configuration (T, P) the same digits test samples run through the
pipelined integer simulator (one batch, recording every spike) and through
``--backend lava`` (compiled once, samples back to back, recording every
spike). It prints Lava's build / compile / start times, seconds per sample of
each, the ratio ``lava / int`` (> 1: Lava is slower) and the match: samples x
neurons x steps compared and the mismatches found. With ``--netx`` it also
writes the lava-dl netx file of the per-layer-threshold graph and compares it
at T = 1 (counted steps and readout).

    .venv/bin/python benchmarks/bench_lava.py --checkpoint digits.pt
    .venv/bin/python benchmarks/bench_lava.py --checkpoint digits.pt --samples 50 --netx --json

Without ``--checkpoint`` the digits-cnn is untrained (random weights and batch
norm): timings hold, spike counts differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from csqcfs_deploy.cli.commands.common import console, print_json, table
from csqcfs_deploy.cli.model_io import load_model
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import CsqcfsError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import DIGITS_ENCODING, load_digits_dataset
from csqcfs_deploy.train.zoo import build_model


@dataclass(frozen=True)
class Row:
    timesteps: int
    presim: int
    samples: int
    steps: int
    build_s: float
    compile_s: float
    start_s: float
    lava_s_per_sample: float
    int_s_per_sample: float
    ratio: float
    compared: int
    mismatches: int


def graphs(checkpoint: str | None) -> tuple[IFGraph, IFGraph]:
    """(per-channel, per-layer) loihi2 graphs of the digits-cnn."""
    if checkpoint:
        return (load_model(checkpoint, profile="loihi2").graph,
                load_model(checkpoint, profile="loihi2", per_channel=False).graph)
    torch.manual_seed(0)
    model: nn.Module = build_model("digits-cnn")
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    folded = fold(model.eval(), (1, 8, 8), DIGITS_ENCODING).graph
    return quantize(folded, "loihi2")[0], quantize(folded, "loihi2", per_channel=False)[0]


def bench(graph: IFGraph, x: torch.Tensor, timesteps: int, presim: int) -> Row:
    from csqcfs_deploy.simulators.lava.runner import LavaRunner

    cfg = RunConfig(timesteps=timesteps, presim=presim, schedule="pipelined", record=True)
    n = x.shape[0]
    simulate(graph, x[:1], cfg)  # warm-up
    t0 = time.perf_counter()
    ref = simulate(graph, x, cfg)
    int_s = time.perf_counter() - t0
    runner = LavaRunner(graph, cfg, BackendOptions(progress=True))
    try:
        t0 = time.perf_counter()
        got = runner.run(x)
        lava_s = time.perf_counter() - t0
        timings = runner.timings
    finally:
        runner.close()
    assert ref.spikes is not None and got.spikes is not None
    compared = sum(s.numel() for s in ref.spikes.values())
    mismatches = sum(int((got.spikes[k] != s).sum()) for k, s in ref.spikes.items())
    mismatches += int((got.readout != ref.readout).sum())
    return Row(timesteps, presim, n, ref.steps, timings.build_s, timings.compile_s,
               timings.start_s, lava_s / n, int_s / n, lava_s / int_s, compared, mismatches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="trained digits-cnn checkpoint (default: untrained)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--configs", default="1:0,4:0,1:4", help="T:P pairs, comma-separated")
    p.add_argument("--netx", action="store_true", help="also check the lava-netx file")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        per_channel, per_layer = graphs(args.checkpoint)
        x = input_units(per_channel, load_digits_dataset().x_test[: args.samples])
        rows = [bench(per_channel, x, int(t), int(pp))
                for t, pp in (c.split(":") for c in args.configs.split(","))]
        netx = None
        if args.netx:
            from csqcfs_deploy.exporters.netx import write_netx
            from csqcfs_deploy.simulators.lava.netx import check_netx

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "digits.net"
                write_netx(per_layer, path)
                t0 = time.perf_counter()
                xl = input_units(per_layer, load_digits_dataset().x_test[: args.samples])
                netx = check_netx(per_layer, path, xl, progress=True)
                netx_total = time.perf_counter() - t0
    except CsqcfsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        out: dict[str, object] = {"rows": [asdict(r) for r in rows]}
        if netx is not None:
            out["netx"] = {**netx.to_json(), "total_seconds": netx_total}
        print_json(out)
        return 0
    con = console()
    con.print(table(
        f"Lava (Loihi2SimCfg fixed_pt) vs integer simulator, pipelined, digits-cnn, "
        f"{args.samples} test samples",
        ["T", "P", "steps", "compile s", "start s", "lava s/sample", "int s/sample",
         "lava/int", "spikes compared", "mismatches"],
        [(r.timesteps, r.presim, r.steps, r.compile_s, r.start_s, r.lava_s_per_sample,
          r.int_s_per_sample, r.ratio, r.compared, r.mismatches) for r in rows]))
    if netx is not None:
        con.print(table(
            "lava-netx file (per-layer thresholds) vs integer simulator, hard reset, T = 1",
            ["samples", "layers", "counted-step spikes compared", "mismatches", "readout equal",
             "netx s/sample"],
            [(netx.samples, netx.layers, netx.compared, netx.mismatches, netx.readout_equal,
              netx.netx_seconds / max(netx.samples, 1))]))
    return 0 if all(r.mismatches == 0 for r in rows) and (netx is None or netx.mismatches == 0
                                                          ) else 6


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    sys.exit(main())
