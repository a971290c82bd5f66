"""Components for multi-process tests that worker processes import by `_target_` (tests/ is on their path)."""
from __future__ import annotations

import os
from typing import Any, Iterator

from nnctl.data.vision import Digits


class CrashingDigits(Digits):
    """Digits whose rank-1 process raises at its third training batch, while rank 0 waits in a collective."""

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        for i, batch in enumerate(super().train_batches(epoch, seed, start, stop)):
            if os.environ.get("RANK") == "1" and i == 2:
                raise RuntimeError("rank 1 crashed on purpose")
            yield batch
