"""Objectives of generative image models: a GAN's adversarial updates, a VAE's ELBO and diffusion's denoising loss.

Each sees the data module's normalized image batches as pixels (nnctl.images.Pixels) and writes an image grid from
a fixed noise seed after every validation (TensorBoard and <run dir>/samples/epoch_NNN.png), so grids of different
epochs show the same latents.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.images import IMAGE_ORIGINS, Pixels, as_drawn, grid, save_png
from nnctl.metrics import Averages
from nnctl.objectives import Objective, Step, unwrap

Batch = tuple[torch.Tensor, torch.Tensor]
GRID_SEED = 1234  # the validation grids' noise: the same latents every epoch, so grids compare across epochs


def _eval_seed(y: torch.Tensor) -> int:
    """Noise for an evaluation batch depends only on the batch, so `nnctl eval` reproduces training's validation
    numbers and evaluation never draws from the training RNG stream."""
    return len(y) * 1_000_003 + int(y.sum())


def _eval_generator(y: torch.Tensor) -> torch.Generator:
    return torch.Generator(device=y.device).manual_seed(_eval_seed(y))


@contextlib.contextmanager
def _seeded(y: torch.Tensor) -> Iterator[None]:
    """The global RNG seeded for an evaluation batch (for draws inside a model), restored afterwards."""
    with torch.random.fork_rng(devices=[y.device] if y.device.type == "cuda" else []):
        torch.manual_seed(_eval_seed(y))
        yield


class Generative(Objective):
    """Shared by the generative objectives: pixels from batches, and the after-validation grid, drawn the way the
    data's images are (`image_origin` from the data's spec: log-mel spectrograms with low frequencies at the
    bottom), so it shows what `nnctl sample` writes."""

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], grid_samples: int = 64,
                 image_origin: str = "upper") -> None:
        if image_origin not in IMAGE_ORIGINS:
            raise ValueError(f"image_origin {image_origin!r}: expected one of {', '.join(IMAGE_ORIGINS)}")
        self.pixels, self.grid_samples, self.image_origin = Pixels(pixel_mean, pixel_std), grid_samples, image_origin

    def count(self, batch: Batch) -> int:
        return len(batch[1])

    def after_validation(self, model: nn.Module, data: Any, epoch: int, run_dir: Path, tb: Any, step: int) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        images = model.sample(self.grid_samples, torch.Generator(device=device).manual_seed(GRID_SEED))
        model.train(was_training)
        from nnctl.distributed import current

        if not current().main:  # every rank samples (a sharded model needs them all); rank 0 writes
            return
        path = Path(run_dir) / "samples" / f"epoch_{epoch:03d}.png"
        save_png(grid(as_drawn(images, self.image_origin), class_columns(model)), path)
        tb.images("samples", path, step)  # the PNG as written: every tracker shows the same pixels


def class_columns(model: nn.Module) -> int | None:
    """Images per grid row for samples that cycle through the classes (a conditional model's default): one column
    per class, so each column shows one class. None (a square grid) for unconditional models."""
    return model.num_classes if getattr(model, "conditional", False) else None


class GANObjective(Generative):
    """Non-saturating GAN loss: the discriminator `d_steps_per_g_step` times, then the generator, per batch.

    One-sided label smoothing (`label_smoothing` > 0) trains the discriminator towards 1 - s on real images.
    best.pt holds the latest weights: adversarial losses do not rank generators (a low discriminator loss can mean
    a failing generator); `nnctl eval eval.feature_ckpt=...` judges samples."""

    monitor = ("latest", "max")  # trainer.checkpoint.monitor=auto (nnctl.run_state.LATEST)

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], d_steps_per_g_step: int = 1,
                 label_smoothing: float = 0.0, grid_samples: int = 64, image_origin: str = "upper") -> None:
        super().__init__(pixel_mean, pixel_std, grid_samples, image_origin)
        self.d_steps, self.smoothing = d_steps_per_g_step, label_smoothing

    def optimizer_groups(self, net: nn.Module) -> dict[str, list[nn.Parameter]]:
        gan = unwrap(net)
        return {"discriminator": [p for p in gan.discriminator.parameters() if p.requires_grad],
                "generator": [p for p in gan.generator.parameters() if p.requires_grad]}

    def _losses(self, gan: nn.Module, real: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(discriminator loss, real logits, fake logits) with the fakes detached from the generator."""
        labels = y if gan.conditional else None
        fake = gan.generate(z, labels).detach()
        real_logit, fake_logit = gan.discriminator(real, labels), gan.discriminator(fake, labels)
        # softplus(-l) = -log sigmoid(l); with smoothing s the real target is 1 - s
        loss = ((1 - smoothing) * F.softplus(-real_logit) + smoothing * F.softplus(real_logit)
                + F.softplus(fake_logit)).mean()
        return loss, real_logit, fake_logit

    def training_steps(self, model: nn.Module, batch: Batch) -> Iterator[Step]:
        gan = unwrap(model)
        x, y = batch
        real = self.pixels(x) * 2 - 1  # [B, C, H, W] in [-1, 1]
        for _ in range(self.d_steps):
            loss_d, real_logit, fake_logit = self._losses(gan, real, y, gan.latents(len(y)), self.smoothing)
            yield "discriminator", loss_d, {"d_real": torch.sigmoid(real_logit.detach()).sum(),
                                            "d_fake": torch.sigmoid(fake_logit.detach()).sum()}
        labels = y if gan.conditional else None
        fake = gan.generate(gan.latents(len(y)), labels)
        loss_g = F.softplus(-gan.discriminator(fake, labels)).mean()  # non-saturating: -log D(G(z))
        yield "generator", loss_g, {}

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        gan = unwrap(model)
        x, y = batch
        z = torch.randn(len(y), gan.latent_dim, generator=_eval_generator(y), device=y.device)
        loss_d, real_logit, fake_logit = self._losses(gan, self.pixels(x) * 2 - 1, y, z, 0.0)
        n = len(y)
        # loss: the generator's loss against the current discriminator (lower = its samples pass as real)
        metrics.add(n, {"loss": F.softplus(-fake_logit).sum(), "loss_discriminator": loss_d * n,
                        "d_real": torch.sigmoid(real_logit).sum(), "d_fake": torch.sigmoid(fake_logit).sum()})


class VAEObjective(Generative):
    """Negative ELBO in nats per image: reconstruction (Bernoulli or Gaussian likelihood on pixels in [0, 1])
    + beta * KL(q(z|x) || N(0, I)), beta ramped linearly from 0 over `kl_warmup_steps` training batches.

    Evaluation reports the true bound (beta = 1): `loss` = -ELBO, `elbo`, `rec` and `kl`, all in nats per image."""

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], beta: float = 1.0,
                 kl_warmup_steps: int = 0, sigma: float = 0.1, grid_samples: int = 64,
                 image_origin: str = "upper") -> None:
        super().__init__(pixel_mean, pixel_std, grid_samples, image_origin)
        self.beta, self.warmup, self.sigma = beta, kl_warmup_steps, sigma

    def _terms(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (reconstruction NLL, KL) in nats, each [B]."""
        logits, mu, logvar = model(pixels)  # through DDP's wrapper when there is one: it syncs the gradients
        if unwrap(model).likelihood == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(logits, pixels, reduction="none")
        else:  # Gaussian with fixed sigma around the sigmoid mean
            rec = (0.5 * ((pixels - torch.sigmoid(logits)) / self.sigma) ** 2
                   + math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # [B]
        return rec.flatten(1).sum(1), kl

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        vae = unwrap(model)
        x, _ = batch
        rec, kl = self._terms(model, self.pixels(x))
        vae.train_batches += 1
        # beta ramps with the batch count stored in the model: a resumed run continues the same ramp
        ramp = (vae.train_batches.clamp(max=self.warmup).float() / self.warmup) if self.warmup else 1.0
        loss = (rec + self.beta * ramp * kl).mean()
        return loss, {"rec": rec.detach().sum(), "kl": kl.detach().sum()}

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        x, y = batch
        with _seeded(y):  # the reparameterized draw, reproducibly
            rec, kl = self._terms(model, self.pixels(x))
        metrics.add(len(y), {"loss": (rec + kl).sum(), "rec": rec.sum(), "kl": kl.sum()})

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        if "rec" in means and "kl" in means:
            means = {**means, "elbo": -(means["rec"] + means["kl"])}
        return means


class DiffusionObjective(Generative):
    """Denoising loss: MSE between the U-Net's output and the noise (epsilon-prediction) or the velocity
    (v-prediction) at a uniformly drawn timestep. Conditional models drop the label with probability
    `label_dropout` (the unconditional half of classifier-free guidance). `snr_gamma` weights each timestep by
    min-SNR-gamma (Hang et al. 2023, as diffusers' training scripts): the many nearly clean timesteps, easy and
    pulling against the noisy ones, weigh less, which makes training converge in fewer steps."""

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], label_dropout: float = 0.1,
                 snr_gamma: float | None = None, grid_samples: int = 64, image_origin: str = "upper") -> None:
        super().__init__(pixel_mean, pixel_std, grid_samples, image_origin)
        self.label_dropout, self.snr_gamma = label_dropout, snr_gamma

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None,
              drop: float) -> torch.Tensor:
        """Per-image mean squared error [B]."""
        net = unwrap(model)
        schedule = net.noise_schedule()
        x0 = self.pixels(x) * 2 - 1  # [B, C, H, W] in [-1, 1]
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        t = torch.randint(0, net.timesteps, (len(y),), generator=gen, device=x0.device)
        noisy = schedule.add_noise(x0, noise, t)
        target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(x0, noise, t)
        labels = None
        if net.conditional:
            keep = torch.rand(len(y), generator=gen, device=y.device) >= drop
            labels = torch.where(keep, y, torch.full_like(y, net.num_classes))  # dropped -> the "no label" id
        out = model(noisy, t, labels)
        mse = (out.float() - target).pow(2).flatten(1).mean(1)  # [B]
        return mse if self.snr_gamma is None else mse * self._snr_weight(schedule, t)

    def _snr_weight(self, schedule: Any, t: torch.Tensor) -> torch.Tensor:
        """min(SNR, gamma) / SNR for noise prediction, min(SNR, gamma) / (SNR + 1) for velocity prediction [B]:
        both equal min(SNR, gamma)-weighted MSE on the clean image."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(schedule, t)  # [B]: alpha_bar / (1 - alpha_bar) at each image's timestep
        if schedule.config.prediction_type == "epsilon":
            return (self.snr_gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 where SNR is 0
        return snr.clamp(max=self.snr_gamma) / (snr + 1)

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return self._loss(model, x, y, None, self.label_dropout).mean(), {}

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        x, y = batch
        metrics.add(len(y), {"loss": self._loss(model, x, y, _eval_generator(y), 0.0).sum()})
