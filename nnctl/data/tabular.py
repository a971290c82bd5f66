"""Tables: a user's CSV (feature columns and a target column) or one of scikit-learn's bundled tables.

Preprocessing is fit on the training split only: numeric features are standardized (mean/std), missing numeric
values (empty, NA, NaN, ?) are replaced by the training median, and non-numeric columns are one-hot encoded over
the training split's categories (a missing value is a category of its own; a category first seen in val/test is
all zeros). Classification or regression is inferred from the target: non-numeric values, or at most
`max_classes` distinct integers, are classes; anything else is regressed (standardized for the loss, metrics in
the target's own units).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from nnctl.data.tensors import Splits, TensorData, standardize
from nnctl.data.text_classification import check_classes, column, read_table
from nnctl.errors import UserError

log = logging.getLogger(__name__)
MISSING = {"", "na", "nan", "null", "none", "?"}
TASKS = ("auto", "classification", "regression")


def _bundled(name: str) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, target column) of a scikit-learn table, as strings like a CSV's (repr round-trips floats)."""
    from sklearn import datasets

    loaders = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer,
               "diabetes": datasets.load_diabetes}
    if name not in loaders:
        raise UserError(f"unknown bundled table {name!r}; choose one of {', '.join(loaders)}, or set data.name=null "
                        "and data.path=<your.csv>", key="data.name")
    bunch = loaders[name]()
    names = getattr(bunch, "target_names", None)
    target = [str(names[int(t)]) if names is not None else repr(float(t)) for t in bunch.target]
    rows = [[repr(float(v)) for v in row] + [t] for row, t in zip(bunch.data, target)]
    return [*bunch.feature_names, "target"], rows, "target"


def _number(text: str) -> float | None:
    """The value of a numeric cell, NaN for a missing one, None for text."""
    if text.strip().lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


class Tabular(TensorData):
    """Batches (features [B, F] float32, target [B] class ids or [B, outputs] standardized values)."""

    name = "tabular"
    fields = ("x", "y")

    def __init__(self, name: str | None, path: str | None, target: str | None, task: str = "auto",
                 max_classes: int = 20, **kw: Any) -> None:
        super().__init__(**kw)
        if (name is None) == (path is None):
            raise UserError("set exactly one of data.name (a bundled table: wine, breast_cancer, diabetes) and "
                            "data.path (your CSV)", key="data.path")
        if task not in TASKS:
            raise UserError(f"got {task!r}; expected one of {', '.join(TASKS)}", key="data.task")
        self.table, self.path, self.target, self.task, self.max_classes = name, path, target, task, max_classes

    def read(self) -> tuple[list[str], list[list[str]], int]:
        if self.table is not None:
            header, rows, target = _bundled(self.table)
            return header, rows, header.index(self.target or target)
        path = Path(self.path)
        header, rows = read_table(path, "data.path")
        if self.target is None:
            raise UserError(f"name the target column; {path}'s columns are: {', '.join(header)}", key="data.target")
        return header, [r for r in rows if len(r) == len(header)], column(header, self.target, path, "data.target")

    def build(self) -> Splits:
        header, rows, t = self.read()
        rows = [r for r in rows if r[t].strip().lower() not in MISSING]
        labels = [r[t].strip() for r in rows]
        numbers = [_number(v) for v in labels]
        integral = all(v is not None and v == int(v) for v in numbers)
        task = self.task
        if task == "auto":
            few = integral and len(set(numbers)) <= self.max_classes
            task = "classification" if any(v is None for v in numbers) or few else "regression"
        if task == "regression" and any(v is None for v in numbers):
            bad = next(v for v, n in zip(labels, numbers) if n is None)
            raise UserError(f"regression needs a numeric target and column {header[t]!r} holds {bad!r}; set "
                            "data.task=classification", key="data.task")
        self.task_kind = task
        split = self.split_rows(len(rows))
        x, self.feature_names = self._features(header, rows, t, split["train"])
        if task == "classification":
            self.classes = check_classes(labels, "data.target")
            if integral:  # numeric class labels in numeric order (10 after 9)
                self.classes = sorted(self.classes, key=float)
            index = {c: i for i, c in enumerate(self.classes)}
            y = torch.tensor([index[v] for v in labels], dtype=torch.int64)
        else:
            y = torch.tensor(numbers, dtype=torch.float64)[:, None]  # [N, 1 output]
        splits = {s: {"x": x[idx], "y": y[idx]} for s, idx in split.items()}
        if task == "regression":
            for s in splits:
                z, self.target_mean, self.target_std = standardize(splits[s]["y"], y[split["train"]])
                splits[s]["y"] = z.float()
        log.info("data %s: %d rows, %d features, %s", self.name, len(rows), x.shape[1], task)
        return splits

    def _features(self, header: list[str], rows: list[list[str]], target: int,
                  train: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Standardized numeric columns and one-hot categorical ones, fit on the `train` rows: [N, F]."""
        columns, names = [], []
        train = train.tolist()
        for j, name in enumerate(header):
            if j == target:
                continue
            cells = [r[j].strip() for r in rows]
            values = [_number(c) for c in cells]
            if all(v is not None for v in values):
                col = torch.tensor(values, dtype=torch.float64)
                fit = col[train]
                fit = fit[~fit.isnan()]
                median = fit.median() if len(fit) else torch.tensor(0.0, dtype=torch.float64)
                col = torch.where(col.isnan(), median, col)
                mean, std = col[train].mean(), col[train].std(unbiased=False).clamp_min(1e-8)
                columns.append(((col - mean) / std)[:, None])  # [N] -> [N, 1]
                names.append(name)
            else:
                keys = [c if c.lower() not in MISSING else "<missing>" for c in cells]
                categories = sorted({keys[i] for i in train})
                index = {c: i for i, c in enumerate(categories)}
                onehot = torch.zeros(len(rows), len(categories), dtype=torch.float64)
                for i, k in enumerate(keys):
                    if k in index:
                        onehot[i, index[k]] = 1.0
                columns.append(onehot)
                names += [f"{name}={c}" for c in categories]
        if not columns:
            raise UserError("the table has no feature columns besides the target", key="data.target")
        return torch.cat(columns, dim=1).float(), names

    @property
    def spec(self) -> dict[str, Any]:
        spec = {"input": "features", "in_shape": (len(self.feature_names),),
                "num_features": len(self.feature_names), "feature_names": list(self.feature_names)}
        if self.task_kind == "classification":
            return {**spec, "target": "class", "num_classes": len(self.classes), "classes": list(self.classes)}
        return {**spec, "target": "regression", "num_outputs": 1, "target_mean": self.target_mean,
                "target_std": self.target_std}
