"""Data-driven initial thresholds (train/threshold_init.py), checked against hooks of our own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csqcfs_deploy.train.activations import CSQCFS
from csqcfs_deploy.train.threshold_init import thresholds_from_data
from csqcfs_deploy.train.zoo import arch_spec, build_model


def _inputs_of_activations(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach()))
             for m in model.modules() if isinstance(m, CSQCFS)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_each_threshold_is_the_quantile_of_its_input_and_bn_statistics_are_kept() -> None:
    torch.manual_seed(0)
    model = build_model("digits-cnn", levels=4).train()
    x = torch.randn(64, 1, 8, 8)
    means = [m.running_mean.clone() for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    chosen = thresholds_from_data(model, x, quantile=0.9)
    after = [m.running_mean.clone() for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(means, after, strict=True))
    acts = [m for m in model.modules() if isinstance(m, CSQCFS)]
    assert len(chosen) == len(acts) == 4
    # after all thresholds are set, the inputs are what each layer saw when it was set
    inputs = _inputs_of_activations(model, x)
    for act, lam, values in zip(acts, chosen, inputs, strict=True):
        expected = float(torch.quantile(values.flatten(), 0.9))
        assert abs(lam - expected) < 1e-4 * max(1.0, expected)
        assert torch.allclose(F.softplus(act.up), torch.full_like(act.up, lam), rtol=1e-5)


def test_vgg16_classifier_is_not_silent_after_data_init() -> None:
    """The fixed lambda = 8 leaves VGG-16's last hidden layer almost silent at
    initialisation; data-driven thresholds make a real share of it fire."""
    assert arch_spec("vgg16").thresholds_from_data
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    fixed = build_model("vgg16", levels=8).train()
    data = build_model("vgg16", levels=8).train()
    data.load_state_dict(fixed.state_dict())
    thresholds_from_data(data, x)

    def last_hidden_nonzero(model: torch.nn.Module) -> float:
        outs: list[torch.Tensor] = []
        act = [m for m in model.modules() if isinstance(m, CSQCFS)][-1]
        h = act.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        return float((outs[0] > 0).float().mean())

    assert last_hidden_nonzero(fixed) < 0.05
    assert last_hidden_nonzero(data) > 0.2
