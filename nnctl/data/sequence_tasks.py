"""Generated, seedable sequence tasks: time-series regression, sequence classification and transduction.

- sum_last_k (regression over real-valued sequences): target = the sum of the last k values of each sequence.
- parity, majority (classification over binary digit strings): odd number of ones; more ones than zeros.
- copy, reverse, sort (sequence-to-sequence over decimal digit strings): the target is the source copied,
  reversed or sorted.

Lengths are drawn from [min_len, max_len]; everything is fixed by data.split_seed, so runs and `nnctl eval` see
the same examples.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from nnctl.data.tensors import Splits, TensorData, Tokenizer, mask_of, pad, standardize
from nnctl.errors import UserError

# transduction tasks: digit list -> target digit list
TRANSDUCTIONS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": lambda s: list(s),
    "reverse": lambda s: s[::-1],
    "sort": sorted,
}
# binary classification tasks: ones, length -> label
CLASSIFICATIONS: dict[str, tuple[Callable[[int, int], int], list[str]]] = {
    "parity": (lambda ones, n: ones % 2, ["even", "odd"]),
    "majority": (lambda ones, n: int(2 * ones > n), ["zeros_or_tie", "ones"]),
}
TASKS = ["sum_last_k", *CLASSIFICATIONS, *TRANSDUCTIONS]
SEQ2SEQ_SPECIALS = ("<pad>", "<bos>", "<eos>")


class SequenceTasks(TensorData):
    name = "sequence_tasks"

    def __init__(self, task: str, num_samples: int, min_len: int, max_len: int, k: int = 3, **kw: Any) -> None:
        super().__init__(**kw)
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}", key="data.task")
        if min_len > max_len:
            raise UserError(f"min_len={min_len} is above max_len={max_len}", key="data.min_len")
        self.task, self.num_samples, self.min_len, self.max_len, self.k = task, num_samples, min_len, max_len, k
        self.tokenizer: Tokenizer | None = None
        if task == "sum_last_k":
            self.fields, self.padded = ("x", "mask", "target"), {"x": "length", "mask": "length"}
        elif task in CLASSIFICATIONS:
            self.fields, self.padded = ("tokens", "mask", "label"), {"tokens": "length", "mask": "length"}
        else:
            self.fields = ("src", "src_mask", "tgt")
            self.padded = {"src": "src_length", "src_mask": "src_length", "tgt": "tgt_length"}

    def build(self) -> Splits:
        g = torch.Generator().manual_seed(self.split_seed)
        n = self.num_samples
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=g)
        mask = mask_of(lengths, self.max_len)  # [N, L]
        if self.task == "sum_last_k":
            x = torch.randn(n, self.max_len, generator=g) * mask  # [N, L], zero past each length
            last = mask & (torch.arange(self.max_len)[None, :] >= (lengths - self.k)[:, None])  # the last k
            fields = {"x": x[:, :, None], "mask": mask, "length": lengths,  # x: [N, L] -> [N, L, 1 feature]
                      "target": (x * last).sum(1, keepdim=True)}  # [N, 1]
        else:
            base = 2 if self.task in CLASSIFICATIONS else 10
            digits = torch.randint(0, base, (n, self.max_len), generator=g) * mask  # [N, L]
            strings = [[str(int(d)) for d in row[:m]] for row, m in zip(digits, lengths)]
            fields = self._classification(strings) if self.task in CLASSIFICATIONS else self._transduction(strings)
        rows = self.split_rows(n)
        splits = {s: {f: t[idx] for f, t in fields.items()} for s, idx in rows.items()}
        if self.task == "sum_last_k":  # the loss sees standardized targets; metrics are reported in target units
            for s in splits:
                splits[s]["target"], self.target_mean, self.target_std = standardize(
                    splits[s]["target"], fields["target"][rows["train"]])
        return splits

    def _classification(self, strings: list[list[str]]) -> dict[str, torch.Tensor]:
        rule, self.classes = CLASSIFICATIONS[self.task]
        self.tokenizer = Tokenizer("char", "01", specials=("<pad>",))
        ids, lengths = pad([self.tokenizer.encode("".join(s)) for s in strings], self.max_len)
        labels = torch.tensor([rule(s.count("1"), len(s)) for s in strings], dtype=torch.int64)
        return {"tokens": ids, "mask": mask_of(lengths, ids.shape[1]), "length": lengths, "label": labels}

    def _transduction(self, strings: list[list[str]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer = Tokenizer("char", "0123456789", specials=SEQ2SEQ_SPECIALS)
        bos, eos = tok.special("<bos>"), tok.special("<eos>")
        src, src_lengths = pad([tok.encode("".join(s)) for s in strings], self.max_len)
        targets = [[bos, *tok.encode("".join(TRANSDUCTIONS[self.task](s))), eos] for s in strings]
        tgt, tgt_lengths = pad(targets, self.max_len + 2)  # [N, L + 2]: <bos> target <eos>
        return {"src": src, "src_mask": mask_of(src_lengths, src.shape[1]), "src_length": src_lengths,
                "tgt": tgt, "tgt_length": tgt_lengths}

    @property
    def spec(self) -> dict[str, Any]:
        if self.task == "sum_last_k":
            return {"input": "sequence", "target": "regression", "num_features": 1, "num_outputs": 1,
                    "target_mean": self.target_mean, "target_std": self.target_std, "max_len": self.max_len}
        spec = {"input": "tokens", "vocab_size": self.tokenizer.vocab_size, "pad_id": 0, "max_len": self.max_len}
        if self.task in CLASSIFICATIONS:
            return {**spec, "target": "class", "num_classes": len(self.classes), "classes": list(self.classes)}
        return {**spec, "target": "seq2seq", "bos_id": 1, "eos_id": 2, "max_len": self.max_len + 2}

    def state_dict(self) -> dict[str, Any]:
        if self.tokenizer is None:
            return {"target_mean": self.target_mean, "target_std": self.target_std}
        return {"tokenizer": self.tokenizer.state_dict()}
