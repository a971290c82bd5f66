"""Variational autoencoder: a convolutional encoder to (mu, log sigma^2), the reparameterization, and a
transposed-convolution decoder. Images are pixels in [0, 1]; the ELBO lives in nnctl.objectives.generative."""
from __future__ import annotations

import torch
import torch.nn as nn

from nnctl.errors import UserError
from nnctl.images import pad_to_multiple, padded_size

LIKELIHOODS = ("bernoulli", "gaussian")


class VAE(nn.Module):
    objective = "vae"  # objective=auto trains this model with the objective registered under this name

    def __init__(self, in_shape: tuple[int, int, int], latent_dim: int = 16, channels: tuple[int, ...] = (32, 64),
                 hidden: int = 256, likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise UserError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}",
                            key="model.likelihood")
        c, h, w = self.in_shape = tuple(in_shape)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.multiple = 2 ** len(channels)  # each encoder stage halves H and W: pad to a multiple of 2^stages
        ph, pw = padded_size(h, self.multiple) // self.multiple, padded_size(w, self.multiple) // self.multiple
        self.grid = (channels[-1], ph, pw)  # the encoder's output, the decoder's input
        enc, ch = [], c
        for out in channels:
            enc.append(nn.Sequential(nn.Conv2d(ch, out, 4, 2, 1), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)))
            ch = out
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(ch * ph * pw, hidden), nn.LeakyReLU(0.2))
        self.to_stats = nn.Linear(hidden, 2 * latent_dim)  # -> (mu, log sigma^2)
        self.project = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, ch * ph * pw),
                                     nn.ReLU())
        dec = []
        for out in reversed((c, *channels[:-1])):
            last = len(dec) == len(channels) - 1
            dec.append(nn.ConvTranspose2d(ch, out, 4, 2, 1) if last else nn.Sequential(
                nn.ConvTranspose2d(ch, out, 4, 2, 1), nn.BatchNorm2d(out), nn.ReLU()))
            ch = out
        self.blocks = nn.ModuleList(dec)
        # KL warm-up counts training batches here: the count is saved with the weights, so resume is exact
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B, C, H, W] in [0, 1] -> (mu, log sigma^2), each [B, Z]."""
        x = pad_to_multiple(pixels * 2 - 1, self.multiple, -1.0)  # padding is black
        return self.to_stats(self.encoder(x)).chunk(2, dim=1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, Z] -> per-pixel logits [B, C, H, W] (Bernoulli) or pre-sigmoid means (Gaussian)."""
        x = self.project(z).view(len(z), *self.grid)  # [B, ch, H/2^s, W/2^s]
        for block in self.blocks:
            x = block(x)  # doubles H and W
        return x[:, :, : self.in_shape[1], : self.in_shape[2]]  # crop the padding

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> pixels in [0, 1] (the likelihood's mean)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder logits of a reparameterized draw, mu, log sigma^2)."""
        mu, logvar = self.encode(pixels)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterization: gradients reach mu and sigma
        return self.decode_logits(z), mu, logvar

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self.train_batches.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images from the prior, pixels [n, C, H, W] in [0, 1]."""
        return self.decode(self.latents(n, generator))

    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images -> their reconstructions from the posterior mean, pixels in [0, 1]."""
        return self.decode(self.encode(pixels)[0])
