"""Offline sample quality: Frechet distance and KID between generated and test images, in the feature space of a
classifier trained by nnctl on the same data (not Inception: no download), and that classifier's accuracy on
class-conditional samples. Computed with torchmetrics (imported here only: it takes seconds)."""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from nnctl.errors import UserError
from nnctl.images import Pixels

log = logging.getLogger(__name__)
KEY = "eval.feature_ckpt"


class ClassifierFeatures(nn.Module):
    """Pixels in [0, 1] -> the classifier's penultimate features (the input of its last linear layer)."""

    def __init__(self, classifier: nn.Module, pixels: Pixels) -> None:
        super().__init__()
        self.classifier, self.pixels = classifier.eval(), pixels
        heads = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise UserError("the feature checkpoint's model has no linear classifier head; pass a checkpoint of "
                            "model=cnn, mlp or resnet", key=KEY)
        self.num_features = heads[-1].in_features
        self._features: torch.Tensor | None = None
        heads[-1].register_forward_hook(lambda module, inputs, output: setattr(self, "_features", inputs[0]))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pixels.normalize(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.logits(pixels)
        return self._features.flatten(1).double()  # [B, F]


def load_classifier(path: str, spec: dict[str, Any], device: torch.device) -> ClassifierFeatures:
    """The nnctl classifier in `path`, checked to be trained on data like the generator's (same image shape and
    classes), normalizing pixels as its own training data did."""
    from hydra.utils import instantiate

    from nnctl import checkpoint as ck
    from nnctl.run_state import load_weights
    from nnctl.spec import complete

    state = ck.load_checkpoint(ck.resolve_checkpoint(path, key=KEY), key=KEY)
    cfg = OmegaConf.create(state[ck.CONFIG])
    data = instantiate(cfg.data).setup(torch.device("cpu"))
    theirs = data.spec
    if theirs.get("target") != "class" or "classes" not in theirs:
        raise UserError(f"{path} is not an image classifier; train one with nnctl train on the same data (e.g. "
                        "experiment=fashion_mnist_cnn)", key=KEY)
    for name in ("in_shape", "classes"):
        if list(theirs[name]) != list(spec[name]):
            raise UserError(f"{path} was trained on other data ({name} {list(theirs[name])} vs the generator's "
                            f"{list(spec[name])}); pass a classifier trained on the generator's dataset", key=KEY)
    net = complete(instantiate(cfg.model), theirs, "model")
    load_weights(net, state[ck.MODEL])
    return ClassifierFeatures(net.to(device), Pixels(theirs["pixel_mean"], theirs["pixel_std"])).to(device)


@torch.no_grad()
def scores(model: nn.Module, data: Any, spec: dict[str, Any], feature_ckpt: str, num_samples: int, seed: int,
           device: torch.device, batch: int = 250, **sample_options: Any) -> dict[str, float]:
    """FD and KID (classifier features) between `num_samples` generated and as many test images; for a
    class-conditional model also the classifier's accuracy on samples of each requested class."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = load_classifier(feature_ckpt, spec, device)
    pixels = Pixels(spec["pixel_mean"], spec["pixel_std"])
    real, have = [], 0
    for x, _ in data.eval_batches("test"):
        real.append(pixels(x[: num_samples - have].to(device)))
        have += len(real[-1])
        if have >= num_samples:
            break
    n = have  # as many generated as real images
    fd = FrechetInceptionDistance(feature=features, normalize=True).to(device)
    with warnings.catch_warnings():  # "will save all extracted features": by design, n is what the user asked for
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(100, n)).to(device)
    for images in real:
        fd.update(images, real=True)
        kid.update(images, real=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    conditional = bool(getattr(model, "conditional", False))
    correct = 0
    for start in range(0, n, batch):
        k = min(batch, n - start)
        labels = (torch.arange(start, start + k, device=device) % len(spec["classes"])) if conditional else None
        images = model.sample(k, gen, labels, **sample_options)
        fd.update(images, real=False)
        kid.update(images, real=False)
        if conditional:
            correct += int((features.logits(images).argmax(1) == labels).sum())
    kid_mean, kid_std = kid.compute()
    out = {"fd_classifier": float(fd.compute()), "kid_classifier": float(kid_mean),
           "kid_classifier_std": float(kid_std), "quality_samples": n}
    if conditional:
        out["class_acc_of_samples"] = correct / n
    log.info("quality on %d samples (nnctl classifier features from %s): %s", n, feature_ckpt, out)
    return out
