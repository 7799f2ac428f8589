"""The convolutional networks the benchmarks share: a ResNet with downsample shortcuts and a
MobileNetV2-style network of inverted residuals (torchvision is not a dependency)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """A ResNet basic block; with stride 2 or a new width, a conv + BatchNorm shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18-shaped (two basic blocks a stage, downsample shortcuts) at the given stage widths."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 100) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width)))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1×1, depthwise 3×3, project 1×1, plus the input."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn2(self.depthwise(F.relu6(self.bn1(self.expand(x))))))
        return x + self.bn3(self.project(h))


class MobileNet(nn.Module):
    """A stride-2 stem, then four inverted residuals (width 64, expansion 6), pooled classifier."""

    def __init__(self, width: int = 64, blocks: int = 4, classes: int = 100) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[InvertedResidual(width, 6 * width) for _ in range(blocks)])
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.bn(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def trained_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine terms as after training (fresh ones are the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.0)
                m.bias.normal_(0, 0.1)
    return model.eval()
