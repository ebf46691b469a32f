"""Architectures of the built-in model registry (CIFAR-style networks and a small CNN).

Pure ``nn.Module`` definitions, no registry logic: :mod:`autoprune.models.registry` registers them.

* CIFAR ResNets (He et al. 2016, section 4.2): a 3x3 stem with 16 channels, three stages of
  ``n`` BasicBlocks with 16/32/64 channels, global average pooling and a Linear; depth ``6n + 2``.
  Shortcuts where the shape changes are either 1x1-conv + BN projections (option "B") or
  parameter-free subsample + zero channel padding (option "A", :class:`PadShortcut`).
* VGG-16-BN for 32x32 inputs, with ``AdaptiveAvgPool2d(1)`` before the classifier so any image
  size works (pooling layers that would shrink the map below 1x1 are left out).
* MobileNetV2, CIFAR variant: stride-1 stem and stride 1 in the first two stride-2 stages.
* A small CNN for tiny images (8x8 digits) ending in ``AdaptiveAvgPool2d(2) -> Flatten -> Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) convs, unit/zero BatchNorm, small-normal Linear weights and zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------- CIFAR ResNet


class PadShortcut(nn.Module):
    """Option-"A" shortcut: subsample by ``stride`` and zero-pad the channels to ``out_channels``.

    Parameter-free; the padded channels are split evenly before and after the input channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        before = extra // 2
        return F.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"unknown shortcut option {shortcut!r} (expected 'A' or 'B')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3 stages of ``blocks_per_stage`` BasicBlocks (16/32/64 channels)."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "B"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        channels = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int, in_channels: int, shortcut: str) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels, shortcut)


# --------------------------------------------------------------------------- VGG-16-BN

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class CifarVGG(nn.Module):
    """VGG with BatchNorm: conv3x3-BN-ReLU stacks and max pools, global average pool, one Linear."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                if size >= 2:  # keep at least a 1x1 map for small inputs
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            width = int(item)
            layers += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- MobileNetV2

# (expansion t, output channels c, repeats n, stride s) as in Sandler et al. 2018, Table 2,
# with the first two stride-2 stages (24 and 32 channels) set to stride 1 for 32x32 inputs.
MOBILENETV2_CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 1),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN (+ input).

    The expansion conv is left out when ``expand_ratio == 1`` (as in the paper and torchvision).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: stride-1 stem, 8x8 final feature map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        channels = 32
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3, stride=1)]
        for t, c, n, s in MOBILENETV2_CIFAR_CFG:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Four conv3x3-BN-ReLU layers (16/32/64/64) for tiny images, then a Linear after Flatten.

    ``AdaptiveAvgPool2d(2) -> Flatten -> Linear(64*4)`` makes the classifier read each channel of
    the last conv at 4 positions: a Linear-after-flatten consumer that pruning must handle.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            conv3x3(16, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        ]
        if image_size >= 8:
            layers.append(nn.MaxPool2d(2))
        layers += [
            conv3x3(32, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(64 * 4, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
