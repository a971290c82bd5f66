"""CIFAR-style ResNet (He et al. 2016) with a 3x3 stem and no max-pool, for 28-32 px images."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.errors import UserError

DEPTHS: dict[int, list[int]] = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:  # 1x1 projection when the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, depth: int = 18,
                 blocks_per_stage: Sequence[int] | None = None, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if blocks_per_stage is None:
            if depth not in DEPTHS:
                raise UserError(f"unsupported depth {depth}; choose one of {sorted(DEPTHS)} or set "
                                f"model.blocks_per_stage", key="model.depth")
            blocks_per_stage = DEPTHS[depth]
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, c_in = [], width
        for i, n_blocks in enumerate(blocks_per_stage):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2  # halve the map at every stage after the first
            stages += [BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1) for b in range(n_blocks)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))  # [B, C, H, W] -> [B, num_classes]
