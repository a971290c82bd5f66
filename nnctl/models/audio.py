"""Audio classifiers: the log-mel front end (nnctl.audio.LogMel) in front of an image backbone (cnn, resnet, ...).

The front end is part of the model, so a checkpoint maps a waveform to a prediction with nothing else to rebuild;
its settings come from the data's spec (`frontend`), SpecAugment's from the model config (training mode only)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from nnctl.audio import frontend as build_frontend
from nnctl.spec import complete


class AudioClassifier(nn.Module):
    def __init__(self, backbone: Callable[..., nn.Module], frontend: dict[str, Any], num_samples: int,
                 num_classes: int, spec_augment: dict[str, int] | None = None) -> None:
        super().__init__()
        self.frontend = build_frontend(frontend, **dict(spec_augment or {}))
        in_shape = (1, int(frontend["n_mels"]), self.frontend.frames(num_samples))  # one log-mel image per clip
        self.backbone = complete(backbone, {"in_shape": in_shape, "num_classes": num_classes}, "model.backbone")

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.frontend(wave))  # [B, samples] -> [B, 1, n_mels, frames] -> [B, num_classes]
