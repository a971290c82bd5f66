"""Text classification from a user's CSV/TSV of text and label columns, or a folder of .txt files per class."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import torch

from nnctl.data.tensors import Splits, TensorData, Tokenizer, mask_of, pad, read_text
from nnctl.errors import UserError

log = logging.getLogger(__name__)


def read_table(path: Path, key: str, strict: bool = True) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV (comma) or TSV (.tsv/.tab: tab) file with a header line."""
    text = read_text(path, key, strict)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UserError(f"{path} has a header but no data rows", key=key)
    return [c.strip() for c in rows[0]], rows[1:]


def column(header: list[str], name: str, path: Path, key: str) -> int:
    """Index of column `name`; a missing column lists the ones there are."""
    if name not in header:
        raise UserError(f"{path} has no column {name!r}; its columns are: {', '.join(header)}", key=key)
    return header.index(name)


def check_classes(labels: list[str], key: str) -> list[str]:
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"the label column holds one class ({classes[0]!r}); classification needs at least two",
                        key=key)
    return classes


class TextClassification(TensorData):
    """Batches (tokens [B, T], mask [B, T] True on real characters, labels [B]); T is the batch's longest text."""

    name = "text_classification"
    fields = ("tokens", "mask", "label")
    padded = {"tokens": "length", "mask": "length"}

    def __init__(self, path: str, text_column: str = "text", label_column: str = "label", tokenizer: str = "char",
                 max_len: int = 256, **kw: Any) -> None:
        super().__init__(**kw)
        self.path, self.text_column, self.label_column = Path(path), text_column, label_column
        self.tokenizer_kind, self.max_len = tokenizer, max_len

    def read(self) -> tuple[list[str], list[str]]:
        """(texts, labels) from the CSV/TSV file or the class folders."""
        strict = self.tokenizer_kind == "char"  # the byte tokenizer takes any bytes
        if self.path.is_dir():
            files = sorted(p for p in self.path.glob("*/*.txt") if p.is_file())
            if not files:
                raise UserError(f"{self.path} has no <class>/*.txt files; expected a folder per class of .txt "
                                "files, or a CSV/TSV file", key="data.path")
            return [read_text(p, "data.path", strict) for p in files], [p.parent.name for p in files]
        header, rows = read_table(self.path, "data.path", strict)
        t = column(header, self.text_column, self.path, "data.text_column")
        y = column(header, self.label_column, self.path, "data.label_column")
        rows = [r for r in rows if len(r) > max(t, y)]
        return [r[t] for r in rows], [r[y].strip() for r in rows]

    def build(self) -> Splits:
        texts, labels = self.read()
        keep = [i for i, text in enumerate(texts) if text.strip()]
        if len(keep) < len(texts):
            log.warning("data: skipped %d empty text(s) of %d", len(texts) - len(keep), len(texts))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        self.classes = check_classes(labels, "data.label_column")
        index = {c: i for i, c in enumerate(self.classes)}
        rows = self.split_rows(len(texts))
        # the vocabulary comes from the training texts only: characters first seen in val/test become <unk>
        self.tokenizer = Tokenizer.fit(self.tokenizer_kind, [texts[i] for i in rows["train"]])
        splits = {}
        for split, idx in rows.items():
            ids, lengths = pad([self.tokenizer.encode(texts[i]) for i in idx], self.max_len)
            splits[split] = {"tokens": ids, "mask": mask_of(lengths, ids.shape[1]), "length": lengths,
                             "label": torch.tensor([index[labels[i]] for i in idx], dtype=torch.int64)}
        return splits

    @property
    def spec(self) -> dict[str, Any]:
        return {"input": "tokens", "target": "class", "vocab_size": self.tokenizer.vocab_size, "pad_id": 0,
                "max_len": self.max_len, "num_classes": len(self.classes), "classes": list(self.classes)}

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.state_dict(), "classes": list(self.classes)}
