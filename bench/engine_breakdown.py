"""Diagnostic (not part of run_all): where the Engine's per-step overhead goes, as an ablation ladder.

Starting from the bare loop of bench/engine_overhead.py, each rung adds one thing Engine.fit does per step
(mirroring nnctl/engine.py as of this script), and the real Engine.fit is timed alongside:

  bare        forward, cross_entropy, backward, AdamW step, zero_grad(set_to_none), LambdaLR step, over
              pre-normalized float tensors
  bare (A/A)  the same bare loop again, with its own copy of the model: its distance from bare is the noise
  +data       batches from nnctl's ImageData.train_batches (augmentation off: slices of the split normalized once)
  +acc        train accuracy in the objective: torch.count_nonzero(logits.argmax(1) == y), a count
  +sums       the running sums (nnctl.metrics.StepSums.add(n, {"acc": count}, {"loss": loss.detach()})): a list
              append per step, stacked and summed at logging steps and the epoch's end
  +isfinite   math.isfinite(loss.item()) per step (the non-finite-loss guard as it runs on the CPU)
  +log        every log_every_n_steps (and at epoch end): total grad norm, running means, 4 TensorBoard
              scalars, a (disabled) progress-bar update
  engine      the real Engine.fit, timed as in engine_overhead (training iterations only)

All variants run interleaved epoch by epoch in one process (each with its own copy of the same initial model);
reported: median microseconds per step per variant over all epochs after warm-up, and each rung's increment. Time
is the main thread's CPU time (time.thread_time), which a busy machine inflates far less than wall time; with the
default --threads 1 it covers all the work except the TensorBoard writer thread. Increments smaller than the A/A
row's distance from bare are noise.

    python -m bench.engine_breakdown --case mlp --threads 1 --epochs 60
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench._common import base_parser, median, table, write_result
from bench.engine_overhead import build, instrument

RUNGS = ["bare", "bare (A/A)", "+data", "+acc", "+sums", "+isfinite", "+log"]
FEATURES = {"bare": 0, "bare (A/A)": 0, "+data": 1, "+acc": 2, "+sums": 3, "+isfinite": 4, "+log": 5}  # rung -> level


def accumulator():
    """The engine's running sums, called the way Engine.fit calls them: (add(loss, stats, n), means())."""
    from nnctl.metrics import StepSums

    sums = StepSums()
    return (lambda loss, stats, n: sums.add(n, stats, {"loss": loss.detach()})), (lambda: sums.totals().means("train/"))


def ladder_epoch(level: int, st: dict[str, Any], engine, epoch: int, tb, bar, task) -> tuple[float, int]:
    """One epoch of the bare loop with the features up to `level` switched on (FEATURES)."""
    model, opt, sched, bare = st["model"], st["opt"], st["sched"], st["bare"]
    t = engine.cfg.trainer
    log_every = int(t.log_every_n_steps)
    start = time.thread_time()
    if level >= 1:
        batches = st["train_batches"](epoch, int(t.seed))
    else:
        n_batches = len(bare.y) // bare.batch_size
        order = torch.randperm(len(bare.y), generator=bare.gen)[: n_batches * bare.batch_size].view(n_batches, -1)
        batches = ((bare.x[idx], bare.y[idx]) for idx in order)
    add, means = accumulator()
    model.train()
    steps = 0
    n_batches = engine.data.num_batches("train")
    for i, (xb, yb) in enumerate(batches):
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        stats = {"acc": torch.count_nonzero(logits.argmax(dim=1) == yb)} if level >= 2 else {}
        loss.backward()
        if level >= 3:
            add(loss, stats, len(yb))
        if level >= 4:
            math.isfinite(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        steps += 1
        if level >= 5 and (steps % log_every == 0 or steps == n_batches):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            running = means() if level >= 3 else {"train/loss": float(loss)}
            tb.scalars({"train/loss_running": running["train/loss"], "lr": opt.param_groups[0]["lr"],
                        "train/grad_norm": float(norm), "train/samples_per_s": 1.0}, steps)
            bar.update(task, completed=steps, stats=f"loss {running['train/loss']:.4f}")
    return time.thread_time() - start, steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from nnctl.loggers.base import RunInfo
    from nnctl.loggers.tensorboard import TensorBoardLogger
    from nnctl.reporting import console, epoch_progress

    parser = base_parser(__doc__)
    parser.add_argument("--case", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: then the main thread's CPU time is all the work)")
    args = parser.parse_args(argv)
    epochs = 8 if args.quick else args.epochs
    torch.set_num_threads(args.threads)
    console.quiet = True
    times: dict[str, list[float]] = {r: [] for r in [*RUNGS, "engine"]}
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
        engine, bare = build(args.case, epochs, run_dir)
        states = []
        for _ in RUNGS:
            b = copy.deepcopy(bare)  # own model, optimizer and schedule; same initial weights
            states.append({"model": b.model, "opt": b.opt, "sched": b.sched, "bare": b,
                           "train_batches": engine.data.train_batches})  # the engine's own, before instrument()
        tb = TensorBoardLogger(RunInfo(Path(run_dir), "ladder"), dir="ladder-tb")
        pairs: list[dict[str, float]] = []

        class Ladder:  # runs every rung once per engine epoch, in rotating order, next to the engine's epoch
            def __init__(self) -> None:
                self.epoch, self.cpu_s = 0, 0.0

            def timed_epoch(self) -> tuple[float, int]:
                k = self.epoch
                order = list(range(len(RUNGS)))
                order = order[k % len(order):] + order[:k % len(order)]
                with epoch_progress(False) as bar:
                    task = bar.add_task("ladder", total=None, stats="")
                    for rung in order:
                        seconds, steps = ladder_epoch(FEATURES[RUNGS[rung]], states[rung], engine, k, tb, bar, task)
                        if k >= args.warmup:
                            times[RUNGS[rung]].append(1e6 * seconds / steps)
                self.epoch += 1
                return 1.0, engine.data.num_batches("train")

        instrument(engine, Ladder(), pairs)
        engine.fit()
        tb.close()
    times["engine"] = [1e6 * p["engine_cpu_s"] / p["steps"] for p in pairs if p["epoch"] >= args.warmup]
    med = {k: median(v) for k, v in times.items()}
    rows, prev = [], None
    for name in [*RUNGS, "engine"]:
        rows.append((name, med[name], None if prev is None else med[name] - med[prev], med[name] - med["bare"],
                     med[name] / med["bare"]))
        prev = prev if name == "bare (A/A)" else name  # the ladder climbs from bare; A/A is beside it
    text = table(["variant", "us/step (median)", "increment us", "vs bare us", "vs bare"], rows)
    print(f"\n{args.case}, {args.threads} thread(s), {epochs} epochs ({args.warmup} warm-up), "
          f"{len(times['bare'])} timed epochs per variant\n{text}")
    console.quiet = False
    result = {"case": args.case, "threads": args.threads, "epochs": epochs, "us_per_step_median": med,
              "table": text, "all": times}
    write_result("engine_breakdown", result)
    return result


if __name__ == "__main__":
    main()
