"""Components for multi-process tests that worker processes import by `_target_` (tests/ is on their path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from nnctl.data.vision import Digits
from nnctl.objectives.generative import GANObjective


class CrashingDigits(Digits):
    """Digits whose rank-1 process raises at its third training batch, while rank 0 waits in a collective."""

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        for i, batch in enumerate(super().train_batches(epoch, seed, start, stop)):
            if os.environ.get("RANK") == "1" and i == 2:
                raise RuntimeError("rank 1 crashed on purpose")
            yield batch


class RankWeightsGAN(GANObjective):
    """A GAN objective that, after each validation, saves this rank's weights and buffers as rank<R>.pt in the run
    dir (instead of the sample grid): whether the ranks stayed in step."""

    def after_validation(self, model: nn.Module, data: Any, epoch: int, run_dir: Path, tb: Any, step: int) -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, Path(run_dir) / f"rank{os.environ.get('RANK', '0')}.pt")
