"""Regression: mean squared error on standardized targets; MSE, MAE and R^2 reported in the target's own units.

The data standardizes targets with the training split's mean and std per output (`target_mean`, `target_std` in
its spec), which keeps the loss well scaled whatever the units. `loss` is that standardized MSE; `mse`, `mae` and
`r2` are in the original units: errors are scaled back by the std before they are summed. R^2 = 1 - SSE / SST, with
SST around the split's own mean (from the sums of y and y^2) and pooled over outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.metrics import Averages
from nnctl.objectives import Objective

Batch = tuple[torch.Tensor, ...]  # (*inputs, targets [B, outputs] standardized)


class Regression(Objective):
    def __init__(self, target_mean: Sequence[float], target_std: Sequence[float]) -> None:
        self.std = torch.tensor(list(target_std), dtype=torch.float32)  # [outputs]
        self.outputs = len(self.std)

    def count(self, batch: Batch) -> int:
        return len(batch[-1])

    def _sums(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch sums in target units: squared and absolute errors, y^2 and y per output (y relative to the
        training mean: small numbers, so the SST computed from them keeps its float32 precision)."""
        std = self.std.to(pred.device)
        err, centered = (pred.detach().float() - y) * std, y * std  # [B, outputs]
        sums = {"sse": err.square().sum(), "sae": err.abs().sum(), "syy": centered.square().sum()}
        return {**sums, **{f"sy{o}": s for o, s in enumerate(centered.sum(0).unbind())}}

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        *inputs, y = batch
        pred = model(*inputs)  # [B, outputs]
        return F.mse_loss(pred, y), self._sums(pred, y)

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        *inputs, y = batch
        pred = model(*inputs).float()  # [B, outputs]
        metrics.add(len(y), {"loss": F.mse_loss(pred, y, reduction="sum") / self.outputs, **self._sums(pred, y)})

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Per-sample means of the sums -> loss, mse, mae, r2 (errors per output value)."""
        helpers = {"sse", "sae", "syy", *(f"sy{o}" for o in range(self.outputs))}
        out = {k: v for k, v in means.items() if k not in helpers}
        if "sse" not in means:
            return out
        k = self.outputs
        mse, mae = means["sse"] / k, means["sae"] / k
        variance = (means["syy"] - sum(means[f"sy{o}"] ** 2 for o in range(k))) / k  # SST / (n k), pooled
        out.update(mse=mse, mae=mae, r2=1.0 - mse / variance if variance > 0 else float("nan"))
        return out
