"""Vision Transformer: non-overlapping patches -> linear embedding, a CLS token, learned positions, pre-norm blocks."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from nnctl.errors import UserError
from nnctl.models.transformer import Block


class ViT(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, patch_size: int = 4, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise UserError(f"ViT reads images [C, H, W] and the data yields inputs of shape {tuple(in_shape)}; choose "
                            "an image data option or another model", key="model")
        c, h, w = in_shape
        if h % patch_size or w % patch_size:
            raise UserError(f"{h}x{w} images do not split into {patch_size}x{patch_size} patches; pick a "
                            "model.patch_size that divides both sides", key="model.patch_size")
        n_patches = (h // patch_size) * (w // patch_size)
        self.patch = nn.Conv2d(c, dim, patch_size, stride=patch_size)  # one linear map per patch
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, D, H/p, W/p] -> [B, N patches, D]
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.positions  # [B, 1 + N, D]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))  # the CLS token -> [B, num_classes]
