"""Model zoo: CS-QCFS networks with average pooling and a Linear readout.

``digits-cnn`` takes 1x8x8 inputs (scikit-learn's digits); ``vgg16``,
``resnet18`` and ``resnet20`` use the CIFAR layouts (3x32x32). Every hidden
activation is a :class:`~csqcfs_deploy.train.activations.CSQCFS`; the last layer is a
Linear readout without activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from csqcfs_deploy.errors import GraphError, UsageError
from csqcfs_deploy.train.activations import CSQCFS


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and what input it takes.

    ``thresholds_from_data``: training starts every activation's threshold from its
    inputs on the first batch (:mod:`~csqcfs_deploy.train.threshold_init`) instead of
    the architecture's fixed default, unless an initial threshold is given.
    """

    name: str
    input_shape: tuple[int, int, int]
    build: Callable[..., nn.Module]
    description: str
    thresholds_from_data: bool = False


def _act(channels: int, levels: int, phi: float, init: float) -> CSQCFS:
    return CSQCFS(channels, levels, phi=phi, init_threshold=init)


def _conv_bn_act(cin: int, cout: int, levels: int, phi: float, init: float) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        _act(cout, levels, phi, init),
    ]


def digits_cnn(
    levels: int = 1, phi: float = 0.5, num_classes: int = 10, in_channels: int = 1,
    init_threshold: float = 1.0,
) -> nn.Module:
    """Small CNN for 8x8 digits: 8x8 -> 4x4 -> 2x2 -> 128 -> classes."""
    return nn.Sequential(
        *_conv_bn_act(in_channels, 32, levels, phi, init_threshold),
        *_conv_bn_act(32, 32, levels, phi, init_threshold),
        nn.AvgPool2d(2),
        *_conv_bn_act(32, 64, levels, phi, init_threshold),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128, bias=False),
        nn.BatchNorm1d(128),
        _act(128, levels, phi, init_threshold),
        nn.Dropout(0.1),
        nn.Linear(128, num_classes),
    )


_VGG16_CFG: list[int | str] = [
    64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P",
]


def vgg16(
    levels: int = 8, phi: float = 0.5, num_classes: int = 10, in_channels: int = 3,
    init_threshold: float = 8.0,
) -> nn.Module:
    """VGG-16 for 32x32 inputs as in the QCFS code: average pooling, 4096-wide classifier."""
    layers: list[nn.Module] = []
    cin = in_channels
    for item in _VGG16_CFG:
        if item == "P":
            layers.append(nn.AvgPool2d(2))
        else:
            assert isinstance(item, int)
            layers += _conv_bn_act(cin, item, levels, phi, init_threshold)
            cin = item
    layers += [
        nn.Flatten(),
        nn.Linear(512, 4096),
        _act(4096, levels, phi, init_threshold),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        _act(4096, levels, phi, init_threshold),
        nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    ]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block; the sum passes through the activation (QCFS layout)."""

    def __init__(
        self, cin: int, cout: int, stride: int, levels: int, phi: float, init: float
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _act(cout, levels, phi, init)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = _act(cout, levels, phi, init)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, stages of basic blocks, global average pool, Linear."""

    def __init__(
        self, widths: list[int], blocks: list[int], levels: int, phi: float,
        num_classes: int, in_channels: int, init: float,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = _act(widths[0], levels, phi, init)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(cin, width, stride, levels, phi, init))
                cin = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet18(
    levels: int = 8, phi: float = 0.5, num_classes: int = 10, in_channels: int = 3,
    init_threshold: float = 8.0,
) -> nn.Module:
    """ResNet-18, CIFAR layout (64-128-256-512, 2 blocks each)."""
    return ResNet([64, 128, 256, 512], [2, 2, 2, 2], levels, phi, num_classes, in_channels,
                  init_threshold)


def resnet20(
    levels: int = 8, phi: float = 0.5, num_classes: int = 10, in_channels: int = 3,
    init_threshold: float = 8.0,
) -> nn.Module:
    """ResNet-20, CIFAR layout (16-32-64, 3 blocks each, 1x1 projection shortcuts)."""
    return ResNet([16, 32, 64], [3, 3, 3], levels, phi, num_classes, in_channels, init_threshold)


ARCHITECTURES: dict[str, ArchSpec] = {
    "digits-cnn": ArchSpec("digits-cnn", (1, 8, 8), digits_cnn, "small CNN for 8x8 digits"),
    # the 4096-wide classifier has no batch norm: with lambda = 8 it starts nearly silent
    "vgg16": ArchSpec("vgg16", (3, 32, 32), vgg16, "VGG-16, CIFAR layout",
                      thresholds_from_data=True),
    "resnet18": ArchSpec("resnet18", (3, 32, 32), resnet18, "ResNet-18, CIFAR layout"),
    "resnet20": ArchSpec("resnet20", (3, 32, 32), resnet20, "ResNet-20, CIFAR layout"),
}


def arch_spec(name: str) -> ArchSpec:
    """Look up an architecture by name; UsageError lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UsageError(f"unknown architecture {name!r} (known: {known})") from None


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial random statistics and affine parameters.

    For folding studies, tests and benchmarks of untrained networks; returns the
    model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.running_mean is None or m.running_var is None:
                    raise GraphError(f"BatchNorm {type(m).__name__} has no running statistics "
                                     "(track_running_stats=False) to randomize")
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


def build_model(
    arch: str, levels: int, phi: float = 0.5, num_classes: int = 10,
    init_threshold: float | None = None,
) -> nn.Module:
    """Build architecture ``arch`` with ``levels`` quantization levels."""
    spec = arch_spec(arch)
    kwargs = {} if init_threshold is None else {"init_threshold": init_threshold}
    return spec.build(levels, phi, num_classes, spec.input_shape[0], **kwargs)
