"""Third-party (float) NIR comes in: a network built in Norse is converted, verified across
the back ends and checked against Norse's own run of the NIR graph; AvgPool2d, r != 1 and
LIF with tau = inf fold into the same float IF graph; what cannot be said is refused.

Norse's own exporter (``norse.torch.to_nir``, norse 1.1) writes a partial graph for this
network (its Flatten becomes an empty node, IF parameters lose their shape and the input
shape keeps the batch), so :func:`export_like_norse` writes the graph by hand, node by node
as norse's ``_extract_norse_module`` does (Conv2d -> Conv2d, IAFCell -> IF with r = 1,
Linear -> Affine), with NIR's shapes (no batch) and the Flatten norse's reader needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import nir
import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.cli.model_io import load_model
from csqcfs_deploy.convert.fold import FoldResult
from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.exporters.nir.float_import import import_float_nir
from csqcfs_deploy.exporters.nir.reader import load_nir
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import DIGITS_ENCODING, Dataset

# --------------------------------------------------------------------------- the network


def norse_network(fg: IFGraph) -> list[tuple[str, nn.Module]]:
    """The trained digits network (L = 1) as Norse modules: Conv2d/Linear, IAFCell,
    LPPool2d(p=1) (Norse's sum pool). At T = 1 an IF neuron from v = 0 fires when
    ``W x + b + phi >= 1``: phi goes into the bias (a real-valued threshold crossing,
    where > and >= agree)."""
    import norse.torch as norse

    mods: list[tuple[str, nn.Module]] = []
    for p in fg.projections:
        dst = fg.neuron_group(p.dst)
        bias = torch.tensor(np.asarray(dst.bias) + (fg.meta.phi if p.dst != fg.readout.name
                                                    else 0.0), dtype=torch.float32)
        w = torch.tensor(p.weight, dtype=torch.float32)
        if p.pool is not None:
            mods.append((f"{p.name}_pool", nn.LPPool2d(1, p.pool.kernel, p.pool.stride)))
        if isinstance(p, ConvProjection):
            m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], p.stride, p.padding)
        else:
            assert isinstance(p, DenseProjection)
            if len(fg.neuron_group(p.src).shape) == 3:
                mods.append((f"{p.name}_flat", nn.Flatten(0)))
            m = nn.Linear(w.shape[1], w.shape[0])
        m.weight.data, m.bias.data = w, bias
        mods.append((p.name, m))
        if p.dst != fg.readout.name:
            mods.append((p.dst, norse.IAFCell(norse.IAFParameters(v_th=torch.tensor(1.0)))))
    return mods


def export_like_norse(mods: list[tuple[str, nn.Module]], input_shape: tuple[int, ...],
                      avg: bool = False, r: float = 1.0, lif: bool = False) -> nir.NIRGraph:
    """The NIR graph of ``mods`` (see the module docstring). Variants that must read as the
    same float IF graph: ``avg`` (AvgPool2d, the next weights x k^2), ``r`` (weights and
    biases / r), ``lif`` (IAFCells as LIF with tau = r = inf, as snnTorch writes beta = 1)."""
    import norse.torch as norse

    x = torch.zeros(input_shape)
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(input_shape)})}
    edges, prev, gain = [], "input", 1.0
    for name, m in mods:
        shape = tuple(x.shape)
        x = m(x)[0] if isinstance(m, norse.IAFCell) else m(x)
        out = tuple(x.shape)
        if isinstance(m, nn.LPPool2d):
            node: Any = (nir.AvgPool2d if avg else nir.SumPool2d)(
                kernel_size=np.array(m.kernel_size), stride=np.array(m.stride),
                padding=np.zeros(2, dtype=np.int64))
            gain = float(np.prod(m.kernel_size)) if avg else 1.0
        elif isinstance(m, nn.Flatten):
            node = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().numpy() * gain
            b = m.bias.detach().numpy()
            last = name == mods[-1][0]
            w, b = (w, b) if last else (w / r, b / r)
            node = (nir.Conv2d(input_shape=shape[1:], weight=w, bias=b, stride=m.stride,
                               padding=m.padding, dilation=1, groups=1)
                    if isinstance(m, nn.Conv2d) else nir.Affine(weight=w, bias=b))
            gain = 1.0
        else:
            ones = np.ones(out, dtype=np.float32)
            node = (nir.LIF(tau=np.full(out, np.inf), r=np.full(out, np.inf),
                            v_leak=0 * ones, v_threshold=ones, v_reset=0 * ones) if lif
                    else nir.IF(r=r * ones, v_threshold=ones, v_reset=0 * ones))
        nodes[name] = node
        edges.append((prev, name))
        prev = name
    nodes["output"] = nir.Output(output_type={"output": np.array(tuple(x.shape))})
    edges.append((prev, "output"))
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)


@pytest.fixture(scope="module")
def source(digits_fold: FoldResult) -> tuple[list[tuple[str, nn.Module]], tuple[int, ...]]:
    fg = digits_fold.graph
    assert fg.meta.levels == 1
    return norse_network(fg), fg.input.shape


@pytest.fixture(scope="module")
def source_file(tmp_path_factory: pytest.TempPathFactory,
                source: tuple[list[tuple[str, nn.Module]], tuple[int, ...]]) -> Path:
    path = tmp_path_factory.mktemp("nirx") / "norse_digits.nir"
    nir.write(path, export_like_norse(*source))
    return path


def norse_predictions(path: Path, raw: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Norse's own run of the NIR file, unbatched, one step (T = 1) per sample."""
    import norse.torch as norse

    module = norse.from_nir(nir.read(path), dt=1.0)
    x = torch.from_numpy(raw / 16.0).float()  # digits: raw / raw_max, mean 0, std 1
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return np.array([int(module(s)[0].argmax()) for s in x])
    finally:
        torch.set_num_threads(before)


def int_predictions(path: Path, profile: str, raw: np.ndarray[Any, Any]
                    ) -> np.ndarray[Any, Any]:
    g = load_model(path, profile=profile).graph
    x = torch.from_numpy(g.input.encoding.to_int(raw))
    return simulate(g, x, RunConfig(timesteps=1)).predictions


# --------------------------------------------------------------------------- agreement


def test_a_norse_network_agrees_with_norses_run(source_file: Path, digits: Dataset,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    raw = digits.x_test
    theirs = norse_predictions(source_file, raw)
    assert len(set(theirs.tolist())) >= 8  # a network that predicts, not a constant
    figures = {p: float((int_predictions(source_file, p, raw) == theirs).mean())
               for p in ("int16", "loihi2")}
    err = capsys.readouterr().err
    assert "source semantics nir" in err and "NIR carries no input encoding" in err
    print(f"agreement with norse.from_nir at T = 1 on {len(raw)} digits samples: "
          + ", ".join(f"{p} {100 * v:.2f} %" for p, v in figures.items()))
    assert figures["int16"] >= 0.99, figures
    assert figures["loihi2"] >= 0.97, figures


def test_convert_verify_run_and_report_take_the_file(
        tmp_path: Path, source_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits.ifg"
    argv = [str(source_file), "--profile", "int16", "--source-semantics", "norse",
            "--calibration-samples", "64"]
    assert main(["convert", *argv, "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nir_import"]["source_semantics"] == "norse"
    assert report["fidelity"]["quantization_fidelity"] >= 0.99
    assert out.is_file()
    lava = [*argv[:2], "loihi2", *argv[3:]]  # Lava runs the loihi2 profile only
    assert main(["verify", *lava, "--backends", "int,lava,norse", "--samples", "2",
                 "--min-agreement", "0"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    assert main(["run", *argv, "--backend", "int", "--samples", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 8
    assert main(["report", *argv, "--samples", "8"]) == 0
    capsys.readouterr()


# --------------------------------------------------------------------------- folds


def _float_graph(ng: nir.NIRGraph, semantics: str = "nir") -> IFGraph:
    return import_float_nir(ng, semantics, DIGITS_ENCODING).graph


def test_avgpool_r_and_lif_fold_into_the_same_float_graph(
        tmp_path: Path, source: tuple[list[tuple[str, nn.Module]], tuple[int, ...]]) -> None:
    base = _float_graph(export_like_norse(*source))
    assert all(la.reset == "zero" and not la.v_init.any() for la in base.if_layers)
    for variant in ({"avg": True}, {"r": 2.0}, {"lif": True}):
        path = tmp_path / "v.nir"
        nir.write(path, export_like_norse(*source, **variant))
        _, ng = load_nir(path, foreign=True)  # through the file: tau = r = inf survive
        other = _float_graph(ng)
        assert [p.name for p in other.projections] == [p.name for p in base.projections]
        for a, b in zip(base.projections, other.projections, strict=True):
            same_pool = a.pool is b.pool or (a.pool is not None and a.pool.equals(b.pool))
            assert same_pool, variant  # AvgPool2d became the same SumPool2d
            assert np.array_equal(a.weight, b.weight), (variant, a.name)
        for a, b in zip(base.if_layers, other.if_layers, strict=True):
            assert np.array_equal(a.bias, b.bias), variant
    for edit in (_halved_with_scale, _halved_with_cuba_lif):
        other = _float_graph(edit(export_like_norse(*source)))
        for a, b in zip(base.projections, other.projections, strict=True):
            assert np.array_equal(a.weight, b.weight), (edit.__name__, a.name)
        assert np.array_equal(base.if_layers[0].bias, other.if_layers[0].bias)
    snn = _float_graph(export_like_norse(*source), "snntorch")
    assert {la.reset for la in snn.if_layers} == {"subtract"}


def _first_conv(ng: nir.NIRGraph) -> tuple[str, str]:
    """The first Conv2d and the neuron node it feeds."""
    conv = next(n for n, v in ng.nodes.items() if isinstance(v, nir.Conv2d))
    return conv, next(b for a, b in ng.edges if a == conv)


def _halve(node: nir.Conv2d) -> nir.Conv2d:
    return dataclasses.replace(node, weight=node.weight / 2, bias=node.bias / 2)


def _halved_with_scale(ng: nir.NIRGraph) -> nir.NIRGraph:
    """The first conv's weights and bias halved, then a Scale(2) per channel after it."""
    conv, dst = _first_conv(ng)
    nodes = {**ng.nodes, conv: _halve(ng.nodes[conv]),
             "x2": nir.Scale(scale=np.full(ng.nodes[conv].weight.shape[0], 2.0))}
    edges = [e for e in ng.edges if e != (conv, dst)] + [(conv, "x2"), ("x2", dst)]
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)


def _halved_with_cuba_lif(ng: nir.NIRGraph) -> nir.NIRGraph:
    """The first conv halved and its IF a CubaLIF that reduces to IF with w_in = 2."""
    conv, dst = _first_conv(ng)
    shape = np.shape(ng.nodes[dst].r)
    cuba = nir.CubaLIF(tau_syn=np.ones(shape), tau_mem=np.full(shape, np.inf),
                       r=np.full(shape, np.inf), v_leak=np.zeros(shape),
                       v_threshold=np.ones(shape), v_reset=np.zeros(shape),
                       w_in=np.full(shape, 2.0))
    return nir.NIRGraph(nodes={**ng.nodes, conv: _halve(ng.nodes[conv]), dst: cuba},
                        edges=list(ng.edges), type_check=False)


# --------------------------------------------------------------------------- refusals


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], ng: nir.NIRGraph,
             code: int, *words: str, extra: tuple[str, ...] = ()) -> None:
    path = tmp_path / "bad.nir"
    nir.write(path, ng)
    out = tmp_path / "bad.ifg"
    assert main(["convert", str(path), "--profile", "int16", "-o", str(out), *extra]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_what_cannot_be_said_is_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        source: tuple[list[tuple[str, nn.Module]], tuple[int, ...]]) -> None:
    ng = export_like_norse(*source)
    first = next(n for n, v in ng.nodes.items() if isinstance(v, nir.IF))
    shape = np.shape(ng.nodes[first].r)
    leaky = dict(ng.nodes)
    leaky[first] = nir.LIF(tau=np.full(shape, 10.0), r=np.ones(shape), v_leak=np.zeros(shape),
                           v_threshold=np.ones(shape), v_reset=np.zeros(shape))
    _refused(tmp_path, capsys, nir.NIRGraph(leaky, ng.edges, type_check=False),
             GraphError.exit_code, f"node {first}", "real leak")
    later = [n for n, v in ng.nodes.items() if isinstance(v, nir.Affine)][0]
    loop = nir.NIRGraph(ng.nodes, [*ng.edges, (later, first)], type_check=False)
    _refused(tmp_path, capsys, loop, GraphError.exit_code, "recurrent edge")
    _refused(tmp_path, capsys, ng, UsageError.exit_code, "sinabs-multispike", "MultiSpike",
             extra=("--source-semantics", "sinabs-multispike"))
