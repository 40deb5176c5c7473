"""Capture and folding: the folded float IF graph reproduces the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from csqcfs_deploy.convert.capture import capture
from csqcfs_deploy.convert.fold import FOLD_PASSES, MergeBatchNorm, fold, run_passes
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir import ConvProjection, DenseProjection, IdentityProjection, InputEncoding
from csqcfs_deploy.ir.ann import evaluate_ann
from csqcfs_deploy.run.reference import ann_forward
from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.datasets import CIFAR10_ENCODING, DIGITS_ENCODING
from csqcfs_deploy.train.zoo import ARCHITECTURES, build_model

from .conftest import randomize_batchnorm


def randomize_thresholds(model: nn.Module, seed: int, low: float = 0.5, high: float = 2.0
                         ) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, CSQCFS):
            lam = torch.rand(m.channels, generator=gen, dtype=torch.float64) * (high - low) + low
            m.up.data.copy_(torch.log(torch.expm1(lam)).to(m.up.dtype))
    return model


def check_equivalence(model: nn.Module, shape: tuple[int, ...], encoding, n: int = 4,
                      seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    model = model.double().eval()
    result = fold(model, shape, encoding)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    got = ann_forward(result.graph, x).logits
    assert expected.std() > 0, "degenerate test network: constant output"
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale
    # and the captured (unfolded) ANN graph agrees too
    assert torch.allclose(evaluate_ann(result.ann, x), expected, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("arch", ["digits-cnn", "vgg16", "resnet20"])
def test_folding_equivalence_with_random_batchnorm(arch: str) -> None:
    torch.manual_seed(1)
    model = build_model(arch, levels=4, init_threshold=1.0)
    randomize_batchnorm(model, seed=2)
    randomize_thresholds(model, seed=3)
    enc = DIGITS_ENCODING if arch == "digits-cnn" else CIFAR10_ENCODING
    check_equivalence(model, ARCHITECTURES[arch].input_shape, enc, n=3 if arch == "vgg16" else 8)


def test_folded_trained_digits_matches_model(digits_model, digits) -> None:  # type: ignore[no-untyped-def]
    model, cfg = digits_model
    result = fold(model, cfg.input_shape, cfg.encoding)
    x = cfg.encoding.normalize(digits.x_test)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).double()
    got = ann_forward(result.graph, torch.from_numpy(x).double()).logits
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert np.array_equal(got.argmax(1).numpy(), expected.argmax(1).numpy())
    names = [p for p, _ in result.log.applied]
    # passes ran in the declared order
    order = [p.name for p in FOLD_PASSES]
    assert names == sorted(names, key=order.index)
    assert {"merge-batchnorm", "absorb-avgpool", "scale-thresholds"} <= set(names)


def test_residual_graph_has_explicit_identity_shortcuts() -> None:
    model = randomize_batchnorm(build_model("resnet20", levels=2), seed=0)
    graph = fold(model, (3, 32, 32), CIFAR10_ENCODING).graph
    kinds = {type(p) for p in graph.projections}
    assert kinds == {ConvProjection, DenseProjection, IdentityProjection}
    # every block output neuron group sums two projections
    assert sum(1 for la in graph.if_layers if len(graph.incoming(la.name)) == 2) == 9
    assert all(np.all(la.v_th == 1.0) for la in graph.if_layers)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 3), cout=st.integers(1, 4), k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2), groups_one=st.booleans(), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bn_merge_property(cin: int, cout: int, k: int, stride: int, groups_one: bool,
                           bias: bool, seed: int) -> None:
    """Conv -> BN equals the merged Conv on random inputs (float64)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if groups_one else cin
    cout = cout * groups
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(cout)
    net = nn.Sequential(conv, bn, CSQCFS(cout, 3), nn.Flatten(), nn.Linear(cout * 16 // (
        stride * stride), 2)).double()
    for p in net.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    randomize_batchnorm(net, seed)
    ann = capture(net, (cin, 4, 4))
    merged, log = run_passes(ann, [MergeBatchNorm()])
    assert [p for p, _ in log.applied] == ["merge-batchnorm"]
    x = torch.randn(5, cin, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        pre_act_ref = bn(conv(x))
    conv_node = next(n for n in merged.nodes if type(n.op).__name__ == "ConvOp")
    w = torch.from_numpy(conv_node.op.weight)
    b = torch.from_numpy(conv_node.op.bias)
    got = torch.nn.functional.conv2d(x, w, b, stride, k // 2, 1, groups)
    assert torch.allclose(got, pre_act_ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    levels=st.integers(1, 6), seed=st.integers(0, 2**16),
    pool=st.booleans(),
)
def test_threshold_scaling_property(widths: list[int], levels: int, seed: int,
                                    pool: bool) -> None:
    """Random thresholds: after scaling every threshold is 1 and the outputs are unchanged."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 2
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), CSQCFS(w, levels)]
        cin = w
    if pool:
        layers.append(nn.AvgPool2d(2))
    layers += [nn.Flatten(), nn.Linear(cin * (4 if pool else 16), 3)]
    net = nn.Sequential(*layers).double()
    for p in net.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    for m in net.modules():
        if isinstance(m, CSQCFS):
            m.up.data.copy_(torch.randn(m.channels, generator=gen, dtype=torch.float64) * 2)
    result = fold(net, (2, 4, 4), InputEncoding(16.0, (0.0, 0.0), (1.0, 1.0)))
    assert all(np.all(la.v_th == 1.0) and np.all(la.v_init == 0.5)
               for la in result.graph.if_layers)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64) * 2
    with torch.no_grad():
        expected = net(x)
    got = ann_forward(result.graph, x).logits
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max())))


# --------------------------------------------------------------------------- conventions


class RefFloor(nn.Module):
    """The QCFS reference code's activation: learnable ``up`` and level count ``t``."""

    def __init__(self, up: torch.Tensor, t: int, softplus: bool) -> None:
        super().__init__()
        self.up = nn.Parameter(up)
        self.t = t
        if softplus:
            self.mode = "softplus"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up
        if getattr(self, "mode", None) == "softplus":
            up = torch.nn.functional.softplus(up)
        if up.numel() > 1:
            up = up.view(1, -1, 1, 1)
        y = torch.clamp(x / up, 0, 1)
        return torch.floor(y * self.t + 0.5) / self.t * up


class RefNet(nn.Module):
    def __init__(self, softplus: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = RefFloor(torch.tensor([0.5, 1.0, 1.5, 2.0]) if softplus else torch.tensor([
            1.5]), 4, softplus)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("softplus", [False, True])
def test_reference_convention_is_recognised(softplus: bool) -> None:
    torch.manual_seed(0)
    check_equivalence(RefNet(softplus), (1, 8, 8), DIGITS_ENCODING, n=8)


class WithMaxPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


class WithRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class WithControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(("model", "needle"), [
    (WithMaxPool(), "node 'pool' (MaxPool2d 'pool')"),
    (WithRelu(), "node 'relu' (function relu)"),
    (WithControlFlow(), "control flow"),
])
def test_unsupported_models_are_refused_naming_the_node(model: nn.Module, needle: str) -> None:
    with pytest.raises(GraphError) as info:
        fold(model, (1, 8, 8), DIGITS_ENCODING)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_non_positive_threshold_is_refused() -> None:
    net = RefNet(softplus=False)
    net.act.up.data.fill_(-0.25)
    with pytest.raises(GraphError, match="non-positive threshold -0.25"):
        fold(net, (1, 8, 8), DIGITS_ENCODING)


def test_nan_weight_is_refused() -> None:
    net = RefNet(softplus=True)
    net.conv.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(GraphError, match="NaN or inf"):
        fold(net, (1, 8, 8), DIGITS_ENCODING)
