"""Sequence to sequence: token cross entropy under teacher forcing, exact match of greedy decoding on evaluation.

A batch is (src [B, S], src_mask [B, S], tgt [B, T]) with tgt = <bos> target <eos> <pad>...; the model reads
tgt[:, :-1] and predicts tgt[:, 1:], padding ignored. Metrics: `loss` (per target token), `token_acc` (teacher
forced, per target token) and, on evaluation, `acc`: the share of sequences whose greedy decoding equals the target
exactly (up to and including <eos>).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.metrics import Averages
from nnctl.objectives import Objective, unwrap

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Seq2Seq(Objective):
    monitor = ("val/acc", "max")  # exact match of greedy decoding
    def __init__(self, pad_id: int, label_smoothing: float = 0.0) -> None:
        self.pad_id, self.label_smoothing = pad_id, label_smoothing

    def count(self, batch: Batch) -> int:
        return len(batch[0])

    def _teacher_forced(self, model: nn.Module, batch: Batch, smoothing: float) -> tuple[torch.Tensor, dict]:
        src, src_mask, tgt = batch
        logits = model(src, src_mask, tgt[:, :-1])  # [B, T-1, V]
        target = tgt[:, 1:]  # [B, T-1]
        loss = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=self.pad_id,
                               label_smoothing=smoothing)
        real = target != self.pad_id
        # per-token counts: summarize divides them (they are per-sample means of per-batch sums, ratio unchanged)
        return loss, {"correct_tokens": ((logits.argmax(-1) == target) & real).sum(), "tokens": real.sum()}

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._teacher_forced(model, batch, self.label_smoothing)

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        src, src_mask, tgt = batch
        loss, sums = self._teacher_forced(model, batch, 0.0)
        target = tgt[:, 1:]  # [B, T-1]
        decoded = unwrap(model).greedy_decode(src, src_mask, max_len=target.shape[1])  # [B, <= T-1]
        decoded = F.pad(decoded, (0, target.shape[1] - decoded.shape[1]), value=self.pad_id)  # [B, T-1]
        metrics.add(len(src), {"loss": loss * len(src), "acc": (decoded == target).all(1).sum(), **sums})

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        out = {k: v for k, v in means.items() if k not in ("correct_tokens", "tokens")}
        if means.get("tokens"):
            out["token_acc"] = means["correct_tokens"] / means["tokens"]
        return out

    def after_validation(self, model: nn.Module, data: Any, epoch: int, run_dir: Path, tb: Any, step: int) -> None:
        """A few validation sources with their greedy decodings, as TensorBoard text."""
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is None:
            return
        src, src_mask, tgt = next(data.eval_batches("val", 1))
        was_training = model.training
        model.eval()
        decoded = model.greedy_decode(src[:4], src_mask[:4], max_len=tgt.shape[1] - 1)
        model.train(was_training)
        lines = [f"{tokenizer.decode(s.tolist())} -> {tokenizer.decode(d.tolist())} "
                 f"(target {tokenizer.decode(t.tolist())})" for s, d, t in zip(src, decoded, tgt)]
        tb.text("val/samples", "\n\n".join(lines), step)
