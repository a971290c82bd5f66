"""Batched image augmentation as tensor ops on the training device (no per-sample PIL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator, padded: bool = False) -> torch.Tensor:
    """Per image: a random translation by up to `padding` px (zero fill) and, with `hflip`, a mirror with
    probability 1/2. One gather over the flattened pixels (rows, columns and the flip folded into one index), no
    per-image Python.

    x: [B, C, H, W], or with `padded` already zero-padded by `padding` on each side, [B, C, H+2p, W+2p], so a
    resident dataset is padded once rather than every batch -> [B, C, H, W].
    Random draws: row shifts, column shifts, then flips (each only when used).
    """
    if padding > 0 and not padded:
        x = F.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    b, c, hp, wp = x.shape
    h, w = hp - 2 * max(padding, 0), wp - 2 * max(padding, 0)
    if padding <= 0 and not hflip:
        return x
    dev = x.device
    rows, cols = torch.arange(h, device=dev).expand(b, h), torch.arange(w, device=dev).expand(b, w)  # [B, H], [B, W]
    if padding > 0:
        rows = rows + torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=gen)
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=gen)
    if hflip:
        flip = torch.rand(b, device=dev, generator=gen) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored order of the same window
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)  # [B, 1, H*W] into the flat padded image
    return x.reshape(b, c, hp * wp).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation only (see crop_flip)."""
    return crop_flip(x, padding, False, gen)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random mirror only (see crop_flip)."""
    return crop_flip(x, 0, True, gen)


class Normalize:
    """uint8 [B, C, H, W] -> float, standardized per channel with the training set's statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        # plain floats too: generative models map their [0, 1] pixels to and from this normalization
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "Normalize":
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # copy=True: never scale a stored float tensor in place; for uint8 input the conversion copies anyway
        return x.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)
