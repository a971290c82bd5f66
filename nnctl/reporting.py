"""What a run shows and writes: rich console output and metrics.json (trackers live in nnctl.loggers)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

console = Console(stderr=False, highlight=False)


class ConsoleLogHandler(logging.Handler):
    """Log records as one line each on the run's console ("warning: 3 unreadable images skipped").

    Printing through the shared console keeps the lines above a live progress bar instead of tearing it. Hydra's
    job logging (configs/hydra/default.yaml) attaches it to the root logger at level WARNING.
    """

    STYLES = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = Text.assemble((f"{record.levelname.lower()}: ", self.STYLES.get(record.levelname, "")),
                                 self.format(record))  # a Text: brackets in the message are not markup
            console.print(text, soft_wrap=True)
        except Exception:
            self.handleError(record)


def print_config(cfg: DictConfig) -> None:
    console.print(Panel(Syntax(OmegaConf.to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"),
                        title="resolved config", expand=False))


def print_model_summary(model: nn.Module) -> None:
    table = Table(title=f"model: {type(model).__name__}", show_edge=False)
    table.add_column("module")
    table.add_column("type")
    table.add_column("params", justify="right")
    for name, child in model.named_children():
        table.add_row(name, type(child).__name__, f"{sum(p.numel() for p in child.parameters()):,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table.add_row("[b]total[/b]", "", f"[b]{total:,}[/b] ({trainable:,} trainable)")
    console.print(table)


def print_metrics(title: str, rows: dict[str, dict[str, float]]) -> None:
    """One row per split, or one row per metric when that is too wide for the terminal (names are never cut)."""
    names = sorted({k for metrics in rows.values() for k in metrics})
    table = Table(title=title)
    width = 8 + sum(max(len(n), 10) + 3 for n in names)
    if width <= console.width:
        table.add_column("split")
        for name in names:
            table.add_column(name, justify="right")
        for split, metrics in rows.items():
            table.add_row(split, *(_fmt(metrics.get(n)) for n in names))
    else:
        table.add_column("metric")
        for split in rows:
            table.add_column(split, justify="right")
        for name in names:
            table.add_row(name, *(_fmt(metrics.get(name)) for metrics in rows.values()))
    console.print(table)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"


def epoch_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[b]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled or console.quiet, transient=False)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (finite floats only; NaN/inf become null)."""
    clean = json.loads(json.dumps(payload, default=str), parse_constant=lambda _: None)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
