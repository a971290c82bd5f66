"""Language modelling: next-token cross entropy; perplexity and bits per character (or byte) per epoch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.metrics import Averages
from nnctl.objectives import Objective

Batch = tuple[torch.Tensor, torch.Tensor, int]  # inputs [B, T], targets [B, T] (-1 = not scored), scored count
BITS = {"character": "bpc", "byte": "bpb"}  # token unit -> name of the bits-per-unit metric


class LanguageModel(Objective):
    """Per-token cross entropy of next-token logits. Metrics: loss (nats per token), acc (next-token top-1, on
    evaluation), ppl = exp(loss), and bits per token unit = loss / ln 2 (bpc for characters, bpb for bytes)."""

    def __init__(self, vocab_size: int, token_unit: str = "token", sample_tokens: int = 200,
                 sample_temperature: float = 0.8, sample_seed: int = 0) -> None:
        self.vocab_size, self.bits = vocab_size, BITS.get(token_unit, "bits_per_token")
        self.sample_tokens, self.sample_temperature, self.sample_seed = sample_tokens, sample_temperature, sample_seed

    def count(self, batch: Batch) -> int:
        return batch[2]  # tokens scored: the loss is a mean per token

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, _ = batch
        logits = model(x)  # [B, T, vocab]
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1), {}

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        x, y, scored = batch
        logits = model(x).float().view(-1, self.vocab_size)  # [B * T, vocab]
        y = y.reshape(-1)
        metrics.add(scored, {"loss": F.cross_entropy(logits, y, ignore_index=-1, reduction="sum"),
                             "acc": (logits.argmax(1) == y).sum()})  # ignored targets (-1) never match

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        if "loss" not in means:
            return means
        loss = means["loss"]
        return {**means, "ppl": math.exp(min(loss, 80.0)), self.bits: loss / math.log(2)}

    def after_validation(self, model: nn.Module, data: Any, epoch: int, run_dir: Path, tb: Any, step: int) -> None:
        """A text sample from a fixed seed, so epochs compare side by side in TensorBoard's TEXT tab."""
        if self.sample_tokens == 0 or not hasattr(model, "stream"):
            return
        from nnctl.generate import sample_text

        text = sample_text(model, data.tokenizer, None, self.sample_tokens, self.sample_temperature, None, 1.0,
                           self.sample_seed)
        tb.text("sample", "\n".join("    " + line for line in text.splitlines()), step)  # markdown code block
