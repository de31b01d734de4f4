"""The model zoo the structure tools are tested on: torchvision and timm models (random weights, small
inputs) and Torch-Pruning-style test models. Test-only: torchvision is imported here, never by the package."""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

_TORCHVISION_OPS: list = []


def import_torchvision():  # noqa: ANN201 - the module
    """``import torchvision`` beside a CPU torch: PyPI's torchvision 0.28 is a CUDA build whose compiled
    ops do not load here, so its meta registrations fail unless ``torchvision::nms``/``qnms`` exist.
    Defining the two schemas first lets the pure-Python model zoo load. CI's environment installs a
    finder that does this at import (``_torchvision_cpu_schemas``); without it, this defines them."""
    import sys

    shim = any(getattr(finder, "__name__", "") == "_DefineSchemasBeforeTorchvision" for finder in sys.meta_path)
    if not shim and "torchvision" not in sys.modules and not _TORCHVISION_OPS:
        library = torch.library.Library("torchvision", "DEF")
        try:
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # a torchvision whose compiled operators load defines them itself
            pass
        _TORCHVISION_OPS.append(library)  # keep the library (and its schemas) alive
    import torchvision

    return torchvision


class SplitModel(nn.Module):
    """Torch-Pruning's ``test_split`` model (``in_dim`` 8, a stem and a head added): the output of
    ``block1`` is split in three; ``block2_1`` is used twice in one forward, on the first two parts."""

    def __init__(self, in_dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, in_dim, 3, padding=1)
        self.block1 = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1), nn.BatchNorm2d(in_dim), nn.GELU(),
            nn.Conv2d(in_dim, in_dim * 4, 1), nn.BatchNorm2d(in_dim * 4),
        )
        self.block2_1 = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.BatchNorm2d(in_dim))
        self.block2_2 = nn.Sequential(nn.Conv2d(2 * in_dim, in_dim, 1), nn.BatchNorm2d(in_dim))
        self.head = nn.Conv2d(3 * in_dim, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        x = torch.cat([self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)], 1)
        return self.head(x).mean((2, 3))


class TransposedConvModel(nn.Module):
    """An encoder-decoder with a ``ConvTranspose2d`` upsampling (segmentation-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.up = nn.ConvTranspose2d(24, 12, 2, stride=2)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.up(self.mid(self.down(x)))))
        return self.head(x).mean((2, 3))


class FunctionalPoolResNet(nn.Module):
    """CIFAR ResNet-56 whose global pooling is ``F.adaptive_avg_pool2d`` in ``forward`` (no pooling module)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_prune.demo.models import build_network

        network = build_network("resnet56", num_classes=10, in_channels=3, image_size=32)
        self.stem, self.layers, self.fc = network.stem, network.layers, network.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 conv, a 3x3 conv of ``cardinality`` conv groups, 1x1 conv, each with a
    BatchNorm, and a residual add (through a 1x1 conv and BatchNorm where the shape changes)."""

    def __init__(self, inputs: int, outputs: int, cardinality: int, group_width: int, stride: int = 1) -> None:
        super().__init__()
        inner = cardinality * group_width
        self.conv1, self.bn1 = nn.Conv2d(inputs, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = nn.Conv2d(inner, outputs, 1, bias=False), nn.BatchNorm2d(outputs)
        self.shortcut = (
            nn.Identity() if stride == 1 and inputs == outputs
            else nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class TinyResNeXt(nn.Module):
    """A stem, two ResNeXt blocks (4 conv groups of 2 and of 3 channels; the second strided, with a projection
    shortcut), functional global pooling and a Linear classifier: every inner group passes through a grouped conv."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(ResNeXtBlock(16, 16, 4, 2), ResNeXtBlock(16, 24, 4, 3, stride=2))
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class GroupedResidualNet(nn.Module):
    """Grouped convs on a residual stream of 16 channels, one of 2 and one of 4 conv groups: both read and write
    the stream, so a stream channel must go with one in-group index of each (4 units of 4 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.two = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16))
        self.four = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.two(x))
        x = torch.relu(x + self.four(x))
        return self.fc(x.mean((2, 3)))


class UnevenGroupedNet(nn.Module):
    """Two branches concatenated into a conv of 2 conv groups: each branch feeds one conv group, so removing a
    branch channel would leave the conv groups unequally wide (both branch groups are refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)))
        return self.fc(x.mean((2, 3)))


def small_resnext() -> nn.Module:
    """torchvision's ResNeXt (its ``Bottleneck``, 8 conv groups of 4 channels), one block per stage."""
    resnet = import_torchvision().models.resnet
    return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10)


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(import_torchvision().models, name)(weights=None, num_classes=10, **kwargs)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


ZOO: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name -> (builder, input side); inputs are 1x3xSxS
    "tv_resnet18": (_torchvision("resnet18"), 32),
    "tv_resnet50": (_torchvision("resnet50"), 32),
    "tv_resnext50_32x4d": (_torchvision("resnext50_32x4d"), 32),
    "tv_wide_resnet50_2": (_torchvision("wide_resnet50_2"), 32),
    "tv_mobilenet_v2": (_torchvision("mobilenet_v2"), 32),
    "tv_mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), 32),
    "tv_mobilenet_v3_large": (_torchvision("mobilenet_v3_large"), 32),
    "tv_efficientnet_b0": (_torchvision("efficientnet_b0"), 32),
    "tv_densenet121": (_torchvision("densenet121"), 32),
    "tv_regnet_x_400mf": (_torchvision("regnet_x_400mf"), 32),
    "tv_regnet_y_400mf": (_torchvision("regnet_y_400mf"), 32),
    "tv_convnext_tiny": (_torchvision("convnext_tiny"), 32),
    "tv_vit_b_16": (_torchvision("vit_b_16", image_size=32), 32),
    "tv_swin_t": (_torchvision("swin_t"), 64),
    "tv_shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), 32),
    "timm_resnet18": (_timm("resnet18"), 32),
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), 32),
    "timm_vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224", img_size=32), 32),
    "timm_deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", img_size=32), 32),
    "timm_convnext_atto": (_timm("convnext_atto"), 32),
    "tp_split": (SplitModel, 16),
    "conv_transpose": (TransposedConvModel, 16),
    "resnet56_functional_pool": (FunctionalPoolResNet, 32),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh model (seeded) and its example input. A zero-initialised classifier (torchvision's ViT)
    gets random weights, else every gradient before it would be zero."""
    builder, side = ZOO[name]
    torch.manual_seed(0)
    model = builder().eval()
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    return model, torch.randn(1, 3, side, side)


class ZooClassifier(pl.LightningModule):
    """A zoo network as a 10-class image classifier (cross-entropy), with an example input."""

    def __init__(self, network: nn.Module, side: int) -> None:
        super().__init__()
        self.network = network
        self.example_input_array = torch.zeros(1, 3, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, batch_index):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
