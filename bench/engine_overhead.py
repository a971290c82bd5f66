"""Engine overhead: time per training step of nnctl's Engine.fit versus a minimal hand-written PyTorch loop.

Contenders (same process, same torch thread count, same model weights at the start, same data, batch size,
optimizer, learning-rate schedule and number of steps):

* engine -- `nnctl.engine.Engine` built from the real composed config (`hydra.compose` of configs/train.yaml with
  data=digits and the case's model), run by `Engine.fit()` exactly as `nnctl train` does, with the progress bar
  off, checkpointing off, early stopping off (so both run the same number of steps) and log_every_n_steps at
  its default. Augmentation is switched off (data.augment.crop_padding=0) because the bare loop has none: both
  do the same arithmetic, and the engine's remaining data work (index the uint8 tensor, normalize per batch)
  counts as its overhead.
* bare -- the limit: a `for idx in randperm(...).view(n_batches, batch_size)` loop over the same training images
  normalized once up front (float tensor), calling forward, cross_entropy, backward, optimizer.step,
  zero_grad(set_to_none=True) and LambdaLR.step with the same AdamW parameter groups and warmup-cosine factor.

What is timed: only the training iterations of each epoch. The engine is instrumented from outside (its
`data.train_batches` is wrapped, nnctl is not modified): the clock starts when the engine asks for the first
batch of an epoch and stops when it asks for the batch after the last one, i.e. after the last optimizer step
(the batches reach it through itertools.chain, in C: the clock adds no Python call to its steps). Validation,
checkpointing, test evaluation and setup are outside the window. The bare loop's epoch is timed the same way.
Also shown, not judged: the ratio of the main thread's CPU time (time.thread_time) over the same windows, which a
busy machine disturbs far less than wall time; with --threads 1 it covers all the work. And an A/A control: a second bare loop, identical to the first, runs
next to them every epoch (odd epochs: bare, engine, copy; even epochs: copy, engine, bare); the median of
copy/bare is the noise floor of this harness on this machine (1.00 on a quiet one). An engine/bare ratio within
that distance of 1.00 cannot be told apart from no overhead.

Interleaving: each bare epoch runs right next to the engine epoch with the same index (before it on odd epochs,
after it on even ones), so each (engine, bare) pair sees the same machine load. The first `--warmup` epochs of
every repeat are dropped; the reported ratio is the median over all remaining pairs of
engine_epoch_seconds / bare_epoch_seconds (1.00 = no overhead). Cases: (a) the default CNN on digits (8x8x1,
batch 64), where the arithmetic dominates, and (b) the default MLP on the same data, where a step is so cheap
that per-step overhead shows most.

`--profile` additionally runs one profiled repeat of a case: cProfile restricted to the training window (top
functions by own time, for engine and bare), and the torch operators each launches per step.
"""
from __future__ import annotations

import copy
import cProfile
import io
import itertools
import math
import pstats
import tempfile
import time
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench._common import RESULTS_DIR, base_parser, compose, cpu_count, median, table, verdict, write_result

NAME = "engine_overhead"
GOAL_RATIO = 1.02
COMMON = ["data=digits", "trainer.device=cpu", "trainer.progress=false", "trainer.checkpoint.enabled=false",
          "trainer.early_stopping.enabled=false", "data.augment.crop_padding=0", "data.augment.hflip=false"]
CASES: dict[str, dict[str, Any]] = {
    # epochs/repeats at full settings; digits gives 20 training steps per epoch at batch 64
    "cnn": {"overrides": ["model=cnn"], "epochs": 8, "repeats": 5, "label": "CNN (default) on digits 8x8x1"},
    "mlp": {"overrides": ["model=mlp"], "epochs": 40, "repeats": 5, "label": "MLP (default) on digits 8x8x1"},
}


class BareLoop:
    """The hand-written loop: what a user would write with no framework at all."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 opt_cfg: dict[str, Any], sched_cfg: dict[str, Any], total_steps: int, label_smoothing: float,
                 seed: int) -> None:
        from hydra.utils import get_class

        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.label_smoothing = label_smoothing
        kw = {k: v for k, v in opt_cfg.items() if not k.startswith("_")}
        wd = kw.pop("weight_decay", 0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = get_class(opt_cfg["_target_"])(groups, **kw)
        warmup = max(1, int(total_steps * sched_cfg.get("warmup_fraction", 0.0)))
        floor = sched_cfg.get("min_lr_ratio", 0.0)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.gen = torch.Generator().manual_seed(seed)

    def epoch(self) -> int:
        model, opt, sched, x, y = self.model, self.opt, self.sched, self.x, self.y
        n_batches = len(y) // self.batch_size
        order = torch.randperm(len(y), generator=self.gen)[: n_batches * self.batch_size].view(n_batches, -1)
        model.train()
        for idx in order:
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=self.label_smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return n_batches

    def timed_epoch(self) -> tuple[float, int]:
        self.cpu_s, start, cpu = None, time.perf_counter(), time.thread_time()
        steps = self.epoch()
        self.cpu_s = time.thread_time() - cpu
        return time.perf_counter() - start, steps


def build(case: str, epochs: int, run_dir: str):
    """A fresh Engine from the composed config, and a BareLoop with a copy of its initial weights."""
    from nnctl.engine import Engine

    cfg = compose([*COMMON, *CASES[case]["overrides"], f"trainer.max_epochs={epochs}", f"paths.run_dir={run_dir}"])
    engine = Engine(cfg, run_dir)
    if not cfg.scheduler._target_.endswith("WarmupCosine"):
        raise SystemExit(f"the bare loop mirrors the default warmup_cosine schedule, not {cfg.scheduler._target_}")
    return engine, make_bare(engine)


def make_bare(engine) -> BareLoop:
    """A bare loop over the engine's training images (normalized once) with a copy of the engine's weights."""
    from omegaconf import OmegaConf

    cfg = engine.cfg
    x, y = engine.data.splits["train"]
    net = getattr(engine, "net", engine.model)  # the plain module, not a torch.compile wrapper
    return BareLoop(copy.deepcopy(net), engine.data.normalize(x), y.clone(), cfg.data.batch_size,
                    OmegaConf.to_container(cfg.optimizer, resolve=True),
                    OmegaConf.to_container(cfg.scheduler, resolve=True), engine.total_steps(),
                    cfg.trainer.label_smoothing, cfg.trainer.seed)


def instrument(engine, bare: BareLoop, pairs: list[dict[str, float]],
               hooks: tuple[Callable[[str], None], Callable[[str], None]] | None = None,
               control: BareLoop | None = None) -> None:
    """Wrap engine.data.train_batches so each engine epoch is timed and paired with one bare epoch (and one epoch
    of an identical second bare loop, `control`, whose ratio to the first is the harness's noise floor)."""
    original = engine.data.train_batches
    start_hook, stop_hook = hooks or (lambda who: None, lambda who: None)
    timed: dict[str, tuple[float, int, float]] = {}

    def run(loop: BareLoop | None) -> None:
        if loop is None:
            return
        who = "bare" if loop is bare else "control"
        start_hook(who)
        try:
            seconds, steps = loop.timed_epoch()
        finally:
            stop_hook(who)
        timed[who] = (seconds, steps, loop.cpu_s)

    def train_batches(epoch: int, seed: int, start: int = 0, stop: int | None = None):
        # odd epochs: bare, engine, control; even epochs: control, engine, bare
        before, after = (bare, control) if epoch % 2 == 1 else (control, bare)
        timed.clear()
        run(before)
        start_hook("engine")
        t0, c0 = time.perf_counter(), time.thread_time()
        # the engine's own batches, chained in C (the clock adds no Python call to its steps) to a primed
        # generator that finishes the epoch's record when the engine asks for the batch after the last, or when it
        # drops the iterator after its last step (max_steps reached: still an epoch)
        end = finish(epoch, start, t0, c0, after)
        next(end)
        return itertools.chain(original(epoch, seed, start, stop), end)

    def finish(epoch: int, start: int, t0: float, c0: float, after: BareLoop | None):
        try:
            yield
        finally:
            engine_s, engine_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
            stop_hook("engine")
            record(epoch, engine.batch_in_epoch - start, engine_s, engine_cpu_s, after)

    def record(epoch: int, steps: int, engine_s: float, engine_cpu_s: float, after: BareLoop | None) -> None:
        run(after)
        bare_s, bare_steps, bare_cpu_s = timed["bare"]
        if steps != bare_steps:  # (one step per batch: no gradient accumulation here)
            raise RuntimeError(f"engine ran {steps} steps, bare loop {bare_steps}: not comparable")
        pair = {"epoch": epoch, "steps": steps, "engine_s": engine_s, "bare_s": bare_s,
                "engine_cpu_s": engine_cpu_s, "bare_cpu_s": bare_cpu_s}
        if "control" in timed:
            pair["control_s"] = timed["control"][0]
        pairs.append(pair)

    engine.data.train_batches = train_batches


def run_case(case: str, epochs: int, repeats: int, warmup: int, max_seconds: float,
             control: bool = True) -> dict[str, Any]:
    from nnctl.reporting import console

    console.quiet = True  # epoch lines and the final table are outside the timed window; keep the output short
    pairs: list[dict[str, float]] = []
    started, done = time.perf_counter(), 0
    for r in range(repeats):
        if r >= 2 and time.perf_counter() - started > max_seconds:
            print(f"  {case}: stopping after {r} repeats: over the {max_seconds:.0f} s budget (a busy machine?)")
            break
        done = r + 1
        with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
            engine, bare = build(case, epochs, run_dir)
            mine: list[dict[str, float]] = []
            instrument(engine, bare, mine, control=make_bare(engine) if control else None)
            engine.fit()
            kept = [dict(p, repeat=r) for p in mine if p["epoch"] >= warmup]
            pairs += kept
            print(f"  {case} repeat {r + 1}/{repeats}: engine/bare per epoch "
                  f"{median(p['engine_s'] / p['bare_s'] for p in kept):.3f}{_aa(kept)} (median of {len(kept)} pairs)")
    console.quiet = False
    ratios = [p["engine_s"] / p["bare_s"] for p in pairs]
    engine_ms = [1e3 * p["engine_s"] / p["steps"] for p in pairs]
    bare_ms = [1e3 * p["bare_s"] / p["steps"] for p in pairs]
    overhead_us = [1e6 * (p["engine_s"] - p["bare_s"]) / p["steps"] for p in pairs]
    return {
        "case": case, "label": CASES[case]["label"], "epochs": epochs, "repeats": done, "warmup_epochs": warmup,
        "steps_per_epoch": pairs[0]["steps"] if pairs else None, "pairs": len(pairs),
        "engine_ms_per_step": median(engine_ms), "bare_ms_per_step": median(bare_ms),
        "ratio_median": median(ratios),
        "control_ratio_median": median(p["control_s"] / p["bare_s"] for p in pairs if "control_s" in p),
        "cpu_ratio_median": median(p["engine_cpu_s"] / p["bare_cpu_s"] for p in pairs),
        "ratio_of_min": min(engine_ms) / min(bare_ms) if pairs else float("nan"),
        "overhead_us_per_step": median(overhead_us),
        "ratio_q1_q3": _quartiles(ratios),
        "raw_pairs": pairs,
    }


def _aa(pairs: list[dict[str, float]]) -> str:
    """The A/A control's median ratio as ", A/A 1.004", printed beside every engine/bare ratio: the noise in view."""
    ratios = [p["control_s"] / p["bare_s"] for p in pairs if "control_s" in p]
    return f", A/A {median(ratios):.3f}" if ratios else ""


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 4:
        return [min(values, default=float("nan")), max(values, default=float("nan"))]
    import statistics

    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# -- profiling ------------------------------------------------------------------------------------------------------
def profile_case(case: str, epochs: int, top: int) -> dict[str, Any]:
    """cProfile and torch-operator counts of the training window only (engine vs bare), one repeat."""
    from nnctl.reporting import console

    console.quiet = True
    profilers = {"engine": cProfile.Profile(), "bare": cProfile.Profile()}
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
        engine, bare = build(case, epochs, run_dir)
        pairs: list[dict[str, float]] = []
        instrument(engine, bare, pairs, hooks=(lambda who: profilers[who].enable(),
                                               lambda who: profilers[who].disable()))
        engine.fit()
    steps = sum(p["steps"] for p in pairs)
    out: dict[str, Any] = {"case": case, "steps": steps, "cprofile": {}}
    for who, prof in profilers.items():
        prof.dump_stats(str(RESULTS_DIR / f"{NAME}.{case}.{who}.prof"))
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        out["cprofile"][who] = text.getvalue()
        print(f"\n=== cProfile, {who}, {case}: {steps} steps (top {top} by own time) ===")
        print(_trim_pstats(text.getvalue()))
    out["ops_per_step"] = op_counts(case)
    console.quiet = False
    return out


def op_counts(case: str, epochs: int = 5, profiled: int = 3) -> dict[str, Any]:
    """Torch operators per training step over the last `profiled` epochs, engine vs bare (torch.profiler, CPU):
    how many each launches from Python, and the self CPU time per operator (are the same kernels slower?)."""
    from torch.profiler import ProfilerActivity, profile

    counts: dict[str, Counter] = {"engine": Counter(), "bare": Counter()}
    self_us: dict[str, Counter] = {"engine": Counter(), "bare": Counter()}
    steps: dict[str, int] = {"engine": 0, "bare": 0}
    active: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
        engine, bare = build(case, epochs, run_dir)
        pairs: list[dict[str, float]] = []

        def start(who: str) -> None:
            if engine.epoch >= epochs - profiled:  # the last epochs only: everything is warm
                active[who] = profile(activities=[ProfilerActivity.CPU])
                active[who].__enter__()

        def stop(who: str) -> None:
            prof = active.pop(who, None)
            if prof is not None:
                prof.__exit__(None, None, None)
                for ev in prof.events():
                    self_us[who][ev.name] += ev.self_cpu_time_total
                    if ev.cpu_parent is None:  # top-level operators only (what Python launched)
                        counts[who][ev.name] += 1

        instrument(engine, bare, pairs, hooks=(start, stop))
        engine.fit()
        steps["engine"] = steps["bare"] = sum(p["steps"] for p in pairs[-profiled:])
    rows = []
    for name in sorted(set(counts["engine"]) | set(counts["bare"]),
                       key=lambda n: -(counts["engine"][n] - counts["bare"][n])):
        e, b = counts["engine"][name] / steps["engine"], counts["bare"][name] / steps["bare"]
        if abs(e - b) > 1e-9:
            rows.append((name, e, b, e - b))
    print(f"\n=== top-level torch ops per step that differ, {case} (engine vs bare) ===")
    print(table(["op", "engine/step", "bare/step", "extra"], rows[:40]))
    total_e = sum(counts["engine"].values()) / steps["engine"]
    total_b = sum(counts["bare"].values()) / steps["bare"]
    print(f"total top-level ops per step: engine {total_e:.1f}, bare {total_b:.1f}")
    top = sorted(set(self_us["engine"]) | set(self_us["bare"]),
                 key=lambda n: -max(self_us["engine"][n], self_us["bare"][n]))[:20]
    time_rows = [(n, self_us["engine"][n] / steps["engine"], self_us["bare"][n] / steps["bare"],
                  (self_us["engine"][n] / steps["engine"]) - (self_us["bare"][n] / steps["bare"])) for n in top]
    total_te = sum(self_us["engine"].values()) / steps["engine"]
    total_tb = sum(self_us["bare"].values()) / steps["bare"]
    print(f"\n=== self CPU time per step of the costliest operators, {case} (us; profiler-inflated) ===")
    print(table(["op", "engine us/step", "bare us/step", "extra us"], time_rows))
    print(f"all recorded operators: engine {total_te:,.0f} us/step, bare {total_tb:,.0f} us/step")
    return {"engine_total": total_e, "bare_total": total_b,
            "differing": [{"op": r[0], "engine": r[1], "bare": r[2]} for r in rows],
            "self_cpu_us_per_step": {"engine": total_te, "bare": total_tb,
                                     "top": [{"op": r[0], "engine": r[1], "bare": r[2]} for r in time_rows]}}


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(lines[max(0, start - 2):])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, help="fresh engine runs per case (default: per case)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: per case)")
    parser.add_argument("--warmup", type=int, default=2, help="epochs dropped at the start of every run")
    parser.add_argument("--max-seconds", type=float, default=240,
                        help="per case: no new repeat starts after this many seconds (at least 2 run)")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="torch.set_num_threads for both")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the A/A control (a second, identical bare loop: the harness's noise floor)")
    parser.add_argument("--profile", action="store_true", help="also profile one run per case (cProfile, ops)")
    parser.add_argument("--top", type=int, default=30, help="functions shown per cProfile listing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for case in args.cases:
        spec = CASES[case]
        epochs = args.epochs or (max(args.warmup + 2, spec["epochs"] // 4) if args.quick else spec["epochs"])
        repeats = args.repeats or (2 if args.quick else spec["repeats"])
        print(f"{case}: {spec['label']}, {repeats} repeat(s) x {epochs} epochs, {args.threads} thread(s)")
        results.append(run_case(case, epochs, repeats, args.warmup, args.max_seconds, args.control))
    profiles = {}
    if args.profile:
        for case in args.cases:
            profiles[case] = profile_case(case, max(4, args.warmup + 2), args.top)
    # the A/A ratio sits beside the judged ratio: an engine/bare no further from 1.00 than it is noise
    rows = [(r["label"], r["steps_per_epoch"], r["pairs"], r["bare_ms_per_step"], r["engine_ms_per_step"],
             r["overhead_us_per_step"], r["ratio_median"], r["control_ratio_median"], r["ratio_of_min"],
             r["cpu_ratio_median"]) for r in results]
    text = table(["case", "steps/epoch", "pairs", "bare ms/step", "engine ms/step", "overhead us/step",
                  "engine/bare (median)", "A/A: bare copy/bare (median)", "engine/bare (min)",
                  "main-thread CPU engine/bare"], rows)
    print("\n" + text)
    met = all(r["ratio_median"] <= GOAL_RATIO for r in results)
    goal = f"engine time per step within {100 * (GOAL_RATIO - 1):.0f}% of the bare loop (ratio <= {GOAL_RATIO})"
    print(f"goal: {goal}: {verdict(met)}")
    summary = {r["case"]: {k: r[k] for k in ("label", "ratio_median", "ratio_of_min", "cpu_ratio_median",
                                             "control_ratio_median",
                                             "engine_ms_per_step",
                                             "bare_ms_per_step", "overhead_us_per_step")} for r in results}
    result = {"goal": goal, "met": met, "quick": args.quick, "threads": args.threads, "table": text,
              "seconds": round(time.perf_counter() - started, 1), "summary": summary, "cases": results,
              "headline": "; ".join(f"{r['case']}: engine/bare {r['ratio_median']:.3f}"
                                    + (f" (A/A {r['control_ratio_median']:.3f})"
                                       if r["control_ratio_median"] == r["control_ratio_median"] else "")
                                    for r in results)}
    if profiles:
        result["profile"] = profiles
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
