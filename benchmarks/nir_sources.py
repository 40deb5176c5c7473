"""Float NIR files written by other libraries' own exporters, with each library's own outputs.

The other direction of ``benchmarks/nir_readers.py``: inputs for ``convert FILE.nir``.
Build the scratch environments first (``bash benchmarks/nir_envs.sh``, folders under
/tmp/nirx), then from the project venv::

    .venv/bin/python benchmarks/nir_sources.py [--out /tmp/nirx/sources] [--json]

A small float ANN is trained here on digits (8x8, inputs ``x / 16``, seed 0, a few
seconds): ``conv 3x3 (1 -> 8, pad 1) -> step(v >= 1) -> 2x2 pool -> flatten -> linear
(128 -> 10)``, its hidden activation a Heaviside step at 1 (straight-through gradient), so
that a one-step IF network with threshold 1 computes it. Each library then builds that
network in its own API with these weights (norse and the project venv; snnTorch,
spikingjelly and sinabs in their scratch environments), runs it on the digits test set
for T = 1 and T = 4 steps from a fresh state (constant input each step, the readout the
linear layer's output summed over the steps), and exports it with its own NIR exporter:

* norse 1.1: ``SequentialState(Conv2d, IAFCell(v_th=1), AvgPool2d, Flatten, Linear)``,
  ``norse.torch.to_nir``;
* snnTorch 1.0: ``Sequential(Conv2d, Leaky(beta=1, threshold=1, reset zero), AvgPool2d,
  Flatten, Linear)``, ``snntorch.export_nir.export_to_nir``;
* spikingjelly 2.0: ``Sequential(layer.Conv2d, IFNode(v_threshold=1, v_reset=0),
  layer.AvgPool2d, layer.Flatten, layer.Linear)``, ``export_to_nir(dt=1.0)``;
* sinabs 3.1: ``Sequential(Conv2d, IAFSqueeze(SingleSpike, min_v_mem=None), SumPool2d,
  Flatten, Linear / 4)`` (sinabs exports SumPool2d only), ``sinabs.to_nir``.

rockpool 3.1 has no conv layer in its NIR mapping and is left out. Written to ``--out``:
``<library>.nir`` (when its exporter succeeds; what a failing one left is renamed
``<library>.partial.nir``), ``<library>-repaired.nir`` (norse and sinabs: their exporter
with the smallest repair that makes the file usable, recorded in the summary) and
``<library>.npz`` (``x`` the float inputs (N, 1, 8, 8), ``labels``,
``readout_T1``/``readout_T4`` (N, 10) and ``pred_T1``/``pred_T4`` of the library's own
run, ``ann_pred`` the float ANN's),
plus ``summary.json``; an exporter failure is recorded there as a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from csqcfs_deploy.train.datasets import load_digits_dataset

STEPS = (1, 4)
LIBRARIES: dict[str, str | None] = {"norse": None, "snntorch": "snntorch",
                                    "spikingjelly": "spikingjelly", "sinabs": "sinabs"}

# Runs inside the library's environment. The library may fail in any way; the failure is
# the measurement, so it is caught broadly and reported as text.
SOURCE_SCRIPT = r'''
import importlib.metadata, json, sys, traceback
import numpy as np, torch
from torch import nn

lib, spec_path = sys.argv[1], sys.argv[2]
spec = json.load(open(spec_path))
torch.set_num_threads(1)
w = np.load(spec["weights"])
x = torch.from_numpy(np.load(spec["inputs"])).float()


def conv():
    c = nn.Conv2d(1, 8, 3, padding=1)
    c.weight.data, c.bias.data = torch.tensor(w["conv_w"]), torch.tensor(w["conv_b"])
    return c


def linear(scale=1.0):
    f = nn.Linear(128, 10)
    f.weight.data, f.bias.data = torch.tensor(w["fc_w"]) * scale, torch.tensor(w["fc_b"])
    return f


def build(steps):
    if lib == "norse":
        import norse.torch as norse
        iaf = norse.IAFCell(norse.IAFParameters(v_th=torch.tensor(1.0)), dt=1.0)
        return norse.SequentialState(conv(), iaf, nn.AvgPool2d(2), nn.Flatten(), linear())
    if lib == "snntorch":
        import snntorch as snn
        leaky = snn.Leaky(beta=1.0, threshold=1.0, init_hidden=True, reset_mechanism="zero")
        return nn.Sequential(conv(), leaky, nn.AvgPool2d(2), nn.Flatten(), linear())
    if lib == "spikingjelly":
        from spikingjelly.activation_based import layer, neuron
        c = layer.Conv2d(1, 8, 3, padding=1)
        c.load_state_dict(conv().state_dict())
        f = layer.Linear(128, 10)
        f.load_state_dict(linear().state_dict())
        return nn.Sequential(c, neuron.IFNode(v_threshold=1.0, v_reset=0.0),
                             layer.AvgPool2d(2), layer.Flatten(), f)
    if lib == "sinabs":
        import sinabs.activation, sinabs.layers as sl
        iaf = sl.IAFSqueeze(num_timesteps=steps, spike_threshold=1.0, min_v_mem=None,
                            spike_fn=sinabs.activation.SingleSpike)
        return nn.Sequential(conv(), iaf, sl.SumPool2d(2), nn.Flatten(), linear(0.25))
    raise SystemExit(f"unknown library {lib}")


def reset(model):
    if lib == "spikingjelly":
        from spikingjelly.activation_based import functional
        functional.reset_net(model)
    if lib == "snntorch":
        from snntorch import utils
        utils.reset(model)
    for m in model.modules():
        if hasattr(m, "reset_states"):
            m.reset_states()


def run(model, steps):
    with torch.no_grad():
        reset(model)
        if lib == "sinabs":
            n = x.shape[0]
            xt = x.unsqueeze(1).expand(n, steps, *x.shape[1:]).flatten(0, 1)
            return model(xt).reshape(n, steps, -1).sum(1)
        state, total = None, 0
        for _ in range(steps):
            if lib == "norse":
                out, state = model(x, state)
            else:
                out = model(x)
            total = total + out
        return total


def export(path):
    sample = x[:1]
    if lib == "norse":
        import norse.torch as norse
        graph = norse.to_nir(build(1), sample, dt=1.0)
    elif lib == "snntorch":
        from snntorch.export_nir import export_to_nir
        graph = export_to_nir(build(1), sample)
    elif lib == "spikingjelly":
        from spikingjelly.activation_based.nir_exchange import export_to_nir
        graph = export_to_nir(build(1), sample, dt=1.0)
    else:
        import sinabs
        graph = sinabs.to_nir(build(1), sample)
    import nir
    nir.write(path, graph)
    back = nir.read(path)
    return {type(n).__name__: sum(type(m) is type(n) for m in back.nodes.values())
            for n in back.nodes.values()}


def norse_with_pool_and_flatten(sample):
    """norse's own node map, plus the two torch modules it does not map."""
    import nir, nirtorch
    from norse.torch.utils.export_nir import _extract_norse_module

    def extract(module):
        node = _extract_norse_module(module, dt=1.0)
        if node is None and isinstance(module, nn.AvgPool2d):
            node = nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                 padding=np.array([0, 0]))
        if node is None and isinstance(module, nn.Flatten):
            node = nir.Flatten(input_type=None, start_dim=0, end_dim=-1)
        return node

    return nirtorch.extract_nir_graph(build(1), extract, sample, model_name="norse")


def fix_types(graph):
    """The repairs a library's graph needs before nir.write: torch tensors to numpy, and
    the shapes of this fixed network (its exporter leaves them None or wrong)."""
    import nir
    for node in graph.nodes.values():
        for key, value in vars(node).items():
            if isinstance(value, torch.Tensor):
                setattr(node, key, value.detach().numpy())
        if isinstance(node, nir.Input):
            node.input_type = {"input": np.array([1, 8, 8])}
        if isinstance(node, nir.Output):
            node.output_type = {"output": np.array([10])}
        if isinstance(node, nir.Conv2d):
            node.input_shape = (8, 8)
            node.input_type = {"input": np.array([1, 8, 8])}
        if isinstance(node, nir.Flatten):
            node.input_type = {"input": np.array([8, 4, 4])}
        if isinstance(node, nir.IF):  # norse: scalar parameters, which nir.write refuses
            for key in ("r", "v_threshold", "v_reset"):
                value = getattr(node, key, None)
                if value is not None and np.ndim(value) == 0:
                    setattr(node, key, np.full((8, 8, 8), value, dtype=np.float32))
    return graph


def repaired_export(path):
    """norse and sinabs with the smallest repair that makes their exporter's file usable."""
    import nir
    sample = x[:1]
    if lib == "norse":
        graph = norse_with_pool_and_flatten(sample)
        what = ("norse's map + AvgPool2d and Flatten; shapes set; scalar IF parameters "
                "broadcast to (8, 8, 8)")
    elif lib == "sinabs":
        import sinabs
        graph = sinabs.to_nir(build(1), sample)
        what = "shapes set (Input, Conv2d input_shape, Flatten input_type, Output)"
    else:
        return None
    nir.write(path, fix_types(graph))
    back = nir.read(path)
    return what, sorted(type(n).__name__ for n in back.nodes.values())


def err(exc):
    text = str(exc).strip() or "at `" + (traceback.extract_tb(exc.__traceback__)[-1].line
                                         or "?") + "`"
    return f"{type(exc).__name__}: {text}".splitlines()[0][:200]


rec = {"library": lib, "version": importlib.metadata.version(lib),
       "nir": importlib.metadata.version("nir")}
arrays = {}
for steps in spec["steps"]:
    try:
        total = run(build(steps), steps).double().numpy()
        arrays[f"readout_T{steps}"] = total
        arrays[f"pred_T{steps}"] = total.argmax(1)
        rec[f"accuracy_T{steps}"] = float((total.argmax(1) == w["labels"]).mean())
        rec[f"ann_agree_T{steps}"] = float((total.argmax(1) == w["ann_pred"]).mean())
    except Exception as exc:  # the failure is the measurement
        rec[f"error_run_T{steps}"] = err(exc)
np.savez(spec["out"] + ".npz", x=x.numpy(), labels=w["labels"], ann_pred=w["ann_pred"],
         **arrays)
try:
    rec["nodes"] = export(spec["out"] + ".nir")
    rec["exported"] = True
except Exception as exc:  # the failure is the measurement
    rec.update(exported=False, error_export=err(exc))
    import os
    if os.path.exists(spec["out"] + ".nir"):  # what the failed exporter left behind
        os.replace(spec["out"] + ".nir", spec["out"] + ".partial.nir")
        rec["partial_file"] = spec["out"] + ".partial.nir"
if not rec["exported"]:
    try:
        repaired = repaired_export(spec["out"] + "-repaired.nir")
        if repaired is not None:
            rec["repair"], rec["repaired_nodes"] = repaired
    except Exception as exc:  # the failure is the measurement
        rec["error_repair"] = err(exc)
print(json.dumps(rec))
'''


class StepAt1(torch.autograd.Function):
    """Heaviside ``v >= 1`` forward, a box (straight-through) gradient around it."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        return (v >= 1.0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return grad * ((v - 1.0).abs() < 0.5).to(grad.dtype)


class StepNet(nn.Module):
    """The float ANN every library rebuilds: conv -> step(v >= 1) -> avgpool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = StepAt1.apply(self.conv(x))
        return self.fc(nn.functional.avg_pool2d(s, 2).flatten(1))


def train_step_net(x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> StepNet:
    """A few seconds of Adam on the digits training split (seed 0)."""
    torch.manual_seed(0)
    net = StepNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net


def library_env(lib: str, envs: Path) -> dict[str, str] | None:
    """The environment a library's subprocess runs with (None: not built)."""
    env = dict(os.environ)
    name = LIBRARIES[lib]
    if name is None:
        return env
    if not (envs / name / ".nirx-done").is_file():
        return None
    env["PYTHONPATH"] = str(envs / name)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/nirx/sources", help="output folder")
    ap.add_argument("--envs", default="/tmp/nirx", help="scratch environments (nir_envs.sh)")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    ds = load_digits_dataset()
    x_train = torch.from_numpy(ds.x_train / 16.0).float()
    x_test = torch.from_numpy(ds.x_test / 16.0).float()
    net = train_step_net(x_train, torch.from_numpy(ds.y_train).long())
    with torch.no_grad():
        ann_pred = net(x_test).argmax(1).numpy()
    labels = np.asarray(ds.y_test)
    np.savez(out / "weights.npz", conv_w=net.conv.weight.detach().numpy(),
             conv_b=net.conv.bias.detach().numpy(), fc_w=net.fc.weight.detach().numpy(),
             fc_b=net.fc.bias.detach().numpy(), labels=labels, ann_pred=ann_pred)
    np.save(out / "inputs.npy", x_test.numpy())
    script = out / "source_script.py"
    script.write_text(SOURCE_SCRIPT)

    rows: list[dict[str, object]] = []
    for lib in [name for name in args.libraries.split(",") if name]:
        env = library_env(lib, Path(args.envs))
        if env is None:
            rows.append({"library": lib, "error": f"not built: run benchmarks/nir_envs.sh "
                         f"{args.envs}"})
            continue
        spec = out / f"{lib}.json"
        spec.write_text(json.dumps({"weights": str(out / "weights.npz"),
                                    "inputs": str(out / "inputs.npy"), "steps": list(STEPS),
                                    "out": str(out / lib)}))
        proc = subprocess.run([sys.executable, str(script), lib, str(spec)], env=env,
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"library": lib, "error": f"process failed: {tail[:200]}"})
            continue
        rows.append(json.loads(lines[-1]))
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
                   "%Y-%m-%d %H:%M UTC"),
               "ann_accuracy": float((ann_pred == labels).mean()), "samples": len(labels),
               "torch": torch.__version__, "out": str(out), "libraries": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['date']}: float ANN {100 * summary['ann_accuracy']:.1f} % on "
          f"{len(labels)} digits test samples; files in {out}")
    for r in rows:
        acc = " ".join(f"T={s}: {100 * float(r[f'accuracy_T{s}']):.1f} %"  # type: ignore[arg-type]
                       for s in STEPS if f"accuracy_T{s}" in r)
        what = f"exported {r['nodes']}" if r.get("exported") else \
            f"export failed: {r.get('error_export') or r.get('error')}"
        if "repair" in r:
            what += f"; repaired ({r['repair']}): {r['repaired_nodes']}"
        elif "error_repair" in r:
            what += f"; repair failed: {r['error_repair']}"
        print(f"  {r['library']} {r.get('version', '')} (nir {r.get('nir', '?')}): own run "
              f"{acc or '-'}; {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
