"""Denoising diffusion (DDPM, sampled by DDPM or DDIM) on diffusers' UNet2DModel, optionally class-conditional
with classifier-free guidance. Noise schedules and samplers are diffusers' schedulers (imported on first use:
diffusers takes seconds to import). Images are in [-1, 1] inside; the loss lives in nnctl.objectives.generative."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from nnctl.errors import UserError
from nnctl.images import pad_to_multiple, padded_size

# model.schedule -> diffusers' beta_schedule name
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
# model.prediction -> diffusers' prediction_type
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
SAMPLERS = ("ddpm", "ddim")


def _choice(value: str, options: dict[str, str] | tuple[str, ...], key: str) -> str:
    if value not in options:
        raise UserError(f"got {value!r}; choose one of {', '.join(options)}", key=key)
    return options[value] if isinstance(options, dict) else value


class Diffusion(nn.Module):
    objective = "diffusion"  # objective=auto trains this model with the objective registered under this name

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, attention: bool = True, norm_groups: int = 8,
                 timesteps: int = 1000, schedule: str = "linear", prediction: str = "epsilon",
                 conditional: bool = False, sampler: str = "ddim", sample_steps: int = 50,
                 guidance: float = 1.0, guidance_rescale: float = 0.0) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        c, h, w = self.in_shape = tuple(in_shape)
        self.multiple = 2 ** (len(channels) - 1)  # the U-Net halves H and W between its levels
        size = (padded_size(h, self.multiple), padded_size(w, self.multiple))
        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention:  # self-attention at the lowest resolution only: cheap there, and where global shape forms
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes = num_classes if conditional else None
        self.unet = UNet2DModel(
            sample_size=size, in_channels=c, out_channels=c, layers_per_block=layers_per_block,
            block_out_channels=tuple(channels), down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=norm_groups,
            # one extra class id is the "no label" of classifier-free guidance
            num_class_embeds=num_classes + 1 if conditional else None)
        self.schedule_config = {"num_train_timesteps": timesteps,
                                "beta_schedule": _choice(schedule, SCHEDULES, "model.schedule"),
                                "prediction_type": _choice(prediction, PREDICTIONS, "model.prediction")}
        self.sampler, self.sample_steps, self.guidance = _choice(sampler, SAMPLERS, "model.sampler"), sample_steps, \
            guidance
        self.guidance_rescale = guidance_rescale
        self._noise: Any = None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def timesteps(self) -> int:
        return self.schedule_config["num_train_timesteps"]

    def noise_schedule(self) -> Any:
        """The training schedule (a diffusers DDPMScheduler): add_noise, get_velocity."""
        if self._noise is None:
            from diffusers import DDPMScheduler

            self._noise = DDPMScheduler(**self.schedule_config)
        return self._noise

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy images [B, C, H, W] in model space, timesteps [B] (and labels [B]) -> the prediction, same shape."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple, -1.0)  # e.g. 28 -> 32; padding is black
        out = self.unet(x, t, class_labels=labels if self.conditional else None).sample
        return out[:, :, :h, :w]

    def sampler_for(self, sampler: str | None, steps: int | None) -> Any:
        """A fresh diffusers scheduler for sampling with `steps` steps (DDPM: the training schedule's steps)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        sampler = _choice(sampler or self.sampler, SAMPLERS, "sampler")
        steps = steps or (self.sample_steps if sampler == "ddim" else self.timesteps)
        if not 1 <= steps <= self.timesteps:
            raise UserError(f"got {steps}; this model was trained with a {self.timesteps}-step noise schedule, so "
                            f"a sampler can take 1 to {self.timesteps} steps", key="steps")
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        scheduler = cls(**self.schedule_config)
        scheduler.set_timesteps(steps)
        return scheduler

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
               guidance_rescale: float | None = None) -> torch.Tensor:
        """n images [n, C, H, W], pixels in [0, 1]: ancestral DDPM or DDIM from pure noise. A conditional model
        cycles through the classes by default; guidance > 1 is classifier-free guidance (two passes per step),
        `guidance_rescale` in [0, 1] blends in the guided prediction rescaled to the conditional one's spread."""
        scheduler = self.sampler_for(sampler, steps)
        guidance = self.guidance if guidance is None else guidance
        rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
        if not 0.0 <= rescale <= 1.0:
            raise UserError(f"got {rescale}; expected a number from 0 (off) to 1", key="guidance_rescale")
        device = next(self.parameters()).device
        x = torch.randn(n, *self.in_shape, generator=generator, device=device)
        if self.conditional and labels is None:
            labels = torch.arange(n, device=device) % self.num_classes
        unlabeled = torch.full((n,), self.num_classes, device=device) if self.conditional else None
        for t in scheduler.timesteps:
            tt = torch.full((n,), int(t), device=device, dtype=torch.long)
            if self.conditional and guidance != 1.0:
                both = self(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, unlabeled]))  # [2n, ...]
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
                if rescale > 0:  # over-exposure fix of Lin et al. 2024 (diffusers' rescale_noise_cfg), per image
                    dims = tuple(range(1, out.ndim))
                    matched = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                    out = rescale * matched + (1 - rescale) * out
            else:
                out = self(x, tt, labels)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return ((x + 1) / 2).clamp(0, 1)

    def export(self, directory: str) -> None:
        """Write a diffusers DDPMPipeline folder (unet + scheduler) that DDPMPipeline.from_pretrained loads."""
        from diffusers import DDPMPipeline, DDPMScheduler

        if self.conditional:
            raise UserError("a class-conditional model needs class labels, which diffusers' DDPMPipeline does not "
                            "pass; export an unconditional model (model.conditional=false)", key="export")
        DDPMPipeline(unet=self.unet, scheduler=DDPMScheduler(**self.schedule_config)).save_pretrained(directory)
