"""NIR export flavours against plain NIR semantics: every portable file agrees with an
independent plain-NIR simulator (tests/nir_plain.py) and with Norse's own reader at T = 1;
a native file is refused by plain readers; every flavour round-trips; the CLI's default,
its fallback and what it says about readers."""

from __future__ import annotations

import json
from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.exporters.nir import (
    FLAVORS,
    PORTABLE_FLAVORS,
    export_nir,
    graph_to_nir,
    read_nir_graph,
    write_nir_graph,
)
from csqcfs_deploy.exporters.nir.flavors import NATIVE_IF_TYPE
from csqcfs_deploy.exporters.nir.readers import READER_FACTS, facts_for
from csqcfs_deploy.ir import save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, Dataset
from csqcfs_deploy.train.zoo import arch_spec, build_model

from .conftest import random_integer_input, randomize_batchnorm
from .nir_plain import PlainNIR
from .test_nir import toy_graph

PROFILES = ("loihi2", "int8", "int16")
NORSE_SAMPLES = 100


def _refusal_names_our_type(exc_info: pytest.ExceptionInfo[BaseException]) -> bool:
    """nir 1.0.8 refuses an unknown type with a bare ``assert type in __all_ir``
    (nir 1.0.4: "Unknown unit type: b'CsqcfsIF'"): the type is in the message or in
    the failing frame's locals."""
    if NATIVE_IF_TYPE in str(exc_info.value):
        return True
    return any(NATIVE_IF_TYPE in repr(entry.locals.get("type", "")) for entry in
               exc_info.traceback)


# --------------------------------------------------------------------------- plain semantics


@pytest.mark.parametrize("profile", PROFILES)
def test_every_portable_digits_export_runs_as_the_integer_simulator_at_t1(
        tmp_path: Path, digits: Dataset, digits_fold: FoldResult, profile: str) -> None:
    x = None
    for per_layer in (False, True):
        g = quantize(digits_fold.graph, profile, per_channel=False if per_layer else None)[0]
        x = torch.from_numpy(g.input.encoding.to_int(digits.x_test))
        sim = simulate(g, x, RunConfig(timesteps=1))
        default = export_nir(g, tmp_path / f"default_{per_layer}.nir")
        assert default.flavor == "portable" and default.fallback == ""
        flavors = PORTABLE_FLAVORS if per_layer else ("portable",)
        for flavor in flavors:
            path = write_nir_graph(g, tmp_path / f"{flavor}_{per_layer}.nir", flavor)
            ng = nir.read(path)  # a real file, read by NIR itself
            theta = ng.nodes[g.if_layers[0].name].v_threshold
            assert (np.unique(theta).size == 1) == per_layer or flavor == "portable"
            readout = PlainNIR(ng).run(x, steps=1)
            assert np.array_equal(readout.argmax(1).numpy(), sim.predictions), flavor
            assert torch.equal(readout, sim.readout.double()), flavor
    if x is not None:  # the per-channel file really has per-channel thresholds
        ng = nir.read(tmp_path / "portable_False.nir")
        assert any(np.unique(ng.nodes[n].v_threshold).size > 1 for n in ng.nodes
                   if isinstance(ng.nodes[n], nir.IF))


def test_a_residual_network_runs_as_the_integer_simulator_at_t1(tmp_path: Path) -> None:
    spec = arch_spec("resnet20")
    model = randomize_batchnorm(build_model("resnet20", 8), seed=3)
    folded = fold(model, spec.input_shape, CIFAR10_ENCODING, arch="resnet20", num_classes=10)
    g = quantize(folded.graph, "int16")[0]
    ng = nir.read(export_nir(g, tmp_path / "resnet.nir").path)
    assert ng.metadata["flavor"] == "portable"
    assert any(sum(1 for _, b in ng.edges if b == n) > 1 for n in ng.nodes)  # residual sums
    x = random_integer_input(g, 4, seed=5)
    sim = simulate(g, x, RunConfig(timesteps=1))
    assert torch.equal(PlainNIR(ng).run(x, steps=1), sim.readout.double())


def test_norse_reads_the_default_file_unbatched_and_predicts_as_the_simulator(
        tmp_path: Path, digits: Dataset, digits_fold: FoldResult, one_torch_thread: None
        ) -> None:
    import norse.torch as norse

    g = quantize(digits_fold.graph, "loihi2")[0]  # per-channel thresholds
    result = export_nir(g, tmp_path / "digits.nir")
    assert result.flavor == "portable"
    module = norse.from_nir(nir.read(result.path), dt=1.0)
    x = torch.from_numpy(g.input.encoding.to_int(digits.x_test[:NORSE_SAMPLES]))
    sim = simulate(g, x, RunConfig(timesteps=1))
    with torch.no_grad():  # unbatched: norse's Flatten(0, -1) would flatten a batch
        out = torch.stack([module(sample.float())[0] for sample in x])
    assert np.array_equal(out.argmax(1).numpy(), sim.predictions)
    assert torch.equal(out.double(), sim.readout.double())


def test_a_native_file_is_refused_by_plain_readers(tmp_path: Path,
                                                   digits_fold: FoldResult) -> None:
    import norse.torch as norse

    g = quantize(digits_fold.graph, "int8")[0]
    path = write_nir_graph(g, tmp_path / "native.nir", "native")
    with pytest.raises(AssertionError) as by_nir:
        nir.read(path)
    assert _refusal_names_our_type(by_nir)
    with pytest.raises(AssertionError) as by_norse:
        norse.from_nir(str(path), dt=1.0)
    assert _refusal_names_our_type(by_norse)
    with pytest.raises(AssertionError):
        PlainNIR(nir.read(path))
    assert read_nir_graph(path).equals(g)  # ours reads it
    # in memory the native graph still has nir.IF nodes (documented)
    assert all(isinstance(graph_to_nir(g, "native").nodes[la.name], nir.IF)
               for la in g.if_layers)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_our_reader_restores_every_flavour_exactly(tmp_path: Path, digits_fold: FoldResult,
                                                   flavor: str) -> None:
    for profile in PROFILES:
        g = quantize(digits_fold.graph, profile, per_channel=False)[0]
        assert read_nir_graph(write_nir_graph(g, tmp_path / f"{profile}.nir", flavor)).equals(g)


def test_version_1_files_still_read(tmp_path: Path) -> None:
    """Format version 1: native files stored their IF nodes as nir.IF."""
    for flavor in ("native", "portable"):
        g = toy_graph("int8", per_layer=flavor == "portable", weight_exp=0)
        ng = graph_to_nir(g, flavor)
        ng.metadata["format_version"] = 1
        path = tmp_path / f"v1_{flavor}.nir"
        nir.write(path, ng)
        assert nir.read(path).nodes["a"].__class__ is nir.IF
        assert read_nir_graph(path).equals(g)


# --------------------------------------------------------------------------- command line


def test_export_defaults_to_portable_and_names_the_readers(
        tmp_path: Path, digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.nir"
    assert main(["export", str(digits_checkpoint), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    text = captured.out
    assert "portable flavour" in text
    assert "exact     norse 1.1 (from_nir, dt=1.0, unbatched) at T = 1, P = 0" in text
    assert "refuses   snnTorch 1.0" in text and "hard" in text
    assert main(["export", str(digits_checkpoint), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flavor"] == "portable" and report["flavor_fallback"] == ""
    assert report["warnings"] == []
    norse_row = next(r for r in report["readers"] if r["reader"] == "norse")
    assert norse_row == {**norse_row, "exact": "yes", "steps": 1, "presim": 0,
                         "batched": "no", "version": "1.1"}
    assert {r["reader"] for r in report["readers"]} >= {"norse", "spikingjelly", "snnTorch",
                                                         "sinabs", "plain NIR simulator"}


def test_default_falls_back_to_native_loudly_and_explicit_portable_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ifg = save_graph(toy_graph("int8"), tmp_path / "toy.ifg")  # padded pool, weight exponent
    out = tmp_path / "toy.nir"
    assert main(["export", str(ifg), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip()
    assert warning.startswith("warning: ") and len(warning.splitlines()) == 1
    assert "projection c2 has a padded sum pool" in warning and "native" in warning
    assert "native flavour" in captured.out and "refuses   norse 1.1" in captured.out
    with pytest.raises(AssertionError):
        nir.read(out)
    for flavor, words in (("portable", "projection c2 has a padded sum pool"),
                          ("portable-uniform", "projection c2 has a padded sum pool")):
        bad = tmp_path / f"{flavor}.nir"
        assert main(["export", str(ifg), "--flavor", flavor, "-o", str(bad)]) \
            == UsageError.exit_code
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        assert words in err and f"the {flavor} NIR flavour" in err
        assert not bad.exists()
    # the weight exponent is named too (this toy graph's pool has no padding)
    g = toy_graph("int8", per_layer=True)
    with pytest.raises(UsageError, match="projection fc1 has weight exponent 1"):
        export_nir(g, tmp_path / "x.nir", "portable")
    fallback = export_nir(g, tmp_path / "x.nir")
    assert fallback.flavor == "native" and "projection fc1" in fallback.fallback


def test_portable_uniform_needs_per_layer_thresholds(
        tmp_path: Path, digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "u.nir"
    assert main(["export", str(digits_checkpoint), "--flavor", "portable-uniform", "-o",
                 str(out)]) == UsageError.exit_code
    err = capsys.readouterr().err
    assert "per-channel thresholds" in err and "--per-layer-thresholds" in err
    assert main(["export", str(digits_checkpoint), "--flavor", "portable-uniform",
                 "--per-layer-thresholds", "-o", str(out)]) == 0
    assert "exact     spikingjelly 2.0.0 (from_nir, dt=1.0)" in capsys.readouterr().out


def test_the_reader_table_holds_what_the_tests_check() -> None:
    """The in-environment rows (norse, the plain simulator, ours) say what the tests above
    check; every flavour has a row for every measured reader."""
    def row(reader: str, flavor: str) -> str:
        return next(f.exact for f in facts_for(flavor) if f.reader == reader)

    for flavor in PORTABLE_FLAVORS:
        assert row("norse", flavor) == row("plain NIR simulator", flavor) == "yes"
    assert row("norse", "native") == row("plain NIR simulator", "native") == "refuses"
    assert all(row("csqcfs-deploy", f) == "yes" for f in FLAVORS)
    readers = {f.reader for f in READER_FACTS}
    for flavor in FLAVORS:
        assert {f.reader for f in facts_for(flavor)} == readers, flavor
    assert all(f.exact in ("yes", "no", "refuses") and f.source for f in READER_FACTS)


