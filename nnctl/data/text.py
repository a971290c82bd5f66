"""Text for language models: one file (or the bundled corpus) as one token tensor, random windows per batch.

The tokenizer (characters or bytes) is built from the file and travels in checkpoints (`state_dict`), so
`nnctl generate` rebuilds it from a checkpoint alone. The text is split by position into train / val / test.
Training batches are random windows whose starts depend only on (seed, epoch, batch index), so a run resumed
mid-epoch sees exactly the windows an uninterrupted run would; an epoch is `batches_per_epoch` batches.
Evaluation covers a split with fixed, evenly spaced windows, every target token exactly once.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nnctl.data.base import _mix
from nnctl.errors import UserError

log = logging.getLogger(__name__)
IGNORE = -1  # target id the loss skips: positions an earlier evaluation window already scored
Batch = tuple[torch.Tensor, torch.Tensor, int]  # inputs [B, T], targets [B, T], number of scored targets


def bundled_corpus() -> bytes:
    """The default corpus: Python's own reference documentation (~460 KB of English prose and examples), which
    CPython ships as `pydoc_data.topics` for `help()`. Present in every Python install, so it works offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)).encode("utf-8")


class CharTokenizer:
    """One token per Unicode character of the training text; the vocabulary is its sorted character set."""

    unit = "character"

    def __init__(self, vocab: str) -> None:
        self.vocab = vocab
        self.codes = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)  # sorted code points
        self.index = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def build(cls, raw: bytes, source: str) -> "CharTokenizer":
        return cls("".join(sorted(set(decode_utf8(raw, source)))))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CharTokenizer":
        return cls(state["vocab"])

    def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
        codes = np.frombuffer(decode_utf8(raw, source).encode("utf-32-le"), dtype=np.uint32)
        return np.searchsorted(self.codes, codes)  # every character is in the vocabulary it was built from

    def encode(self, text: str, what: str = "the prompt", key: str = "prompt") -> list[int]:
        """Token ids of `text`; a character the vocabulary lacks is a user error naming it and its position."""
        for pos, ch in enumerate(text):
            if ch not in self.index:
                raise UserError(f"character {ch!r} (U+{ord(ch):04X}) at position {pos} of {what} is not in the "
                                f"checkpoint's vocabulary ({len(self.vocab)} characters seen in the training text); "
                                "remove or replace it", key=key)
        return [self.index[ch] for ch in text]

    def decoder(self) -> "_CharDecoder":
        return _CharDecoder(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "char", "vocab": self.vocab}


class ByteTokenizer:
    """One token per byte (256 ids): reads any file, UTF-8 or not."""

    unit = "byte"
    vocab_size = 256

    @classmethod
    def build(cls, raw: bytes, source: str) -> "ByteTokenizer":
        return cls()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ByteTokenizer":
        return cls()

    def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.uint8)

    def encode(self, text: str, what: str = "the prompt", key: str = "prompt") -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> "_ByteDecoder":
        return _ByteDecoder()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}


class _CharDecoder:
    def __init__(self, vocab: str) -> None:
        self.vocab = vocab

    def __call__(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class _ByteDecoder:
    """Incremental UTF-8: a character split over several tokens is printed once its last byte arrives."""

    def __init__(self) -> None:
        import codecs

        self.state = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> str:
        return self.state.decode(bytes(ids))


TOKENIZERS: dict[str, type] = {"char": CharTokenizer, "byte": ByteTokenizer}


def tokenizer_from_state(state: dict[str, Any]) -> CharTokenizer | ByteTokenizer:
    """The tokenizer a checkpoint was trained with (its data state's "tokenizer" entry)."""
    return TOKENIZERS[state["kind"]].from_state(state)


def decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); "
                        "the char tokenizer needs UTF-8 text: convert the file, or use data.tokenizer=byte, which "
                        "reads any file", key="data.path") from None


def read_text_file(path: str | None) -> tuple[bytes, str]:
    """(the file's bytes, a name for messages); path None is the bundled corpus."""
    if path is None:
        return bundled_corpus(), "the bundled corpus (pydoc_data.topics)"
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a text file, or data.path=null for the bundled corpus",
                        key="data.path")
    if not p.is_file():
        raise UserError(f"{p} is not a file; pass a text file, or data.path=null for the bundled corpus",
                        key="data.path")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {p} ({exc.strerror or exc})", key="data.path") from None
    if not raw:
        raise UserError(f"{p} is empty; pass a file with text in it", key="data.path")
    return raw, str(p)


class TextData:
    """A text file as train / val / test token tensors on the training device. Keys mirror `data/text.yaml`."""

    def __init__(self, path: str | None, tokenizer: str, block_size: int, batch_size: int, eval_batch_size: int,
                 batches_per_epoch: int, val_fraction: float, test_fraction: float) -> None:
        if tokenizer not in TOKENIZERS:
            raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}",
                            key="data.tokenizer")
        if val_fraction + test_fraction >= 1:
            raise UserError(f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training "
                            "text; keep their sum below 1", key="data.val_fraction")
        self.path, self.kind, self.block_size = path, tokenizer, block_size
        self.batch_size, self.eval_batch_size, self.batches_per_epoch = batch_size, eval_batch_size, batches_per_epoch
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.splits: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    # -- the contract used by the engine --------------------------------------------------------------------------
    def setup(self, device: torch.device) -> "TextData":
        """Read and tokenize the file, split it by position, put the splits on `device`. Idempotent."""
        if self.splits:
            return self
        raw, source = read_text_file(self.path)
        self.tokenizer = TOKENIZERS[self.kind].build(raw, source)
        ids = torch.from_numpy(self.tokenizer.encode_bytes(raw, source).astype(np.int64))
        n = len(ids)
        n_test, n_val = int(n * self.test_fraction), int(n * self.val_fraction)
        n_train = n - n_val - n_test
        self.splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
        for split, tokens in self.splits.items():
            if len(tokens) < self.block_size + 1:  # a window is block_size inputs plus the next token
                raise UserError(f"block_size {self.block_size} needs {self.block_size + 1} tokens in each split, but "
                                f"the {split} split of {source} has {len(tokens)} (of {n}); lower data.block_size "
                                f"or use a longer text", key="data.block_size")
        self.device = device
        self.splits = {k: v.to(device) for k, v in self.splits.items()}
        self._offsets = torch.arange(self.block_size + 1, device=device)
        log.info("data text: %s, %d %s tokens (vocabulary %d): train %d, val %d, test %d", source, n,
                 self.tokenizer.unit, self.tokenizer.vocab_size, n_train, n_val, n_test)
        return self

    @property
    def spec(self) -> dict[str, Any]:
        """What models and objectives are completed with (see nnctl.spec)."""
        return {"input": "tokens", "target": "next_token", "vocab_size": self.tokenizer.vocab_size,
                "block_size": self.block_size, "token_unit": self.tokenizer.unit}

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer and the spec: enough to rebuild the model and read/write its text without the file."""
        return {"tokenizer": self.tokenizer.state_dict(), "spec": self.spec}

    def num_batches(self, split: str) -> int:
        if split == "train":
            return self.batches_per_epoch
        return math.ceil(self._num_windows(split) / self.eval_batch_size)

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Random windows: batch i of `epoch` depends only on (seed, epoch, i)."""
        tokens, stop = self.splits["train"], self.batches_per_epoch if stop is None else stop
        gen = torch.Generator(device=self.device)
        n_targets = self.batch_size * self.block_size
        for i in range(start, min(stop, self.batches_per_epoch)):
            gen.manual_seed(_mix(seed, epoch, i))
            starts = torch.randint(0, len(tokens) - self.block_size, (self.batch_size,), generator=gen,
                                   device=self.device)
            windows = tokens[starts[:, None] + self._offsets]  # [B, T + 1]
            yield windows[:, :-1], windows[:, 1:], n_targets

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[Batch]:
        """Windows at 0, T, 2T, ... (the last one aligned to the end of the split), in order: each target token
        of the split is scored exactly once."""
        tokens, T = self.splits[split], self.block_size
        n_windows = self._num_windows(split)
        starts = torch.arange(n_windows, device=self.device) * T
        last = len(tokens) - 1 - T
        overlap = int(starts[-1]) - last  # targets of the last window that the one before already scored
        starts[-1] = last
        for b, idx in enumerate(starts.split(self.eval_batch_size)[:stop]):
            windows = tokens[idx[:, None] + self._offsets]  # [b, T + 1]
            x, y = windows[:, :-1], windows[:, 1:]
            scored = len(idx) * T
            if b == (n_windows - 1) // self.eval_batch_size and overlap > 0:
                y = y.clone()
                y[-1, :overlap] = IGNORE
                scored -= overlap
            yield x, y, scored

    # -- internals ------------------------------------------------------------------------------------------------
    def _num_windows(self, split: str) -> int:
        return math.ceil((len(self.splits[split]) - 1) / self.block_size)
