"""Running averages kept on the device: the step loop adds tensors, only `means()` waits for the device."""
from __future__ import annotations

import torch


class Averages:
    """Sample-weighted averages of named values. `add` takes sums over `n` samples, e.g. a batch's summed loss.

    The state is a dict of tensors and one int, so it can live inside a checkpoint (mid-epoch resume).
    """

    def __init__(self, state: dict[str, torch.Tensor | int] | None = None) -> None:
        self.sums: dict[str, torch.Tensor | int] = dict(state or {})

    def add(self, n: int, sums: dict[str, torch.Tensor]) -> None:
        for name, value in sums.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.sums["_n"] = int(self.sums.get("_n", 0)) + n

    def add_means(self, n: int, loss: torch.Tensor, means: dict[str, torch.Tensor]) -> None:
        """Add a batch of `n` samples given its mean loss and other per-sample means."""
        self.add(n, {"loss": loss * n, **{k: v * n for k, v in means.items()}})

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(1, int(self.sums.get("_n", 0)))
        return {f"{prefix}{k}": float(v) / n for k, v in self.sums.items() if k != "_n"}

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return self.sums
