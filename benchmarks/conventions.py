"""Reference-convention networks through the real CLI: fold/model and float/quantized agreement.

For each activation convention of the public QCFS code bases (tests/refnets.py:
``IF`` with ``thresh``/``L``/``T``, ``MyFloor`` with ``up``/``t``, an untagged
per-channel softplus layer, an ``abs``-parameterised one) and each layout (VGG-
and ResNet-like), train briefly on a dataset, save the state dict the way those
code bases do (a plain ``state_dict``; the ResNet ones as DataParallel would,
with ``module.`` prefixes), then run ``csqcfs-deploy convert --model
tests.refnets:build --model-args ... --weights ...`` for int16 and loihi2 and
print the figures ``convert --json`` reports. Run from the repository root::

    .venv/bin/python benchmarks/conventions.py --dataset digits --epochs 8
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csqcfs_deploy.train.datasets import load_dataset  # noqa: E402
from tests.refnets import CONVENTIONS, build  # noqa: E402


def train(model: nn.Module, ds, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    x = torch.from_numpy(ds.encoding.normalize(ds.x_train))
    y = torch.from_numpy(ds.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(ds.encoding.normalize(ds.x_test))
        return float((model(xt).argmax(1).numpy() == ds.y_test).mean())


def convert(args_json: str, weights: Path, dataset: str, profile: str, out: Path) -> dict:
    cmd = [str(ROOT / ".venv/bin/csqcfs-deploy"), "convert", "--model", "tests.refnets:build",
           "--model-args", args_json, "--weights", str(weights), "--dataset", dataset,
           "--profile", profile, "-o", str(out), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed",
                "exit": proc.returncode}
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ds = load_dataset(args.dataset)
    c, h, _ = ds.input_shape
    cpu = platform.processor() or platform.machine()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {cpu}"
          f" torch {torch.__version__} numpy {np.__version__}; dataset {args.dataset}, "
          f"{args.epochs} epochs, seed {args.seed}")
    print("| layout | convention | torch test acc | profile | fold/model | float acc | "
          "quantized acc | float vs quantized |")
    print("|---|---|--:|---|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("vgg", "resnet"):
            for conv in sorted(CONVENTIONS):
                margs = {"arch": arch, "convention": conv, "in_channels": c, "spatial": h}
                model = build(**margs)
                acc = train(model, ds, args.epochs, args.seed)
                state = model.state_dict()
                if arch == "resnet":  # as saved from DataParallel / DDP
                    state = nn.DataParallel(model).state_dict()
                weights = Path(tmp) / f"{arch}-{conv}.pth"
                torch.save(state, weights)
                for profile in ("int16", "loihi2"):
                    res = convert(json.dumps(margs), weights, args.dataset, profile,
                                  Path(tmp) / f"{arch}-{conv}-{profile}.ifg")
                    if "error" in res:
                        print(f"| {arch} | {conv} | {100 * acc:.2f} | {profile} | "
                              f"exit {res['exit']}: {res['error']} ||||")
                        continue
                    chk = res["check"]
                    fm = chk.get("folded_matches_model") if isinstance(chk, dict) else None
                    print(f"| {arch} | {conv} | {100 * acc:.2f} | {profile} | "
                          f"{100 * fm:.2f} % | {100 * chk['float_accuracy']:.2f} | "
                          f"{100 * chk['quantized_accuracy']:.2f} | "
                          f"{100 * chk['agreement']:.2f} % |")


if __name__ == "__main__":
    main()
