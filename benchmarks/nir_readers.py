"""Which third-party NIR readers load csqcfs-deploy's NIR files, and what they get right.

Build the scratch environments once (each a ``pip install --target`` folder under
/tmp/nirx layered over the project venv; nothing goes into the venv)::

    bash benchmarks/nir_envs.sh            # sinabs 3.1.3 + nir 1.0.4 + nirtorch 2.0.2,
                                           # rockpool 3.1.0 + nir 1.0.4, snntorch 1.0.0,
                                           # spikingjelly 2.0.0 (these two on nir 1.0.8)
    .venv/bin/python benchmarks/nir_readers.py --checkpoint digits.pt [--json]

Norse runs in the project venv. For every hardware profile it exports the trained
digits-cnn as ``portable`` (default, per-channel thresholds), ``portable-uniform``
(converted with per-layer thresholds) and ``native``, each in nir 1.0.8's layout, and
the two portable flavours again with ``--nir-version 1.0.4``. Each reader (a
subprocess with ``PYTHONPATH=/tmp/nirx/<env>``) loads each file with ``nir.read`` and
its own NIR import, runs every digits test sample for T steps from a fresh state
(constant input, summing the Output over the steps), one sample at a time
(``unbatched``; spikingjelly and sinabs get a batch dimension of 1) and as one batch,
and is compared with csqcfs-deploy's integer simulator on the same IF graph:
prediction agreement and whether the summed output equals the simulator's readout
exactly. Reader settings: norse and spikingjelly ``dt=1.0``; sinabs at its defaults and
as ``sinabs+exact`` (``SingleSpike``, ``min_v_mem=None`` on every IAFSqueeze, the
settings that make it exact); snntorch also with its Conv2d ``groups`` cast to int.
T = 1 is where the portable flavours promise exactness; T = 4 shows what happens
after the first step. Prints a table with the date and versions (or ``--json``); a
reader whose environment is not built is a row saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import nir
import numpy as np
import torch
from tqdm import tqdm

from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.exporters.nir import read_nir_graph, write_nir_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.checkpoint import load_checkpoint, save_checkpoint
from csqcfs_deploy.train.datasets import load_digits_dataset
from csqcfs_deploy.train.training import TrainOptions, train

STEPS = (1, 4)
PROFILES = ("loihi2", "int8", "int16")

# Runs inside the reader's own environment: needs numpy, torch, nir and the reader.
# A third-party reader may fail in any way; the failure is the measurement, so it is
# caught broadly and reported as text.
READER_SCRIPT = r'''
import datetime, importlib.metadata, json, sys, time
import numpy as np, torch, nir

reader, spec_path = sys.argv[1], sys.argv[2]
base, _, variant = reader.partition("+")
spec = json.load(open(spec_path))
torch.set_num_threads(1)
x = torch.from_numpy(np.load(spec["inputs"])).float()
SETTINGS = {"norse": "from_nir, dt=1.0", "snntorch": "import_from_nir",
            "snntorch+int-groups": "import_from_nir, Conv2d groups cast to int",
            "spikingjelly": "import_from_nir, dt=1.0",
            "sinabs": "from_nir, defaults (MultiSpike, min_v_mem=-v_threshold)",
            "sinabs+exact": "from_nir, SingleSpike, min_v_mem=None",
            "rockpool": "from_nir"}


def load(path, steps):
    g = nir.read(path)
    if variant == "int-groups":  # a hand fix: h5py gives numpy.int64, torch wants int
        for node in g.nodes.values():
            if isinstance(node, nir.Conv2d):
                node.groups = int(node.groups)
    if base == "norse":
        import norse.torch as norse
        return norse.from_nir(g, dt=1.0)
    if base == "snntorch":
        from snntorch.import_nir import import_from_nir
        return import_from_nir(g)
    if base == "spikingjelly":
        from spikingjelly.activation_based.nir_exchange import import_from_nir
        return import_from_nir(g, dt=1.0)
    if base == "sinabs":
        import sinabs.activation, sinabs.layers
        from sinabs.nir import from_nir
        module = from_nir(g, num_timesteps=steps)
        if variant == "exact":
            for m in module.modules():
                if isinstance(m, sinabs.layers.IAFSqueeze):
                    m.spike_fn, m.min_v_mem = sinabs.activation.SingleSpike, None
        return module
    if base == "rockpool":
        from rockpool.nn.modules.torch.nir import from_nir
        return from_nir(g)
    raise SystemExit(f"unknown reader {reader}")


def fresh(module):
    for m in module.modules():   # snntorch and sinabs keep hidden state inside modules
        if hasattr(m, "reset_mem"):
            m.reset_mem()
        if hasattr(m, "reset_states"):
            m.reset_states()


def first(out):
    return out[0] if isinstance(out, tuple) else out


def run_once(module, batch, steps):
    # batch: (N, C, H, W); sinabs squeezes time into the batch, the others step
    fresh(module)
    if base == "sinabs":
        n = batch.shape[0]
        xt = batch.unsqueeze(1).expand(n, steps, *batch.shape[1:]).flatten(0, 1)
        return first(module(xt)).reshape(n, steps, -1).sum(1)
    state, total = None, 0
    for _ in range(steps):
        out, state = module(batch, state)
        total = total + out
    return total


def run(module, batched, steps):
    with torch.no_grad():
        if batched:
            return run_once(module, x, steps)
        # one sample at a time; spikingjelly and sinabs need a batch dimension of 1
        keep = base in ("spikingjelly", "sinabs")
        outs = [run_once(module, s.unsqueeze(0) if keep else s, steps) for s in x]
        return torch.stack([o.reshape(-1) for o in outs])


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def err(exc):
    import traceback
    text = str(exc).strip() or "at `" + (traceback.extract_tb(exc.__traceback__)[-1].line
                                         or "?") + "`"
    return f"{type(exc).__name__}: {text}".splitlines()[0][:160]


results = []
for f in spec["files"]:
    rec = {"file": f["name"], "version": version(base), "nir": version("nir"),
           "settings": SETTINGS.get(reader, "")}
    t0 = time.time()
    for steps in spec["steps"]:
        try:
            module = load(f["path"], steps)
            rec["loads"] = True
        except Exception as exc:  # the failure is the result
            rec.update(loads=False, error=err(exc))
            break
        for batched in (False, True):
            key = f"T{steps}_{'batched' if batched else 'unbatched'}"
            try:
                total = run(module, batched, steps).double().numpy()
            except Exception as exc:  # the failure is the result
                rec[f"error_{key}"] = err(exc)
                continue
            ref_pred = np.array(f[f"pred_T{steps}"])
            ref_readout = np.array(f[f"readout_T{steps}"], dtype=np.float64)
            if total.shape != ref_readout.shape:
                rec[f"error_{key}"] = f"output shape {total.shape}, expected {ref_readout.shape}"
                continue
            rec[f"agree_{key}"] = float((total.argmax(1) == ref_pred).mean())
            rec[f"exact_{key}"] = bool(np.array_equal(total, ref_readout))
    rec["seconds"] = round(time.time() - t0, 2)
    results.append(rec)
print(json.dumps(results))
'''


#: reader -> its scratch environment under --envs (None: the project venv).
READERS: dict[str, str | None] = {
    "norse": None, "snntorch": "snntorch", "snntorch+int-groups": "snntorch",
    "spikingjelly": "spikingjelly", "sinabs": "sinabs", "sinabs+exact": "sinabs",
    "rockpool": "rockpool",
}
#: (flavour, NIR file layout) written for every profile.
FILES = (("portable", "1.0.8"), ("portable-uniform", "1.0.8"), ("native", "1.0.8"),
         ("portable", "1.0.4"), ("portable-uniform", "1.0.4"))
MODES = tuple(f"T{s}_{m}" for s in STEPS for m in ("unbatched", "batched"))


def reader_env(reader: str, envs: Path) -> dict[str, str] | None:
    """The environment a reader's subprocess runs with (None: the reader is not built)."""
    name = READERS[reader]
    env = dict(os.environ)
    if name is None:
        return env
    folder = envs / name
    if not (folder / ".nirx-done").is_file():
        return None
    env["PYTHONPATH"] = str(folder)
    return env


def export_files(ckpt: Path, raw: np.ndarray, workdir: Path, profiles: list[str]
                 ) -> tuple[list[dict[str, object]], np.ndarray]:
    """Every (profile, flavour, layout) file of the digits network, with the integer
    simulator's predictions and readouts at each T."""
    model, cfg = load_checkpoint(ckpt)
    folded = fold(model, cfg.input_shape, cfg.encoding, arch=cfg.arch,
                  num_classes=cfg.num_classes)
    files: list[dict[str, object]] = []
    x_int = None
    for profile in profiles:
        for flavor, layout in FILES:
            graph = quantize(folded.graph, profile,
                             per_channel=False if flavor == "portable-uniform" else None)[0]
            path = write_nir_graph(graph, workdir / f"digits_{profile}_{flavor}_{layout}.nir",
                                   flavor, nir_version=layout)
            if not read_nir_graph(path).equals(graph):  # our reader: lossless
                raise SystemExit(f"{path} does not read back as the same IF graph")
            x_int = torch.from_numpy(graph.input.encoding.to_int(raw))
            entry: dict[str, object] = {"name": f"{flavor}/{profile}/nir-{layout}",
                                        "path": str(path)}
            for steps in STEPS:
                sim = simulate(graph, x_int, RunConfig(timesteps=steps))
                entry[f"pred_T{steps}"] = sim.predictions.tolist()
                entry[f"readout_T{steps}"] = sim.readout.tolist()
            files.append(entry)
    assert x_int is not None
    return files, x_int.numpy()


def measure(readers: list[str], envs: Path, script: Path, spec: Path,
            quiet: bool) -> list[dict[str, object]]:
    """One subprocess per reader; a reader that is not built or crashes is a row too."""
    rows: list[dict[str, object]] = []
    for reader in tqdm(readers, desc="readers", disable=quiet):
        env = reader_env(reader, envs)
        if env is None:
            rows.append({"reader": reader, "file": "*", "loads": False,
                         "error": f"not built: run benchmarks/nir_envs.sh {envs}"})
            continue
        proc = subprocess.run([sys.executable, str(script), reader, str(spec)],
                              capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"reader": reader, "file": "*", "loads": False,
                         "error": f"reader process failed: {tail[:160]}"})
            continue
        rows.extend({"reader": reader, **rec} for rec in json.loads(lines[-1]))
    return rows


def print_table(rows: list[dict[str, object]], header_line: str) -> None:
    print(header_line)
    header = ["reader", "version", "nir", "file", "loads",
              *[m.replace("_", " ") for m in MODES], "settings; error"]
    table = [header]
    for r in rows:
        cells = []
        for m in MODES:
            if f"agree_{m}" in r:
                exact = " exact" if r[f"exact_{m}"] else ""
                cells.append(f"{100 * float(r[f'agree_{m}']):.1f}%{exact}")  # type: ignore[arg-type]
            else:
                cells.append("err" if f"error_{m}" in r else "-")
        errors = [str(r[k]) for k in r if k.startswith("error")]
        note = "; ".join([str(r.get("settings", "")), *errors[:1]]).strip("; ")
        table.append([str(r["reader"]), str(r.get("version", "")), str(r.get("nir", "")),
                      str(r["file"]), "yes" if r.get("loads") else "no", *cells, note])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="trained digits-cnn (default: train one, seed 0)")
    ap.add_argument("--envs", default="/tmp/nirx", help="scratch environments "
                    "(benchmarks/nir_envs.sh; default /tmp/nirx)")
    ap.add_argument("--readers", default=",".join(READERS),
                    help=f"comma-separated subset of {', '.join(READERS)}")
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated profiles")
    ap.add_argument("--samples", type=int, default=None, help="first N test samples")
    ap.add_argument("--keep", metavar="DIR", help="keep the exported files in DIR")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    readers = [r for r in args.readers.split(",") if r]
    unknown = [r for r in readers if r not in READERS]
    if unknown:
        raise SystemExit(f"unknown readers {unknown} (known: {', '.join(READERS)})")

    ds = load_digits_dataset()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="nir_readers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else workdir / "digits.pt"
    if not args.checkpoint:
        result = train(ds, TrainOptions(progress=not args.json))
        save_checkpoint(ckpt, result.model, result.config)
    raw = ds.x_test if args.samples is None else ds.x_test[:args.samples]
    files, x_int = export_files(ckpt, raw, workdir, args.profiles.split(","))
    np.save(workdir / "inputs.npy", x_int)
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"inputs": str(workdir / "inputs.npy"), "steps": list(STEPS),
                                "files": files}))
    script = workdir / "reader_script.py"
    script.write_text(READER_SCRIPT)

    rows = [{"reader": "csqcfs-deploy", "version": "this", "nir": nir.version,
             "file": f["name"], "loads": True,
             **{f"agree_{m}": 1.0 for m in MODES}, **{f"exact_{m}": True for m in MODES},
             "settings": "read_nir_graph: restores the IF graph exactly (IFGraph.equals)"}
            for f in files]
    rows += measure(readers, Path(args.envs), script, spec, args.json)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "nir (project venv)": nir.version}
    if args.json:
        print(json.dumps({"date": when, "versions": versions, "samples": len(raw),
                          "steps": list(STEPS), "rows": rows}, indent=2))
        return 0
    print_table(rows, f"{when}; digits test samples: {len(raw)}; {versions}; files in "
                f"{workdir}\ncells: prediction agreement with `run --backend int`, "
                "'exact' = summed readout identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
