"""The Lava back end: lava-nc fixed-point processes equal the pipelined simulator, spike for
spike; Lava imports on Python 3.11 through lava_compat; failures stop Lava's processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import BackendUnavailable, GraphError, UsageError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    IFGraph,
    SumPool,
    save_graph,
)
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.ir.synapses import apply_projection
from csqcfs_deploy.run.backends import BackendOptions, open_backend
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.simulators.lava import processes as lava_processes
from csqcfs_deploy.simulators.lava.compat import ensure_lava_compat
from csqcfs_deploy.simulators.lava.layout import fold_pool, lava_conv_weight
from csqcfs_deploy.simulators.lava.runner import LavaRunner
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.datasets import DIGITS_ENCODING, Dataset
from csqcfs_deploy.train.zoo import BasicBlock

from .conftest import random_integer_input, randomize_batchnorm

SAMPLES = 20
CONFIGS = [(1, 0), (4, 0), (1, 4)]  # (T, P): T = 1, T = 4, pre-simulation P = 4


# --------------------------------------------------------------------------- helpers


def assert_same_run(ref: RunResult, got: RunResult) -> int:
    """Every spike of every layer at every step, counts, masks and readout equal.

    Returns the number of spike slots compared (samples x neurons x steps).
    """
    assert ref.steps == got.steps
    assert ref.spikes is not None and got.spikes is not None
    assert set(ref.spikes) == set(got.spikes)
    compared = 0
    for name, spikes in ref.spikes.items():
        assert got.spikes[name].dtype == torch.bool
        assert got.spikes[name].shape == spikes.shape, name
        mismatches = int((got.spikes[name] != spikes).sum())
        assert mismatches == 0, f"layer {name}: {mismatches} spikes differ"
        compared += spikes.numel()
        assert torch.equal(got.spike_counts[name], ref.spike_counts[name]), name
        assert torch.equal(got.window_counts[name], ref.window_counts[name]), name
    if ref.masks is None:
        assert got.masks is None
    else:
        assert got.masks is not None
        for name, mask in ref.masks.items():
            assert torch.equal(got.masks[name], mask), name
    assert got.readout.dtype == torch.int64
    assert torch.equal(got.readout, ref.readout)
    assert torch.equal(got.logits, ref.logits)
    return compared


def run_both(graph: IFGraph, x: torch.Tensor, timesteps: int, presim: int
             ) -> tuple[RunResult, RunResult]:
    cfg = RunConfig(timesteps=timesteps, presim=presim, schedule="pipelined", record=True)
    with open_backend("lava", graph, cfg) as runner:
        got = runner.run(x)
    return simulate(graph, x, cfg), got


class TinyResNet(nn.Module):
    """1x8x8 -> stem -> block (identity shortcut) -> block (1x1 stride-2 shortcut) -> readout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                  CSQCFS(4, 1))
        self.block1 = BasicBlock(4, 4, 1, 1, 0.5, 1.0)
        self.block2 = BasicBlock(4, 8, 2, 1, 0.5, 1.0)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def calibrate_thresholds(model: nn.Module, x: torch.Tensor, quantile: float = 0.8) -> None:
    """Set every CS-QCFS threshold to a quantile of its positive inputs (layer by layer),
    so every layer of a random network fires at a moderate rate."""
    acts = [m for m in model.modules() if isinstance(m, CSQCFS)]
    for act in acts:
        seen: list[torch.Tensor] = []
        handle = act.register_forward_hook(
            lambda m, inp, out, seen=seen: seen.append(inp[0].detach()))
        with torch.no_grad():
            model(x)
        handle.remove()
        pre = seen[0].transpose(0, 1).reshape(act.channels, -1)
        lam = torch.stack([torch.quantile(row[row > 0], quantile) if (row > 0).any()
                           else torch.tensor(1.0) for row in pre]).clamp(min=0.05)
        act.up.data.copy_(torch.log(torch.expm1(lam.to(act.up.dtype))))


@pytest.fixture(scope="module")
def residual_graph() -> IFGraph:
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyResNet(), seed=1)
    calib = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate_thresholds(model, calib)
    return quantize(fold(model, (1, 8, 8), DIGITS_ENCODING).graph, "loihi2")[0]


@pytest.fixture(scope="module")
def digits_inputs(digits: Dataset, digits_graphs: dict[str, IFGraph]) -> torch.Tensor:
    return input_units(digits_graphs["loihi2"], digits.x_test[:SAMPLES])


def lava_children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def lava_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


# --------------------------------------------------------------------------- compat


def test_lava_imports_on_this_python_through_the_compat_hook(tmp_path: Path) -> None:
    """A fresh interpreter (with a tqdm bar first, which fixes the start method) imports
    Lava through import_lava; without the hook Python 3.11 refuses var_model.py."""
    code = ("from tqdm import tqdm\n"
            "for _ in tqdm(range(2), disable=True): pass\n"
            "from csqcfs_deploy.simulators.lava.compat import import_lava\n"
            "import_lava('lava.magma.compiler.var_model')\n"
            "import_lava('lava.magma.runtime.message_infrastructure.multiprocessing')\n"
            "from lava.magma.compiler.var_model import CoreEncoder\n"
            "assert CoreEncoder().x is CoreEncoder().x\n"
            "import multiprocessing; assert multiprocessing.get_start_method() == 'fork'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    if sys.version_info >= (3, 11):
        bare = subprocess.run([sys.executable, "-c", "import lava.magma.compiler.var_model"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert bare.returncode != 0
        assert "mutable default" in bare.stderr


def test_compat_is_idempotent_once_lava_is_imported() -> None:
    before = list(sys.meta_path)
    ensure_lava_compat()
    ensure_lava_compat()
    assert sys.meta_path == before
    import dataclasses

    assert dataclasses.dataclass.__module__ == "dataclasses"  # the patch is gone after import


def test_if_arithmetic_equals_lavas_own_lif_fixed_point_model() -> None:
    """loihi2_current/voltage equal AbstractPyLifModelFixed (du = 4095, dv = 0) on random data,
    including wrapping currents and saturating voltages."""
    from lava.proc.lif.models import PyLifModelBitAcc

    rng = np.random.default_rng(0)
    n = 4000
    model = PyLifModelBitAcc({})
    model.u = np.zeros(n, np.int32)
    model.v = rng.integers(-(2**23) + 1, 2**23, n).astype(np.int32)
    model.du, model.dv = 4095, 0
    model.bias_mant = rng.integers(-4095, 4096, n).astype(np.int16)
    model.bias_exp = rng.integers(0, 8, n).astype(np.int16)
    a_in = rng.integers(-(2**18), 2**18, n).astype(np.int32)
    v0 = model.v.copy()
    model.scale_bias()
    model.subthr_dynamics(a_in)
    bias = lava_processes.effective_bias(model.bias_mant, model.bias_exp)
    u = lava_processes.loihi2_current(a_in)
    assert np.array_equal(u, model.u)
    assert np.array_equal(lava_processes.loihi2_voltage(v0, u, bias), model.v)
    wraps = np.abs(a_in.astype(np.int64) << 6) >= 2**23
    assert wraps.any() and (np.abs(model.v) == 2**23 - 1).any()


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("conv_padding", [0, 1])
def test_pool_folded_into_conv_weights_is_exact(conv_padding: int) -> None:
    rng = np.random.default_rng(conv_padding)
    w = rng.integers(-127, 128, (5, 3, 3, 3)) * 2
    p = ConvProjection("c", "a", "b", w, SumPool((2, 2), (2, 2)), stride=(1, 1),
                       padding=(conv_padding, conv_padding))
    x = torch.from_numpy(rng.integers(0, 2, (4, 3, 8, 8))).double()
    q = fold_pool(p, (3, 8, 8))
    assert q.pool is None
    assert torch.equal(apply_projection(q, x), apply_projection(p, x))


def test_pool_folded_into_dense_and_identity_is_exact() -> None:
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.integers(0, 2, (4, 3, 9, 9))).double()  # 9x9: the pool drops a row
    dense = DenseProjection("d", "a", "b", rng.integers(-127, 128, (6, 3 * 4 * 4)) * 2,
                            SumPool((2, 2), (2, 2)))
    assert torch.equal(apply_projection(fold_pool(dense, (3, 9, 9)), x),
                       apply_projection(dense, x))
    ident = IdentityProjection("i", "a", "b", rng.integers(-127, 128, 3) * 2,
                               SumPool((3, 3), (3, 3)))
    assert torch.equal(apply_projection(fold_pool(ident, (3, 9, 9)), x),
                       apply_projection(ident, x))


def test_overlapping_pool_is_refused() -> None:
    p = DenseProjection("d", "a", "b", np.zeros((2, 3 * 3 * 3), np.int64), SumPool((3, 3), (2, 2)))
    with pytest.raises(GraphError, match="overlaps or is padded"):
        fold_pool(p, (3, 8, 8))


@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 1, 1), (2, 0, 1), (1, 1, 2)])
def test_lava_conv_layout_equals_cross_correlation(stride: int, padding: int, groups: int
                                                   ) -> None:
    """Lava's Conv kernel arithmetic (its own conv function, WHC layout, flipped kernel) on
    our converted weights equals the graph's cross-correlation."""
    from lava.proc.conv import utils

    rng = np.random.default_rng(stride + groups)
    w = rng.integers(-127, 128, (4, 4 // groups, 3, 2)) * 2
    p = ConvProjection("c", "a", "b", w, None, stride=(stride, stride),
                       padding=(padding, padding), groups=groups)
    x = rng.integers(0, 200, (4, 7, 6))
    ours = apply_projection(p, torch.from_numpy(x[None]).double())[0].numpy()
    theirs = utils.conv(x.transpose(2, 1, 0).astype(np.int32),
                        lava_conv_weight(w).astype(np.int32), (2, 3), (stride, stride),
                        (padding, padding), (1, 1), groups)
    assert np.array_equal(theirs.transpose(2, 1, 0), ours)


# --------------------------------------------------------------------------- spike for spike


@pytest.mark.parametrize(("timesteps", "presim"), CONFIGS)
def test_digits_cnn_lava_equals_pipelined_simulator(digits_graphs: dict[str, IFGraph],
                                                    digits_inputs: torch.Tensor,
                                                    timesteps: int, presim: int) -> None:
    graph = digits_graphs["loihi2"]
    ref, got = run_both(graph, digits_inputs, timesteps, presim)
    compared = assert_same_run(ref, got)
    layers = len(graph.if_layers)
    assert compared == SAMPLES * ref.steps * sum(la.neurons for la in graph.if_layers)
    assert layers == 4
    assert all(int(s.sum()) > 0 for s in ref.spikes.values())  # every layer is active


@pytest.mark.parametrize(("timesteps", "presim"), CONFIGS)
def test_residual_network_lava_equals_pipelined_simulator(residual_graph: IFGraph,
                                                          timesteps: int, presim: int) -> None:
    graph = residual_graph
    depths = graph.depths()
    delays = [depths[p.dst] - depths[p.src] for p in graph.projections]
    assert max(delays) == 2  # the shortcuts need delay lines
    assert any(isinstance(p, IdentityProjection) for p in graph.projections)
    x = random_integer_input(graph, SAMPLES, seed=timesteps + presim)
    ref, got = run_both(graph, x, timesteps, presim)
    assert_same_run(ref, got)
    assert ref.spikes is not None
    for name, s in ref.spikes.items():
        assert 0.01 < float(s.float().mean()) < 0.9, f"layer {name} is (nearly) silent/saturated"


def test_samples_back_to_back_equal_independent_runs(residual_graph: IFGraph) -> None:
    """Runs of different sizes through one compiled network (slots reused at other offsets)
    give what each sample gives alone."""
    graph = residual_graph
    cfg = RunConfig(timesteps=2, presim=2, schedule="pipelined", record=True)
    x = random_integer_input(graph, 5, seed=11)
    runner = LavaRunner(graph, cfg, BackendOptions(), slots=3)
    try:
        first = runner.run(x)
        again = runner.run(x[3:5])
        alone = runner.run(x[4:5])
    finally:
        runner.close()
    assert_same_run(simulate(graph, x, cfg), first)
    assert first.spikes is not None and again.spikes is not None and alone.spikes is not None
    for name in first.spikes:
        assert torch.equal(again.spikes[name], first.spikes[name][:, 3:5])
        assert torch.equal(alone.spikes[name], first.spikes[name][:, 4:5])
    assert torch.equal(alone.readout, first.readout[4:5])


def test_no_record_gives_counts_and_readout_only(residual_graph: IFGraph) -> None:
    cfg = RunConfig(timesteps=2, presim=0, schedule="pipelined")
    x = random_integer_input(residual_graph, 3, seed=4)
    with open_backend("lava", residual_graph, cfg) as runner:
        got = runner.run(x)
    ref = simulate(residual_graph, x, cfg)
    assert got.spikes is None and got.masks is None
    for name in ref.spike_counts:
        assert torch.equal(got.spike_counts[name], ref.spike_counts[name])
        assert torch.equal(got.window_counts[name], ref.window_counts[name])
    assert torch.equal(got.readout, ref.readout)


# --------------------------------------------------------------------------- refusals, failures


def test_other_profiles_and_schedules_are_refused(digits_graphs: dict[str, IFGraph]) -> None:
    with pytest.raises(GraphError, match="loihi2 profile only"):
        LavaRunner(digits_graphs["int8"], RunConfig(1, schedule="pipelined"), BackendOptions())
    with pytest.raises(UsageError, match="pipelined"):
        with open_backend("lava", digits_graphs["loihi2"], RunConfig(1)):
            pass


def test_failure_inside_a_run_stops_every_lava_process(residual_graph: IFGraph,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception raised inside a Lava process (after fork) -> one clear error, and no Lava
    process, thread or result file is left."""
    original = lava_processes.PyIFNeuronsModelFixed.run_spk

    def failing(self: lava_processes.PyIFNeuronsModelFixed) -> None:
        if self.time_step == 3:
            raise ArithmeticError("injected failure")
        original(self)

    monkeypatch.setattr(lava_processes.PyIFNeuronsModelFixed, "run_spk", failing)
    children, threads = lava_children(), lava_threads()
    cfg = RunConfig(timesteps=1, schedule="pipelined")
    runner = LavaRunner(residual_graph, cfg, BackendOptions())
    workdir = runner.session.workdir
    assert lava_children() - children  # Lava's processes are running
    with pytest.raises(BackendUnavailable, match="injected failure") as info:
        runner.run(random_integer_input(residual_graph, 2, seed=0))
    assert "\n" not in str(info.value)
    assert lava_children() - children == set()
    deadline = time.monotonic() + 10
    while lava_threads() - threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lava_threads() - threads == set()
    assert not workdir.exists()
    with pytest.raises(BackendUnavailable, match="closed"):
        runner.run(random_integer_input(residual_graph, 1, seed=0))


def test_ctrl_c_during_a_run_stops_every_lava_process(residual_graph: IFGraph) -> None:
    children = lava_children()
    cfg = RunConfig(timesteps=4, schedule="pipelined")
    x = random_integer_input(residual_graph, 200, seed=1)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        with open_backend("lava", residual_graph, cfg) as runner:
            timer.start()
            runner.run(x)
    timer.cancel()
    assert lava_children() - children == set()


def test_lava_failing_to_start_is_one_line_and_leaves_nothing(residual_graph: IFGraph,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from lava.magma.runtime.runtime import Runtime

    original = Runtime._build_runtime_services

    def broken(self: Runtime) -> None:
        original(self)  # Lava's processes are forked by now
        raise OSError("cannot start the runtime services")

    monkeypatch.setattr(Runtime, "_build_runtime_services", broken)
    children = lava_children()
    with pytest.raises(BackendUnavailable, match="failed to start") as info:
        LavaRunner(residual_graph, RunConfig(1, schedule="pipelined"), BackendOptions())
    assert "'lava' extra" in str(info.value) and "\n" not in str(info.value)
    assert lava_children() - children == set()


def test_missing_lava_is_one_line_naming_the_extra(residual_graph: IFGraph, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for name in list(sys.modules):
        if name == "lava" or name.startswith(("lava.", "csqcfs_deploy.simulators.lava")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lava", None)  # import lava -> ImportError
    path = save_graph(residual_graph, tmp_path / "res.ifg")
    code = main(["run", str(path), "--backend", "lava", "--samples", "1", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == BackendUnavailable.exit_code
    assert err.count("\n") == 0 and err.startswith("error:")
    assert "'lava' extra" in err


def test_cli_run_lava_gives_the_int_backend_keys(residual_graph: IFGraph, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = save_graph(residual_graph, tmp_path / "res.ifg")
    outputs = {}
    for backend in ("lava", "int"):
        code = main(["run", str(path), "--backend", backend, "--schedule", "pipelined",
                     "--dataset", "digits", "--timesteps", "2", "--presim", "1",
                     "--samples", "3", "--json"])
        assert code == 0
        outputs[backend] = json.loads(capsys.readouterr().out)
    assert set(outputs["lava"]) == set(outputs["int"])
    for key in ("accuracy", "samples", "latency_steps", "pipeline_depth", "firing_rate"):
        assert outputs["lava"][key] == outputs["int"][key], key
    counters = ("wrapped", "saturated")  # counted by the integer simulator only
    for name, la in outputs["int"]["layers"].items():
        lava = outputs["lava"]["layers"][name]
        assert all(lava[c] is None for c in counters)
        assert {k: v for k, v in la.items() if k not in counters} == {
            k: v for k, v in lava.items() if k not in counters}
    assert outputs["lava"]["backend"] == "lava"
