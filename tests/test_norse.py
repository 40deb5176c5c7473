"""The Norse back end against the synchronous integer simulator, spike for spike.

Norse is part of the suite: a missing norse makes this module fail at import.
"""

from __future__ import annotations

import doctest
from collections.abc import Callable

import norse.torch  # noqa: F401 - a missing Norse must fail the suite, not skip it
import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import BackendUnavailable, GraphError, UsageError
from csqcfs_deploy.ir import (
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ReadoutLayer,
    SumPool,
    load_graph,
    save_graph,
)
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.ir.synapses import apply_projection
from csqcfs_deploy.run.backends import BackendOptions, open_backend
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.results import RunResult
from csqcfs_deploy.simulators import norse as nb
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, Dataset
from csqcfs_deploy.train.zoo import arch_spec, build_model

from .conftest import PROFILE_NAMES, random_integer_input


def assert_same(a: RunResult, b: RunResult) -> None:
    """Every recorded spike, count, mask and the readout identical (dtypes too)."""
    assert a.steps == b.steps
    assert a.readout.dtype == b.readout.dtype == torch.int64
    assert torch.equal(a.readout, b.readout)
    assert torch.equal(a.logits, b.logits)
    assert a.spikes is not None and b.spikes is not None
    assert a.spikes.keys() == b.spikes.keys()
    for name, sa in a.spikes.items():
        sb = b.spikes[name]
        assert sb.dtype == torch.bool and sb.shape == sa.shape, name
        if not torch.equal(sa, sb):
            diff = (sa != sb).nonzero()[0].tolist()
            raise AssertionError(f"layer {name}: first differing spike at (step-1, n, ...) "
                                 f"{diff}")
    for counts_a, counts_b in ((a.spike_counts, b.spike_counts),
                               (a.window_counts, b.window_counts)):
        assert counts_a.keys() == counts_b.keys()
        for name in counts_a:
            assert counts_b[name].dtype == counts_a[name].dtype
            assert torch.equal(counts_a[name], counts_b[name]), name
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None and b.masks is not None:
        assert a.masks.keys() == b.masks.keys()
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name]), name


def run_norse(graph: IFGraph, x: torch.Tensor, cfg: RunConfig) -> RunResult:
    with open_backend("norse", graph, cfg) as runner:
        return runner.run(x)


# --------------------------------------------------------------------------- digits-cnn


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_digits_every_spike_matches_simulator(digits_graphs: dict[str, IFGraph],
                                              digits: Dataset, profile: str) -> None:
    graph = digits_graphs[profile]
    x = input_units(graph, digits.x_test)
    assert len(x) == len(digits.y_test) > 300  # every test sample
    for timesteps, presim in ((1, 0), (4, 0), (1, 4)):
        cfg = RunConfig(timesteps=timesteps, presim=presim, record=True)
        expected = simulate(graph, x, cfg)
        got = run_norse(graph, x, cfg)
        assert_same(expected, got)
        # the comparison is not vacuous: every IF layer spikes, and the network classifies
        assert all(int(c.sum()) > 0 for c in expected.spike_counts.values())
        assert (got.predictions == digits.y_test).mean() > 0.8


# --------------------------------------------------------------------------- vgg16 / resnet20


def zoo_graph(arch: str, profile: str, init_threshold: float | None,
              random_bn: Callable[[nn.Module, int], nn.Module]) -> IFGraph:
    torch.manual_seed(0)
    model = random_bn(build_model(arch, 4, init_threshold=init_threshold), 1)
    folded: FoldResult = fold(model, arch_spec(arch).input_shape, CIFAR10_ENCODING, arch=arch,
                              num_classes=10)
    return quantize(folded.graph, profile)[0]


@pytest.mark.parametrize(("arch", "profile", "init_threshold", "cfg"), [
    ("vgg16", "loihi2", 1.0, RunConfig(timesteps=1, presim=1, record=True)),
    ("resnet20", "loihi2", None, RunConfig(timesteps=2, presim=2, record=True)),
    ("resnet20", "int16", None, RunConfig(timesteps=2, record=True)),
])
def test_zoo_every_spike_matches_simulator(arch: str, profile: str,
                                           init_threshold: float | None, cfg: RunConfig,
                                           random_bn: Callable[[nn.Module, int], nn.Module]
                                           ) -> None:
    graph = zoo_graph(arch, profile, init_threshold, random_bn)
    x = random_integer_input(graph, 2, seed=3)
    expected = simulate(graph, x, cfg)
    assert_same(expected, run_norse(graph, x, cfg))
    active = sum(int(c.sum()) > 0 for c in expected.spike_counts.values())
    assert active >= 0.9 * len(expected.spike_counts)  # not vacuous: (nearly) every layer spikes


# --------------------------------------------------------------------------- wrap, saturation


def edge_graph(profile: str) -> IFGraph:
    """A small graph whose currents wrap (loihi2) and whose membranes saturate.

    input (1, 4, 4) -> conv 3x3 (IF a, subtract) -> 2x2 sum pool + identity (IF b, zero
    reset) and input -> 2x2 sum pool + conv 1x1 (IF b); readout <- dense from b
    (weight_exp -1) + pooled dense from a (weight_exp +1).
    """
    rng = np.random.default_rng(7)
    big = 1 << 22 if profile == "loihi2" else 1 << 30
    inp = InputLayer("in", (1, 4, 4), scale=1 / 255, raw_max=255.0, mean=(0.0,), std=(1.0,),
                     bits=8)
    a = IFLayer("a", (2, 4, 4), v_th=np.array([300_000, 5_000_000]),
                v_init=np.array([150_001, 2_500_001]), bias=np.array([big, -big]),
                threshold_real=np.ones(2))
    b = IFLayer("b", (2, 2, 2), v_th=np.array([40, 3]), v_init=np.array([0, 1]),
                bias=np.array([-5, 2]), threshold_real=np.ones(2), reset="zero")
    out = ReadoutLayer("out", (3,), bias=np.array([big, 0, -big]), scale=0.5)
    projections = (
        ConvProjection("c1", "in", "a", rng.integers(-128, 128, size=(2, 1, 3, 3)) * 2,
                       padding=(1, 1)),
        IdentityProjection("id", "a", "b", np.array([7, -3]), pool=SumPool((2, 2), (2, 2))),
        ConvProjection("c2", "in", "b", rng.integers(-20, 20, size=(2, 1, 1, 1)),
                       pool=SumPool((2, 2), (2, 2))),
        DenseProjection("d1", "b", "out", rng.integers(-100, 100, size=(3, 8)), weight_exp=-1),
        DenseProjection("d2", "a", "out", rng.integers(-100, 100, size=(3, 8)),
                        pool=SumPool((2, 2), (2, 2)), weight_exp=1),
    )
    return IFGraph(layers=(inp, a, b, out), projections=projections,
                   meta=GraphMeta(levels=1, phi=0.5, profile=profile))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_wrap_saturation_zero_reset_pool_identity_weight_exp(profile: str) -> None:
    graph = edge_graph(profile)
    prof = get_profile(profile)
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(16, 1, 4, 4)))
    cfg = RunConfig(timesteps=5, presim=2, record=True)
    net = nb.to_norse(graph, presim=2, input_max_abs=255)
    assert_same(simulate(graph, x, cfg), run_norse_with(net, graph, x, cfg))
    # the edge cases really occur: saturation of layer a (and wrap on loihi2)
    state = None
    hit_limit = False
    for _, state in net.steps(x, 7):
        v = state.layers[0].v
        hit_limit |= bool((v == prof.voltage_max).any() or (v == prof.voltage_min).any())
    assert hit_limit
    if prof.current_bits is not None:
        acc = apply_projection(graph.node("c1"), x.to(torch.float64))
        assert float((acc * 64).abs().max()) > 2 ** (prof.current_bits - 1)


def run_norse_with(net: nb.NorseIFNetwork, graph: IFGraph, x: torch.Tensor, cfg: RunConfig
                   ) -> RunResult:
    return nb.NorseRunner(net=net, cfg=cfg).run(x)


# --------------------------------------------------------------------------- dtype and device


def test_moves_between_dtypes_and_stays_exact(digits_graphs: dict[str, IFGraph],
                                              digits: Dataset) -> None:
    graph = digits_graphs["loihi2"]
    x = input_units(graph, digits.x_test[:64])
    cfg = RunConfig(timesteps=3, presim=2, record=True)
    expected = simulate(graph, x, cfg)
    net = nb.to_norse(graph, presim=2)
    assert net.dtype == torch.float32  # loihi2's 24-bit membrane is exact in float32
    assert_same(expected, run_norse_with(net, graph, x, cfg))
    net.double()
    assert net.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert_same(expected, run_norse_with(net, graph, x, cfg))
    net.to(torch.float32)
    assert net.dtype == torch.float32
    assert_same(expected, run_norse_with(net, graph, x, cfg))
    with pytest.raises(GraphError, match="float16"):
        net.half()
    assert net.dtype == torch.float32 and all(p.dtype == torch.float32
                                              for p in net.parameters())


def test_32_bit_membrane_needs_float64_unless_the_run_is_short(
        digits_graphs: dict[str, IFGraph], digits: Dataset) -> None:
    graph = digits_graphs["int16"]
    x = input_units(graph, digits.x_test[:64])
    net = nb.to_norse(graph)
    assert net.dtype == torch.float64  # unlimited steps: 32-bit membrane
    with pytest.raises(GraphError, match="membrane range .* not exact in float32"):
        net.float()
    assert net.dtype == torch.float64 and all(p.dtype == torch.float64
                                              for p in net.parameters())
    with pytest.raises(GraphError, match="float32"):
        nb.to_norse(graph, dtype=torch.float32)
    # a known, short run fits float32 for int16's digits-cnn (one step), int8's (many)
    limit = min(s for b in nb.layer_bounds(graph)
                if (s := b.max_steps(torch.float32)) is not None)
    assert limit >= 1
    cfg = RunConfig(timesteps=limit, record=True)
    short = nb.to_norse(graph, dtype=torch.float32, max_steps=limit)
    assert_same(simulate(graph, x, cfg), run_norse_with(short, graph, x, cfg))
    with pytest.raises(GraphError, match="at most"):
        list(short.steps(x, limit + 1))
    with pytest.raises(UsageError, match="presim"):
        nb.NorseRunner(net=short, cfg=RunConfig(timesteps=1, presim=1))
    int8 = nb.to_norse(digits_graphs["int8"], presim=4, max_steps=8)
    assert int8.dtype == torch.float32
    cfg8 = RunConfig(timesteps=4, presim=4, record=True)
    assert_same(simulate(digits_graphs["int8"], x, cfg8),
                run_norse_with(int8, digits_graphs["int8"], x, cfg8))


def test_float32_beyond_the_bound_would_be_wrong() -> None:
    """The check is not decorative: a membrane past 2**24 does round in float32."""
    inp = InputLayer("in", (2,), scale=1.0, raw_max=1.0, mean=(0.0, 0.0), std=(1.0, 1.0),
                     bits=2)
    hidden = IFLayer("h", (1,), v_th=np.array([3]), v_init=np.array([1]), bias=np.array([0]),
                     threshold_real=np.ones(1))
    out = ReadoutLayer("out", (2,), bias=np.array([2**24 + 1, 0]), scale=1.0)
    graph = IFGraph(
        layers=(inp, hidden, out),
        projections=(DenseProjection("p", "in", "h", np.array([[1, 1]])),
                     DenseProjection("q", "h", "out", np.array([[0], [1]]))),
        meta=GraphMeta(levels=1, phi=0.5, profile="int8"))
    x = torch.tensor([[1, 1]])
    cfg = RunConfig(timesteps=1, record=True)
    expected = simulate(graph, x, cfg)
    assert int(expected.readout[0, 0]) == 2**24 + 1
    with pytest.raises(GraphError, match="layer out"):
        nb.to_norse(graph, dtype=torch.float32, max_steps=1)
    assert nb.to_norse(graph, max_steps=1).dtype == torch.float64
    assert_same(expected, run_norse(graph, x, cfg))
    bounds = nb.layer_bounds(graph)
    unchecked = nb.NorseIFNetwork(graph, bounds, torch.float32, 0, None, 1, "heaviside", 0.0)
    wrong = run_norse_with(unchecked, graph, x, cfg)
    assert int(wrong.readout[0, 0]) != 2**24 + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_moves_to_cuda_and_stays_exact(digits_graphs: dict[str, IFGraph],
                                       digits: Dataset) -> None:
    for profile in PROFILE_NAMES:
        graph = digits_graphs[profile]
        x = input_units(graph, digits.x_test)
        cfg = RunConfig(timesteps=4, presim=4, record=True)
        net = nb.to_norse(graph, presim=4, max_steps=8).to("cuda")
        assert net.device.type == "cuda"
        assert_same(simulate(graph, x, cfg), run_norse_with(net, graph, x, cfg))
        with open_backend("norse", graph, cfg, BackendOptions(device="cuda")) as runner:
            assert_same(simulate(graph, x, cfg), runner.run(x))


# --------------------------------------------------------------------------- bounds


def test_layer_bounds_edges() -> None:
    f32 = torch.float32
    kw = dict(layer="l", wrap_span=0, bias=0, v_min=-(2**31), v_max=2**31 - 1, start=10)
    ok = nb.LayerBound(synaptic=2**24, current=2**24, **kw)
    assert ok.synaptic_exact(f32)
    assert not nb.LayerBound(synaptic=2**24 + 1, current=2**24 + 1, **kw).synaptic_exact(f32)
    assert ok.max_steps(f32) == 0  # 2 * 10 + 2**24 + 1 > 2**24
    small = nb.LayerBound(synaptic=1000, current=1000, **kw)
    # float32 is exact while 2 * start + n * 1000 + 1 <= 2**24 = 16777216:
    # n = 16777 reaches 16777021, n = 16778 would reach 16778021
    assert small.max_steps(f32) == 16777
    # the same edge where one step more or less shows: start 2**19, 2**20 per step;
    # 2**20 + 14 * 2**20 + 1 = 15728641 fits, 2**20 + 15 * 2**20 + 1 = 2**24 + 1 does not
    tight = nb.LayerBound(synaptic=2**20, current=2**20, **dict(kw, start=2**19))
    assert tight.max_steps(f32) == 14
    assert small.max_steps(torch.float64) is None
    loihi = nb.LayerBound(layer="l", synaptic=2**18, wrap_span=2**18, current=2**23,
                          bias=2**19, v_min=-(2**23 - 1), v_max=2**23 - 1, start=2**22)
    assert loihi.max_steps(f32) is None  # the range argument: any number of steps
    wrap_fails = nb.LayerBound(layer="l", synaptic=2**24 - 2**18 + 1, wrap_span=2**18,
                               current=2**23, bias=0, v_min=-(2**23 - 1), v_max=2**23 - 1,
                               start=1)
    assert "current wrap" in str(wrap_fails.problem(f32, None))
    with pytest.raises(GraphError):
        nb.LayerBound(synaptic=-1, current=0, **kw)


# --------------------------------------------------------------------------- errors


def test_errors(digits_graphs: dict[str, IFGraph], digits_fold: FoldResult) -> None:
    graph = digits_graphs["loihi2"]
    with pytest.raises(GraphError, match="quantized"):
        nb.to_norse(digits_fold.graph)
    with pytest.raises(UsageError, match="synchronous"):
        nb.open_runner(graph, RunConfig(timesteps=1, schedule="pipelined"), BackendOptions())
    with pytest.raises(UsageError, match="synchronous"):
        with open_backend("norse", graph, RunConfig(timesteps=1, schedule="pipelined")):
            pass
    with pytest.raises(UsageError, match="cpu or cuda"):
        nb.open_runner(graph, RunConfig(timesteps=1), BackendOptions(device="tpu"))
    with pytest.raises(UsageError, match="cpu or cuda"):
        nb.open_runner(graph, RunConfig(timesteps=1), BackendOptions(device="mps"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            nb.open_runner(graph, RunConfig(timesteps=1), BackendOptions(device="cuda"))
    with pytest.raises(GraphError, match="float16"):
        nb.to_norse(graph, dtype=torch.float16)
    with pytest.raises(UsageError, match="threshold method"):
        nb.to_norse(graph, method="logistic")
    with pytest.raises(UsageError, match="presim"):
        nb.to_norse(graph, presim=-1)
    net = nb.to_norse(graph)
    good = input_units(graph, digits_raw(graph))
    with pytest.raises(GraphError, match="shape"):
        net(good[:, :, :4])
    with pytest.raises(GraphError, match="exceeds 16"):
        net(good + 20)
    with pytest.raises(GraphError, match="fractional"):
        net(good.double() + 0.5)
    with pytest.raises(GraphError, match="integers"):
        net(good > 3)
    # weights so large that float64 cannot hold the sums
    big = np.zeros_like(graph.projections[-1].weight)
    big[0, 0] = 2**53
    last = graph.projections[-1]
    assert isinstance(last, DenseProjection)
    too_big = graph.replace(projections=(*graph.projections[:-1],
                                         DenseProjection(last.name, last.src, last.dst, big)))
    with pytest.raises(GraphError, match="float64"):
        nb.to_norse(too_big)


def digits_raw(graph: IFGraph) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 17, size=(3, *graph.input.shape)).astype(np.float64)


def test_cli_norse_matches_int(digits_graphs: dict[str, IFGraph], tmp_path,  # type: ignore[no-untyped-def]
                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = save_graph(digits_graphs["int8"], tmp_path / "digits.ifg")
    outs = {}
    for backend in ("int", "norse"):
        argv = ["run", str(path), "--backend", backend, "--dataset", "digits",
                "--timesteps", "2", "--presim", "1", "--samples", "100", "--json"]
        assert main(argv) == 0
        outs[backend] = json.loads(capsys.readouterr().out)
    a, b = outs["int"], outs["norse"]
    assert a.keys() == b.keys()
    for volatile in ("backend", "seconds", "throughput"):
        a.pop(volatile), b.pop(volatile)
    # the overflow counters come from the integer simulator only (null for Norse)
    for key in ("wrapped_total", "saturated_total", "readout_saturated"):
        assert isinstance(a.pop(key), int) and b.pop(key) is None
    # the measured kernel choice belongs to the integer simulator (null for Norse)
    assert isinstance(a.pop("kernels"), dict) and b.pop("kernels") is None
    for out in (a, b):
        for la in [*out["layers"].values(), out["readout"]]:
            assert ("wrapped" in la) and ("saturated" in la)
            if out is b:
                assert la.pop("wrapped") is None and la.pop("saturated") is None
            else:
                la.pop("wrapped"), la.pop("saturated")
    assert a == b
    if not torch.cuda.is_available():
        argv = ["run", str(path), "--backend", "norse", "--dataset", "digits",
                "--timesteps", "1", "--device", "cuda"]
        assert main(argv) == BackendUnavailable.exit_code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "cuda" in err


def test_docstring_example_runs(digits_graphs: dict[str, IFGraph], digits: Dataset,
                                tmp_path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
                                ) -> None:
    graph = digits_graphs["loihi2"]
    save_graph(graph, tmp_path / "digits.ifg")
    monkeypatch.chdir(tmp_path)
    x_int = input_units(graph, digits.x_test[:5])
    globs = {"to_norse": nb.to_norse, "load_graph": load_graph, "x_int": x_int}
    tests = doctest.DocTestFinder().find(nb.to_norse, "to_norse", globs=globs)
    assert tests and tests[0].examples and len(tests[0].examples) == 3
    runner = doctest.DocTestRunner()
    runner.run(tests[0], clear_globs=False)
    assert runner.failures == 0 and runner.tries == 3
    readout_v, spikes = tests[0].globs["readout_v"], tests[0].globs["spikes"]
    assert readout_v.shape == (5, 10)
    assert set(spikes) == {la.name for la in graph.if_layers}


def test_tf32_is_off_while_the_module_runs_on_cuda() -> None:
    """The CUDA guard switches TF32 off and restores the user's setting (no GPU needed)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, matmul.fp32_precision)
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        with nb.ieee_float32(torch.device("cuda")):
            assert conv.fp32_precision == matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == matmul.fp32_precision == "tf32"
        with nb.ieee_float32(torch.device("cpu")):
            assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
