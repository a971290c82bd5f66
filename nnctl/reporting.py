"""What a run shows and writes: rich console output, TensorBoard scalars, metrics.json."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

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
    names = sorted({k for metrics in rows.values() for k in metrics})
    table = Table(title=title)
    table.add_column("split")
    for name in names:
        table.add_column(name, justify="right")
    for split, metrics in rows.items():
        table.add_row(split, *(_fmt(metrics.get(n)) for n in names))
    console.print(table)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"


def epoch_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[b]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (finite floats only; NaN/inf become null)."""
    clean = json.loads(json.dumps(payload, default=str), parse_constant=lambda _: None)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class TensorBoard:
    """Scalars per split, the resolved config as text, and hparams with the final metrics."""

    def __init__(self, log_dir: Path) -> None:
        # imported here: they pull in tensorboard
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import scalar

        self.writer = SummaryWriter(str(log_dir))
        self._summary, self._scalar = Summary, scalar

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        """The finite values as one event: a third of the cost of an add_scalar per value (in the step loop)."""
        values = [v for name, value in metrics.items() if isinstance(value, (int, float)) and math.isfinite(value)
                  for v in self._scalar(name, value).value]
        if values:
            self.writer.file_writer.add_summary(self._summary(value=values), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """One image [C, H, W], floats in [0, 1] (e.g. a sample grid)."""
        self.writer.add_image(tag, image, step)

    def config(self, cfg: DictConfig) -> None:
        text = "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())  # markdown code block
        self.writer.add_text("config", text, 0)

    def hparams(self, cfg: DictConfig, final: dict[str, float]) -> None:
        flat = dict(_flatten(OmegaConf.to_container(cfg, resolve=True)))
        hparams = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) and not k.startswith(
            ("paths.", "hydra."))}
        metrics = {f"hparam/{k}": v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)}
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _flatten(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        yield prefix[:-1], str(tree)
    else:
        yield prefix[:-1], tree
