"""Speed-run CNN in the style of Keller Jordan's airbench: a frozen patch-whitening first layer, three
conv-pool-BN-activation blocks (GELU by default) and a max-pool head. Built for short, high-learning-rate runs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.models import activation as _activation


class _BatchNorm(nn.BatchNorm2d):
    """BN with a fast-moving running average (short runs) and no learned scale: the next conv absorbs it."""

    def __init__(self, channels: int, momentum: float = 0.6) -> None:
        super().__init__(channels, momentum=momentum, eps=1e-12)
        self.weight.requires_grad_(False)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool, act: str) -> None:
        super().__init__()
        self.act = _activation(act)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.norm1 = _BatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = _BatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))  # [B, c_out, H/2, W/2] (pooled while >= 2 px)
        return self.act(self.norm2(self.conv2(x)))


class AirBench(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (64, 256, 256),
                 whiten_width: int | None = None, whiten_kernel: int = 2, logit_scale: float = 1 / 9,
                 activation: str = "gelu", norm_bias_lr_mult: float = 1.0) -> None:
        super().__init__()
        self.act = _activation(activation)
        c_in = in_shape[0]
        k = whiten_kernel
        # Half the filters are the whitening eigenvectors, half their negatives (so the activation keeps both signs).
        self.whiten = nn.Conv2d(c_in, 2 * (c_in * k * k) if whiten_width is None else whiten_width, k, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.whiten.bias.requires_grad_(False)
        chans = [self.whiten.out_channels, *widths]
        sizes = [min(in_shape[1:]) - k + 1]
        for _ in widths:
            sizes.append(sizes[-1] // 2 if sizes[-1] >= 2 else sizes[-1])
        self.blocks = nn.Sequential(*(_Block(a, b, pool=size >= 2, act=activation)
                                      for a, b, size in zip(chans[:-1], chans[1:], sizes)))
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        # airbench's bias scaler: the norm biases (the norms' only learned parameters) step this many times the lr.
        # The tag gives them their own optimizer group (nnctl.optimization.param_groups); finetune.lr_mult overrides.
        if norm_bias_lr_mult != 1.0:
            for norm in self.modules():
                if isinstance(norm, _BatchNorm):
                    norm.bias.lr_mult = float(norm_bias_lr_mult)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the first layer to whiten k x k patches of normalized training images [N, C, H, W]."""
        k, n_out = self.whiten.kernel_size[0], self.whiten.out_channels
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
        patches = patches.transpose(1, 3).reshape(-1, images.shape[1] * k * k)  # [N*H'*W', C*k*k]
        patches = patches - patches.mean(dim=0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
        eigval, eigvec = eigval.flip(0), eigvec.flip(1)  # largest first
        n = min(n_out // 2, eigvec.shape[1])
        filters = (eigvec[:, :n] / torch.sqrt(eigval[:n] + 1e-2)).T  # [n, C*k*k]
        filters = filters.reshape(n, images.shape[1], k, k)
        weight = torch.zeros_like(self.whiten.weight)
        weight[:n], weight[n:2 * n] = filters, -filters
        self.whiten.weight.copy_(weight)
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))           # [B, C, H, W] -> [B, 2*C*k*k, H-k+1, W-k+1]
        x = self.blocks(x)                     # -> [B, widths[-1], H/8, W/8]
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # [B, widths[-1]]
        return self.head(x) * self.logit_scale
