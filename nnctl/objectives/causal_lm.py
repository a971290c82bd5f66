"""Causal language-model fine-tuning: next-token cross entropy on the labelled tokens; loss and perplexity."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.metrics import Averages
from nnctl.objectives import Objective

IGNORE = -100


class CausalLM(Objective):
    """Batches are dicts of input_ids / attention_mask / labels [B, T]; label -100 carries no loss."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["input_ids"])

    def _loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over labelled tokens, number of labelled tokens), both on the device."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # position t predicts token t+1
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, (labels != IGNORE).sum()

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, tokens = self._loss_sum(model, batch)
        return loss / tokens.clamp_min(1), {}

    def eval_update(self, model: nn.Module, batch: dict[str, torch.Tensor], metrics: Averages, tta: object) -> None:
        loss, tokens = self._loss_sum(model, batch)
        metrics.add(int(tokens), {"loss": loss})  # token-weighted: the split's mean loss per token

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        if "loss" in means:
            means["ppl"] = math.exp(min(means["loss"], 50.0))
        return means
