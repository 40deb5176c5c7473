"""Activations recognised by what they compute (issue 11): the reference code
bases' conventions, per-channel softplus/abs layers without a tag, T switches,
refusals and shape errors. The independent check is the user's own torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from csqcfs_deploy.convert.activation import ann_mode, probe_module
from csqcfs_deploy.convert.capture import InputShapeError, capture
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.ann import ActOp
from csqcfs_deploy.run.reference import ann_forward, input_units
from csqcfs_deploy.train.activations import CSQCFS, QCFS
from csqcfs_deploy.train.datasets import load_dataset
from tests.refnets import (
    CONVENTIONS,
    AbsAct,
    OddAct,
    RefResNet,
    RefVGG,
    SoftplusAct,
    ThreshIF,
    UpFloor,
    randomize,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model_predictions(model: nn.Module, ds, raw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ds.encoding.normalize(raw))).argmax(1).numpy()


@pytest.mark.parametrize("arch", [RefVGG, RefResNet])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_folded_graph_matches_model(arch, convention, digits):
    model = randomize(arch(CONVENTIONS[convention]), seed=3)
    result = fold(model, digits.input_shape, digits.encoding)
    raw = digits.x_train[:300]
    folded = ann_forward(result.graph, input_units(result.graph, raw)).predictions
    assert (folded == _model_predictions(model, digits, raw)).mean() == 1.0
    acts = [n for n in result.ann.nodes if isinstance(n.op, ActOp)]
    assert len(acts) == (3 if arch is RefVGG else 5)


def test_thresholds_are_evaluated_with_the_modules_arithmetic():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    soft = SoftplusAct(3)
    with torch.no_grad():
        soft.p.copy_(torch.tensor([-0.0027, 0.5, -2.0]))
    spec = probe_module(soft, x).spec
    assert spec is not None and spec.levels == 4 and spec.phi == 0.5
    expect = torch.nn.functional.softplus(torch.tensor([-0.0027, 0.5, -2.0], dtype=torch.float64))
    assert torch.allclose(spec.threshold, expect, rtol=1e-12)
    assert spec.threshold[0] == pytest.approx(0.6918, abs=1e-4)  # not -0.0027
    spec = probe_module(AbsAct(3, levels=2, init=1.5), x).spec
    assert spec is not None and spec.levels == 2 and torch.allclose(spec.threshold,
                                                                    torch.full((3,), 1.5,
                                                                               dtype=torch.float64))
    spec = probe_module(UpFloor(up=3.0, t=16), x).spec
    assert spec is not None and spec.levels == 16 and float(spec.threshold[0]) == 3.0
    cs = CSQCFS(3, levels=2, phi=0.25, init_threshold=0.7)
    spec = probe_module(cs, x).spec
    assert spec is not None and (spec.levels, spec.phi) == (2, 0.25)
    assert torch.allclose(spec.threshold, torch.full((3,), 0.7, dtype=torch.float64))
    spec = probe_module(QCFS(3, init_threshold=5.0), x).spec
    assert spec is not None and float(spec.threshold[0]) == 5.0


def test_a_T_switch_is_converted_in_ann_mode_and_restored(digits):
    model = randomize(RefVGG(lambda c: ThreshIF(T=4, L=4, thresh=2.0), T=4), seed=1)
    with ann_mode(model) as switched:
        assert model.T == 0 and "layer1.2" in switched
    assert model.T == 4 and model.layer1[2].T == 4
    result = fold(model, digits.input_shape, digits.encoding)
    assert model.T == 4 and model.layer1[2].T == 4
    raw = digits.x_train[:100]
    folded = ann_forward(result.graph, input_units(result.graph, raw)).predictions
    model.set_T(0)
    assert (folded == _model_predictions(model, digits, raw)).all()


def test_an_unrecognisable_quantizer_is_refused_naming_module_and_reason(digits):
    model = randomize(RefVGG(lambda c: OddAct()))
    with pytest.raises(GraphError, match=r"OddAct 'layer1\.2' is not a recognised "
                                         r"clip-floor-shift activation: .*'sigmoid'"):
        capture(model, digits.input_shape)


class _Unclipped(nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.floor(x * 4 + 0.5) / 4


class _Offset(nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.clamp(torch.floor(x * 4 + 0.5), 0, 4) / 4 + 0.1


class _Mismatched(nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.clamp(torch.floor(x * 4 + 0.5), 0, 4) / 2


class _Relu(nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.clamp(x, 0, 1)


@pytest.mark.parametrize("module, reason", [
    (_Unclipped(), "not clipped at 0 below"),
    (_Offset(), "offset"),
    (_Mismatched(), "input scale is not L / lambda"),
    (_Relu(), "has no floor"),
])
def test_near_misses_are_refused_with_what_did_not_match(module, reason):
    probe = probe_module(module, torch.randn(2, 3, 4, 4))
    assert probe.is_activation and probe.spec is None
    assert reason in (probe.reason or "")


def test_containers_are_traced_through_not_probed_as_activations():
    block = RefResNet(CONVENTIONS["myfloor"]).conv2_x[0]
    assert not probe_module(block, torch.randn(2, 8, 4, 4)).is_activation
    assert not probe_module(nn.Conv2d(3, 3, 1), torch.randn(2, 3, 4, 4)).is_activation


def test_a_model_for_other_inputs_gets_one_line_naming_both_shapes(digits):
    model = randomize(RefVGG(CONVENTIONS["softplus"], in_channels=3, spatial=32))
    with pytest.raises(InputShapeError) as err:
        capture(model, digits.input_shape)
    msg = str(err.value)
    assert "\n" not in msg and "(1, 8, 8)" in msg and "takes 3 input channels" in msg
    assert "--dataset" in msg and "--data" in msg
