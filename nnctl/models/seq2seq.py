"""Encoder-decoder models for sequence-to-sequence tasks, with greedy and beam decoding.

Two architectures share one interface: `encode(src, src_mask) -> memory` (a tuple of batch-first tensors) and
`decode(tgt_in, memory, src_mask) -> logits [B, T, V]` over a whole (teacher-forced) target prefix.
`forward(src, src_mask, tgt_in)` trains with teacher forcing; `greedy_decode` and `beam_decode` generate from <bos>
and return token ids after it, <eos> included, <pad> after it.

- `TransformerSeq2Seq`: pre-norm encoder blocks; decoder blocks with causal self-attention and cross-attention.
- `LSTMSeq2Seq`: LSTM encoder whose final state starts an LSTM decoder, with Luong (general) attention over the
  encoder outputs after the decoder's recurrence, so teacher forcing runs in one pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nnctl.models.transformer import Block, Positions

Memory = tuple[torch.Tensor, ...]


class Decoding(nn.Module):
    """Greedy and beam search over any `encode`/`decode` pair. Subclasses set pad_id, bos_id, eos_id."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Memory:
        raise NotImplementedError

    def decode(self, tgt_in: torch.Tensor, memory: Memory, src_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)  # [B, T, V]

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> torch.Tensor:
        """The most likely next token at each step: ids [B, <= max_len]."""
        memory = self.encode(src, src_mask)
        seqs = src.new_full((len(src), 1), self.bos_id)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(seqs, memory, src_mask)[:, -1].argmax(-1).masked_fill(done, self.pad_id)  # [B]
            seqs, done = torch.cat([seqs, nxt[:, None]], 1), done | (nxt == self.eos_id)
            if bool(done.all()):
                break
        return seqs[:, 1:]

    @torch.no_grad()
    def beam_decode(self, src: torch.Tensor, src_mask: torch.Tensor, beam: int, max_len: int) -> torch.Tensor:
        """The highest summed log-probability sequence among `beam` kept hypotheses: ids [B, <= max_len].
        Finished hypotheses keep their score (extended by <pad> at no cost); no length normalization."""
        b = len(src)
        memory = tuple(m.repeat_interleave(beam, 0) for m in self.encode(src, src_mask))  # [B * beam, ...]
        mask = src_mask.repeat_interleave(beam, 0)
        seqs = src.new_full((b * beam, 1), self.bos_id)
        scores = torch.full((b, beam), float("-inf"), device=src.device)
        scores[:, 0] = 0.0  # one live hypothesis at the start: the beams would otherwise be copies
        done = torch.zeros(b * beam, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            logp = F.log_softmax(self.decode(seqs, memory, mask)[:, -1].float(), -1)  # [B * beam, V]
            vocab = logp.shape[-1]
            logp[done] = float("-inf")
            logp[done, self.pad_id] = 0.0
            top, index = (scores.view(-1, 1) + logp).view(b, beam * vocab).topk(beam, dim=1)  # [B, beam]
            origin = (torch.arange(b, device=src.device)[:, None] * beam + index // vocab).view(-1)  # [B * beam]
            token = (index % vocab).view(-1)
            seqs, scores = torch.cat([seqs[origin], token[:, None]], 1), top
            done = done[origin] | (token == self.eos_id)
            if bool(done.all()):
                break
        best = scores.argmax(1)  # [B]
        return seqs.view(b, beam, -1)[torch.arange(b, device=src.device), best, 1:]


class _Stack(nn.Module):
    """A stack of transformer blocks (in `blocks`, for grad checkpointing) and its final norm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, cross: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


class TransformerSeq2Seq(Decoding):
    def __init__(self, vocab_size: int, max_len: int, pad_id: int, bos_id: int, eos_id: int, dim: int = 64,
                 depth: int = 2, decoder_depth: int | None = None, heads: int = 4, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, positions: str = "sinusoidal") -> None:
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)  # shared by source and target
        self.scale = dim ** 0.5
        self.positions = Positions(positions, max_len, dim)
        self.encoder = _Stack(dim, depth, heads, mlp_ratio, dropout, cross=False)
        self.decoder = _Stack(dim, decoder_depth or depth, heads, mlp_ratio, dropout, cross=True)
        self.head = nn.Linear(dim, vocab_size)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Memory:
        h = self.positions(self.embed(src) * self.scale)  # [B, S, D]
        for block in self.encoder.blocks:
            h = block(h, src_mask)
        return (self.encoder.norm(h),)

    def decode(self, tgt_in: torch.Tensor, memory: Memory, src_mask: torch.Tensor) -> torch.Tensor:
        h = self.positions(self.embed(tgt_in) * self.scale)  # [B, T, D]
        for block in self.decoder.blocks:
            h = block(h, memory=memory[0], memory_mask=src_mask, causal=True)
        return self.head(self.decoder.norm(h))  # [B, T, V]


class LSTMSeq2Seq(Decoding):
    def __init__(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, embed_dim: int = 64,
                 hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        between = dropout if num_layers > 1 else 0.0
        self.encoder = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True, dropout=between)
        self.decoder = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True, dropout=between)
        self.score = nn.Linear(hidden_size, hidden_size, bias=False)  # Luong "general": h_dec W h_enc
        self.combine = nn.Linear(2 * hidden_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Memory:
        lengths = src_mask.sum(1).cpu()
        packed = pack_padded_sequence(self.drop(self.embed(src)), lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # [B, S, H]
        return out, h.transpose(0, 1), c.transpose(0, 1)  # states [layers, B, H] -> [B, layers, H]: batch-first

    def decode(self, tgt_in: torch.Tensor, memory: Memory, src_mask: torch.Tensor) -> torch.Tensor:
        enc, h, c = memory
        state = (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous())  # back to [layers, B, H]
        dec, _ = self.decoder(self.drop(self.embed(tgt_in)), state)  # [B, T, H]
        scores = dec @ self.score(enc).transpose(1, 2)  # [B, T, H] @ [B, H, S] -> [B, T, S]
        weights = scores.masked_fill(~src_mask[:, None, :], float("-inf")).softmax(-1)
        context = weights @ enc  # [B, T, S] @ [B, S, H] -> [B, T, H]
        return self.head(self.drop(torch.tanh(self.combine(torch.cat([context, dec], -1)))))  # [B, T, V]
