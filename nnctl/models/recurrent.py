"""Recurrent sequence models (RNN, LSTM, GRU): stacked, optionally bidirectional, pooled over time to one vector.

Token input (the data offers `vocab_size`) goes through an embedding, real-valued sequences (`num_features`)
through a linear projection. Each layer is its own module in `self.blocks` (dropout between layers), so
trainer.grad_checkpointing can recompute them. Padding is respected: sequences are packed, so the recurrence never
reads padding, and pooling uses only the real positions (last = each sequence's true last step).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nnctl.errors import UserError
from nnctl.models import head_size

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


SEQUENCE_INPUTS = ("tokens", "sequence")


def input_layer(vocab_size: int | None, num_features: int | None, dim: int, pad_id: int = 0,
                input: str = "tokens") -> nn.Module:
    """Embedding for token ids, linear projection for real-valued features: chosen from what the data offers
    (`input` is the spec's kind of input: sequences only)."""
    if input not in SEQUENCE_INPUTS:
        raise UserError(f"this model reads token or real-valued sequences and the data yields {input} input; choose "
                        "data=text_classification or sequence_tasks, or a model for this data", key="model")
    if vocab_size is not None:
        return nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    if num_features is not None:
        return nn.Linear(num_features, dim)
    raise UserError("this model reads token or real-valued sequences (it needs vocab_size or num_features) and the "
                    "data provides neither; choose data=text_classification, sequence_tasks or tabular", key="model")


class Pool(nn.Module):
    """[B, T, D] states + mask [B, T] -> [B, D]: the true last state, the masked mean, or learned attention."""

    MODES = ("last", "mean", "attention")

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise UserError(f"unknown pooling {mode!r}; choose one of {', '.join(self.MODES)}", key="model.pool")
        self.mode = mode
        self.score = nn.Linear(dim, 1) if mode == "attention" else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "last":
            last = mask.sum(1) - 1  # [B]: index of each sequence's last real step
            return h[torch.arange(len(h), device=h.device), last]  # [B, D]
        if self.mode == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            return (h * m).sum(1) / m.sum(1).clamp_min(1)
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # [B, T]
        return (scores.softmax(1).unsqueeze(-1) * h).sum(1)  # [B, T, 1] * [B, T, D] -> [B, D]


class _Layer(nn.Module):
    """One recurrent layer over a packed batch (padding is never read), dropout on its outputs."""

    def __init__(self, cell: str, d_in: int, hidden: int, bidirectional: bool, dropout: float) -> None:
        super().__init__()
        self.rnn = CELLS[cell](d_in, hidden, batch_first=True, bidirectional=bidirectional)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # [B, T, H * directions]
        return self.drop(out)


class Recurrent(nn.Module):
    """Sequence classifier/regressor: input layer -> stacked recurrent layers -> pooling -> linear head."""

    def __init__(self, cell: str, hidden_size: int = 128, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, pool: str = "last", embed_dim: int = 64, vocab_size: int | None = None,
                 num_features: int | None = None, pad_id: int = 0, num_classes: int | None = None,
                 num_outputs: int | None = None, input: str = "tokens") -> None:
        super().__init__()
        if cell not in CELLS:
            raise UserError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}", key="model.cell")
        if bidirectional and pool == "last":  # the backward direction's last step has seen one token only
            raise UserError("pool=last reads the final step, which the backward direction reaches after one token; "
                            "use model.pool=mean or attention with model.bidirectional=true", key="model.pool")
        self.embed = input_layer(vocab_size, num_features, embed_dim, pad_id, input)
        width = hidden_size * (2 if bidirectional else 1)
        dims = [embed_dim] + [width] * (num_layers - 1)
        # dropout between layers, not after the last one (as torch's own num_layers stacking does)
        self.blocks = nn.ModuleList(_Layer(cell, d, hidden_size, bidirectional, dropout if i < num_layers - 1 else 0.0)
                                    for i, d in enumerate(dims))
        self.pool = Pool(pool, width)
        self.head = nn.Linear(width, head_size(num_classes, num_outputs))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).cpu()  # packing wants host lengths
        h = self.embed(x)  # [B, T] ids or [B, T, F] values -> [B, T, E]
        for block in self.blocks:
            h = block(h, lengths)  # [B, T, H * directions]
        return self.head(self.pool(h, mask))  # [B, classes or outputs]

