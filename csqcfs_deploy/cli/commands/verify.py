"""``csqcfs-deploy verify``: prove every back end spikes exactly like the integer simulator."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_json_arg,
    add_model_args,
    console,
    print_json,
    resolve_model,
    table,
)
from csqcfs_deploy.cli.commands.run import (
    add_run_args,
    fold_check_json,
    print_fold_check,
    split,
)
from csqcfs_deploy.cli.fidelity_args import (
    add_gate_args,
    add_scale_args,
    fidelity_of,
    gates_from_args,
    print_fidelity,
)
from csqcfs_deploy.cli.sharded import sharding, verify_on
from csqcfs_deploy.cli.workers import add_parallel_args, parallel_of
from csqcfs_deploy.convert.check import FoldCheck
from csqcfs_deploy.errors import UsageError, VerificationFailed
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BACKENDS, BackendOptions
from csqcfs_deploy.run.fidelity import Fidelity
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.verify import Mismatch, VerifyResult


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="compare every spike of every back end",
                       description="Run the back ends on the same integer inputs, each under "
                       "its schedule, and compare every layer's spikes at every step with the "
                       "integer simulator (which runs both schedules). Exit 0 only when "
                       "everything agrees.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("--backends", default="int,lava,norse",
                   help="comma-separated back ends (default int,lava,norse)")
    add_run_args(p)
    p.add_argument("--device", default="cpu", help="device for norse and int (cpu or cuda[:i])")
    add_scale_args(p)
    add_gate_args(p)
    add_parallel_args(p)
    add_json_arg(p)
    p.set_defaults(func=run, batch_size=32)


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; known: "
                         f"{', '.join(BACKENDS)}")
    return names


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify --json`` prints: the result, the inputs it was run on and the fold
    check (None when the model was not folded here)."""

    result: VerifyResult
    dataset: str
    samples: int
    timesteps: int
    presim: int
    fold_check: FoldCheck | None = None
    fidelity: Fidelity | None = None

    def to_json(self) -> dict[str, object]:
        """The fidelity, the result's JSON (``identical``: the back ends agree with each
        other), ``verified`` (they agree *and* the fidelity gates hold), dataset, samples,
        timesteps, presim, fold check."""
        verified = self.result.identical and (self.fidelity is None or self.fidelity.passed)
        return {"fidelity": None if self.fidelity is None else self.fidelity.to_json(),
                **self.result.to_json(), "verified": verified,
                "dataset": self.dataset, "samples": self.samples,
                "timesteps": self.timesteps, "presim": self.presim,
                "fold_check": fold_check_json(self.fold_check)}


def describe_mismatch(m: Mismatch) -> str:
    """One line: which comparison, layer, sample, neuron and step, and both values."""
    idx = ",".join(str(i) for i in m.neuron)
    where = f"step {m.step}" if m.step else "end of run"
    return (f"{m.backend} vs {m.reference}: layer {m.layer}, sample {m.sample}, "
            f"neuron ({idx}), {where}: expected {m.expected}, got {m.got}")


def print_result(result: VerifyResult, fid: Fidelity | None = None) -> None:
    """Mismatches / values compared per layer and comparison, then one line each."""
    con = console()
    cols = ["layer", "neurons", "spikes (int)"] + [c.name for c in result.comparisons]
    rows = []
    names = list(result.layer_neurons) + [n for c in result.comparisons for n in c.compared
                                          if n not in result.layer_neurons][:1]
    for name in names:
        row: list[object] = [name, result.layer_neurons.get(name, "readout"),
                             result.layer_spikes.get(name, "-")]
        for c in result.comparisons:
            row.append(f"{c.mismatches.get(name, 0)} / {c.compared.get(name, 0)}"
                       if name in c.compared else "-")
        rows.append(row)
    con.print(table("mismatches / values compared (spikes at every step; the readout's final "
                    "membrane)", cols, rows))
    for c in result.comparisons:
        status = "identical" if c.total_mismatches == 0 else f"{c.total_mismatches} MISMATCHES"
        con.print(f"{c.name}: {c.samples} samples x {len(c.compared)} layers x {c.steps} steps, "
                  f"{c.total_compared} values compared: {status}")
    for name, why in result.skipped.items():
        con.print(f"{name}: not compared ({why})")
    first = result.first_mismatch
    if first is not None:
        con.print(f"first mismatch: {describe_mismatch(first)}")
    fails = [] if fid is None else fid.failures()
    if result.identical and not fails:
        con.print("IDENTICAL: every compared spike agrees, and the fidelity gates hold")
    elif result.identical:
        con.print("NOT VERIFIED: the back ends agree spike for spike, but "
                  + "; ".join(fails))
    else:
        con.print("NOT IDENTICAL" + (f"; also {'; '.join(fails)}" if fails else ""))


def run(args: argparse.Namespace) -> int:
    backends = parse_backends(args.backends)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    gates_from_args(args)
    loaded = resolve_model(args)
    raw, labels, ds_name = split(args, loaded)
    fid = fidelity_of(args, loaded, raw, labels, RunConfig(args.timesteps, args.presim))
    if not args.json:
        print_fidelity(fid, console())
        print_fold_check(loaded)
    x = input_units(loaded.graph, raw)
    with sharding(parallel_of(args), loaded.graph) as sharder:
        result = verify_on(sharder, loaded.graph, x, args.timesteps, args.presim, backends,
                           args.batch_size, BackendOptions(device=args.device, progress=False),
                           progress=not args.json)
    if args.json:
        print_json(VerifyReport(result, ds_name, len(x), args.timesteps, args.presim,
                                loaded.fold_check, fid).to_json())
    else:
        print_result(result, fid)
    if not result.identical:
        return VerificationFailed.exit_code
    fid.check()
    return 0
