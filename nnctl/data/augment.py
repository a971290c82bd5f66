"""Batched image augmentation as tensor ops on the training device (no per-sample PIL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random translation by up to `padding` px (zero fill) and, with `hflip`, a mirror with
    probability 1/2. Two gathers (rows, then columns with the flip folded in), no per-image Python.

    x: [B, C, H, W] -> [B, C, H, W]. Random draws: row shifts, column shifts, then flips (each only when used).
    """
    b, c, h, w = x.shape
    dev = x.device
    cols = torch.arange(w, device=dev).expand(b, w)  # [B, W]
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
        dy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B, 1, H, 1]
        x = x.gather(2, rows.expand(b, c, h, x.shape[3]))  # [B, C, H, W+2p]
        cols = cols + dx[:, None]
    if hflip:
        flip = torch.rand(b, device=dev, generator=gen) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored order of the same window
    if padding <= 0 and not hflip:
        return x
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # [B, C, H, W]


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation only (see crop_flip)."""
    return crop_flip(x, padding, False, gen)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random mirror only (see crop_flip)."""
    return crop_flip(x, 0, True, gen)


class Normalize:
    """uint8 [B, C, H, W] -> float, standardized per channel with the training set's statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "Normalize":
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # copy=True: never scale a stored float tensor in place; for uint8 input the conversion copies anyway
        return x.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)
