"""`nnctl explain ckpt=PATH method=...`: where a trained image classifier looks, drawn over its images (captum).

Methods: Grad-CAM on a convolutional layer (the last Conv2d unless `layer` names another), integrated gradients
from a black image, plain gradient saliency, and occlusion with a black patch. Writes `<method>.png` (each image
next to its heat-map overlay, with true and predicted labels) and `attributions.pt` (the maps as tensors).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from nnctl.errors import UserError


def conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _layer(model: nn.Module, name: str | None) -> nn.Module:
    convs = conv_layers(model)
    if not convs:
        raise UserError(f"gradcam needs a Conv2d layer and this {type(model).__name__} has none; use "
                        "method=saliency, integrated_gradients or occlusion", key="method")
    if name is None:
        return list(convs.values())[-1]  # the last conv: the coarsest, most semantic feature map
    modules = dict(model.named_modules())
    if name not in modules:
        near = difflib.get_close_matches(name, list(convs), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"no module {name!r} in the model{hint}; conv layers: {', '.join(convs)}", key="layer")
    return modules[name]


def _black(data: Any, x: torch.Tensor) -> torch.Tensor:
    """The normalized value of a black image: the reference that 'no evidence' is measured against."""
    return data.normalize.shift.to(x.device).expand_as(x).contiguous()  # [B, C, H, W]


def _gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, data: Any, layer: str | None) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, _layer(model, layer)).attribute(x, target=target, relu_attributions=True)  # [B,1,h,w]
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]  # [B, H, W]


def _integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, data: Any,
                          layer: str | None) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(model).attribute(x, baselines=_black(data, x), target=target, n_steps=32)
    return attr.abs().sum(1)  # [B, H, W]: evidence for or against, summed over channels


def _saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, data: Any, layer: str | None) -> torch.Tensor:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=target, abs=True).sum(1)  # [B, H, W]


def _occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, data: Any, layer: str | None) -> torch.Tensor:
    from captum.attr import Occlusion

    c, h, w = x.shape[1:]
    size = max(2, min(h, w) // 6)  # patch ~1/6 of the image: 4 px on 28x28, 2 px on 8x8
    stride = max(1, size // 2)
    attr = Occlusion(model).attribute(x, target=target, sliding_window_shapes=(c, size, size),
                                      strides=(c, stride, stride), baselines=_black(data, x))
    return attr.sum(1).clamp(min=0)  # [B, H, W]: where covering the image lowers the target's score


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": _gradcam, "integrated_gradients": _integrated_gradients, "saliency": _saliency,
    "occlusion": _occlusion}


def method_fn(name: str) -> Callable[..., torch.Tensor]:
    if name not in METHODS:
        near = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown method {name!r}{hint}; choose one of {', '.join(METHODS)}", key="method")
    return METHODS[name]


def targets(spec: Any, labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class each map explains: the prediction, the true label, or one class index for all images."""
    if spec == "predicted":
        return predicted
    if spec == "true" or spec is True:  # `target=true` on the command line arrives as YAML's boolean
        return labels
    if isinstance(spec, int) and not isinstance(spec, bool) and 0 <= spec < num_classes:
        return torch.full_like(labels, spec)
    raise UserError(f"got {spec!r}; expected predicted, true or a class index 0..{num_classes - 1}", key="target")


def attribute(engine: Any, method: str, images: torch.Tensor, target: torch.Tensor, layer: str | None) -> torch.Tensor:
    """Attribution maps [B, H, W] of `images` for `target` with the engine's evaluation weights."""
    model = engine.ema.module if engine.ema is not None else engine.net
    model.eval()
    x = images.clone().requires_grad_(True)
    return method_fn(method)(model, x, target, engine.data, layer).detach().float().cpu()


def plot(display: torch.Tensor, maps: torch.Tensor, labels: list[str], preds: list[str], method: str,
         path: Path) -> Path:
    """Each image, then the same image in gray under its heat map (normalized per image)."""
    from nnctl.plots import grid, save, show

    fig, axes = grid(len(maps), per_item=2)
    for i, (image, heat) in enumerate(zip(display, maps)):
        ax_image, ax_overlay = axes[2 * i], axes[2 * i + 1]
        show(ax_image, image)
        wrong = labels[i] != preds[i]
        ax_image.set_title(f"true: {labels[i]}\npred: {preds[i]}", fontsize=8, color="firebrick" if wrong else "black")
        show(ax_overlay, image.mean(-1, keepdim=True))  # gray under the colours, so the shape stays visible
        scaled = heat / heat.max().clamp(min=1e-12)
        ax_overlay.imshow(scaled.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        ax_overlay.set_title(method.replace("_", " "), fontsize=8)
    return save(fig, path)


def explain(cfg: Any) -> dict[str, Any]:
    from nnctl.commands import load_for_eval
    from nnctl.images import as_drawn
    from nnctl.plots import display_images
    from nnctl.reporting import console

    method_fn(cfg.method)  # an unknown method fails before the checkpoint is read
    engine, _, path, run_dir = load_for_eval(cfg, classifier=True)
    if cfg.method == "gradcam":
        _layer(engine.net, cfg.layer)
    x, y = [], []
    for xb, yb in engine.data.eval_batches(cfg.split):  # the first num_images images of the split
        x.append(xb), y.append(yb)
        if sum(len(b) for b in y) >= cfg.num_images:
            break
    images, labels = torch.cat(x)[: cfg.num_images].float(), torch.cat(y)[: cfg.num_images]
    model = engine.ema.module if engine.ema is not None else engine.net
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    target = targets(cfg.target, labels, predicted, engine.data.num_classes)
    maps = attribute(engine, cfg.method, images, target, cfg.layer)
    classes = [str(c) for c in engine.data.classes]
    display = display_images(engine.data, images)
    maps = as_drawn(maps, engine.spec.get("image_origin", "upper"))  # the same way up as the images under them
    out = plot(display, maps, [classes[i] for i in labels.tolist()], [classes[i] for i in predicted.tolist()],
               cfg.method, run_dir / f"{cfg.method}.png")
    torch.save({"maps": maps, "images": display, "labels": labels.cpu(), "predicted": predicted.cpu(),
                "target": target.cpu()}, run_dir / "attributions.pt")
    console.print(f"nnctl explain: {cfg.method} maps of {len(maps)} {cfg.split} images from {path}: {out}",
                  markup=False)
    return {"png": str(out), "checkpoint": str(path)}
