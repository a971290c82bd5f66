"""What the training loop reports while it runs: throughput windows, the periodic step log, one-line epoch
summaries. Logging at the log cadence is the only place the loop waits for the device."""
from __future__ import annotations

import time
from typing import Any

import torch

from nnctl.metrics import Averages
from nnctl.schedulers import current_lr


class Window:
    """Throughput over the steps since the last `rate` call (wall clock; callers first synchronize the device)."""

    def __init__(self, step: int, samples_per_step: int) -> None:
        self.step, self.time, self.samples_per_step = step, time.perf_counter(), samples_per_step

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.samples_per_step / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate


def log_step(tb: Any, bar: Any, task: Any, window: Window, sums: Averages, optimizer: torch.optim.Optimizer,
             grad_norm: torch.Tensor | None, step: int, batch_in_epoch: int) -> None:
    """Running training losses, lr, gradient norm and throughput to TensorBoard and the progress bar."""
    samples_per_s = window.rate(step)  # since the last log
    running = sums.means("train/")
    losses = {f"{k}_running": v for k, v in running.items() if k.startswith("train/loss")}
    scalars = {**losses, "lr": current_lr(optimizer), "train/samples_per_s": samples_per_s}
    if grad_norm is not None:  # None when the update was skipped (a non-finite loss)
        scalars["train/grad_norm"] = float(grad_norm)
    tb.scalars(scalars, step)
    if bar.disable:  # no bar on the screen (progress off, a log file, a quiet console): nothing to draw
        return
    shown = "  ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in running.items() if k.startswith("train/loss"))
    bar.update(task, completed=batch_in_epoch,
               stats=f"{shown}  lr {scalars['lr']:.2e}  {samples_per_s:,.0f} samples/s")


def split(metrics: dict[str, float], name: str) -> dict[str, float]:
    """{'val/acc': 0.9, 'train/acc': 0.95} -> {'acc': 0.9} for name='val'."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{name}/")}


def brief(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
