"""`nnctl lr-find`: Leslie Smith's learning-rate range test on the configured model, data and optimizer.

The learning rate grows exponentially from lr_find.start_lr to lr_find.end_lr over num_steps training steps; the
smoothed loss is recorded and the test stops once it diverges. The suggestion is the learning rate where the
smoothed loss falls fastest. Model, optimizer, grad scaler and RNG states are restored exactly afterwards.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterator

import torch


def _batches(engine: Any) -> Iterator[Any]:
    epoch = 0
    while True:  # as many epochs as the ramp needs
        yield from engine.data.train_batches(epoch, engine.t.seed)
        epoch += 1


def range_test(engine: Any, start_lr: float, end_lr: float, num_steps: int, smoothing: float = 0.98,
               diverge: float = 4.0) -> dict[str, Any]:
    """Run the ramp on `engine` (optimization configured here) and put every state back as it was."""
    from nnctl import checkpoint as ck

    from nnctl.spec import to_device

    if engine.optim is None:
        engine.configure_optimization()
    if len(engine.optim.optimizers) > 1:
        from nnctl.errors import UserError

        raise UserError(f"the range test ramps one optimizer's learning rate; this objective updates "
                        f"{', '.join(engine.optim.optimizers)} in turn: tune their lrs with nnctl tune instead",
                        key="objective")
    saved = copy.deepcopy({"model": engine.net.state_dict(), "optimizer": engine.optimizer.state_dict(),
                           "scaler": engine.scaler.state_dict()})
    rng = ck.rng_state()
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    engine.model.train()
    try:
        for step, batch in zip(range(num_steps), _batches(engine)):
            lr = start_lr * (end_lr / start_lr) ** (step / max(1, num_steps - 1))
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            with engine.precision.autocast(engine.device):
                loss, _ = engine.objective.training_step(engine.model, to_device(batch, engine.device))
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
            engine.optimizer.zero_grad(set_to_none=True)
            value = loss.item()  # float() on a tensor that requires grad warns
            if not math.isfinite(value):
                break
            avg = smoothing * avg + (1 - smoothing) * value
            debiased = avg / (1 - smoothing ** (step + 1))  # the average starts at 0: correct its bias
            lrs.append(lr), losses.append(value), smoothed.append(debiased)
            best = min(best, debiased)
            if step > 5 and debiased > diverge * best:
                break
    finally:
        engine.net.load_state_dict(saved["model"])
        engine.optimizer.load_state_dict(saved["optimizer"])
        engine.scaler.load_state_dict(saved["scaler"])
        ck.set_rng_state(rng)
    return {"lr": lrs, "loss": losses, "smoothed": smoothed, "suggestion": suggest(lrs, smoothed),
            "min_loss_lr": lrs[smoothed.index(min(smoothed))] if smoothed else None}


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The learning rate of the steepest descent of the smoothed loss (per decade of lr), before its minimum."""
    if len(lrs) < 10:
        return None
    stop = smoothed.index(min(smoothed))
    skip = max(1, len(lrs) // 10)  # the first points carry the average's warm-up
    if stop - skip < 2:
        return None
    logs = [math.log10(v) for v in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(skip, stop)]
    return lrs[skip + min(range(len(slopes)), key=slopes.__getitem__)]


def plot(result: dict[str, Any], path: Path) -> Path:
    from nnctl.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result["lr"], result["loss"], color="0.75", linewidth=0.8, label="loss")
    ax.plot(result["lr"], result["smoothed"], color="tab:blue", label="smoothed loss")
    if result["suggestion"] is not None:
        i = result["lr"].index(result["suggestion"])
        ax.plot([result["suggestion"]], [result["smoothed"][i]], "o", color="tab:red", markersize=8,
                label=f"suggested lr {result['suggestion']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    low, start = min(result["loss"]), result["smoothed"][0]
    ax.set_ylim(low - 0.05 * abs(start - low), start + 0.6 * abs(start - low))  # the divergence runs off the top
    ax.legend()
    ax.set_title("learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    return save(fig, path)


def lr_find(cfg: Any, run_dir: Path, task_overrides: list[str]) -> dict[str, Any]:
    import shlex

    from nnctl.engine import Engine
    from nnctl.errors import UserError
    from nnctl.reporting import console, write_json
    from nnctl.validate import validate

    validate(cfg)
    s = cfg.lr_find
    if s.start_lr >= s.end_lr:
        raise UserError(f"start_lr={s.start_lr} must be below end_lr={s.end_lr}", key="lr_find.start_lr")
    engine = Engine(cfg, run_dir)
    result = range_test(engine, float(s.start_lr), float(s.end_lr), int(s.num_steps))
    if not result["lr"]:
        raise UserError(f"the loss was not finite at lr={s.start_lr}; lower lr_find.start_lr", key="lr_find.start_lr")
    write_json(run_dir / "lr_find.json", result)
    plot(result, run_dir / "lr_find.png")
    console.print(f"lr-find: {len(result['lr'])} steps from {result['lr'][0]:.2e} to {result['lr'][-1]:.2e}; "
                  f"wrote lr_find.png and lr_find.json to {run_dir}", markup=False)
    if result["suggestion"] is None:
        console.print("no clear descent in the loss: widen lr_find.start_lr/end_lr or raise lr_find.num_steps")
        return result
    keep = [o for o in task_overrides if not o.startswith(("lr_find.", "optimizer.lr=", "hydra."))]
    command = " ".join(["nnctl", "train", *map(shlex.quote, keep), f"optimizer.lr={result['suggestion']:.3g}"])
    console.print(f"suggested learning rate: {result['suggestion']:.3g} (steepest descent of the smoothed loss; "
                  f"the minimum is at {result['min_loss_lr']:.3g}); train with:", markup=False)
    console.print(f"  {command}", markup=False, soft_wrap=True)
    return result
