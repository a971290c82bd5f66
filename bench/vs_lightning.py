"""nnctl vs PyTorch Lightning, end to end: the same model, data, recipe and epochs, each run as a user would.

* nnctl -- `nnctl train trainer.max_epochs=E trainer.early_stopping.enabled=false` with every other setting at
  its default: digits (8x8x1, batch 64, random crop padding 1), the default CNN, AdamW + warmup-cosine, progress
  bar, TensorBoard, best.pt + last.pt every epoch, test pass at the end. (Early stopping is off only so both
  run exactly E epochs.)
* lightning -- bench/lightning_digits.py: a LightningModule wrapping the same nnctl CNN, Trainer with its default
  progress bar, a TensorBoardLogger, ModelCheckpoint(monitor val/acc, save_last=True), a DataLoader over a
  TensorDataset with torchvision transforms (RandomCrop(8, padding=1) + dtype + Normalize) applied per sample,
  the same split, optimizer, schedule and epochs, then trainer.test on the best checkpoint.

Both run as fresh subprocesses attached to a pseudo-terminal (so both progress bars are live, as at a terminal),
with the same environment and torch's default thread count (or --threads N for both), alternating nnctl/lightning/lightning/nnctl...

Two numbers per run:
  end-to-end per epoch -- wall time of the whole command (start-up, data loading, every epoch, test) / epochs;
  steady epoch         -- median time between consecutive epoch ends (training steps + validation + checkpoint +
                          logging of one epoch, after the first), from nnctl's train.log timestamps and from a
                          one-line Lightning callback.
Also shown, not judged: CPU seconds (user + system) of each whole run, which moves less with other load.
Ratio = lightning time / nnctl time (> 1: nnctl faster), median over repeats. Goal: nnctl >= 1.10x faster end to
end per epoch; judged on both numbers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench._common import PYTHON, base_parser, median, nnctl_command, run_in_terminal, table, verdict, write_result

NAME = "vs_lightning"
GOAL = 1.10
_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[nnctl\.engine\]\[INFO\] - epoch (\d+):")


def nnctl_epoch_ends(log: Path) -> list[float]:
    """Epoch-end times (epoch seconds) from the run's train.log ('epoch N: ...' is logged after checkpointing)."""
    ends = []
    for line in log.read_text().splitlines():
        m = _LOG_LINE.match(line)
        if m:
            ends.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return ends


def steady(ends: list[float]) -> float:
    return median(b - a for a, b in zip(ends, ends[1:]))


# What bench/lightning_digits.py hard-codes; checked against nnctl's composed defaults so the two cannot drift apart.
RECIPE = {"data._target_": "nnctl.data.vision.Digits", "data.batch_size": 64, "data.augment.crop_padding": 1,
          "data.augment.hflip": False, "data.val_fraction": 0.1, "model._target_": "nnctl.models.cnn.CNN",
          "optimizer._target_": "torch.optim.AdamW", "optimizer.lr": 3e-3, "optimizer.weight_decay": 0.05,
          "scheduler._target_": "nnctl.schedulers.WarmupCosine", "scheduler.warmup_fraction": 0.05,
          "trainer.label_smoothing": 0.0, "trainer.grad_accum_steps": 1, "trainer.grad_clip_norm": None}


def recipe_drift() -> list[str]:
    """Settings of `nnctl train`'s defaults that differ from what the Lightning program does."""
    from omegaconf import OmegaConf

    from bench._common import compose

    cfg = compose(["paths.run_dir=unused"])
    drift = []
    for key, expected in RECIPE.items():
        got = OmegaConf.select(cfg, key, default="<absent>")
        if got != expected:
            drift.append(f"{key}={got!r} (the Lightning program uses {expected!r})")
    return drift


def run_nnctl(epochs: int, work: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    run_dir = work / "nnctl"
    cmd = [*nnctl_command(), "train", f"trainer.max_epochs={epochs}", "trainer.early_stopping.enabled=false",
           f"hydra.run.dir={run_dir}"]
    wall, code, out, cpu = run_in_terminal(cmd, env=env, timeout=timeout)
    if code != 0:
        raise SystemExit(f"nnctl train failed ({code}):\n{out[-3000:]}")
    ends = nnctl_epoch_ends(run_dir / "train.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if len(ends) != epochs:
        raise SystemExit(f"nnctl ran {len(ends)} epochs, expected {epochs}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"wall_s": wall, "per_epoch_e2e_s": wall / epochs, "steady_epoch_s": steady(ends), "cpu_s": cpu,
            "test_acc": metrics.get("test", {}).get("acc")}


def run_lightning(epochs: int, workers: int, work: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    out_dir = work / "lightning"
    cmd = [PYTHON, "-m", "bench.lightning_digits", f"--epochs={epochs}", f"--workers={workers}", f"--out={out_dir}"]
    wall, code, out, cpu = run_in_terminal(cmd, env=env, timeout=timeout)
    if code != 0:
        raise SystemExit(f"lightning run failed ({code}):\n{out[-3000:]}")
    times = json.loads((out_dir / "times.json").read_text())
    if len(times["epoch_end"]) != epochs:
        raise SystemExit(f"lightning ran {len(times['epoch_end'])} epochs, expected {epochs}")
    shutil.rmtree(out_dir, ignore_errors=True)
    test = (times.get("test") or [{}])[0]
    return {"wall_s": wall, "per_epoch_e2e_s": wall / epochs, "steady_epoch_s": steady(times["epoch_end"]),
            "cpu_s": cpu,
            "test_acc": test.get("test/acc")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--epochs", type=int, help="epochs per run (default 10 = nnctl's default; --quick 4)")
    parser.add_argument("--repeats", type=int, help="runs of each (default 3, --quick 1)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Lightning DataLoader num_workers (default 0: fastest for 8x8 images on 2 cores)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    parser.add_argument("--max-seconds", type=float, default=300,
                        help="no new repeat starts after this many seconds (at least 2 run)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: unset, torch's default)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        import lightning  # noqa: F401
    except ImportError:
        raise SystemExit("lightning is not installed: pip install -e '.[bench]'")
    drift = recipe_drift()
    for line in drift:
        print(f"WARNING: nnctl's defaults changed: {line}; update bench/lightning_digits.py")
    epochs = args.epochs or (4 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"nnctl": [], "lightning": []}
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as tmp:
        work = Path(tmp)
        for r in range(repeats):
            if r >= 2 and time.perf_counter() - started > args.max_seconds:
                print(f"  stopping after {r} repeats: over the {args.max_seconds:.0f} s budget (a busy machine?)")
                break
            order = ["nnctl", "lightning"] if r % 2 == 0 else ["lightning", "nnctl"]
            for who in order:
                res = run_nnctl(epochs, work, args.timeout, env) if who == "nnctl" else \
                    run_lightning(epochs, args.workers, work, args.timeout, env)
                runs[who].append(res)
                print(f"  repeat {r + 1}/{repeats} {who:9s}: wall {res['wall_s']:.1f}s, cpu {res['cpu_s']:.1f}s, steady epoch "
                      f"{res['steady_epoch_s']:.3f}s, test acc {res['test_acc']}")
    med = {who: {k: median(r[k] for r in rs) for k in ("wall_s", "per_epoch_e2e_s", "steady_epoch_s", "cpu_s")}
           for who, rs in runs.items()}
    speedup = {k: med["lightning"][k] / med["nnctl"][k] for k in ("per_epoch_e2e_s", "steady_epoch_s")}
    rows = [("end-to-end per epoch (s)", med["nnctl"]["per_epoch_e2e_s"], med["lightning"]["per_epoch_e2e_s"],
             speedup["per_epoch_e2e_s"]),
            ("steady epoch (s)", med["nnctl"]["steady_epoch_s"], med["lightning"]["steady_epoch_s"],
             speedup["steady_epoch_s"]),
            ("whole run wall (s)", med["nnctl"]["wall_s"], med["lightning"]["wall_s"],
             med["lightning"]["wall_s"] / med["nnctl"]["wall_s"]),
            ("whole run CPU time, user+sys (s)", med["nnctl"]["cpu_s"], med["lightning"]["cpu_s"],
             med["lightning"]["cpu_s"] / med["nnctl"]["cpu_s"])]
    print(f"\ndigits + CNN, {epochs} epochs, {len(runs['nnctl'])} repeat(s), Lightning num_workers={args.workers}")
    text = table(["metric (median)", "nnctl", "lightning", "lightning/nnctl"], rows)
    print(text)
    met = all(v >= GOAL for v in speedup.values())
    goal = f"nnctl >= {GOAL:.2f}x faster than Lightning per epoch (end to end and steady state)"
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "epochs": epochs, "repeats": len(runs["nnctl"]),
              "table": text,
              "threads": args.threads or "torch default",
              "lightning_workers": args.workers, "recipe_drift": drift, "speedup": speedup, "median": med, "runs": runs,
              "seconds": round(time.perf_counter() - started, 1),
              "headline": f"nnctl faster by {speedup['per_epoch_e2e_s']:.2f}x end-to-end per epoch, "
                          f"{speedup['steady_epoch_s']:.2f}x steady epoch"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
