"""Third-party float NIR in: our conversion of each library's export against its own run.

The inputs come from ``benchmarks/nir_sources.py`` (each library's network exported by
its own exporter, with its own predictions on the digits test set at T = 1 and T = 4)::

    bash benchmarks/nir_envs.sh && .venv/bin/python benchmarks/nir_sources.py
    .venv/bin/python benchmarks/nir_import.py [--sources /tmp/nirx/sources] [--json]

For each file and profile, the file is loaded as ``convert FILE.nir --profile P
--source-semantics S --timesteps T`` loads it (calibrated on the digits training
split), run on our integer simulator for T steps, and its predictions are compared
with the library's own run of its source network: the end-to-end agreement a user of
that library gets. A file a library's exporter could not write is a row saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from csqcfs_deploy.cli.model_io import NirOptions, load_model
from csqcfs_deploy.errors import CsqcfsError
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.calibration import CalibrationPlan
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import load_digits_dataset

#: (file stem, the library's npz stem, --source-semantics)
SOURCES = (("norse-repaired", "norse", "norse"), ("spikingjelly", "spikingjelly", "spikingjelly"),
           ("sinabs-repaired", "sinabs", "sinabs"), ("snntorch", "snntorch", "snntorch"))
PROFILES = ("int16", "loihi2")
STEPS = (1, 4)


def measure(sources: Path) -> list[dict[str, object]]:
    """One row per (file, profile, T): agreement with the library's own predictions."""
    raw = load_digits_dataset().x_test
    rows: list[dict[str, object]] = []
    for stem, lib, semantics in SOURCES:
        path, ref_path = sources / f"{stem}.nir", sources / f"{lib}.npz"
        if not path.is_file() or not ref_path.is_file():
            rows.append({"file": stem, "semantics": semantics, "result": "no file (its "
                         "exporter failed; see summary.json)"})
            continue
        with np.load(ref_path) as ref:
            theirs = {t: ref[f"pred_T{t}"] for t in STEPS}
        for profile in PROFILES:
            for t in STEPS:
                row: dict[str, object] = {"file": stem, "semantics": semantics,
                                          "profile": profile, "T": t}
                try:
                    loaded = load_model(path, profile=profile,
                                        plan=CalibrationPlan(timesteps=t),
                                        nir_import=NirOptions(semantics))
                except CsqcfsError as exc:
                    row["result"] = f"refused: {exc}"
                    rows.append(row)
                    continue
                g = loaded.graph
                x = torch.from_numpy(g.input.encoding.to_int(raw))
                pred = simulate(g, x, RunConfig(timesteps=t)).predictions
                row["agreement_pct"] = round(100.0 * float(np.mean(pred == theirs[t])), 2)
                row["samples"] = len(raw)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, default=Path("/tmp/nirx/sources"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.sources.is_dir():
        print(f"error: {args.sources} does not exist; run benchmarks/nir_sources.py first",
              file=sys.stderr)
        return 2
    rows = measure(args.sources)
    header = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__}
    if args.json:
        json.dump({**header, "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(", ".join(f"{k} {v}" for k, v in header.items()))
    print(f"{'file':<18} {'semantics':<13} {'profile':<8} {'T':>2}  agreement with the "
          "library's own run")
    for r in rows:
        result = (f"{r['agreement_pct']:.2f} % of {r['samples']}" if "agreement_pct" in r
                  else str(r["result"]))
        print(f"{r['file']:<18} {r['semantics']:<13} {r.get('profile', ''):<8} "
              f"{r.get('T', ''):>2}  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
