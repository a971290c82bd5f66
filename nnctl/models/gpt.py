"""GPT: a decoder-only Transformer language model (nanoGPT-style), with a KV cache for generation.

Token + learned positional embeddings, pre-norm blocks (causal self-attention on
`torch.nn.functional.scaled_dot_product_attention`, then an MLP), a final LayerNorm and an output projection tied
to the token embedding. vocab_size and block_size come from the data (see nnctl.spec).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnctl.errors import UserError


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated for the whole context, so each
    new token costs one position of attention instead of a forward pass over the whole context."""

    def __init__(self, n_layer: int, batch: int, n_head: int, block_size: int, head_dim: int,
                 like: torch.Tensor) -> None:
        shape = (n_layer, batch, n_head, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0  # positions filled


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> 3 x [B, n_head, T, head_dim]
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        mask, causal = None, T > 1
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]  # [B, H, start + T, hd]
            if start > 0 and T > 1:  # new queries see the cached past and the new positions up to their own
                seen = torch.arange(start + T, device=x.device)
                mask = seen <= torch.arange(start, start + T, device=x.device)[:, None]  # [T, start + T]
                causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, H, T, hd] -> [B, T, C]
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"n_embd={n_embd} must be a multiple of n_head={n_head} (each head gets "
                            "n_embd / n_head channels)", key="model.n_embd")
        self.block_size, self.n_head, self.n_embd = block_size, n_head, n_embd
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied: one matrix, listed once by parameters() (decayed once)
        self.apply(_init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids [B, T] -> next-token logits [B, T, vocab]. With `cache`, idx continues the cached positions."""
        start = cache.length if cache is not None else 0
        if start + idx.shape[1] > self.block_size:
            raise ValueError(f"{start + idx.shape[1]} positions exceed block_size {self.block_size}")
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))  # [B, T, C]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
               kv_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield `max_new_tokens` next tokens [B] after `prompt` [B, T], each chosen by `pick(logits [B, vocab])`.

        The model sees the tokens from `start` on. When they outgrow block_size, the context slides forward to the
        last block_size // 2 tokens; with the KV cache that slide is one prefill of those tokens, and between
        slides each token costs one position. Both paths follow the same slides, so they pick the same tokens.
        """
        tokens, keep = prompt, max(1, self.block_size // 2)
        start, cache = max(0, prompt.shape[1] - self.block_size), None
        for _ in range(max_new_tokens):
            if not kv_cache:
                logits = self(tokens[:, start:])
            elif cache is None:  # prefill the context once
                cache = KVCache(len(self.blocks), len(tokens), self.n_head, self.block_size,
                                self.n_embd // self.n_head, self.tok.weight)
                logits = self(tokens[:, start:], cache)
            else:  # one new position
                logits = self(tokens[:, -1:], cache)
            nxt = pick(logits[:, -1])  # [B]
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            yield nxt
            if tokens.shape[1] - start > self.block_size:
                start, cache = tokens.shape[1] - keep, None


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
