"""`nnctl sample`: images from a generative checkpoint (grids, single PNGs, latent interpolations, VAE
reconstructions, diffusers export), and the quality scores `nnctl eval eval.feature_ckpt=...` adds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError
from nnctl.images import Pixels, as_drawn, grid, save_png

INTERPOLATION_STEPS = 8  # images per interpolation row


def load_generator(cfg: DictConfig) -> Any:
    """An Engine rebuilt from the checkpoint's stored config, holding its evaluation weights (the EMA when on)."""
    from hydra.core.hydra_config import HydraConfig

    from nnctl import checkpoint as ck
    from nnctl.engine import Engine

    path = ck.resolve_checkpoint(cfg.ckpt, prefer=ck.BEST)
    state = ck.load_checkpoint(path)
    run_cfg = OmegaConf.create(state[ck.CONFIG])
    run_cfg.trainer.device, run_cfg.trainer.progress = cfg.device, False
    engine = Engine(run_cfg, Path(HydraConfig.get().runtime.output_dir))
    if not hasattr(engine.eval_net, "sample"):
        raise UserError(f"{path} holds a {type(engine.eval_net).__name__}, which does not generate images; pass a "
                        "checkpoint of model=gan, vae or diffusion", key="ckpt")
    engine.load_state_dict(state, full=False)
    engine.eval_net.eval()
    return engine


def sample_options(model: nn.Module, cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """The sampler settings given on the command line (`prefix`: where they live in the command's config),
    refused by models whose `sample` does not take them."""
    from nnctl.spec import accepted

    given = {k: cfg[k] for k in ("sampler", "steps", "guidance", "guidance_rescale") if cfg.get(k) is not None}
    names, _ = accepted(model.sample)
    for key in given:
        if names is not None and key not in names:
            raise UserError(f"a {type(model).__name__} has no {key} setting (only diffusion models do); drop it",
                            key=prefix + key)
    return given


def labels_for(model: nn.Module, cfg: DictConfig, n: int, device: torch.device) -> torch.Tensor | None:
    label = cfg.get("class_label")
    if label is None:
        return None
    if not getattr(model, "conditional", False):
        raise UserError("this model was trained without class labels; drop class_label or train with "
                        "model.conditional=true", key="class_label")
    if not isinstance(label, int) or not 0 <= label < model.num_classes:
        raise UserError(f"got {label!r}; this model knows classes 0 to {model.num_classes - 1}", key="class_label")
    return torch.full((n,), label, device=device, dtype=torch.long)


def _interpolate(model: nn.Module, n: int, gen: torch.Generator, labels: torch.Tensor | None) -> torch.Tensor:
    """Rows of INTERPOLATION_STEPS images on straight lines between pairs of latents."""
    if not hasattr(model, "decode"):
        raise UserError(f"a {type(model).__name__} has no latent space to walk; mode=interpolate is for GANs and "
                        "VAEs", key="mode")
    rows = max(1, n // INTERPOLATION_STEPS)
    ends = model.latents(2 * rows, gen).view(rows, 2, -1)  # [rows, 2, Z]
    w = torch.linspace(0, 1, INTERPOLATION_STEPS, device=ends.device).view(1, -1, 1)  # [1, S, 1]
    z = ((1 - w) * ends[:, :1] + w * ends[:, 1:]).flatten(0, 1)  # [rows * S, Z]
    if getattr(model, "conditional", False) and labels is None:  # one class per row
        labels = (torch.arange(rows, device=z.device) % model.num_classes).repeat_interleave(INTERPOLATION_STEPS)
    elif labels is not None:
        labels = labels[:1].expand(len(z))
    return model.decode(z, labels)


def _reconstruct(engine: Any, n: int) -> torch.Tensor:
    """Test images and their reconstructions, interleaved: [x0, r0, x1, r1, ...]."""
    model = engine.eval_net
    if not hasattr(model, "reconstruct"):
        raise UserError(f"a {type(model).__name__} does not reconstruct images; mode=reconstruct is for VAEs",
                        key="mode")
    pixels = Pixels(engine.spec["pixel_mean"], engine.spec["pixel_std"])
    x = pixels(next(iter(engine.data.eval_batches("test")))[0][:n].to(engine.device))
    return torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)  # [2n, C, H, W]


MODES = ("sample", "interpolate", "reconstruct")


@torch.no_grad()
def sample(cfg: DictConfig) -> dict[str, Any]:
    from nnctl.reporting import console

    if cfg.mode not in MODES:
        raise UserError(f"got {cfg.mode!r}; choose one of {', '.join(MODES)}", key="mode")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise UserError(f"got {cfg.num_samples!r}; expected an integer >= 1", key="num_samples")
    engine = load_generator(cfg)
    model, n, device = engine.eval_net, cfg.num_samples, engine.device
    if cfg.export:
        if not hasattr(model, "export"):
            raise UserError(f"a {type(model).__name__} cannot be exported as a diffusers pipeline; export is for "
                            "diffusion models", key="export")
        model.export(str(cfg.export))
        console.print(f"nnctl sample: wrote a diffusers DDPMPipeline to {cfg.export}")
        return {"export": str(cfg.export)}
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    labels = labels_for(model, cfg, n, device)
    cycling = cfg.mode == "sample" and labels is None  # a conditional model's samples cycle through the classes
    options = sample_options(model, cfg)
    if cfg.mode == "sample":
        images = model.sample(n, gen, labels, **options)
    elif cfg.mode == "interpolate":
        images = _interpolate(model, n, gen, labels)
    else:
        images = _reconstruct(engine, n)
    audio = "frontend" in engine.spec and cfg.mode == "sample"  # log-mel images of a data=audio_* logmel run
    if audio:
        from nnctl.audio import write_clips

        if labels is None and getattr(model, "conditional", False):  # the classes model.sample cycled through
            labels = torch.arange(n, device=device) % model.num_classes
        wav_dir = Path(cfg.get("wav_dir") or Path(cfg.out).with_suffix(""))
        write_clips(images, engine.spec, labels, wav_dir, int(cfg.get("griffin_lim_iters", 32)), int(cfg.seed))
        console.print(f"nnctl sample: wrote {len(images)} .wav file(s) to {wav_dir}")
    images = as_drawn(images, engine.spec.get("image_origin", "upper"))  # as the data draws them (spectrograms)
    if cfg.out_dir:
        for i, image in enumerate(images):
            save_png(image, Path(cfg.out_dir) / f"{i:04d}.png")
        where = str(cfg.out_dir)
    else:
        from nnctl.objectives.generative import class_columns

        nrow = cfg.nrow or (INTERPOLATION_STEPS if cfg.mode == "interpolate" else
                            class_columns(model) if cycling else None)
        if cfg.mode == "reconstruct":
            nrow = 2 * (cfg.nrow or 4)  # pairs side by side
        save_png(grid(images, nrow), Path(cfg.out))
        where = str(cfg.out)
    console.print(f"nnctl sample: wrote {len(images)} image(s) to {where}")
    return {"images": len(images), "out": where, **({"wav_dir": str(wav_dir)} if audio else {})}


def quality(engine: Any, eval_cfg: DictConfig) -> dict[str, float]:
    """FD / KID in an nnctl classifier's features (and its accuracy on conditional samples), for nnctl eval."""
    from nnctl.quality import scores

    model = engine.eval_net
    if not hasattr(model, "sample"):
        raise UserError("quality scores compare generated images with test images; this checkpoint's model does "
                        "not generate images: drop eval.feature_ckpt", key="eval.feature_ckpt")
    n = eval_cfg.get("quality_samples", 1000)
    if not isinstance(n, int) or n < 2:
        raise UserError(f"got {n!r}; expected an integer >= 2", key="eval.quality_samples")
    return scores(model.eval(), engine.data, engine.spec, str(eval_cfg.feature_ckpt), n, 0, engine.device,
                  **sample_options(model, eval_cfg, "eval."))
