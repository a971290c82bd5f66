"""Generative adversarial networks: a DCGAN (transposed convolutions with batch norm / strided convolutions with
LeakyReLU) or an MLP pair, optionally class-conditional (labels concatenated to the latent; a projection
discriminator). Trained by nnctl.objectives.generative.GANObjective with one optimizer per network."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.errors import UserError


def halvings(h: int, w: int) -> int:
    """How many times a DCGAN upsamples from its base grid: halve while both sides are even and above 4
    (28 -> 14 -> 7: 2, 32 -> 4: 3, 8 -> 4: 1)."""
    k = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 4:
        h, w, k = h // 2, w // 2, k + 1
    return k


class DCGenerator(nn.Module):
    def __init__(self, z_dim: int, out_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c, h, w = out_shape
        k = halvings(h, w)
        self.base = (width * 2 ** max(k - 1, 0), h >> k, w >> k)  # (channels, rows, cols) of the first grid
        ch, bh, bw = self.base
        self.project = nn.Sequential(nn.Linear(z_dim, ch * bh * bw, bias=False), nn.BatchNorm1d(ch * bh * bw),
                                     nn.ReLU(inplace=True))
        blocks = []
        for _ in range(k - 1):
            blocks.append(nn.Sequential(nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2),
                                        nn.ReLU(inplace=True)))
            ch //= 2
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.ConvTranspose2d(ch, c, 4, 2, 1) if k else nn.Conv2d(ch, c, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), *self.base)  # [B, ch, h/2^k, w/2^k]
        for block in self.blocks:
            x = block(x)  # each doubles H and W, halves the channels
        return torch.tanh(self.out(x))  # [B, C, H, W] in [-1, 1]


class DCDiscriminator(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c, h, w = in_shape
        k = max(halvings(h, w), 1)
        blocks, ch = [nn.Sequential(nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True))], width  # no BN
        for _ in range(k - 1):
            blocks.append(nn.Sequential(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2),
                                        nn.LeakyReLU(0.2, inplace=True)))
            ch *= 2
        self.blocks = nn.ModuleList(blocks)
        self.num_features = ch * (h >> k) * (w >> k)  # a 4/2/1 convolution maps s -> s // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)  # [B, num_features]


class MLPGenerator(nn.Module):
    def __init__(self, z_dim: int, out_shape: tuple[int, int, int], hidden: int) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(z_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Linear(hidden, hidden * 2, bias=False), nn.BatchNorm1d(hidden * 2), nn.ReLU(inplace=True)),
        ])
        self.out = nn.Linear(hidden * 2, out_shape[0] * out_shape[1] * out_shape[2])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            z = block(z)
        return torch.tanh(self.out(z)).view(len(z), *self.out_shape)  # [B, C*H*W] -> [B, C, H, W]


class MLPDiscriminator(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], hidden: int) -> None:
        super().__init__()
        n = in_shape[0] * in_shape[1] * in_shape[2]
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(n, hidden * 2), nn.LeakyReLU(0.2, inplace=True)),
                                     nn.Sequential(nn.Linear(hidden * 2, hidden), nn.LeakyReLU(0.2, inplace=True))])
        self.num_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, C*H*W]
        for block in self.blocks:
            x = block(x)
        return x  # [B, hidden]


# model.arch -> (generator, discriminator) builders: (z_dim, shape, width, hidden) -> module
ARCHS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "dcgan": (lambda z, shape, width, hidden: DCGenerator(z, shape, width),
              lambda shape, width, hidden: DCDiscriminator(shape, width)),
    "mlp": (lambda z, shape, width, hidden: MLPGenerator(z, shape, hidden),
            lambda shape, width, hidden: MLPDiscriminator(shape, hidden)),
}


class Critic(nn.Module):
    """Discriminator features -> one logit per image; conditional: plus the projection <embed(y), features>."""

    def __init__(self, body: nn.Module, num_classes: int | None) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.num_features, 1)
        self.embed = nn.Embedding(num_classes, body.num_features) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        f = self.body(x)  # [B, F]
        logit = self.head(f).squeeze(1)  # [B]
        if self.embed is not None:
            logit = logit + (self.embed(labels) * f).sum(1)
        return logit


class GAN(nn.Module):
    """A generator and a discriminator in one module (one checkpoint, one EMA); images are in [-1, 1] inside."""

    objective = "gan"  # objective=auto trains this model with the objective registered under this name

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, arch: str = "dcgan", latent_dim: int = 64,
                 width: int = 64, hidden: int = 256, conditional: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown GAN architecture {arch!r}; choose one of {', '.join(ARCHS)}", key="model.arch")
        self.in_shape, self.latent_dim = tuple(in_shape), latent_dim
        self.num_classes = num_classes if conditional else None
        make_g, make_d = ARCHS[arch]
        z_in = latent_dim + (num_classes if conditional else 0)  # conditional: a one-hot label joins the latent
        self.generator = make_g(z_in, self.in_shape, width, hidden)
        self.discriminator = Critic(make_d(self.in_shape, width, hidden), self.num_classes)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator, device=device)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, Z] (and labels [B]) -> images [B, C, H, W] in [-1, 1]."""
        if self.conditional:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)  # [B, Z + K]
        return self.generator(z)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> pixels in [0, 1]."""
        return (self.generate(z, labels) + 1) / 2

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images [n, C, H, W], pixels in [0, 1]; a conditional model cycles through the classes by default."""
        z = self.latents(n, generator)
        if self.conditional and labels is None:
            labels = torch.arange(n, device=z.device) % self.num_classes
        return self.decode(z, labels)
