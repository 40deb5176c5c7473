"""NIR exchange: lossless round trips, the portable flavour against the simulator through
Norse's own NIR reader, plain NIR files, and bad input from the command line (the
flavours against plain NIR semantics: tests/test_nir_export.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import h5py
import nir
import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import GraphError, InputFileError, UsageError
from csqcfs_deploy.exporters.nir import (
    NIR_FORMAT,
    PORTABLE_EXACTNESS,
    graph_to_nir,
    nir_to_graph,
    read_nir_graph,
    write_nir_graph,
)
from csqcfs_deploy.exporters.nir.writer import read_back
from csqcfs_deploy.ir import (
    NODE_TYPES,
    ConvProjection,
    DenseProjection,
    GraphMeta,
    IdentityProjection,
    IFGraph,
    IFLayer,
    InputLayer,
    ReadoutLayer,
    SumPool,
    save_graph,
)
from csqcfs_deploy.ir.nodes import CalibrationRecord
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, Dataset
from csqcfs_deploy.train.zoo import arch_spec, build_model

from .conftest import random_integer_input, randomize_batchnorm

PROFILES = ("loihi2", "int8", "int16")
DOCS = Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------- helpers


def toy_graph(profile: str, per_layer: bool = False, weight_exp: int = 1) -> IFGraph:
    """Every node type and layout: conv (pool with padding, groups), identity on (C, H, W)
    and on (F,), dense from (C, H, W) and from (F,), residual sums on both, a reset-to-zero
    layer, a weight exponent, a layer nothing reads, two projections into the readout."""
    prof = get_profile(profile)
    rng = np.random.default_rng(7)
    step, unit = prof.weight_step, prof.threshold_unit

    def w(*shape: int) -> np.ndarray:
        return rng.integers(-40, 41, size=shape).astype(np.int64) * step

    def layer(name: str, shape: tuple[int, ...], reset: str = "subtract") -> IFLayer:
        c = shape[0]
        mant = np.full(c, 50) if per_layer else rng.integers(20, 90, size=c)
        v_th = mant.astype(np.int64) * unit
        v_init = np.rint(0.5 * v_th).astype(np.int64) + (1 if prof.strict else 0)
        bias = rng.integers(-30, 31, size=c).astype(np.int64) * unit
        real = rng.uniform(0.5, 2.0, size=c)
        return IFLayer(name, shape, v_th, v_init, bias, real, reset)

    layers = (
        InputLayer("input", (2, 6, 6), 1 / 16, 16.0, (0.0, 0.0), (1.0, 1.0), 8),
        layer("a", (3, 6, 6)),
        layer("b", (6, 3, 3)),
        layer("b2", (6, 3, 3), reset="zero"),
        layer("d", (5,)),
        layer("e", (5,)),
        layer("side", (5,)),
        ReadoutLayer("out", (4,), rng.integers(-9, 10, size=4) * unit, 0.125),
    )
    projections = (
        ConvProjection("c1", "input", "a", w(3, 2, 3, 3), padding=(1, 1)),
        ConvProjection("c2", "a", "b", w(6, 1, 3, 3),
                       SumPool((2, 2), (2, 2)) if per_layer else SumPool((3, 3), (2, 2), (1, 1)),
                       padding=(1, 1), groups=3),
        IdentityProjection("sc", "b", "b2", w(6)),
        ConvProjection("c3", "b", "b2", w(6, 6, 1, 1)),
        DenseProjection("fc1", "b2", "d", w(5, 54), weight_exp=weight_exp),
        IdentityProjection("id2", "d", "e", w(5)),
        DenseProjection("fc2", "d", "e", w(5, 5)),
        DenseProjection("fc_side", "d", "side", w(5, 5)),
        DenseProjection("fc3", "e", "out", w(4, 5)),
        DenseProjection("fc4", "b", "out", w(4, 54), SumPool((1, 1), (1, 1))),
    )
    return IFGraph(layers, projections, GraphMeta(levels=2, phi=0.5, profile=profile,
                                                  arch="toy", num_classes=4, notes="n"))


@pytest.fixture(scope="module")
def zoo_float_graphs() -> dict[str, IFGraph]:
    """Folded float graphs of the zoo with randomized BN, built on first use."""
    return {}


def zoo_graph(cache: dict[str, IFGraph], arch: str, profile: str, per_layer: bool = False
              ) -> IFGraph:
    if arch not in cache:
        spec = arch_spec(arch)
        levels = 1 if arch == "digits-cnn" else 8
        model = randomize_batchnorm(build_model(arch, levels), seed=3)
        enc = CIFAR10_ENCODING if spec.input_shape[0] == 3 else None
        if enc is None:
            from csqcfs_deploy.train.datasets import load_digits_dataset

            enc = load_digits_dataset().encoding
        cache[arch] = fold(model, spec.input_shape, enc, arch=arch, num_classes=10).graph
    return quantize(cache[arch], profile, per_channel=False if per_layer else None)[0]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("profile", PROFILES)
def test_every_node_type_round_trips_through_a_file(tmp_path: Path, profile: str) -> None:
    g = toy_graph(profile)
    g = g.replace(meta=dataclasses.replace(g.meta, calibration=CalibrationRecord(
        4, 1, 16, "test inputs", 0.995)))
    assert {type(n).__name__ for n in (*g.layers, *g.projections, g.meta,
                                       g.meta.calibration)} | {"SumPool"} == set(NODE_TYPES)
    path = write_nir_graph(g, tmp_path / "toy.nir")
    with pytest.raises(AssertionError):  # a native file: plain NIR readers refuse it
        nir.read(path)
    ng = read_back(path, "native")  # NIR's own nodes, with its type check
    assert {type(n).__name__ for n in ng.nodes.values()} >= {
        "Input", "IF", "Output", "Conv2d", "Affine", "SumPool2d", "Flatten"}
    # the residual sums are two edges into one neuron node
    assert sorted(a for a, b in ng.edges if b == "b2") == ["c3", "sc"]
    back = read_nir_graph(path)
    assert back.equals(g)
    for a, b in zip(g.layers, back.layers, strict=True):
        if isinstance(a, IFLayer):
            assert b.v_th.dtype == b.v_init.dtype == b.bias.dtype == np.int64
    # a changed tensor is noticed
    changed = g.replace(layers=tuple(
        IFLayer(la.name, la.shape, la.v_th, la.v_init + 1, la.bias, la.threshold_real, la.reset)
        if la.name == "a" else la for la in g.layers))
    assert not back.equals(changed)
    # and the graph runs the same
    x = random_integer_input(g, 4, seed=1)
    cfg = RunConfig(timesteps=3, presim=1, schedule="pipelined")
    assert torch.equal(simulate(g, x, cfg).readout, simulate(back, x, cfg).readout)


@pytest.mark.parametrize("profile", PROFILES)
def test_portable_flavour_round_trips_from_metadata(tmp_path: Path, profile: str) -> None:
    g = toy_graph(profile, per_layer=True, weight_exp=0)
    path = write_nir_graph(g, tmp_path / "toy.nir", flavor="portable")
    ng = nir.read(path)
    assert ng.metadata["flavor"] == "portable"
    assert ng.metadata["exactness"] == PORTABLE_EXACTNESS
    prof = get_profile(profile)
    a = g.node("a")
    th = ng.nodes["a"].v_threshold
    assert th.dtype == np.float32 and np.unique(th).size == 1
    # a plain reader starts at v = 0 and adds the step's integer input u (membrane units):
    # for every u, "u > th" and "u >= th" alike must fire exactly when step 1 of the IF
    # graph does (v_init + u > v_th on strict profiles, v_init + u >= v_th otherwise)
    u = np.arange(-3 * int(a.v_th[0]), 3 * int(a.v_th[0]) + 1)
    ours = a.v_init[0] + u > a.v_th[0] if prof.strict else a.v_init[0] + u >= a.v_th[0]
    assert 0 < int(ours.sum()) < ours.size
    assert np.array_equal(u > th.flat[0], ours) and np.array_equal(u >= th.flat[0], ours)
    assert read_nir_graph(path).equals(g)


def _with_c2_pool(g: IFGraph, pool: SumPool) -> IFGraph:
    c2 = g.node("c2")
    return g.replace(projections=tuple(
        ConvProjection("c2", "a", "b", c2.weight, pool, padding=(1, 1), groups=3)
        if p.name == "c2" else p for p in g.projections))


def test_portable_flavour_refuses_what_it_cannot_say(tmp_path: Path) -> None:
    per_channel = _with_c2_pool(toy_graph("int8", weight_exp=0), SumPool((2, 2), (2, 2)))
    assert nir_to_graph(graph_to_nir(per_channel, "portable")).equals(per_channel)
    with pytest.raises(UsageError, match="layer a has per-channel thresholds.*"
                       "--per-layer-thresholds"):
        graph_to_nir(per_channel, "portable-uniform")
    for flavor in ("portable", "portable-uniform"):
        with pytest.raises(UsageError, match="projection fc1 has weight exponent 1"):
            graph_to_nir(toy_graph("int8", per_layer=True), flavor)
        padded = _with_c2_pool(toy_graph("int8", per_layer=True, weight_exp=0),
                               SumPool((3, 3), (2, 2), (1, 1)))
        with pytest.raises(UsageError, match="projection c2 has a padded sum pool"):
            graph_to_nir(padded, flavor)
    with pytest.raises(UsageError, match="unknown NIR flavour"):
        graph_to_nir(toy_graph("int8"), "fancy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch,profile", [
    (arch, profile) for arch in ("digits-cnn", "resnet20") for profile in PROFILES])
def test_zoo_round_trips_through_files(tmp_path: Path, zoo_float_graphs: dict[str, IFGraph],
                                       arch: str, profile: str) -> None:
    g = zoo_graph(zoo_float_graphs, arch, profile)
    path = write_nir_graph(g, tmp_path / "g.nir")
    assert read_nir_graph(path).equals(g)
    per_channel = write_nir_graph(g, tmp_path / "per_channel.nir", flavor="portable")
    assert isinstance(nir.read(per_channel), nir.NIRGraph)
    assert read_nir_graph(per_channel).equals(g)
    gl = zoo_graph(zoo_float_graphs, arch, profile, per_layer=True)
    p = write_nir_graph(gl, tmp_path / "portable.nir", flavor="portable-uniform")
    assert isinstance(nir.read(p), nir.NIRGraph)
    assert read_nir_graph(p).equals(gl)
    assert nir_to_graph(graph_to_nir(gl, "native")).equals(gl)


@pytest.mark.parametrize("arch,profile", [
    ("resnet18", "loihi2"), ("vgg16", "loihi2"),
    pytest.param("resnet18", "int8", marks=pytest.mark.slow),
    pytest.param("resnet18", "int16", marks=pytest.mark.slow),
    pytest.param("vgg16", "int8", marks=pytest.mark.slow),
    pytest.param("vgg16", "int16", marks=pytest.mark.slow),
])
def test_large_zoo_graphs_round_trip(zoo_float_graphs: dict[str, IFGraph], arch: str,
                                     profile: str) -> None:
    """Converted only (not run): the NIR graph in memory, with NIR's own type check."""
    g = zoo_graph(zoo_float_graphs, arch, profile)
    ng = graph_to_nir(g)
    ng.infer_types()
    ng.check_types()
    assert nir_to_graph(ng).equals(g)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_large_zoo_graphs_round_trip_through_files(tmp_path: Path,
                                                   zoo_float_graphs: dict[str, IFGraph],
                                                   arch: str) -> None:
    g = zoo_graph(zoo_float_graphs, arch, "loihi2")
    path = write_nir_graph(g, tmp_path / "g.nir")
    assert read_nir_graph(path).equals(g)


def test_metadata_keeps_its_types_and_is_documented(tmp_path: Path) -> None:
    g = toy_graph("loihi2")
    ng = read_back(write_nir_graph(g, tmp_path / "toy.nir"), "native")
    md = ng.metadata
    assert md["format"] == NIR_FORMAT and isinstance(md["format_version"], np.integer)
    assert isinstance(md["phi"], np.floating) and isinstance(md["profile"], str)
    a = ng.nodes["a"]
    assert a.v_threshold.dtype == np.int64 and a.v_threshold.shape == (3, 6, 6)
    assert np.all(a.r == 1) and np.all(a.v_reset == 0)
    assert a.metadata["v_init"].dtype == np.int64
    assert a.metadata["threshold_real"].dtype == np.float64
    assert ng.nodes["input"].metadata["mean"].dtype == np.float64
    # NIR weights are in membrane units: the stored weight << act_shift
    assert np.array_equal(ng.nodes["c1"].weight, g.node("c1").weight << 6)
    # the layer bias rides on its first incoming projection
    assert np.array_equal(ng.nodes["c3"].bias, np.zeros(6)) and np.array_equal(
        ng.nodes["sc"].bias, g.node("b2").bias)
    ported = nir.read(write_nir_graph(toy_graph("loihi2", True, 0), tmp_path / "p.nir",
                                      flavor="portable"))
    keys = set(md) | {k for n in (*ng.nodes.values(), *ported.nodes.values())
                      for k in n.metadata} | set(ported.metadata)
    documented = set(re.findall(r"^\| `(\w+)` \|", DOCS.read_text(), flags=re.M))
    assert keys <= documented, f"undocumented metadata keys: {sorted(keys - documented)}"


def test_plain_nir_is_read_with_nir_semantics(digits: Dataset, digits_fold: FoldResult) -> None:
    """A portable file whose metadata a tool dropped still predicts as the IF graph at T = 1."""
    g = quantize(digits_fold.graph, "loihi2", per_channel=False)[0]
    ng = graph_to_nir(g, "portable")
    for node in ng.nodes.values():
        node.metadata = {}
    plain = nir.NIRGraph(nodes=ng.nodes, edges=ng.edges, metadata={})
    back = nir_to_graph(plain)
    assert back.meta.profile == "int16"
    assert all(la.reset == "zero" and not la.v_init.any() for la in back.if_layers)
    x = torch.from_numpy(g.input.encoding.to_int(digits.x_test))
    ours = simulate(g, x, RunConfig(timesteps=1))
    theirs = simulate(back, x, RunConfig(timesteps=1))
    assert np.array_equal(ours.predictions, theirs.predictions)
    assert torch.equal(ours.readout, theirs.readout)  # loihi2's << 6 lives in the weights
    for name in ours.spike_counts:
        assert torch.equal(ours.spike_counts[name], theirs.spike_counts[name])


# --------------------------------------------------------------------------- Norse reads it


@pytest.mark.parametrize("profile", ["loihi2", "int8"])
def test_norse_reads_the_portable_file_and_predicts_as_the_simulator(
        tmp_path: Path, digits: Dataset, digits_fold: FoldResult, one_torch_thread: None,
        profile: str) -> None:
    import norse.torch as norse

    g = quantize(digits_fold.graph, profile, per_channel=False)[0]
    path = write_nir_graph(g, tmp_path / "digits.nir", flavor="portable")
    module = norse.from_nir(nir.read(path), dt=1.0)
    x = torch.from_numpy(g.input.encoding.to_int(digits.x_test))
    sim = simulate(g, x, RunConfig(timesteps=1))
    # Norse maps NIR's Flatten(start_dim=0) to torch.nn.Flatten(0, -1), which would flatten
    # a batch too: every sample runs unbatched, one step from a fresh state.
    with torch.no_grad():
        out = torch.stack([module(sample.float())[0] for sample in x])
    assert out.shape == (len(x), 10)
    assert np.array_equal(out.argmax(1).numpy(), sim.predictions)
    assert torch.equal(out.double(), sim.readout.double())  # exact readout, not just argmax


# --------------------------------------------------------------------------- command line


def test_export_checkpoint_then_run_the_nir_file(tmp_path: Path, digits_checkpoint: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits.nir"
    assert main(["export", str(digits_checkpoint), "--target", "nir", "-o", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flavor"] == "portable" and report["verified_round_trip"] is True
    assert report["node_types"]["IF"] == 4
    assert main(["run", str(out), "--backend", "int", "--samples", "40", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["samples"] == 40 and run["profile"] == "loihi2"
    # portable: needs per-layer thresholds, and says where it is exact
    port = tmp_path / "portable.nir"
    assert main(["export", str(digits_checkpoint), "--profile", "int8",
                 "--per-layer-thresholds", "--flavor", "portable", "-o", str(port)]) == 0
    assert "exact only at T = 1 without pre-simulation" in capsys.readouterr().out
    # an .ifg and a .nir are accepted as MODEL too
    ifg = save_graph(read_nir_graph(port), tmp_path / "g.ifg")
    again = tmp_path / "again.nir"
    assert main(["export", str(ifg), "--flavor", "portable", "-o", str(again)]) == 0
    assert main(["export", str(port), "--flavor", "native", "-o",
                 str(tmp_path / "native.nir")]) == 0
    capsys.readouterr()
    assert read_nir_graph(again).equals(read_nir_graph(tmp_path / "native.nir"))


def test_portable_uniform_without_per_layer_thresholds_is_refused(
        tmp_path: Path, digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.nir"
    assert main(["export", str(digits_checkpoint), "--flavor", "portable-uniform", "-o",
                 str(out)]) == UsageError.exit_code
    assert "--per-layer-thresholds" in one_line_error(capsys)
    assert main(["export", str(digits_checkpoint), "--flavor", "wide", "-o", str(out)]) \
        == UsageError.exit_code
    assert "flavours portable, portable-uniform, native" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def _native_file(tmp_path: Path) -> tuple[Path, nir.NIRGraph]:
    g = toy_graph("int8")
    path = write_nir_graph(g, tmp_path / "good.nir")
    return path, read_back(path, "native")


def _write_raw(path: Path, ng: nir.NIRGraph) -> Path:
    nir.write(path, ng)
    return path


def _expect_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path,
                    code: int, *words: str) -> None:
    out = tmp_path / "out.nir"
    for argv in (["export", str(model), "-o", str(out)],
                 ["run", str(model), "--backend", "int", "--samples", "2"]):
        assert main(argv) == code
        message = one_line_error(capsys)
        for word in words:
            assert word in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.nir")]


def test_a_file_that_is_not_nir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h5 = tmp_path / "data.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    _expect_refusal(tmp_path, capsys, h5, InputFileError.exit_code, "data.h5",
                    "not a readable NIR file")
    with pytest.raises(InputFileError, match="not a readable NIR file"):
        read_nir_graph(tmp_path / "data.h5")
    text = tmp_path / "notes.nir"
    text.write_text("hello")
    with pytest.raises(InputFileError, match="notes.nir is not a readable NIR file"):
        read_nir_graph(text)


def test_a_leaky_neuron_is_refused_by_name(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, ng = _native_file(tmp_path)
    shape = ng.nodes["b"].r.shape
    ng.nodes["b"] = nir.LIF(tau=np.full(shape, 10.0), r=np.ones(shape), v_leak=np.zeros(shape),
                            v_threshold=np.ones(shape))
    bad = _write_raw(tmp_path / "leaky.nir", ng)
    _expect_refusal(tmp_path, capsys, bad, GraphError.exit_code, "node b", "leaky LIF")


def test_a_recurrent_edge_is_refused_by_name(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, ng = _native_file(tmp_path)
    ng.edges.append(("b2", "b"))  # b -> c3 -> b2 -> b
    bad = _write_raw(tmp_path / "loop.nir", nir.NIRGraph(ng.nodes, ng.edges, ng.metadata,
                                                         type_check=False))
    _expect_refusal(tmp_path, capsys, bad, GraphError.exit_code, "recurrent edge b2 -> b")


def test_shapes_that_disagree_are_refused_by_name(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, ng = _native_file(tmp_path)
    old = ng.nodes["b2"]
    small = (6, 2, 2)
    ng.nodes["b2"] = nir.IF(r=np.ones(small, dtype=np.int64),
                            v_threshold=np.asarray(old.v_threshold)[:, :2, :2].copy(),
                            v_reset=np.zeros(small, dtype=np.int64), metadata=old.metadata)
    bad = _write_raw(tmp_path / "shapes.nir", nir.NIRGraph(ng.nodes, ng.edges, ng.metadata,
                                                           type_check=False))
    with pytest.raises(ValueError, match="type mismatch"):  # NIR's own check agrees
        nir.read(bad)
    _expect_refusal(tmp_path, capsys, bad, GraphError.exit_code, "shapes.nir",
                    "(6, 3, 3)", "(6, 2, 2)")


def _same_nir(a: nir.NIRGraph, b: nir.NIRGraph) -> bool:
    """Node by node: type, every field (arrays with dtype), metadata; edges as a set."""
    if set(a.nodes) != set(b.nodes) or set(a.edges) != set(b.edges):
        return False

    def same(x: object, y: object) -> bool:
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y, strict=True))
        return bool(x == y)

    return all(type(a.nodes[k]) is type(b.nodes[k])
               and same(a.nodes[k].to_dict(), b.nodes[k].to_dict()) for k in a.nodes) \
        and same(a.metadata, b.metadata)


@pytest.mark.parametrize("flavor", ["native", "portable", "portable-uniform"])
def test_nir_to_if_graph_to_nir_is_lossless(tmp_path: Path, flavor: str) -> None:
    g = toy_graph("loihi2", per_layer=True, weight_exp=0)
    first = read_back(write_nir_graph(g, tmp_path / "a.nir", flavor=flavor), flavor)
    again = read_back(write_nir_graph(nir_to_graph(first), tmp_path / "b.nir", flavor=flavor),
                      flavor)
    assert _same_nir(first, again)
    # the comparison notices a change
    again.nodes["c1"].weight = again.nodes["c1"].weight + 1
    assert not _same_nir(first, again)
