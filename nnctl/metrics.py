"""Running averages kept on the device: the step loop adds tensors, only `means()` waits for the device."""
from __future__ import annotations

import torch


class Averages:
    """Sample-weighted averages of named values. `add` takes sums over `n` samples, e.g. a batch's summed loss.

    The state is a dict of tensors and one int, so it can live inside a checkpoint (mid-epoch resume).
    """

    def __init__(self, state: dict[str, torch.Tensor | int] | None = None) -> None:
        self.sums: dict[str, torch.Tensor | int] = dict(state or {})

    def add(self, n: int, sums: dict[str, torch.Tensor], means: dict[str, torch.Tensor] | None = None) -> None:
        """Add a batch of `n` samples: `sums` are totals over the batch (e.g. correct predictions), `means` are
        per-sample means (e.g. a mean loss), weighted by `n`. One in-place op per value, on the device."""
        for name, value in sums.items():
            self._total(name, value).add_(value.detach())
        for name, value in (means or {}).items():
            self._total(name, value).add_(value.detach(), alpha=n)
        self.sums["_n"] = int(self.sums.get("_n", 0)) + n

    def _total(self, name: str, like: torch.Tensor) -> torch.Tensor:
        total = self.sums.get(name)
        if total is None:  # float32 everywhere (MPS has no float64); counts stay exact up to 2**24 per epoch
            total = self.sums[name] = torch.zeros((), dtype=torch.float32, device=like.device)
        return total

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(1, int(self.sums.get("_n", 0)))
        return {f"{prefix}{k}": float(v) / n for k, v in self.sums.items() if k != "_n"}

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return self.sums
