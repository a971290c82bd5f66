"""GPT training step: nnctl's Engine.fit on model=gpt data=text versus a minimal nanoGPT-style PyTorch loop.

Contenders (same process, same thread count, same initial weights, same training windows, same AdamW parameter
groups and warmup-cosine schedule, same number of iterations):

* engine -- `nnctl.engine.Engine` from the composed config (model=gpt data=text on the bundled corpus, char
  tokenizer; 4 layers, 4 heads, width 128, block 64, batch 12), run by `Engine.fit()` as `nnctl train` does, with
  progress, checkpoints, early stopping and the TensorBoard text sample off.
* bare -- the loop nanoGPT's train.py runs: per iteration `torch.randint` window starts and a gather from the
  token tensor (seeded exactly as nnctl's data module seeds batch i of epoch e, so both see the same windows),
  forward, cross_entropy, backward, AdamW step, zero_grad(set_to_none=True), LambdaLR step.
* A/A control: a second bare loop, identical to the first; the median of control/bare is this harness's noise floor.

Timing and pairing are engine_overhead's (bench/engine_overhead.py `instrument`): only the training iterations of
each epoch are timed, each engine epoch next to one epoch of each bare loop, in alternating order; the first
`--warmup` epochs are dropped. After training, the validation loss of the engine's model and the bare loop's model
on the same validation windows are compared (same data and initialization: they should agree within noise).
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench._common import base_parser, compose, cpu_count, median, table, verdict, write_result
from bench.engine_overhead import BareLoop, _quartiles, instrument
from nnctl.data.base import _mix

NAME = "gpt_step"
GOAL_RATIO = 1.05
SIZE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0", "data.block_size=64",
        "data.batch_size=12"]
COMMON = ["model=gpt", "data=text", "objective=language_model", "objective.sample_tokens=0", "trainer.device=cpu",
          "trainer.progress=false", "trainer.checkpoint.enabled=false", "trainer.early_stopping.enabled=false",
          "data.eval_batch_size=64", "trainer.limit_val_batches=4", "scheduler=warmup_cosine", "optimizer=adamw"]


class BareGPTLoop(BareLoop):
    """nanoGPT's loop over the same token tensor and windows, with BareLoop's optimizer groups and schedule."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, block_size: int,
                 steps_per_epoch: int, opt_cfg: dict[str, Any], sched_cfg: dict[str, Any], total_steps: int,
                 seed: int) -> None:
        super().__init__(model, tokens, tokens, batch_size, opt_cfg, sched_cfg, total_steps, 0.0, seed)
        self.block_size, self.steps_per_epoch, self.seed, self.epoch_index = block_size, steps_per_epoch, seed, 0

    def epoch(self) -> int:
        model, opt, sched, tokens = self.model, self.opt, self.sched, self.x
        T, B = self.block_size, self.batch_size
        gen = torch.Generator()
        model.train()
        for i in range(self.steps_per_epoch):
            gen.manual_seed(_mix(self.seed, self.epoch_index, i))
            starts = torch.randint(0, len(tokens) - T, (B,), generator=gen)
            w = tokens[starts[:, None] + torch.arange(T + 1)]  # [B, T + 1]
            x, y = w[:, :-1], w[:, 1:]
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        self.epoch_index += 1
        return self.steps_per_epoch


def build(epochs: int, steps: int, run_dir: str):
    import copy

    from omegaconf import OmegaConf

    from nnctl.engine import Engine

    cfg = compose([*COMMON, *SIZE, f"data.batches_per_epoch={steps}", f"trainer.max_epochs={epochs}",
                   f"paths.run_dir={run_dir}"])
    engine = Engine(cfg, run_dir)

    def bare() -> BareGPTLoop:
        return BareGPTLoop(copy.deepcopy(engine.net), engine.data.splits["train"], cfg.data.batch_size,
                           cfg.data.block_size, steps, OmegaConf.to_container(cfg.optimizer, resolve=True),
                           OmegaConf.to_container(cfg.scheduler, resolve=True), engine.total_steps(),
                           cfg.trainer.seed)

    return engine, bare(), bare


@torch.no_grad()
def val_loss(engine, model: torch.nn.Module) -> float:
    """Mean per-token loss of `model` on the engine's validation windows."""
    model.eval()
    total, n = 0.0, 0
    for x, y, scored in engine.data.eval_batches("val", engine.batches_per_epoch("val")):
        logits = model(x)
        total += float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                       reduction="sum"))
        n += scored
    return total / n


def run(epochs: int, steps: int, repeats: int, warmup: int, max_seconds: float) -> dict[str, Any]:
    from nnctl.reporting import console

    console.quiet = True
    pairs: list[dict[str, float]] = []
    losses: list[dict[str, float]] = []
    started = time.perf_counter()
    for r in range(repeats):
        if r >= 2 and time.perf_counter() - started > max_seconds:
            print(f"  stopping after {r} repeats: over the {max_seconds:.0f} s budget (a busy machine?)")
            break
        with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
            engine, bare, make = build(epochs, steps, run_dir)
            control = make()
            mine: list[dict[str, float]] = []
            instrument(engine, bare, mine, control=control)
            engine.fit()
            losses.append({"engine": val_loss(engine, engine.net), "bare": val_loss(engine, bare.model),
                           "control": val_loss(engine, control.model)})
            kept = [dict(p, repeat=r) for p in mine if p["epoch"] >= warmup]
            pairs += kept
            print(f"  repeat {r + 1}/{repeats}: engine/bare {median(p['engine_s'] / p['bare_s'] for p in kept):.3f}"
                  f", A/A {median(p['control_s'] / p['bare_s'] for p in kept):.3f}; val loss engine "
                  f"{losses[-1]['engine']:.4f}, bare {losses[-1]['bare']:.4f}")
    console.quiet = False
    ratios = [p["engine_s"] / p["bare_s"] for p in pairs]
    return {"pairs": len(pairs), "steps_per_epoch": steps, "epochs": epochs, "warmup_epochs": warmup,
            "engine_ms_per_step": median(1e3 * p["engine_s"] / p["steps"] for p in pairs),
            "bare_ms_per_step": median(1e3 * p["bare_s"] / p["steps"] for p in pairs),
            "ratio_median": median(ratios), "ratio_q1_q3": _quartiles(ratios),
            "control_ratio_median": median(p["control_s"] / p["bare_s"] for p in pairs),
            "cpu_ratio_median": median(p["engine_cpu_s"] / p["bare_cpu_s"] for p in pairs),
            "val_loss": losses, "raw_pairs": pairs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="fresh engine runs")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run")
    parser.add_argument("--steps", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--warmup", type=int, default=1, help="epochs dropped at the start of every run")
    parser.add_argument("--max-seconds", type=float, default=300, help="no new repeat starts after this")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="torch.set_num_threads for all")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.steps = 2, 3, 10
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"GPT 4x4x128, block 64, batch 12: {args.repeats} repeat(s) x {args.epochs} epochs x {args.steps} "
          f"steps, {args.threads} thread(s)")
    r = run(args.epochs, args.steps, args.repeats, args.warmup, args.max_seconds)
    loss_gap = median(abs(v["engine"] - v["bare"]) for v in r["val_loss"])
    loss_noise = median(abs(v["control"] - v["bare"]) for v in r["val_loss"])
    text = table(["contender", "ms/step (median)", "vs bare", "val loss (median)"], [
        ("bare loop (nanoGPT style)", r["bare_ms_per_step"], 1.0, median(v["bare"] for v in r["val_loss"])),
        ("bare loop copy (A/A)", r["bare_ms_per_step"] * r["control_ratio_median"], r["control_ratio_median"],
         median(v["control"] for v in r["val_loss"])),
        ("nnctl Engine.fit", r["engine_ms_per_step"], r["ratio_median"], median(v["engine"] for v in r["val_loss"])),
    ])
    print("\n" + text)
    met = r["ratio_median"] <= GOAL_RATIO and loss_gap <= max(0.02, 3 * loss_noise)
    goal = (f"engine time per GPT step <= {GOAL_RATIO}x the bare loop, validation loss within 0.02 of it "
            "(same data, same initial weights)")
    print(f"val loss |engine - bare| {loss_gap:.4f} (A/A |copy - bare| {loss_noise:.4f})")
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "threads": args.threads, "table": text,
              "seconds": round(time.perf_counter() - started, 1), "val_loss_gap": loss_gap,
              "val_loss_noise": loss_noise, **r,
              "headline": f"engine/bare {r['ratio_median']:.3f} (A/A {r['control_ratio_median']:.3f}), "
                          f"val loss gap {loss_gap:.4f}"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
