"""In-memory datasets of named tensors (token sequences, real-valued sequences, feature tables) and their tokenizer.

A subclass builds its splits once as {field: tensor [N, ...]} (`build`); this base class holds them on the training
device and yields batches as tuples of fields in a fixed order. Padded sequence fields are cut per batch to the
longest sequence in it (lengths are kept on the host, so cutting never waits for the device). Batch order depends
only on (seed, epoch, batch index), as for images, so a run resumed mid-epoch sees the same batches.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from nnctl.data.base import _mix
from nnctl.errors import UserError

log = logging.getLogger(__name__)
Splits = dict[str, dict[str, torch.Tensor]]  # split -> field -> tensor [N, ...]


class TensorData:
    """Base for non-image data modules. Subclasses set `fields` (batch order), `padded` (fields cut to the batch's
    longest sequence, with their length field), implement `build()` and `spec`."""

    name = "tensors"
    fields: tuple[str, ...] = ()
    padded: dict[str, str] = {}  # sequence field -> the field holding its lengths (host tensor [N])

    def __init__(self, batch_size: int, eval_batch_size: int, val_fraction: float, test_fraction: float,
                 split_seed: int) -> None:
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.device = torch.device("cpu")
        self.splits: Splits = {}

    def build(self) -> Splits:
        """The train/val/test splits as {field: tensor [N, ...]} (CPU); called once by `setup`."""
        raise NotImplementedError

    @property
    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- the contract used by the engine --------------------------------------------------------------------------
    def setup(self, device: torch.device) -> "TensorData":
        if self.splits:
            return self
        splits = self.build()
        for split, fields in splits.items():
            if len(next(iter(fields.values()))) == 0:
                raise UserError(f"the {split} split is empty; add rows or change data.val_fraction / "
                                "data.test_fraction", key="data")
        self.lengths = {s: {f: fields[n] for f, n in self.padded.items()} for s, fields in splits.items()}
        self.device = device
        self.splits = {s: {f: t.to(device) for f, t in fields.items()} for s, fields in splits.items()}
        log.info("data %s: %s", self.name, ", ".join(f"{s} {self.size(s)}" for s in self.splits))
        return self

    def size(self, split: str) -> int:
        return len(next(iter(self.splits[split].values())))

    def num_batches(self, split: str) -> int:
        n = self.size(split)
        return n // self.batch_size if split == "train" else math.ceil(n / self.eval_batch_size)

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[tuple]:
        """Shuffled training batches [start, stop) of `epoch` (drop_last), fixed by (seed, epoch)."""
        n_batches = self.num_batches("train")
        stop = n_batches if stop is None else min(stop, n_batches)
        order = torch.randperm(self.size("train"), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        for idx in order[: n_batches * self.batch_size].view(n_batches, self.batch_size)[start:stop]:
            yield self.batch("train", idx)

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[tuple]:
        for idx in torch.arange(self.size(split)).split(self.eval_batch_size)[:stop]:
            yield self.batch(split, idx)

    def batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fields of rows `idx` (a host tensor), sequence fields cut to the longest sequence among them."""
        data, on_device = self.splits[split], idx.to(self.device, non_blocking=True)
        out = []
        for f in self.fields:
            t = data[f][on_device]
            if f in self.padded:
                t = t[:, : int(self.lengths[split][f][idx].max())]  # [B, T_max] -> [B, T_batch]
            out.append(t)
        return tuple(out)

    # -- helpers for subclasses -----------------------------------------------------------------------------------
    def split_rows(self, n: int, has_test: bool = False) -> dict[str, torch.Tensor]:
        """Row indices of train/val(/test) for `n` rows, fixed by split_seed (trainer.seed never moves rows)."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_test = 0 if has_test else max(1, int(round(n * self.test_fraction)))
        n_val = max(1, int(round((n - n_test) * self.val_fraction)))
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        return {k: v.sort().values for k, v in parts.items() if not (has_test and k == "test")}


def pad(seqs: Sequence[Sequence[int]], max_len: int, value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [N, L] padded with `value`, lengths [N]); L = the longest (<= max_len) sequence."""
    lengths = torch.tensor([min(len(s), max_len) for s in seqs], dtype=torch.int64)
    out = torch.full((len(seqs), max(1, int(lengths.max()) if len(seqs) else 1)), value, dtype=torch.int64)
    for i, s in enumerate(seqs):
        out[i, : lengths[i]] = torch.as_tensor(list(s[:max_len]), dtype=torch.int64)
    return out, lengths


def mask_of(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """lengths [N] -> bool mask [N, width], True on real positions."""
    return torch.arange(width)[None, :] < lengths[:, None]


class Tokenizer:
    """Characters (the training text's own alphabet) or bytes to ids, after the special tokens (pad first).

    Its state is plain lists, stored in checkpoints, so decoding and generation rebuild it from a checkpoint alone.
    Characters never seen in training map to <unk> when there is one; otherwise they are an error for the caller.
    """

    KINDS = ("char", "byte")

    def __init__(self, kind: str, symbols: Sequence[str] = (), specials: Sequence[str] = ("<pad>", "<unk>")) -> None:
        if kind not in self.KINDS:
            raise UserError(f"unknown tokenizer {kind!r}; choose one of {', '.join(self.KINDS)}", key="data.tokenizer")
        self.kind, self.specials = kind, list(specials)
        self.symbols = [chr(b) for b in range(256)] if kind == "byte" else list(symbols)
        self.ids = {s: i + len(self.specials) for i, s in enumerate(self.symbols)}
        self.unk = self.specials.index("<unk>") if "<unk>" in self.specials else None

    @classmethod
    def fit(cls, kind: str, texts: Sequence[str], specials: Sequence[str] = ("<pad>", "<unk>")) -> "Tokenizer":
        return cls(kind, sorted(set("".join(texts))) if kind == "char" else (), specials)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        return cls(state["kind"], state["symbols"], state["specials"])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": list(self.symbols) if self.kind == "char" else [],
                "specials": list(self.specials)}

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.symbols)

    def special(self, name: str) -> int:
        return self.specials.index(name)

    def encode(self, text: str) -> list[int]:
        # surrogateescape: bytes of a non-UTF-8 file (read the same way) come back exactly
        units = [chr(b) for b in text.encode("utf-8", "surrogateescape")] if self.kind == "byte" else text
        return [self.ids.get(c, self.unk) if self.unk is not None else self.ids[c] for c in units]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.specials)
        units = "".join(self.symbols[i - n] for i in ids if i >= n)  # special tokens are not text
        return units.encode("latin-1").decode("utf-8", errors="replace") if self.kind == "byte" else units


def read_text(path: Path, key: str, strict: bool = True) -> str:
    """A UTF-8 text file; a missing, empty or (when `strict`) non-UTF-8 file is a one-line error naming `key`.
    Not strict: undecodable bytes are kept as surrogates, which the byte tokenizer turns back into those bytes."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass an existing file", key=key)
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path} is empty", key=key)
    try:
        return raw.decode("utf-8", "strict" if strict else "surrogateescape")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte offset {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                        "convert it to UTF-8 or set data.tokenizer=byte", key=key) from None


def standardize(y: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
    """Targets [N, O] in units of the training targets' mean and std per output: (standardized, means, stds).
    Fit on the training split only, so no statistic of val/test leaks into training."""
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-8)
    return (y - mean) / std, mean.tolist(), std.tolist()
