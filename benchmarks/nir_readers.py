"""Which third-party NIR readers load csqcfs-deploy's NIR files, and what they get right.

Run from the project venv (the driver needs csqcfs-deploy; each reader runs in a
subprocess with the Python that has it installed)::

    .venv/bin/python benchmarks/nir_readers.py --checkpoint digits.pt \
        --python snntorch=/tmp/nirx/snn/bin/python \
        --python spikingjelly=/tmp/nirx/sj/bin/python

Norse runs with this interpreter (it is part of the project's environment). For
every hardware profile it exports the trained digits-cnn twice: ``native`` (the
default conversion, per-channel thresholds) and ``portable`` (converted with
per-layer thresholds). Each reader loads each file with ``nir.read`` and its
own NIR import, runs every digits test sample for T steps from a fresh state
(summing the Output over the steps) and is compared with csqcfs-deploy's
integer simulator on the same IF graph: prediction agreement and whether the
summed output equals the simulator's readout exactly. T = 1 is where the
portable flavour promises exactness; T = 4 shows what happens after the first
step. Prints a table (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

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
import importlib.metadata, json, sys, time
import numpy as np, torch, nir

reader, spec_path = sys.argv[1], sys.argv[2]
base, _, variant = reader.partition("+")
spec = json.load(open(spec_path))
torch.set_num_threads(1)
x = torch.from_numpy(np.load(spec["inputs"])).float()


def load(path):
    g = nir.read(path)
    if variant == "int-groups":  # a hand fix: h5py gives numpy.int64, torch wants int
        for node in g.nodes.values():
            if isinstance(node, nir.Conv2d):
                node.groups = int(node.groups)
    if base == "norse":
        import norse.torch as norse
        return norse.from_nir(g, dt=1.0), False
    if base == "snntorch":
        from snntorch.import_nir import import_from_nir
        return import_from_nir(g), False
    if base == "spikingjelly":
        from spikingjelly.activation_based.nir_exchange import import_from_nir
        return import_from_nir(g, dt=1.0), True   # its Flatten assumes a batch dimension
    raise SystemExit(f"unknown reader {reader}")


def fresh(module):
    for m in module.modules():   # snntorch keeps hidden state inside its neurons
        if hasattr(m, "reset_mem"):
            m.reset_mem()


def run(module, batched, steps):
    outs = []
    with torch.no_grad():
        if batched:
            fresh(module)
            state, total = None, 0
            for _ in range(steps):
                out, state = module(x, state)
                total = total + out
            return total
        for sample in x:
            fresh(module)
            state, total = None, 0
            for _ in range(steps):
                out, state = module(sample, state)
                total = total + out
            outs.append(total)
    return torch.stack(outs)


try:
    version = importlib.metadata.version(base)
except importlib.metadata.PackageNotFoundError:
    version = "?"
results = []
for f in spec["files"]:
    rec = {"file": f["name"], "version": version, "nir": importlib.metadata.version("nir")}
    t0 = time.time()
    try:
        module, batched = load(f["path"])
        rec["loads"] = True
    except Exception as exc:  # the failure is the result
        rec.update(loads=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
        results.append(rec)
        continue
    for steps in spec["steps"]:
        try:
            total = run(module, batched, steps).double().numpy()
        except Exception as exc:  # the failure is the result
            rec[f"error_T{steps}"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            continue
        ref_pred = np.array(f[f"pred_T{steps}"])
        ref_readout = np.array(f[f"readout_T{steps}"], dtype=np.float64)
        rec[f"agree_T{steps}"] = float((total.argmax(1) == ref_pred).mean())
        rec[f"exact_T{steps}"] = bool(total.shape == ref_readout.shape
                                      and np.array_equal(total, ref_readout))
    rec["seconds"] = round(time.time() - t0, 2)
    results.append(rec)
print(json.dumps(results))
'''


def parse_python(values: list[str]) -> dict[str, str]:
    readers = {"norse": sys.executable}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--python wants READER=PATH, got {item!r}")
        readers[name] = path
        if name == "snntorch":  # also measure it with the one-line fix its Conv2d needs
            readers[f"{name}+int-groups"] = path
    return readers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="trained digits-cnn (default: train one, seed 0)")
    ap.add_argument("--python", action="append", default=[], metavar="READER=PATH",
                    help="interpreter that has READER (snntorch, spikingjelly) installed")
    ap.add_argument("--samples", type=int, default=None, help="first N test samples")
    ap.add_argument("--keep", metavar="DIR", help="keep the exported files in DIR")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    readers = parse_python(args.python)

    ds = load_digits_dataset()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="nir_readers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else workdir / "digits.pt"
    if not args.checkpoint:
        result = train(ds, TrainOptions(progress=True))
        save_checkpoint(ckpt, result.model, result.config)
    model, cfg = load_checkpoint(ckpt)
    folded = fold(model, cfg.input_shape, cfg.encoding, arch=cfg.arch,
                  num_classes=cfg.num_classes)
    raw = ds.x_test if args.samples is None else ds.x_test[:args.samples]

    files = []
    x_int = None
    for profile in PROFILES:
        for flavor in ("native", "portable"):
            graph = quantize(folded.graph, profile,
                             per_channel=False if flavor == "portable" else None)[0]
            path = write_nir_graph(graph, workdir / f"digits_{profile}_{flavor}.nir", flavor)
            assert read_nir_graph(path).equals(graph)  # our reader: lossless
            x_int = torch.from_numpy(graph.input.encoding.to_int(raw))
            entry: dict[str, object] = {"name": f"{flavor}/{profile}", "path": str(path)}
            for steps in STEPS:
                sim = simulate(graph, x_int, RunConfig(timesteps=steps))
                entry[f"pred_T{steps}"] = sim.predictions.tolist()
                entry[f"readout_T{steps}"] = sim.readout.tolist()
            files.append(entry)
    assert x_int is not None
    np.save(workdir / "inputs.npy", x_int.numpy())
    spec = {"inputs": str(workdir / "inputs.npy"), "steps": list(STEPS), "files": files}
    (workdir / "spec.json").write_text(json.dumps(spec))
    script = workdir / "reader_script.py"
    script.write_text(READER_SCRIPT)

    rows = [{"reader": "csqcfs-deploy", "version": "this", "file": f["name"], "loads": True,
             **{f"agree_T{s}": 1.0 for s in STEPS}, **{f"exact_T{s}": True for s in STEPS},
             "note": "read_nir_graph restores the IF graph exactly (IFGraph.equals)"}
            for f in files]
    for reader, python in tqdm(readers.items(), desc="readers", disable=args.json):
        proc = subprocess.run([python, str(script), reader, str(workdir / "spec.json")],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"reader": reader, "file": "*", "loads": False,
                         "error": f"reader process failed: {tail[:160]}"})
            continue
        for rec in json.loads(lines[-1]):
            rows.append({"reader": reader, **rec})

    if args.json:
        print(json.dumps({"samples": len(raw), "steps": list(STEPS), "rows": rows}, indent=2))
        return 0
    print(f"digits test samples: {len(raw)}; files in {workdir}")
    header = ["reader", "version", "file", "loads", "T=1 agree %", "T=1 exact",
              "T=4 agree %", "T=4 exact", "note / error"]
    table = [header]
    for r in rows:
        def pct(key: str, r: dict = r) -> str:
            return f"{100 * r[key]:.2f}" if key in r else "-"

        def yes(key: str, r: dict = r) -> str:
            return ("yes" if r[key] else "no") if key in r else "-"

        note = r.get("error") or r.get("error_T1") or r.get("error_T4") or r.get("note", "")
        table.append([r["reader"], str(r.get("version", "")), r["file"],
                      "yes" if r.get("loads") else "no", pct("agree_T1"), yes("exact_T1"),
                      pct("agree_T4"), yes("exact_T4"), note])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
