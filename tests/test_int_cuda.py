"""The integer simulator on CUDA: the device decisions on any machine, the GPU runs where
there is one (issue 15, item 3).

The dtype, bound, TF32 and int8-shape decisions are pure functions of a device and a
:class:`PrecisionFlags` snapshot, so they are checked here on the CPU; only the runs
that need a GPU are skipped without one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import BackendUnavailable, TargetError, UsageError
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph
from csqcfs_deploy.ir.ifg import save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions, open_backend
from csqcfs_deploy.simulators.devices import ieee_float32
from csqcfs_deploy.simulators.integer import Simulator, float32_kernels_exact, sum_dtype_for
from csqcfs_deploy.simulators.integer.device import (
    DevicePlan,
    PrecisionFlags,
    exact_kernels,
    int8_gemm_shape,
    int8_projection_ok,
    int8_shape_ok,
    simulator_device,
)

from .conftest import random_integer_input
from .test_simulator import assert_same

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
EXACT = PrecisionFlags()  # IEEE float32 everywhere, cuDNN off: what exact_kernels sets
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _dtype(plan: DevicePlan, bound: float) -> torch.dtype:
    return sum_dtype_for("a", [(bound, 0)], plan.float32_exact, plan.float64_exact)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sum_dtype_follows_the_bounds_on_either_device(device: torch.device) -> None:
    plan = DevicePlan.for_device(device, EXACT)
    assert _dtype(plan, 2.0**24 - 1) == torch.float32
    assert _dtype(plan, 2.0**24) == torch.float64
    assert _dtype(plan, 2.0**53 - 1) == torch.float64
    with pytest.raises(TargetError, match="beyond exact float64"):
        _dtype(plan, 2.0**53)


@pytest.mark.parametrize("change", [{"cuda_matmul": "tf32"}, {"cudnn_conv": "tf32"},
                                    {"matmul_precision": "high"}])
def test_tf32_makes_float32_not_exact_on_cuda_only(change: dict[str, str]) -> None:
    flags = PrecisionFlags(**change)  # type: ignore[arg-type]
    cuda = DevicePlan.for_device(CUDA, flags)
    assert not cuda.float32_exact and cuda.float64_exact
    assert _dtype(cuda, 100.0) == torch.float64
    cpu = DevicePlan.for_device(CPU, flags)
    # cuBLAS/cuDNN modes do not touch the CPU; the matmul precision does
    assert cpu.float32_exact == (change.get("matmul_precision", "highest") == "highest")


def test_cudnn_on_leaves_no_exact_float_kernel_on_cuda() -> None:
    """cuDNN may choose FFT/Winograd convolutions: neither float dtype is proven."""
    plan = DevicePlan.for_device(CUDA, PrecisionFlags(cudnn_enabled=True))
    assert not plan.float32_exact and not plan.float64_exact
    with pytest.raises(TargetError, match="no float kernel is exact"):
        _dtype(plan, 100.0)
    assert DevicePlan.for_device(CPU, PrecisionFlags(cudnn_enabled=True)).float32_exact


def test_onednn_bf16_makes_float32_not_exact_on_the_cpu() -> None:
    plan = DevicePlan.for_device(CPU, PrecisionFlags(mkldnn=frozenset({"none", "bf16"})))
    assert not plan.float32_exact and _dtype(plan, 100.0) == torch.float64
    assert DevicePlan.for_device(CUDA, PrecisionFlags(mkldnn=frozenset({"bf16"}))
                                 ).float32_exact


def test_int8_shape_rule_on_cuda_and_none_on_the_cpu() -> None:
    assert int8_shape_ok(CUDA, 17, 8, 8) and int8_shape_ok(CUDA, 4096, 1152, 256)
    for bad in [(16, 8, 8), (17, 9, 8), (17, 8, 12), (17, 0, 8), (17, 8, 0)]:
        assert not int8_shape_ok(CUDA, *bad), bad
        assert int8_shape_ok(CPU, *bad), bad


def test_int8_gemm_shapes_of_conv_and_dense_projections() -> None:
    conv = ConvProjection("c", "i", "o", np.ones((16, 8, 3, 3), np.int64), padding=(1, 1))
    first = ConvProjection("f", "i", "o", np.ones((16, 1, 3, 3), np.int64), padding=(1, 1))
    dense = DenseProjection("d", "i", "o", np.ones((10, 64), np.int64))
    assert int8_gemm_shape(conv, 2, (8, 4, 4)) == (2 * 16, 72, 16)
    assert int8_gemm_shape(dense, 20, (4, 4, 4)) == (20, 64, 10)
    assert int8_projection_ok(CUDA, conv, 2, (8, 4, 4))
    assert not int8_projection_ok(CUDA, first, 2, (1, 4, 4))     # k = 9
    assert not int8_projection_ok(CUDA, conv, 1, (8, 4, 4))      # m = 16
    assert not int8_projection_ok(CUDA, dense, 20, (4, 4, 4))    # n = 10
    assert int8_projection_ok(CPU, dense, 1, (4, 4, 4))


def _flags_now() -> tuple[object, ...]:
    b = torch.backends
    return (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision,
            b.mkldnn.matmul.fp32_precision, PrecisionFlags.read().matmul_precision,
            b.cudnn.enabled)


def test_exact_kernels_sets_and_restores_every_flag() -> None:
    """Inside: TF32 off, precision highest, cuDNN off (float32 exact on CUDA); after,
    also after an error: the user's settings, unchanged; on the CPU nothing changes."""
    b = torch.backends
    before = _flags_now()
    try:
        torch.set_float32_matmul_precision("high")
        b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = "tf32"
        b.cudnn.enabled = True
        user = _flags_now()
        assert not float32_kernels_exact(CUDA)
        with pytest.raises(KeyError), exact_kernels(CUDA):
            assert _flags_now()[:2] == ("ieee", "ieee")
            assert _flags_now()[3] == "highest" and not b.cudnn.enabled
            assert float32_kernels_exact(CUDA)
            assert PrecisionFlags.read() == PrecisionFlags(
                mkldnn=PrecisionFlags.read().mkldnn)
            raise KeyError("inside")
        assert _flags_now() == user
        with exact_kernels(CPU), ieee_float32(CPU):
            assert _flags_now() == user
    finally:
        torch.set_float32_matmul_precision(str(before[3]))
        (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision,
         b.mkldnn.matmul.fp32_precision) = before[:3]
        b.cudnn.enabled = bool(before[4])
    assert _flags_now() == before


def test_precision_flags_inherit_along_the_chain() -> None:
    b = torch.backends
    saved = (b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision)
    try:
        b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision = "none", "tf32"
        assert PrecisionFlags.read().cudnn_conv == "tf32"
        b.cudnn.fp32_precision = "none"
        assert PrecisionFlags.read().cudnn_conv == "ieee"
    finally:
        b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision = saved


def test_device_names() -> None:
    assert simulator_device("cpu") == CPU
    with pytest.raises(UsageError, match="tpu.*cpu or cuda"):
        simulator_device("tpu")
    with pytest.raises(UsageError, match="unknown device"):
        simulator_device("gpu0")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(BackendUnavailable, match=f"--device {name}: no CUDA GPU"):
                simulator_device(name)


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory,
                digits_graphs: dict[str, IFGraph]) -> Path:
    return save_graph(digits_graphs["loihi2"], tmp_path_factory.mktemp("cuda") / "d.ifg")


@pytest.mark.parametrize("device,code", [("cuda", BackendUnavailable.exit_code),
                                         ("tpu", UsageError.exit_code)])
def test_cli_device_errors_are_one_line(digits_file: Path, device: str, code: int,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``csqcfs-deploy run ... --backend int --device cuda|tpu`` (the CLI's entry point)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda runs (test_cuda_back_end_and_cli)")
    assert main(["run", str(digits_file), "--backend", "int", "--dataset", "digits",
                 "--samples", "8", "--device", device]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"--device {device}" in err or repr(device) in err
    assert "Traceback" not in err


def test_explicit_cpu_device_is_the_default(digits_graphs: dict[str, IFGraph]) -> None:
    graph = digits_graphs["int8"]
    x = random_integer_input(graph, 6, seed=3)
    cfg = RunConfig(timesteps=3, presim=1)
    assert_same(Simulator(graph, device=CPU).run(x, cfg), Simulator(graph).run(x, cfg))


# --------------------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("kernel", ["auto", "int8"])
@pytest.mark.parametrize("schedule", ["synchronous", "pipelined"])
@pytest.mark.parametrize("timesteps", [1, 4])
def test_cuda_equals_cpu(digits_graphs: dict[str, IFGraph], kernel: str, schedule: str,
                         timesteps: int) -> None:
    graph = digits_graphs["loihi2"]
    x = random_integer_input(graph, 40, seed=timesteps)
    cfg = RunConfig(timesteps=timesteps, presim=1 if timesteps > 1 else 0,
                    schedule=schedule, record=True)  # type: ignore[arg-type]
    before = _flags_now()
    on_gpu = Simulator(graph, kernel, device=CUDA).run(x, cfg)  # type: ignore[arg-type]
    assert _flags_now() == before
    on_cpu = Simulator(graph, kernel).run(x, cfg)  # type: ignore[arg-type]
    assert on_gpu.readout.device.type == "cpu"
    assert all(v.device.type == "cpu" for v in on_gpu.spike_counts.values())
    assert_same(on_gpu, on_cpu)
    assert on_gpu.wrapped == on_cpu.wrapped and on_gpu.saturated == on_cpu.saturated


@needs_gpu
def test_cuda_back_end_and_cli(digits_graphs: dict[str, IFGraph], digits_file: Path) -> None:
    graph = digits_graphs["loihi2"]
    x = random_integer_input(graph, 24, seed=5)
    cfg = RunConfig(timesteps=2)
    with open_backend("int", graph, cfg, BackendOptions(device="cuda")) as runner:
        assert_same(runner.run(x), Simulator(graph).run(x, cfg))
    cli = Path(sys.executable).with_name("csqcfs-deploy")
    proc = subprocess.run([str(cli), "run", str(digits_file), "--backend", "int",
                           "--dataset", "digits", "--samples", "64", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
