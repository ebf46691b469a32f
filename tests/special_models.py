"""Small models rebuilt from public bug reports of pruning tools (issue 17), one per kind of fault.

Each factory has the registry signature ``fn(num_classes, in_channels, image_size)`` so a test can
use it as ``tests.special_models:<name>`` too; ``SPECIAL`` maps a short label to (factory, input shape).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DeconvNet(nn.Module):
    """Conv -> ReLU -> ConvTranspose -> ReLU -> Conv -> ReLU -> mean -> Linear (case 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.deconv(F.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class SharedConvNet(nn.Module):
    """One conv applied to two inputs (the two halves of the feature map) in forward (case 2)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(32, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        a = self.shared(h)
        b = self.shared(F.avg_pool2d(h, 3, 1, 1))
        h = F.relu(self.bn2(self.head(torch.cat([a, b], 1))))
        return self.fc(h.mean((2, 3)))


class AuxHeadNet(nn.Module):
    """An auxiliary head that runs only in training reads the 32-channel layer (case 3)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)
        self.aux = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.bn1(self.conv1(x)))
        mid = F.relu(self.bn2(self.conv2(h)))
        out = self.fc(F.relu(self.bn3(self.conv3(mid))).mean((2, 3)))
        if self.training:
            return out + 0.0 * self.aux(mid)  # keeps one output; the aux loss is what matters in training
        return out


class SEConvClassifier(nn.Module):
    """Logits from a 1x1 conv after a squeeze-excitation block built from nn.Linear (case 4)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.se_reduce = nn.Linear(32, 8)
        self.se_expand = nn.Linear(8, 32)
        self.classifier = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3))))))
        h = h * s[:, :, None, None]
        return self.classifier(h).mean((2, 3))


class ProjectionHeadNet(nn.Module):
    """A classifier ``fc`` plus an unused projection head registered after it (case 4)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)
        self.projection = nn.Linear(32, 5)  # e.g. a contrastive head, not used by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(h.mean((2, 3)))


class LeNet5(nn.Module):
    """LeNet-5 for 3x32x32 with the hard-coded ``view(-1, 16*5*5)`` of the PyTorch tutorial (case 5)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TensorAttrNet(nn.Module):
    """Holds a tensor with autograd history as a plain attribute (case 7)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)
        self.scale = self.bn2.weight.mean() * 0 + 1  # non-leaf: deepcopy refuses it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(h.mean((2, 3))) * self.scale.detach()


class TupleOutNet(nn.Module):
    """A classifier plus an embedding head: forward returns ``(logits, embedding)`` (issue 29, case 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)
        self.embed = nn.Linear(32, 6)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fc(h), self.embed(h)


class DictOutNet(TupleOutNet):
    """The same heads returned as a dict, logits not first (case 1)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {"embedding": self.embed(h), "logits": self.fc(h)}


class Heads(NamedTuple):
    logits: torch.Tensor
    embedding: torch.Tensor


class NamedTupleOutNet(TupleOutNet):
    """The same heads as a namedtuple, like torchvision's GoogLeNetOutputs (case 1)."""

    def forward(self, x: torch.Tensor) -> Heads:
        h = self.features(x)
        return Heads(self.fc(h), self.embed(h))


class TwoHeadDictNet(TupleOutNet):
    """Two heads in a dict without a 'logits' key: the user must say which one (case 1)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {"aux": self.embed(h), "main": self.fc(h)}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnitNet(nn.Module):
    """ShuffleNetV2-style units: split, 1x1 -> depthwise -> 1x1 on one half, concat, channel shuffle (case 2)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.units = nn.ModuleList(nn.Sequential(
            nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24),
            nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        for unit in self.units:
            a, b = x.chunk(2, dim=1)
            x = channel_shuffle(torch.cat([a, unit(b)], 1), 2)
        return self.fc(x.mean((2, 3)))


class DataBranchNet(nn.Module):
    """A branch chosen by the data (``x.std() > 0.5``): constant probe inputs take only ``branch_b`` (case 4)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.branch_a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.bn(self.conv(x)))
        h = self.branch_a(f) if x.std() > 0.5 else self.branch_b(f)
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


class RareBranchNet(DataBranchNet):
    """``branch_a`` runs only for inputs with a mean above 2: neither probe (ones, standard normal) takes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.bn(self.conv(x)))
        h = self.branch_a(f) if x.mean() > 2 else self.branch_b(f)
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


class NormNet(nn.Module):
    """Conv -> ``norm`` -> ReLU twice, then a Linear; ``norm`` is InstanceNorm with running statistics,
    GroupNorm (4 groups, then 1 group) or LayerNorm over channels (case 5)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "instance") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm1 = self._norm(norm, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, 32) if norm == "group" else self._norm(norm, 32)  # one group: prunable
        self.fc = nn.Linear(32, num_classes)
        self.kind = norm

    @staticmethod
    def _norm(kind: str, channels: int) -> nn.Module:
        if kind == "instance":
            return nn.InstanceNorm2d(channels, affine=True, track_running_stats=True)
        if kind == "group":
            return nn.GroupNorm(4, channels)
        return nn.LayerNorm(channels)  # over channels: applied channels-last

    def _normed(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, nn.LayerNorm):
            return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self._normed(self.norm1, self.conv1(x)))
        h = F.relu(self._normed(self.norm2, self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def deconv_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return DeconvNet(num_classes, in_channels)


def shared_conv_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SharedConvNet(num_classes, in_channels)


def aux_head_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return AuxHeadNet(num_classes, in_channels)


def se_conv_classifier(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SEConvClassifier(num_classes, in_channels)


def projection_head_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ProjectionHeadNet(num_classes, in_channels)


def lenet5(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return LeNet5(num_classes, in_channels)


def tensor_attr_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TensorAttrNet(num_classes, in_channels)


def tuple_out_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TupleOutNet(num_classes, in_channels)


def dict_out_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return DictOutNet(num_classes, in_channels)


def namedtuple_out_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return NamedTupleOutNet(num_classes, in_channels)


def two_head_dict_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TwoHeadDictNet(num_classes, in_channels)


def shuffle_unit_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ShuffleUnitNet(num_classes, in_channels)


def data_branch_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return DataBranchNet(num_classes, in_channels)


def rare_branch_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return RareBranchNet(num_classes, in_channels)


def instance_norm_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return NormNet(num_classes, in_channels, "instance")


def group_norm_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return NormNet(num_classes, in_channels, "group")


def layer_norm_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return NormNet(num_classes, in_channels, "layer")


def bf16_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TupleOutNet(num_classes, in_channels).to(torch.bfloat16)


# label -> (factory name in this module, input shape C, H, W)
SPECIAL = {
    "deconv": ("deconv_net", (3, 8, 8)),
    "shared": ("shared_conv_net", (3, 8, 8)),
    "aux_head": ("aux_head_net", (3, 8, 8)),
    "se_conv_classifier": ("se_conv_classifier", (3, 8, 8)),
    "projection_head": ("projection_head_net", (3, 8, 8)),
    "lenet5": ("lenet5", (3, 32, 32)),
    "tensor_attr": ("tensor_attr_net", (3, 8, 8)),
}

# issue 29's torchvision models, built at CIFAR size (3x32x32): channel shuffle, state-dict versions, a namedtuple output
TV_KINDS = ["torchvision:shufflenet_v2_x0_5", "torchvision:mnasnet0_5", "torchvision:googlenet"]

# issue 29's kinds: outputs that are not one tensor, channel shuffle, a data-dependent branch, norms
KINDS = {
    "tuple_out": ("tuple_out_net", (3, 8, 8)),
    "dict_out": ("dict_out_net", (3, 8, 8)),
    "namedtuple_out": ("namedtuple_out_net", (3, 8, 8)),
    "shuffle_unit": ("shuffle_unit_net", (3, 8, 8)),
    "data_branch": ("data_branch_net", (3, 8, 8)),
    "instance_norm": ("instance_norm_net", (3, 8, 8)),
    "group_norm": ("group_norm_net", (3, 8, 8)),
    "layer_norm": ("layer_norm_net", (3, 8, 8)),
}
