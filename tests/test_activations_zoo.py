"""Activations, the model zoo, training and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from csqcfs_deploy.train.activations import CSQCFS, QCFS
from csqcfs_deploy.train.checkpoint import load_checkpoint
from csqcfs_deploy.train.datasets import load_digits_dataset
from csqcfs_deploy.train.training import TrainOptions, train
from csqcfs_deploy.train.zoo import ARCHITECTURES, build_model


def reference_csqcfs(x: np.ndarray, lam: np.ndarray, levels: int, phi: float) -> np.ndarray:
    """SPEC section 1 as a staircase, with no floor and no clip: the output is ``lam / L``
    times the number of steps ``j = 1 .. L`` whose edge ``(j - phi) * lam / L`` the input
    has reached (``floor(x L / lam + phi) >= j`` exactly when ``x >= (j - phi) lam / L``)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    lam = lam.reshape(shape)
    steps = sum((x >= (j - phi) * lam / levels).astype(np.float64)
                for j in range(1, levels + 1))
    return lam / levels * steps


@pytest.mark.parametrize("phi", [0.5, 0.25])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6, 6)])
@pytest.mark.parametrize("levels", [1, 4, 8])
def test_csqcfs_equals_a_staircase_count(shape: tuple[int, ...], levels: int,
                                         phi: float) -> None:
    torch.manual_seed(0)
    act = CSQCFS(3, levels, phi=phi)
    with torch.no_grad():
        act.up.copy_(torch.tensor([-0.5, 0.3, 2.0]))
    x = torch.randn(*shape, dtype=torch.float64) * 2
    lam = F.softplus(act.up.detach().double()).numpy()
    got = act.double()(x).detach().numpy()
    np.testing.assert_allclose(got, reference_csqcfs(x.numpy(), lam, levels, phi), atol=1e-12)
    # a negative raw parameter still gives a positive threshold (softplus, not the raw value)
    assert float(act.up.detach()[0]) < 0 and bool(torch.all(act.threshold() > 0))


def test_csqcfs_straight_through_gradients() -> None:
    act = CSQCFS(2, 4)
    x = torch.tensor([[0.3, 0.7], [0.1, 2.0]], requires_grad=True)
    act(x).sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    assert act.up.grad is not None and torch.count_nonzero(act.up.grad) > 0


def test_qcfs_single_threshold_used_as_is() -> None:
    act = QCFS(levels=2, init_threshold=4.0)
    x = torch.tensor([[0.0, 0.9, 1.1, 3.0, 5.0]]).view(1, 5)
    # 4/2 * clip(floor(x*2/4 + 0.5), 0, 2)
    expected = torch.tensor([[0.0, 0.0, 2.0, 4.0, 4.0]])
    assert torch.equal(act(x), expected)
    assert act.threshold().shape == (1,)


def test_activation_rejects_bad_shapes_and_arguments() -> None:
    with pytest.raises(ValueError, match="expects"):
        CSQCFS(3, 1)(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        CSQCFS(3, 0)
    with pytest.raises(ValueError):
        CSQCFS(3, 1, phi=1.5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zoo_builds_and_runs(arch: str) -> None:
    model = build_model(arch, levels=2).eval()
    shape = ARCHITECTURES[arch].input_shape
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    acts = [m for m in model.modules() if isinstance(m, CSQCFS)]
    assert acts and all(a.levels == 2 for a in acts)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert isinstance(list(model.modules())[-1], torch.nn.Linear)


def test_training_is_deterministic_for_a_seed() -> None:
    ds = load_digits_dataset()
    opts = TrainOptions(epochs=1, progress=False, seed=3)
    a, b = train(ds, opts), train(ds, opts)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    c = train(ds, TrainOptions(epochs=1, progress=False, seed=4))
    assert not torch.equal(a.model.state_dict()["0.weight"], c.model.state_dict()["0.weight"])


def test_default_training_reaches_97_percent(digits_checkpoint, digits) -> None:  # type: ignore[no-untyped-def]
    model, config = load_checkpoint(digits_checkpoint)
    assert config.levels == 1 and config.arch == "digits-cnn"
    x = torch.from_numpy(config.encoding.normalize(digits.x_test))
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == digits.y_test).mean())
    assert acc >= 0.97
    assert abs(acc - config.extra["test_accuracy"]) < 1e-12
    assert len(digits.y_test) == 360


def test_checkpoint_is_weights_only_and_config_is_json(digits_checkpoint) -> None:  # type: ignore[no-untyped-def]
    payload = torch.load(digits_checkpoint, weights_only=True)
    config = json.loads(payload["config"])
    assert config["arch"] == "digits-cnn"
    assert config["encoding"]["raw_max"] == 16.0
    assert set(payload["state_dict"]) == set(build_model("digits-cnn", 1).state_dict())
