"""Shared matplotlib helpers (Agg backend, imported lazily): figures to PNG, images for display, image grids."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from nnctl.images import as_drawn


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def display_images(data: Any, x: torch.Tensor) -> torch.Tensor:
    """A batch of the data module's inputs -> [B, H, W, C] in [0, 1] for imshow, drawn the data's way up (the
    spec's `image_origin`). Image data: its normalization undone; data that draws itself (`pixels`, e.g. audio
    as log-mel images): that drawing."""
    if hasattr(data, "pixels"):
        images = data.pixels(x).float()  # [B, C, H, W] in [0, 1]
    else:
        norm = data.normalize  # out = x_uint8 * scale + shift
        raw = (x.float() - norm.shift.to(x.device)) / norm.scale.to(x.device)  # [B, C, H, W] in 0..255
        images = (raw / 255.0).clamp(0, 1)
    return as_drawn(images, data.spec.get("image_origin", "upper")).permute(0, 2, 3, 1).cpu()  # [B, H, W, C]


def show(ax: Any, image: torch.Tensor) -> None:
    """An [H, W, C] image in [0, 1]; single-channel images in gray."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def grid(n: int, per_item: int = 1, max_cols: int = 8) -> tuple[Any, Sequence[Any]]:
    """A figure with `n` items of `per_item` panels each, laid out row by row; returns (fig, axes per panel)."""
    plt = pyplot()
    cols = max(1, min(n, max_cols // per_item)) * per_item
    rows = -(-n * per_item // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n * per_item:]:
        ax.axis("off")
    return fig, flat
