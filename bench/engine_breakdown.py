"""Diagnostic (not part of run_all): where the Engine's per-step overhead goes, as an ablation ladder.

Starting from the bare loop of bench/engine_overhead.py, each rung adds one thing Engine.fit does per step
(mirroring nnctl/engine.py as of this script), and the real Engine.fit is timed alongside:

  bare        forward, cross_entropy, backward, AdamW step, zero_grad(set_to_none), LambdaLR step, over
              pre-normalized float tensors
  bare (A/A)  the same bare loop again, with its own copy of the model: its distance from bare is the noise
  +data       batches from nnctl's ImageData.train_batches (augmentation off: slices of the split normalized once)
  +acc        train accuracy as the classification objective returns it: a `Later` holding the detached
              logits and the labels (the count is taken for many steps at once, when the sums are read)
  +sums       the running sums (nnctl.metrics.StepSums.add(n, {"acc": later}, {"loss": loss.detach()})): list
              appends per step; the losses stacked at logging steps, everything at the epoch's end
  +isfinite   math.isfinite(loss.item()) per step (the non-finite-loss guard as it runs on the CPU)
  +log        every log_every_n_steps optimizer steps: total grad norm, the running losses, 4 TensorBoard
              scalars (a progress bar that is off is not drawn)
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
from nnctl.metrics import Later, StepSums
from nnctl.objectives.classification import _correct

RUNGS = ["bare", "bare (A/A)", "+data", "+acc", "+sums", "+isfinite", "+log"]
FEATURES = {"bare": 0, "bare (A/A)": 0, "+data": 1, "+acc": 2, "+sums": 3, "+isfinite": 4, "+log": 5}  # rung -> level


def accumulator():
    """The engine's running sums, called the way Engine.fit calls them: (add(loss, stats, n), means())."""

    sums = StepSums()
    return ((lambda loss, stats, n: sums.add(n, stats, {"loss": loss.detach()})),
            (lambda: sums.totals(means_only=True).means("train/")))


def ladder_epoch(level: int, st: dict[str, Any], engine, epoch: int, tb) -> tuple[float, int]:
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
    for xb, yb in batches:
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        stats = {"acc": Later(_correct, (logits.detach(), yb))} if level >= 2 else {}
        loss.backward()
        if level >= 3:
            add(loss, stats, len(yb))
        if level >= 4:
            math.isfinite(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        steps += 1
        st["step"] = st.get("step", 0) + 1  # the run's optimizer steps: the log cadence counts these
        if level >= 5 and st["step"] % log_every == 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            running = means() if level >= 3 else {"train/loss": float(loss)}
            tb.scalars({"train/loss_running": running["train/loss"], "lr": opt.param_groups[0]["lr"],
                        "train/grad_norm": float(norm), "train/samples_per_s": 1.0}, st["step"])
    return time.thread_time() - start, steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from nnctl.loggers.base import RunInfo
    from nnctl.loggers.tensorboard import TensorBoardLogger
    from nnctl.reporting import console

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
                for rung in order:
                    seconds, steps = ladder_epoch(FEATURES[RUNGS[rung]], states[rung], engine, k, tb)
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
