"""Batched image augmentation as tensor ops on the training device (no per-sample PIL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by `padding` (zeros) and crop back to the original size at a random offset per image.

    x: [B, C, H, W] -> [B, C, H, W]
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # gather -> [B, C, H, W]


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2. x: [B, C, H, W]."""
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Normalize:
    """uint8 [B, C, H, W] -> float, standardized per channel with the training set's statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "Normalize":
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift
