"""Built-in networks a user can prune at once.

LeNet-300-100 (MLP), a LeNet-5-style CNN, Caffe's LeNet-5 (the pruning papers' "LeNet-5"), CIFAR-style ResNet-20/56 (He et al. 2016, 1x1-conv
projection shortcuts), VGG-style nets (one of them the "VGG-like" CIFAR net of Zagoruyko's cifar.torch) and a MobileNetV2-style net (inverted residuals, depthwise
convolutions). Every convolutional net takes ``width`` (a channel multiplier), ``in_channels`` and
``num_classes``; all are plain ``nn.Module`` s with no dependency on this package.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class LeNet300100(nn.Module):
    """LeNet-300-100: two hidden fully connected layers of 300 and 100 units (Han et al. 2015)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        hidden1, hidden2 = _scaled(300, width), _scaled(100, width)
        self.fc1 = nn.Linear(in_features, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5-style CNN: conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc 120 - fc 84 - fc classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = _scaled(6, width), _scaled(16, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, _scaled(120, width)),
            nn.ReLU(),
            nn.Linear(_scaled(120, width), _scaled(84, width)),
            nn.ReLU(),
            nn.Linear(_scaled(84, width), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5Caffe(nn.Module):
    """Caffe's LeNet-5 (``examples/mnist/lenet.prototxt``), the "LeNet-5" of Han et al. 2015 and AutoPrune:
    conv(20, 5x5) - max pool - conv(50, 5x5) - max pool - fc 500 - ReLU - fc classes, no padding.

    431,080 parameters on 1x28x28 inputs (conv 520 + 25,050, fc 400,500 + 5,010).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"`image_size` must be at least 16 for lenet5_caffe (two unpadded 5x5 convs and pools), got {image_size!r}.")
        c1, c2, hidden = _scaled(20, width), _scaled(50, width), _scaled(500, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Residual shortcut: identity, or a 1x1 conv + BN projection when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus shortcut (1x1 conv + bn when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n+2 with stage widths 16, 32, 64 (times ``width``)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"`depth` must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}.")
        blocks = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.stem = conv_bn_relu(in_channels, widths[0])
        layers: list[nn.Module] = []
        current = widths[0]
        for stage, out_channels in enumerate(widths):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(current, out_channels, stride))
                current = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


VGG_CONFIGS: dict[str, list] = {
    "vgg_small": [32, 32, "M", 64, 64, "M", 128, 128, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class VGG(nn.Module):
    """VGG-style net (conv-bn-relu stacks, max pools, global average pool, one linear classifier).

    ``vgg_small`` suits 8x8 inputs; ``vgg11``/``vgg16`` (CIFAR variants) expect 32x32.
    """

    def __init__(self, config: str = "vgg_small", num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"`config` must be one of {sorted(VGG_CONFIGS)}, got {config!r}.")
        layers: list[nn.Module] = []
        current = in_channels
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_channels = _scaled(item, width)
                layers.append(conv_bn_relu(current, out_channels))
                current = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


VGG_LIKE = [(64, 0.3), (64, None), "M", (128, 0.4), (128, None), "M", (256, 0.4), (256, 0.4), (256, None), "M",
            (512, 0.4), (512, 0.4), (512, None), "M", (512, 0.4), (512, 0.4), (512, None), "M"]


class VGGLike(nn.Module):
    """The "VGG-like" CIFAR net of Zagoruyko's cifar.torch (``models/vgg_bn_drop.lua``), measured by AutoPrune.

    13 conv3x3 (bias) - BN (eps 1e-3) - ReLU layers, 64-64-M-128-128-M-256-256-256-M-512-512-512-M-512-512-512-M
    (``M``: 2x2 max pool, ceil mode; dropout 0.3 after the first conv, 0.4 after the others of a stage but its
    last), then dropout 0.5 - fc 512 - BN - ReLU - dropout 0.5 - fc classes. Made for 32x32 inputs
    (the five pools leave 1x1); 14,991,946 parameters at width 1 with 10 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        current = in_channels
        for item in VGG_LIKE:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            channels, dropout = item
            out_channels = _scaled(channels, width)
            layers += [nn.Conv2d(current, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels, eps=1e-3), nn.ReLU(inplace=True)]
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
            current = out_channels
        self.features = nn.Sequential(*layers)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(current, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu(in_channels, hidden, kernel_size=1))
        layers += [
            conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


MOBILENETV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2-style net for small images: (expand ratio, channels, blocks, stride) stages."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        current = _scaled(32, width)
        layers: list[nn.Module] = [conv_bn_relu(in_channels, current)]
        for expand_ratio, channels, blocks, stride in MOBILENETV2_SETTINGS:
            out_channels = _scaled(channels, width)
            for index in range(blocks):
                layers.append(InvertedResidual(current, out_channels, stride if index == 0 else 1, expand_ratio))
                current = out_channels
        last = _scaled(320, width)
        layers.append(conv_bn_relu(current, last, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet300100": lambda num_classes, in_channels, image_size, width: LeNet300100(
        in_channels * image_size * image_size, num_classes, width
    ),
    "lenet5": lambda num_classes, in_channels, image_size, width: LeNet5(in_channels, num_classes, image_size, width),
    "lenet5_caffe": lambda num_classes, in_channels, image_size, width: LeNet5Caffe(in_channels, num_classes, image_size, width),
    "resnet20": lambda num_classes, in_channels, image_size, width: CifarResNet(20, num_classes, in_channels, width),
    "resnet56": lambda num_classes, in_channels, image_size, width: CifarResNet(56, num_classes, in_channels, width),
    "vgg_small": lambda num_classes, in_channels, image_size, width: VGG("vgg_small", num_classes, in_channels, width),
    "vgg11": lambda num_classes, in_channels, image_size, width: VGG("vgg11", num_classes, in_channels, width),
    "vgg16": lambda num_classes, in_channels, image_size, width: VGG("vgg16", num_classes, in_channels, width),
    "vgg_like": lambda num_classes, in_channels, image_size, width: VGGLike(num_classes, in_channels, width),
    "mobilenetv2": lambda num_classes, in_channels, image_size, width: MobileNetV2(num_classes, in_channels, width),
}


def build_network(arch: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: float = 1.0) -> nn.Module:
    """Build a built-in network by name (see ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"`arch` must be one of {sorted(ARCHITECTURES)}, got {arch!r}.")
    if width <= 0:
        raise ValueError(f"`width` must be positive, got {width!r}.")
    return ARCHITECTURES[arch](num_classes, in_channels, image_size, width)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand (x4), shortcut (1x1 conv + bn on a shape change)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu3 = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet-shaped ResNet-50 (He et al. 2016): 7x7/2 stem, 3x3/2 max pool, bottleneck stages of
    3, 4, 6, 3 blocks with widths 64, 128, 256, 512 (times ``width``, outputs x4), global average pool,
    linear classifier. Made for 224x224 inputs; any side >= 32 runs."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        current = _scaled(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, current, 7, 2, 3, bias=False),
            nn.BatchNorm2d(current),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        for stage, (channels, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck(current, _scaled(channels, width), stride))
                current = _scaled(channels, width) * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


ARCHITECTURES["resnet50"] = lambda num_classes, in_channels, image_size, width: ResNet50(num_classes, in_channels, width)
