"""Classification: cross entropy and accuracy, with test-time augmentation for image classifiers.

A batch is (inputs..., labels): (images, labels) for image data, (tokens or values, mask, labels) for sequences;
the model is called with the inputs in that order."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.metrics import Averages
from nnctl.objectives import Objective

Batch = tuple[torch.Tensor, ...]  # (*inputs, labels [B])


def _plain(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return model(*inputs)


def _flip(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Average the logits of each image and its mirror image."""
    return 0.5 * (model(x) + model(x.flip(3)))


def _flip_translate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """airbench's TTA: half on the flip-averaged image, a quarter on each of two opposite 1-px translations."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # [B, C, H+2, W+2]
    up_left, down_right = padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]  # [B, C, H, W] each
    return 0.5 * _flip(model, x) + 0.25 * _flip(model, up_left) + 0.25 * _flip(model, down_right)


TTA_MODES = {"none": _plain, "flip": _flip, "flip_translate": _flip_translate}
TTA_ALIASES = {False: "none", None: "none", True: "flip"}


def tta_mode(name: str | bool | None):  # noqa: ANN201 - returns one of TTA_MODES' functions
    """The TTA function for a config value (true/false are accepted as flip/none)."""
    name = name if isinstance(name, str) else TTA_ALIASES[name]
    if name not in TTA_MODES:
        from nnctl.errors import UserError

        raise UserError(f"unknown test-time augmentation {name!r}; choose one of {', '.join(TTA_MODES)}",
                        key="eval.tta")
    return TTA_MODES[name]


class Classification(Objective):
    monitor = ("val/acc", "max")
    """Cross entropy with optional label smoothing; accuracy (and top-5 accuracy when there are > 5 classes)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def count(self, batch: Batch) -> int:
        return len(batch[-1])

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        *inputs, y = batch
        logits = model(*inputs)  # [B, num_classes]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        # a count (integers carry no graph); count_nonzero is the CPU's fast path for it (a bool sum elsewhere)
        return loss, {"acc": torch.count_nonzero(logits.argmax(dim=1) == y)}

    def predict(self, model: nn.Module, *inputs: torch.Tensor, tta: str | bool | None) -> torch.Tensor:
        """Logits [B, num_classes]; TTA modes other than none take images only (the engine refuses the rest)."""
        return tta_mode(tta)(model, *inputs)

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        *inputs, y = batch
        logits = self.predict(model, *inputs, tta=tta).float()  # [B, num_classes]
        # Unsmoothed cross entropy: evaluation loss stays comparable across label_smoothing settings.
        sums = {"loss": F.cross_entropy(logits, y, reduction="sum"), "acc": (logits.argmax(1) == y).sum()}
        if self.num_classes > 5:
            top5 = logits.topk(5, dim=1).indices  # [B, 5]
            sums["acc_top5"] = (top5 == y[:, None]).any(dim=1).sum()
        metrics.add(len(y), sums)
