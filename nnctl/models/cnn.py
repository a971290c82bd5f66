"""Plain CNN: conv-BN-activation blocks with max-pooling, global average pooling and a dropout head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from nnctl.models import activation


def conv_bn(c_in: int, c_out: int, act: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), activation(act))


class CNN(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128),
                 convs_per_block: int = 2, activation: str = "relu", dropout: float = 0.2) -> None:
        super().__init__()
        c_in, size = in_shape[0], min(in_shape[1:])
        layers: list[nn.Module] = []
        for c_out in channels:
            layers += [conv_bn(c_in if i == 0 else c_out, c_out, activation) for i in range(convs_per_block)]
            if size >= 2:  # pool while the map is still at least 2 px, so tiny inputs (8x8 digits) still work
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, C, H, W] -> [B, C', H', W'] -> [B, num_classes]
