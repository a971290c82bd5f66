"""Time to accuracy: Fashion-MNIST test accuracy reached by `nnctl train experiment=fashion_mnist_fast` within
10 minutes of wall time on this machine's CPU.

Runs the command exactly as a user would (fresh subprocess from the repository root, its run directory pinned
with hydra.run.dir under bench/results/runs/), measures the wall time of the whole command (start-up, data
loading, training, validation, checkpoints and the final test pass), then reads test accuracy from the run's
metrics.json. Goal: test accuracy >= 94.0% and wall time <= 600 s for each of three seeds (`--seeds`, default 42
-- the config's own -- then 1 and 2), run one after another so that each has both cores. A run is stopped at 1.5x
the budget.

Skips (met = null, with the reason) when the experiment config or the Fashion-MNIST files are missing; the files
are looked for where data=fashion_mnist looks: <data.root>/FashionMNIST/raw and /usr/share/datasets/fashion-mnist
(Debian's dataset-fashion-mnist).

Extra arguments are passed to `nnctl train` as overrides, e.g. a smoke test of this script:
    python -m bench.time_to_accuracy --experiment fashion_mnist_cnn trainer.max_epochs=1 data.limit=2000
(`--quick` adds exactly those two overrides and runs the config's seed only.)
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._common import CONFIG_DIR, RESULTS_DIR, ROOT, base_parser, nnctl_command, run_timed, table, verdict, \
    write_result

NAME = "time_to_accuracy"
GOAL_ACC, BUDGET_S = 0.94, 600.0
SEEDS = [42, 1, 2]  # the config's own seed first
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
DIRS = [ROOT / "data" / "FashionMNIST" / "raw", Path("/usr/share/datasets/fashion-mnist")]


def find_data() -> Path | None:
    for d in DIRS:
        if all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in FILES):
            return d
    return None


def run_seed(seed: int | None, args, overrides: list[str]) -> dict[str, Any]:
    """One timed `nnctl train` (seed None: the config's own); its accuracy, wall time and run directory."""
    suffix = "" if seed is None else f"-seed{seed}"
    run_dir = RESULTS_DIR / "runs" / f"{NAME}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    seeded = [] if seed is None else [f"trainer.seed={seed}"]
    cmd = [*nnctl_command(), "train", f"experiment={args.experiment}", *seeded, *overrides, f"hydra.run.dir={run_dir}"]
    print(f"running: {' '.join(cmd)}  (budget {args.budget:.0f} s)", flush=True)
    try:
        wall, proc = run_timed(cmd, timeout=1.5 * args.budget)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        wall, code = 1.5 * args.budget, None
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{NAME}{suffix}.log").write_text(output)
    metrics_path = run_dir / "metrics.json"
    row: dict[str, Any] = {"seed": seed, "wall_s": wall, "run_dir": str(run_dir.relative_to(ROOT))}
    if code != 0 or not metrics_path.is_file():
        row["error"] = "timed out" if code is None else f"exit code {code}"
        print(f"nnctl train failed ({row['error']}); output tail:\n{output[-3000:]}")
        return row
    metrics = json.loads(metrics_path.read_text())
    row.update(test_acc=metrics.get("test", {}).get("acc"), train_seconds=metrics.get("train_seconds"),
               epochs=metrics.get("epochs"), val_acc=metrics.get("val", {}).get("acc"), metrics=metrics)
    print(f"  test accuracy {_pct(row['test_acc'])} in {wall:.1f} s wall", flush=True)
    return row


def _pct(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}%"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--experiment", default="fashion_mnist_fast", help="configs/experiment/<name>.yaml")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="wall-time budget in seconds, per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS,
                        help=f"trainer.seed of each run, one after another (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("overrides", nargs="*", help="extra `nnctl train` overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["trainer.max_epochs=1", "data.limit=2000"] if args.quick else [])
    seeds: list[int | None] = [None] if args.quick else list(args.seeds)
    if any(o.lstrip("+").startswith("trainer.seed=") for o in overrides):
        parser.error("give seeds with --seeds, not as a trainer.seed override")
    goal = (f"experiment={args.experiment}: test accuracy >= {100 * GOAL_ACC:.1f}% within {args.budget:.0f} s wall"
            + (f", for each of {len(seeds)} seeds" if len(seeds) > 1 else ""))
    started = time.perf_counter()

    def skip(reason: str) -> dict[str, Any]:
        print(f"SKIPPED: {reason}")
        result = {"goal": goal, "met": None, "skipped": reason, "quick": args.quick, "headline": f"skipped: {reason}"}
        write_result(NAME, result)
        return result

    if not (CONFIG_DIR / "experiment" / f"{args.experiment}.yaml").is_file():
        return skip(f"configs/experiment/{args.experiment}.yaml does not exist (yet)")
    data_dir = find_data()
    if data_dir is None:
        return skip("Fashion-MNIST IDX files not found in " + ", ".join(map(str, DIRS)) +
                    " (apt-get install dataset-fashion-mnist)")
    print(f"data: {data_dir}", flush=True)
    runs = [run_seed(seed, args, overrides) for seed in seeds]  # one at a time: each run has both cores

    def ok(run: dict[str, Any]) -> bool:
        return run.get("test_acc") is not None and run["test_acc"] >= GOAL_ACC and run["wall_s"] <= args.budget

    met: bool | None = all(ok(r) for r in runs)
    rows = [("config" if r["seed"] is None else r["seed"], _pct(r.get("test_acc")), f"{r['wall_s']:.1f}",
             r.get("train_seconds"), r.get("epochs"), r.get("val_acc"), r.get("error") or ("yes" if ok(r) else "no"))
            for r in runs]
    text = table(["seed", "test accuracy", "wall s", "train s (engine)", "epochs", "val acc", "goal met"], rows)
    text += f"\ngoal per run: test accuracy >= {100 * GOAL_ACC:.1f}%, wall <= {args.budget:.0f} s"
    print(text)
    if overrides:
        met = None  # a shortened run checks the script; it says nothing about the goal
        print(f"note: overrides {' '.join(overrides)} were given: a check of the script, the goal is not judged")
    print(f"goal: {goal}: {'NOT JUDGED (script check)' if met is None else verdict(met)}")
    accs = "/".join(_pct(r.get("test_acc")).rstrip("%") for r in runs)
    walls = "/".join(f"{r['wall_s']:.0f}" for r in runs)
    label = "" if seeds == [None] else f" (seeds {', '.join(map(str, seeds))})"
    result = {"goal": goal, "met": met, "quick": args.quick, "overrides": overrides, "table": text,
              "seeds": seeds, "runs": runs, "wall_s": max(r["wall_s"] for r in runs),
              "seconds": round(time.perf_counter() - started, 1),
              "headline": f"test acc {accs}% in {walls} s{label}"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
