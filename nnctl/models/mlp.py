"""Multi-layer perceptron over flattened inputs: images, or rows of a table (classes or regression outputs)."""
from __future__ import annotations

from typing import Sequence

import math
import torch
import torch.nn as nn

from nnctl.models import activation, head_size


class _Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: str, batch_norm: bool, dropout: float, residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=not batch_norm)  # BN's shift makes the bias redundant
        self.norm = nn.BatchNorm1d(d_out) if batch_norm else nn.Identity()
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)
        self.residual = residual and d_in == d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm(self.linear(x))))
        return x + y if self.residual else y


class MLP(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int | None = None, num_outputs: int | None = None,
                 hidden_sizes: Sequence[int] = (256, 128),
                 activation: str = "relu", batch_norm: bool = True, dropout: float = 0.0,
                 residual: bool = False) -> None:
        super().__init__()
        dims = [math.prod(in_shape), *hidden_sizes]
        self.blocks = nn.Sequential(*(_Block(a, b, activation, batch_norm, dropout, residual)
                                      for a, b in zip(dims[:-1], dims[1:])))
        self.head = nn.Linear(dims[-1], head_size(num_classes, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, C, H, W] -> [B, C*H*W]
        return self.head(self.blocks(x))  # [B, num_classes or num_outputs]
