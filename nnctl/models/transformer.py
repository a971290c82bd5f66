"""Transformer encoder classifier, and the attention blocks the ViT and seq2seq models share.

Pre-norm blocks (x + attn(norm(x)), x + mlp(norm(x))), multi-head attention on
torch.nn.functional.scaled_dot_product_attention; padding masks keep padded keys out of every softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.errors import UserError
from nnctl.models import head_size
from nnctl.models.recurrent import input_layer


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values `context` (x itself for self-attention)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"model.dim={dim} is not divisible by model.heads={heads}", key="model.heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, d/H]
        q, (k, v) = split(self.q(x)), map(split, self.kv(context).chunk(2, dim=-1))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]: True = attend
        if causal:
            s = context.shape[1]
            tri = torch.ones(t, s, dtype=torch.bool, device=x.device).tril()  # [T, S]
            mask = tri if mask is None else mask & tri
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # [B, H, T, d/H] -> [B, T, D]


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention (decoders), MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm_c, self.cross = (nn.LayerNorm(dim), Attention(dim, heads, dropout)) if cross else (None, None)
        hidden = int(dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, None if causal else mask, causal))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm_c(x), memory, memory_mask))
        return x + self.mlp(self.norm2(x))


def sinusoidal(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine position codes [length, dim] (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq[: dim // 2])
    return out


class Positions(nn.Module):
    """Adds position codes to [B, T, D]: learned (a table) or sinusoidal (fixed, a buffer)."""

    KINDS = ("sinusoidal", "learned")

    def __init__(self, kind: str, length: int, dim: int) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise UserError(f"unknown positions {kind!r}; choose one of {', '.join(self.KINDS)}",
                            key="model.positions")
        self.length = length
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(length, dim) * 0.02)
        else:
            self.register_buffer("table", sinusoidal(length, dim), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if offset + x.shape[1] > self.length:
            raise UserError(f"a sequence of {offset + x.shape[1]} positions is longer than the model's "
                            f"{self.length}; raise data.max_len", key="data.max_len")
        return x + self.table[offset: offset + x.shape[1]]


class TransformerEncoder(nn.Module):
    """Token (or feature) embedding + positions -> pre-norm blocks -> final norm -> mean or CLS pooling -> head."""

    POOLS = ("mean", "cls")

    def __init__(self, max_len: int, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, positions: str = "sinusoidal", pool: str = "mean",
                 vocab_size: int | None = None, num_features: int | None = None, pad_id: int = 0,
                 num_classes: int | None = None, num_outputs: int | None = None, input: str = "tokens") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise UserError(f"unknown pooling {pool!r}; choose one of {', '.join(self.POOLS)}", key="model.pool")
        self.pool = pool
        self.embed = input_layer(vocab_size, num_features, dim, pad_id, input)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.positions = Positions(positions, max_len + 1, dim)  # + 1: the CLS token
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, head_size(num_classes, num_outputs))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # [B, T, D]
        if self.cls is not None:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)  # [B, 1 + T, D]
            mask = torch.cat([mask.new_ones(len(h), 1), mask], dim=1)
        h = self.positions(h)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        if self.cls is not None:
            return self.head(h[:, 0])  # the CLS position
        m = mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))  # masked mean over time
