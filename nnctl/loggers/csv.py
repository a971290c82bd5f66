"""CSV: `metrics.csv` in the run dir, one row per logged step, one column per metric ("wide" format).

`pandas.read_csv("metrics.csv", index_col="step")` gives a frame with one column per metric, as people expect
from a spreadsheet. Columns are `step` and then the metrics in the order they first appeared; a metric that was not
logged at a step is an empty cell (NaN in pandas). A metric first seen late in the run (val/* after the first
epoch, test/* at the end) rewrites the file once with the wider header, so every row has every column. Values
logged for the same step by separate calls (a step's log and the epoch's end) share one row. A resumed run appends
to the same file.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping

from nnctl.loggers.base import Logger, RunInfo


class CSVLogger(Logger):
    def __init__(self, run: RunInfo, state: dict[str, Any] | None = None, file: str = "metrics.csv") -> None:
        self.path = Path(run.dir) / file  # a relative `file` lands in the run dir
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = ["step"]
        if self.path.is_file():  # resuming: keep the columns (and rows) already written
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), None) or self.columns
        self.row: dict[str, Any] = {}  # the pending row: the step's values until a later step arrives

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if self.row and self.row["step"] != step:
            self._write()
        self.row.update(metrics, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.row:
            self._write()

    def _write(self) -> None:
        new = [k for k in self.row if k not in self.columns]
        if new or not self.path.is_file():
            self._rewrite(self.columns + new)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(self.row)
        self.row = {}

    def _rewrite(self, columns: list[str]) -> None:
        """The rows so far under a wider header (atomically: a temp file, then rename)."""
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.columns = columns
