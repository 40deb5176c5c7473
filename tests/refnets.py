"""Test networks written in the conventions of the public QCFS code bases.

Written for these tests from the conventions alone (module names, attributes,
how ``T`` switches to IF neurons, checkpoint layout); no code is copied:

- ``ThreshIF``: putshua/ANN_SNN_QCFS and bjourne/ANN_SNN_QCFS name their
  activation ``IF`` with a learnable scalar ``thresh``, ``L`` levels and a ``T``
  switch (``T > 0``: IF neurons with soft reset and a 0.5 initial membrane; the
  straight-through floor is an ``autograd.Function``).
- ``UpFloor``: putshua/SNN_conversion_QCFS names it ``MyFloor`` with ``up`` and
  ``t`` and floors before it clamps.
- ``SoftplusAct`` / ``AbsAct``: a per-channel CS-QCFS layer written as the paper
  describes it (lambda = softplus(p)), or abs-parameterised, without any tag.
- ``OddAct``: a quantizer that is not clip-floor-shift (for the refusal test).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _FloorPassGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return grad


class ThreshIF(nn.Module):
    """``IF(T, L, thresh)``: ANN mode at T == 0, IF neurons at T > 0."""

    def __init__(self, T: int = 0, L: int = 8, thresh: float = 8.0) -> None:
        super().__init__()
        self.thresh = nn.Parameter(torch.tensor([thresh]))
        self.L = L
        self.T = T

    def forward(self, x):  # type: ignore[no-untyped-def]
        if self.T > 0:  # time-major (T*N, ...) as in the reference code
            th = self.thresh.data
            steps = x.view(self.T, -1, *x.shape[1:])
            mem = 0.5 * th
            out = []
            for t in range(self.T):
                mem = mem + steps[t]
                spike = (mem >= th).float() * th
                mem = mem - spike
                out.append(spike)
            return torch.stack(out).flatten(0, 1)
        y = torch.clamp(x / self.thresh, 0, 1)
        y = _FloorPassGrad.apply(y * self.L + 0.5) / self.L
        return y * self.thresh


class UpFloor(nn.Module):
    """``MyFloor(up, t)``: floor first, then clamp."""

    def __init__(self, up: float = 8.0, t: int = 4) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.tensor([up]))
        self.t = t

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = _FloorPassGrad.apply(x / self.up * self.t + 0.5) / self.t
        return torch.clamp(y, 0, 1) * self.up


class SoftplusAct(nn.Module):
    """Per-channel lambda = softplus(p), written as the paper describes it (no tag)."""

    def __init__(self, channels: int, levels: int = 4, init: float = 2.0) -> None:
        super().__init__()
        raw = init + torch.log(-torch.expm1(torch.tensor(-init)))
        self.p = nn.Parameter(raw * torch.ones(channels))
        self.levels = levels

    def forward(self, x):  # type: ignore[no-untyped-def]
        lam = F.softplus(self.p).view(1, -1, *([1] * (x.dim() - 2)))
        y = x * self.levels / lam + 0.5
        y = (y.floor() - y).detach() + y
        return lam * y.clamp(0, self.levels) / self.levels


class AbsAct(nn.Module):
    """Per-channel lambda = |p| (parameter shape (1, C, 1, 1))."""

    def __init__(self, channels: int, levels: int = 2, init: float = 2.0) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1, channels, 1, 1), -init))
        self.levels = levels

    def forward(self, x):  # type: ignore[no-untyped-def]
        lam = self.p.abs().reshape(1, -1, *([1] * (x.dim() - 2)))
        q = torch.floor(torch.relu(x / lam) * self.levels + 0.5)
        return torch.clamp(q, max=self.levels) * (lam / self.levels)


class OddAct(nn.Module):
    """Floors a sigmoid: a quantizer, but not clip-floor-shift."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0]))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.floor(torch.sigmoid(x) * 4) / 4 * self.scale


# --------------------------------------------------------------------------- networks


def _time_major(x: torch.Tensor, T: int) -> torch.Tensor:
    return x.unsqueeze(0).repeat(T, *([1] * x.dim())).flatten(0, 1)


class RefVGG(nn.Module):
    """VGG layout of the reference code: ``layer1..`` blocks (conv, BN, act,
    dropout, avg pool), a ``classifier`` (flatten, linear, act, dropout, linear),
    and a model-level ``T`` that switches the forward to time-major SNN mode."""

    def __init__(self, act, in_channels: int = 1, widths=(8, 16), hidden: int = 32,
                 num_classes: int = 10, spatial: int = 8, T: int = 0) -> None:
        super().__init__()
        self.T = T
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w),
                                        act(w), nn.Dropout(0.1), nn.AvgPool2d(2)))
            c = w
            spatial //= 2
        self.layer1, self.layer2 = blocks
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * spatial * spatial, hidden),
                                        act(hidden), nn.Dropout(0.1),
                                        nn.Linear(hidden, num_classes))

    def set_T(self, T: int) -> None:
        for m in self.modules():
            if hasattr(m, "T"):
                m.T = T

    def forward(self, x):  # type: ignore[no-untyped-def]
        if self.T > 0:
            x = _time_major(x, self.T)
        out = self.classifier(self.layer2(self.layer1(x)))
        if self.T > 0:
            out = out.view(self.T, -1, out.shape[-1])
        return out


class RefBlock(nn.Module):
    """Basic block of the reference code: ``residual_function``, ``shortcut``, ``act``."""

    def __init__(self, act, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            act(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.act = act(cout)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.act(self.residual_function(x) + self.shortcut(x))


class RefResNet(nn.Module):
    """ResNet4Cifar-like layout: ``conv1`` block, stages of RefBlocks, pool, ``fc``."""

    def __init__(self, act, in_channels: int = 1, widths=(8, 16), num_classes: int = 10,
                 T: int = 0) -> None:
        super().__init__()
        self.T = T
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), act(widths[0]))
        self.conv2_x = nn.Sequential(RefBlock(act, widths[0], widths[0]))
        self.conv3_x = nn.Sequential(RefBlock(act, widths[0], widths[1], stride=2))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.conv3_x(self.conv2_x(self.conv1(x)))
        out = self.avg_pool(out)
        return self.fc(out.view(out.size(0), -1))


#: Activation factories by convention: channels -> module.
CONVENTIONS = {
    "thresh-if": lambda c: ThreshIF(T=0, L=4, thresh=2.0),
    "myfloor": lambda c: UpFloor(up=2.0, t=4),
    "softplus": lambda c: SoftplusAct(c, levels=4),
    "abs": lambda c: AbsAct(c, levels=2),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking parameters: BN statistics, and thresholds spread per channel
    (softplus raw values around 0, including small negatives such as -0.0027)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            elif isinstance(m, SoftplusAct):
                m.p.copy_(torch.randn(m.p.shape, generator=gen) * 0.5 - 0.0027)
            elif isinstance(m, AbsAct):
                m.p.copy_(-(torch.rand(m.p.shape, generator=gen) + 0.5))
            elif isinstance(m, ThreshIF):
                m.thresh.copy_(torch.rand(1, generator=gen) + 1.0)
            elif isinstance(m, UpFloor):
                m.up.copy_(torch.rand(1, generator=gen) + 1.0)
    return model.eval()


def build(arch: str = "vgg", convention: str = "thresh-if", in_channels: int = 1,
          num_classes: int = 10, spatial: int = 8, T: int = 0) -> nn.Module:
    """A factory for ``--model tests.refnets:build`` with ``--model-args``."""
    act = CONVENTIONS[convention]
    if arch == "vgg":
        return RefVGG(act, in_channels=in_channels, num_classes=num_classes, spatial=spatial,
                      T=T)
    if arch == "resnet":
        return RefResNet(act, in_channels=in_channels, num_classes=num_classes, T=T)
    raise ValueError(f"arch must be 'vgg' or 'resnet', got {arch!r}")
