"""A ResNet-style CNN in plain torch.nn (no torchvision): the zoo's convolutional model.

Layout (He et al., "basic" blocks as in ResNet-18/34): a stem (conv-BN-ReLU, 3x3 max pool with
stride 2), stages of basic blocks (conv3x3-BN-ReLU, conv3x3-BN, add the shortcut, ReLU; the first
block of a later stage halves the resolution, and its shortcut is a strided 1x1 conv-BN), global
average pool, flatten, linear. `tiny` is 2 stages of 8 and 16 channels on 32x32 images; `base` is
ResNet-18 at 224x224.

Batch-norm layers get random running statistics and affine parameters (seeded): fresh layers are
identities in eval mode (mean 0, variance 1, weight 1, bias 0), which would let a wrong
conv-BN folding pass go unnoticed. Note that the TorchScript exporter folds every BN into the conv
before it (eval-mode peephole); the dynamo exporter keeps `BatchNormalization` nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _conv_bn(inputs: int, outputs: int, kernel: int, stride: int) -> list[nn.Module]:
    conv = nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(outputs)]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(inputs, outputs, 3, stride),
            nn.ReLU(),
            *_conv_bn(outputs, outputs, 3, 1),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(*_conv_bn(inputs, outputs, 1, stride))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, `len(channels)` stages of `blocks[i]` basic blocks, global average pool, linear."""

    def __init__(
        self,
        channels: Sequence[int],
        blocks: Sequence[int],
        classes: int,
        stem_kernel: int = 7,
        stem_stride: int = 2,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(3, channels[0], stem_kernel, stem_stride),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        width = channels[0]
        for index, (outputs, count) in enumerate(zip(channels, blocks, strict=True)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(width, outputs, stride))
                width = outputs
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        features = self.pool(self.stages(self.stem(pixel_values)))
        return (self.head(torch.flatten(features, 1)),)


def _randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BN non-trivial statistics and affine parameters (see the module docstring)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)


def make_resnet(config: Mapping[str, Any]) -> nn.Module:
    """The ResNet for `config` (see `specs.RESNET`), seeded and in eval mode."""
    torch.manual_seed(0)
    model = ResNet(
        channels=config["channels"],
        blocks=config["blocks"],
        classes=config["classes"],
        stem_kernel=config["stem_kernel"],
        stem_stride=config["stem_stride"],
    )
    _randomize_batch_norms(model, torch.Generator().manual_seed(1))
    return model.eval()


BUILDERS = {"resnet": make_resnet}
