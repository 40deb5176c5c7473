"""Issue 12's closing-note table: fidelity of deployed networks, before and after calibration.

For every model in ``--models-dir``, every profile, ``T`` and ``P``, runs the real CLI
twice through a subprocess and reads the ``"fidelity"`` object of its JSON::

    .venv/bin/csqcfs-deploy run MODEL --profile P -T T -P PRESIM --json \\
        --scales weights --min-agreement 0        # "before": weight-only scales
    .venv/bin/csqcfs-deploy run MODEL --profile P -T T -P PRESIM --json   # "after"

Each row gives agreement with the source model, quantization fidelity (integer SNN
vs float IF graph), the float ANN's, float IF graph's and SNN's accuracy, and the
saturated and wrapped neuron-steps, with the exact command that printed it and its
exit code (9: a fidelity gate failed; the JSON is still read). A second table checks
issue 12's "Done when" on the "after" rows.

Models: zoo checkpoints ``*.pt`` (``csqcfs-deploy train --dataset digits32 ...``) and
reference-convention state dicts described by a ``*.json`` next to them::

    {"model": "tests.refnets:build", "model_args": {...}, "weights": "refvgg_thresh-if.pth",
     "dataset": "digits32"}

``--train-reference EPOCHS`` first trains two such nets (VGG-like ``IF(thresh, L, T)``,
ResNet-like ``MyFloor(up, t)``) with benchmarks/conventions.py's training function and
writes them with their JSON. Run from the repository root::

    .venv/bin/python benchmarks/fidelity.py --models-dir /tmp/models12 --timesteps 1,4,16
    .venv/bin/python benchmarks/fidelity.py --train-reference 12 --profiles int16 --samples 100
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csqcfs_deploy.errors import CsqcfsError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = ".venv/bin/csqcfs-deploy"
DEFAULT_MODELS_DIR = Path("/tmp/models12")
GATE_EXIT = 9  # FidelityGateFailed.exit_code: the JSON is printed all the same
#: Done-when limits: loihi2's source agreement may trail int16's by these points, by T
MAX_GAP_POINTS = {1: 0.5}
MAX_GAP_POINTS_OTHER_T = 1.0
MIN_FIDELITY = 0.99
#: the reference-convention nets --train-reference writes: (file stem, model args)
REFERENCE_NETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("refvgg_thresh-if", {"arch": "vgg", "convention": "thresh-if"}),
    ("refresnet_myfloor", {"arch": "resnet", "convention": "myfloor"}),
)


class BenchError(CsqcfsError):
    """A benchmark input (models folder, model description, CLI output) that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to run: ``label`` for the table, ``args`` the CLI's model arguments."""

    label: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """One CLI run: ``variant`` is "before" (``--scales weights``) or "after" (calibrated)."""

    model: ModelSpec
    profile: str
    timesteps: int
    presim: int
    variant: str
    samples: int | None
    dataset: str

    def command(self) -> list[str]:
        """The ``csqcfs-deploy run`` command line (relative to the repository root)."""
        cmd = [CLI, "run", *self.model.args, "--dataset", self.dataset,
               "--profile", self.profile, "-T", str(self.timesteps), "-P", str(self.presim),
               "--json"]
        if self.variant == "before":
            cmd += ["--scales", "weights", "--min-agreement", "0"]
        if self.samples is not None:
            cmd += ["--samples", str(self.samples)]
        return cmd


@dataclass(frozen=True)
class Figures:
    """The figures of one run's ``"fidelity"`` JSON (fractions in 0..1; None: not given).

    ``saturated``/``wrapped``: neuron-steps summed over every layer, the readout
    included; ``readout_saturated``: the readout's share of ``saturated``.
    """

    samples: int
    source_agreement: float | None
    quantization_fidelity: float | None
    source_accuracy: float | None
    float_if_accuracy: float | None
    snn_accuracy: float | None
    saturated: int | None
    readout_saturated: int | None
    wrapped: int | None
    gate_passed: bool | None


@dataclass(frozen=True)
class Row:
    """A job, its exit code, its figures (None when the CLI printed no usable JSON) and the
    error line it printed, if any."""

    job: Job
    exit_code: int
    figures: Figures | None
    error: str | None
    seconds: float


def _fraction(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise BenchError(f"fidelity.{key} must be a fraction in 0..1 or null, got {value!r}")
    return float(value)


def _counts(obj: dict[str, Any], key: str) -> dict[str, int] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise BenchError(f"fidelity.{key} must map layer names to integers, got {value!r}")
    return value


def parse_run_json(text: str) -> Figures:
    """The figures of ``run --json`` output ``text``; BenchError when it is not that JSON.

    The readout's saturated steps are counted once: ``saturated`` holds them when the
    per-layer map names the readout (top-level ``"readout"."name"``), else they are added.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"run printed no JSON ({exc.msg} at line {exc.lineno})") from None
    fid = doc.get("fidelity") if isinstance(doc, dict) else None
    if not isinstance(fid, dict):
        raise BenchError("run's JSON has no \"fidelity\" object (is the CLI too old?)")
    readout = doc.get("readout")
    readout_name = readout.get("name") if isinstance(readout, dict) else None
    saturated, wrapped = _counts(fid, "saturated"), _counts(fid, "wrapped")
    readout_sat = fid.get("readout_saturated")
    if readout_sat is not None and not isinstance(readout_sat, int):
        raise BenchError(f"fidelity.readout_saturated must be an integer, got {readout_sat!r}")
    sat_total = None
    if saturated is not None:
        sat_total = sum(saturated.values())
        if readout_sat is not None and readout_name not in saturated:
            sat_total += readout_sat
    gates = fid.get("gates")
    passed = gates.get("passed") if isinstance(gates, dict) else None
    return Figures(
        samples=int(fid.get("samples", 0)),
        source_agreement=_fraction(fid, "source_agreement"),
        quantization_fidelity=_fraction(fid, "quantization_fidelity"),
        source_accuracy=_fraction(fid, "source_accuracy"),
        float_if_accuracy=_fraction(fid, "float_if_accuracy"),
        snn_accuracy=_fraction(fid, "snn_accuracy"),
        saturated=sat_total, readout_saturated=readout_sat,
        wrapped=None if wrapped is None else sum(wrapped.values()),
        gate_passed=passed if isinstance(passed, bool) else None,
    )


def row_of(job: Job, exit_code: int, stdout: str, stderr: str, seconds: float) -> Row:
    """A row from one finished run: figures where it printed the JSON (exit 0 or 9)."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else None
    if exit_code not in (0, GATE_EXIT):
        return Row(job, exit_code, None, last or f"exit {exit_code}", seconds)
    try:
        return Row(job, exit_code, parse_run_json(stdout), last if exit_code else None,
                   seconds)
    except BenchError as exc:
        return Row(job, exit_code, None, str(exc), seconds)


def run_job(job: Job) -> Row:
    """Run one job's command from the repository root and read its JSON."""
    start = time.perf_counter()
    proc = subprocess.run(job.command(), cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return row_of(job, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


# --------------------------------------------------------------------------- models


def discover_models(models_dir: Path) -> list[ModelSpec]:
    """Zoo checkpoints ``*.pt`` and reference nets ``*.json`` in ``models_dir``, by name."""
    if not models_dir.is_dir():
        raise BenchError(f"models folder {models_dir} does not exist (train models first; "
                         "see this script's docstring)")
    specs = [ModelSpec(p.stem, (str(p),)) for p in sorted(models_dir.glob("*.pt"))]
    for desc in sorted(models_dir.glob("*.json")):
        try:
            info = json.loads(desc.read_text())
            weights = models_dir / info["weights"]
            args = (("--model", info["model"], "--model-args", json.dumps(info["model_args"]),
                     "--weights", str(weights)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BenchError(f"{desc}: not a model description ({exc})") from None
        if not weights.is_file():
            raise BenchError(f"{desc}: weights {weights} do not exist")
        specs.append(ModelSpec(desc.stem, args))
    if not specs:
        raise BenchError(f"no *.pt checkpoints or *.json model descriptions in {models_dir}")
    return specs


def train_reference(models_dir: Path, dataset: str, epochs: int, seed: int) -> None:
    """Train :data:`REFERENCE_NETS` on ``dataset`` with benchmarks/conventions.py's
    ``train`` and write ``STEM.pth`` (a plain state dict; the ResNet with DataParallel's
    ``module.`` prefixes, as conventions.py saves it) and ``STEM.json`` into ``models_dir``."""
    import torch
    from torch import nn

    from benchmarks.conventions import train
    from csqcfs_deploy.train.datasets import load_dataset
    from tests.refnets import build

    ds = load_dataset(dataset)
    channels, height, _ = ds.input_shape
    models_dir.mkdir(parents=True, exist_ok=True)
    for stem, base in REFERENCE_NETS:
        model_args = {**base, "in_channels": channels, "spatial": height}
        model = build(**model_args)
        start = time.perf_counter()
        acc = train(model, ds, epochs, seed)
        seconds = time.perf_counter() - start
        state = nn.DataParallel(model).state_dict() if base["arch"] == "resnet" \
            else model.state_dict()
        torch.save(state, models_dir / f"{stem}.pth")
        info = {"model": "tests.refnets:build", "model_args": model_args,
                "weights": f"{stem}.pth", "dataset": dataset, "epochs": epochs, "seed": seed,
                "torch_test_accuracy": acc, "train_seconds": round(seconds, 1)}
        (models_dir / f"{stem}.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"trained {stem} on {dataset}: test accuracy {100 * acc:.2f} % in "
              f"{seconds:.1f} s -> {models_dir / stem}.pth", file=sys.stderr)


# --------------------------------------------------------------------------- output


def machine_header() -> str:
    """Date, host, processor (and whether it has AVX512-VNNI) and library versions."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    vnni = "avx512_vnni" if "avx512_vnni" in flags.split() else "no avx512_vnni"
    versions = []
    for dist in ("torch", "numpy", "lava-nc"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    cpu = platform.processor() or platform.machine()
    return (f"# {time.strftime('%Y-%m-%d')} {platform.node()} {cpu} ({vnni}); "
            + ", ".join(versions))


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _int(v: int | None) -> str:
    return "–" if v is None else str(v)


def table(rows: list[Row]) -> str:
    """The closing-note table (markdown), one line per run."""
    lines = ["| model | profile | T | P | scales | source agreement % | quantization "
             "fidelity % | float ANN acc % | float IF acc % | SNN acc % | saturated | "
             "readout saturated | wrapped | exit | command |",
             "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        j = r.job
        head = f"| {j.model.label} | {j.profile} | {j.timesteps} | {j.presim} | {j.variant} |"
        cmd = f"`{shlex.join(j.command())}`"
        f = r.figures
        if f is None:
            lines.append(f"{head} {r.error} ||||||||| {r.exit_code} | {cmd} |")
            continue
        lines.append(
            f"{head} {_pct(f.source_agreement)} | {_pct(f.quantization_fidelity)} | "
            f"{_pct(f.source_accuracy)} | {_pct(f.float_if_accuracy)} | "
            f"{_pct(f.snn_accuracy)} | {_int(f.saturated)} | {_int(f.readout_saturated)} | "
            f"{_int(f.wrapped)} | {r.exit_code} | {cmd} |")
    return "\n".join(lines)


def done_when(rows: list[Row]) -> str:
    """Issue 12's checks on the "after" rows: loihi2's source agreement against int16's
    (within 0.5 points at T = 1, 1 point otherwise), loihi2 fidelity >= 99 %, and no
    readout saturation at T = 16. Empty when int16 or loihi2 rows are missing."""
    after = {(r.job.model.label, r.job.profile, r.job.timesteps, r.job.presim): r.figures
             for r in rows if r.job.variant == "after"}
    lines = []
    for (label, profile, t, p), lo in after.items():
        hi = after.get((label, "int16", t, p))
        if profile != "loihi2" or lo is None or hi is None:
            continue
        limit = MAX_GAP_POINTS.get(t, MAX_GAP_POINTS_OTHER_T)
        gap = (None if lo.source_agreement is None or hi.source_agreement is None
               else 100 * (hi.source_agreement - lo.source_agreement))
        ok = (gap is not None and gap <= limit and lo.quantization_fidelity is not None
              and lo.quantization_fidelity >= MIN_FIDELITY
              and (t != 16 or lo.readout_saturated == 0))
        gap_text = "–" if gap is None else f"{gap:.2f}"
        lines.append(f"| {label} | {t} | {p} | {_pct(hi.source_agreement)} | "
                     f"{_pct(lo.source_agreement)} | {gap_text} (<= {limit:g}) | "
                     f"{_pct(lo.quantization_fidelity)} | {_int(lo.readout_saturated)} | "
                     f"{'yes' if ok else 'NO'} |")
    if not lines:
        return ""
    return "\n".join(["| model | T | P | int16 agreement % | loihi2 agreement % | gap points | "
                      "loihi2 fidelity % | loihi2 readout saturated | done |",
                      "|---|--:|--:|--:|--:|--:|--:|--:|---|", *lines])


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got "
                                         f"{text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--timesteps", type=_int_list, default=[1, 4, 16], metavar="T[,T..]")
    p.add_argument("--presim", type=_int_list, default=[0], metavar="P[,P..]")
    p.add_argument("--profiles", type=lambda s: [v for v in s.split(",") if v],
                   default=["int16", "loihi2"], metavar="NAME[,NAME..]")
    p.add_argument("--samples", type=int, default=None,
                   help="test samples per run (default all)")
    p.add_argument("--dataset", default="digits32")
    p.add_argument("--train-reference", type=int, default=None, metavar="EPOCHS",
                   help="first train the reference-convention nets into --models-dir")
    p.add_argument("--seed", type=int, default=0, help="seed of --train-reference")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    if min(args.timesteps) < 1:
        p.error("--timesteps must be >= 1")
    return args


def jobs_for(args: argparse.Namespace, models: list[ModelSpec]) -> list[Job]:
    """Every model x profile x T x P, "before" then "after"."""
    return [Job(m, prof, t, p, variant, args.samples, args.dataset)
            for m in models for prof in args.profiles for t in args.timesteps
            for p in args.presim for variant in ("before", "after")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.train_reference is not None:
            train_reference(args.models_dir, args.dataset, args.train_reference, args.seed)
        models = discover_models(args.models_dir)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs = jobs_for(args, models)
    rows = []
    for i, job in enumerate(jobs, 1):
        row = run_job(job)
        rows.append(row)
        f = row.figures
        note = (row.error or "") if f is None else (
            f"agreement {_pct(f.source_agreement)} %, fidelity {_pct(f.quantization_fidelity)} %")
        print(f"[{i}/{len(jobs)}] {job.model.label} {job.profile} T={job.timesteps} "
              f"P={job.presim} {job.variant}: exit {row.exit_code}, {row.seconds:.1f} s; {note}",
              file=sys.stderr, flush=True)
    header = machine_header()
    if args.json:
        print(json.dumps({"header": header, "rows": [
            {"model": r.job.model.label, "profile": r.job.profile, "timesteps": r.job.timesteps,
             "presim": r.job.presim, "scales": r.job.variant, "exit": r.exit_code,
             "command": shlex.join(r.job.command()), "error": r.error,
             "seconds": round(r.seconds, 2),
             "figures": None if r.figures is None else asdict(r.figures)} for r in rows]},
            indent=1))
        return 0
    print(header)
    print(table(rows))
    checks = done_when(rows)
    if checks:
        print("\nDone when (after rows):\n" + checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
