"""Pixels in and out of generative models: the data's normalization undone, padding to a size convolutions like,
image grids and PNG files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


class Pixels:
    """Maps the data module's normalized batches to pixels in [0, 1] and back, per channel.

    Generative models see pixels (GANs and diffusion in [-1, 1], VAEs in [0, 1]), whatever normalization the data
    module applies for classifiers, so samples are images whichever dataset they were trained on."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized [B, C, H, W] -> pixels in [0, 1]."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp_(0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the data's normalization (what a classifier trained on that data expects)."""
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    """Pad [B, C, H, W] at the bottom/right so H and W divide by `multiple` (e.g. 28 -> 32 for 3 halvings)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def padded_size(size: int, multiple: int) -> int:
    return size + (-size % multiple)


# spec["image_origin"]: where a data module's image row 0 is drawn. "lower" puts it at the bottom, as spectrograms are
# drawn (row 0 = the lowest frequency band); the names are matplotlib's imshow(origin=...).
IMAGE_ORIGINS = ("upper", "lower")


def as_drawn(images: torch.Tensor, origin: str = "upper") -> torch.Tensor:
    """Images [..., H, W] the way their data is drawn: row 0 at the top ("upper") or at the bottom ("lower")."""
    if origin not in IMAGE_ORIGINS:
        raise ValueError(f"image origin {origin!r}: expected one of {', '.join(IMAGE_ORIGINS)}")
    return images.flip(-2) if origin == "lower" else images


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> one [C, H', W'] image, `nrow` images per row (default: a square)."""
    from torchvision.utils import make_grid  # torchvision's import is not free: only when a grid is made

    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    return make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """[C, H, W] in [0, 1] -> an 8-bit PNG (grayscale for one channel). Parent dirs are created."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # [C, H, W]
    array = array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()  # [H, W] or [H, W, C]
    Image.fromarray(array).save(path)
    return path
