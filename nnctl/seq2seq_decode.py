"""Decode one text with a trained sequence-to-sequence model, using the vocabulary stored in its checkpoint."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from nnctl.data.tensors import Tokenizer
from nnctl.errors import UserError


def decode_text(model: nn.Module, data_state: dict[str, Any], text: str, beam: int = 1, max_len: int = 64) -> str:
    """`text` -> the model's output text: tokenized with the checkpoint's vocabulary (its data state), decoded
    greedily (beam=1) or by beam search, and detokenized (special tokens dropped). A character outside the
    vocabulary is a user error naming it and its position."""
    if beam < 1:
        raise UserError(f"got {beam}; expected an integer >= 1 (1 = greedy)", key="beam")
    tokenizer = Tokenizer.from_state(data_state["tokenizer"])
    if tokenizer.unk is None and tokenizer.kind == "char":
        for i, c in enumerate(text):
            if c not in tokenizer.ids:
                raise UserError(f"character {c!r} at position {i} is not in the model's vocabulary "
                                f"({''.join(tokenizer.symbols)!r})", key="input")
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the input is empty; pass some text", key="input")
    device = next(model.parameters()).device
    src = torch.tensor([ids], dtype=torch.int64, device=device)  # [1, S]
    mask = torch.ones_like(src, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        out = model.greedy_decode(src, mask, max_len) if beam == 1 else model.beam_decode(src, mask, beam, max_len)
    finally:
        model.train(was_training)
    ids = out[0].tolist()
    eos = tokenizer.specials.index("<eos>") if "<eos>" in tokenizer.specials else None
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
