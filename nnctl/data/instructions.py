"""Instruction tuning data (`data=instructions`): a JSONL of prompt/response records, tokenized with the model's
tokenizer. The loss covers the response tokens only (labels are -100 on the prompt and on padding).

Batches are dicts of input_ids / attention_mask / labels [B, T] on the device, either `padded` (one record per
row, padded to the longest row of the batch) or `packed` (records concatenated and cut into rows of max_len, no
padding). Batch order depends only on (seed, epoch, batch index), so a resumed run sees the same batches.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator

import torch

from nnctl.data.base import _mix
from nnctl.errors import UserError

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens without loss (cross_entropy's ignore_index)
MODES = ("padded", "packed")


class Instructions:
    name = "instructions"

    def __init__(self, path: str, tokenizer_path: str, batch_size: int, eval_batch_size: int, max_len: int,
                 mode: str, template: str, prompt_field: str, response_field: str, val_fraction: float,
                 test_fraction: float, split_seed: int, limit: int | None = None) -> None:
        if mode not in MODES:
            raise UserError(f"got {mode!r}; expected one of {', '.join(MODES)}", key="data.mode")
        self.path, self.tokenizer_path, self.mode, self.template = path, tokenizer_path, mode, template
        self.batch_size, self.eval_batch_size, self.max_len = batch_size, eval_batch_size, max_len
        self.fields = (prompt_field, response_field)
        self.val_fraction, self.test_fraction, self.split_seed, self.limit = val_fraction, test_fraction, \
            split_seed, limit
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.lengths: dict[str, list[int]] = {}

    # -- loading ------------------------------------------------------------------------------------------------
    def _records(self) -> list[tuple[str, str]]:
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise UserError(f"{p} does not exist; point data.path at a JSONL file of "
                            f"{{\"{self.fields[0]}\": ..., \"{self.fields[1]}\": ...}} records", key="data.path")
        records = []
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append((str(row[self.fields[0]]), str(row[self.fields[1]])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{p}:{n} is not a JSON record with {self.fields[0]!r} and {self.fields[1]!r} "
                                f"({type(exc).__name__}: {exc}); fix the line or set data.prompt_field / "
                                "data.response_field", key="data.path") from None
        if len(records) < 3:
            raise UserError(f"{p} holds {len(records)} record(s); at least 3 are needed for train/val/test",
                            key="data.path")
        return records[: self.limit] if self.limit else records

    def _encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one record: the templated prompt, then the response and end-of-text."""
        head = self.tokenizer(self.template.format(prompt=prompt), add_special_tokens=False)["input_ids"]
        tail = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        ids, labels = (head + tail)[: self.max_len], ([IGNORE] * len(head) + tail)[: self.max_len]
        return ids, labels

    def setup(self, device: torch.device) -> "Instructions":
        if self.splits:
            return self
        from nnctl.models.hf import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        records = self._records()
        perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = max(1, round(len(records) * self.val_fraction))
        n_test = max(1, round(len(records) * self.test_fraction))
        parts = {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
        for split, index in parts.items():
            encoded = [self._encode(*records[i]) for i in sorted(index)]
            rows = _pack(encoded, self.max_len, self.pad_id) if self.mode == "packed" and split == "train" \
                else encoded
            self.lengths[split] = [len(ids) for ids, _ in rows]
            self.splits[split] = {k: v.to(device) for k, v in _pad(rows, self.max_len, self.pad_id).items()}
        if self.num_batches("train") == 0:
            raise UserError(f"{len(parts['train'])} training record(s) make no batch of {self.batch_size}; lower "
                            "data.batch_size", key="data.batch_size")
        log.info("data instructions: %s train rows (%s), %d val, %d test records, vocabulary %d",
                 len(self.lengths["train"]), self.mode, len(parts["val"]), len(parts["test"]), len(self.tokenizer))
        return self

    # -- the data contract ----------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return {"input": "tokens", "target": "causal_lm", "vocab_size": len(self.tokenizer), "pad_id": self.pad_id,
                "max_len": self.max_len}

    def state_dict(self) -> dict[str, Any]:
        """Where the tokenizer comes from and how prompts are shown: what nnctl generate needs to prompt the model."""
        return {"tokenizer_path": str(self.tokenizer_path), "template": self.template}

    def num_batches(self, split: str) -> int:
        n = len(self.lengths[split])
        return n // self.batch_size if split == "train" else math.ceil(n / self.eval_batch_size)

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        n = self.num_batches("train")
        stop = n if stop is None else min(stop, n)
        order = torch.randperm(len(self.lengths["train"]), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        for rows in order[: n * self.batch_size].view(n, self.batch_size)[start:stop]:
            yield self._batch("train", rows)

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[dict]:
        for rows in torch.arange(len(self.lengths[split])).split(self.eval_batch_size)[:stop]:
            yield self._batch(split, rows)

    def _batch(self, split: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of `split`, cut to the longest of them (lengths are known on the host: no device sync)."""
        width = max(self.lengths[split][i] for i in rows.tolist())
        tensors = self.splits[split]
        index = rows.to(tensors["input_ids"].device)
        return {k: v[index, :width] for k, v in tensors.items()}


def _pack(encoded: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate the records and cut the stream into rows of max_len (the last, shorter row is kept)."""
    ids = [t for e, _ in encoded for t in e]
    labels = [t for _, lab in encoded for t in lab]
    return [(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]


def _pad(rows: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """[N, width] input_ids (pad_id), attention_mask (0 on padding) and labels (-100 on padding)."""
    n = len(rows)
    out = {"input_ids": torch.full((n, width), pad_id), "attention_mask": torch.zeros(n, width, dtype=torch.long),
           "labels": torch.full((n, width), IGNORE)}
    for i, (ids, labels) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["labels"][i, :len(labels)] = torch.tensor(labels)
    return out
