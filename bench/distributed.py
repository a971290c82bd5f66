"""Distributed training: throughput of 1 vs 2 processes, and the engine's per-step overhead under DDP.

Two measurements:

* scaling -- `nnctl train trainer.nproc_per_node=N` end to end (N = 1, 2; gloo on CPU, the default CNN on digits,
  data.batch_size=64 per process, so 2 processes step a global batch of 128). Reported: the training throughput
  of the last epoch from metrics.json (train/samples_per_s, global samples), repeats interleaved 1, 2, 2, 1, ...
  On a 2-core machine two processes share the cores one process's threads had: expect about 1x, not 2x; the
  number shows the cost of gradient all-reduce and the launcher, not a speed-up.
* overhead -- inside one 2-process job (started with torch.distributed.run), epoch by epoch interleaved:
  `Engine.fit` under DDP (the real engine from the composed config, progress/checkpoints/early stopping off,
  augmentation off) vs a bare DDP loop (the same model wrapped in DistributedDataParallel, the rank's half of the
  training images normalized once, forward / cross_entropy / backward / AdamW / warmup-cosine). Only training
  iterations are timed (bench.engine_overhead's instrumentation), with an A/A control: a second, identical bare
  DDP loop whose ratio to the first is the noise floor of two processes sharing two cores (each step waits for the
  slower rank). Goal: engine / bare <= 1.05 (median of pairs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import PYTHON, ROOT, base_parser, median, nnctl_command, table, verdict, write_result

NAME = "distributed"
GOAL_RATIO = 1.05
SCALING = ["data=digits", "model=cnn", "data.batch_size=64", "trainer.device=cpu", "trainer.progress=false",
           "trainer.checkpoint.enabled=false", "trainer.early_stopping.enabled=false"]


# -- scaling: nnctl train with 1 and 2 processes ---------------------------------------------------------------------
def scaling(repeats: int, epochs: int) -> dict[str, Any]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(repeats):
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
            with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as tmp:
                cmd = [*nnctl_command(), "train", *SCALING, f"trainer.max_epochs={epochs}",
                       f"trainer.nproc_per_node={nproc}", f"hydra.run.dir={tmp}/run"]
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, _cores() // nproc)))
                done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                rate = json.loads(Path(tmp, "run", "metrics.json").read_text())["train/samples_per_s"]
            rates[nproc].append(rate)
            print(f"  scaling repeat {r + 1}/{repeats}: {nproc} process(es) {rate:,.0f} samples/s")
    one, two = median(rates[1]), median(rates[2])
    return {"samples_per_s_1": one, "samples_per_s_2": two, "speedup": two / one, "raw": rates,
            "epochs": epochs, "batch_size_per_process": 64}


def _cores() -> int:
    from bench._common import cpu_count

    return cpu_count()


# -- overhead: Engine under DDP vs a bare DDP loop -------------------------------------------------------------------
def overhead(epochs: int, warmup: int) -> dict[str, Any]:
    """Run the 2-process job below and read rank 0's pairs."""
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as tmp:
        out = Path(tmp) / "pairs.json"
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench.distributed",
               "--worker", str(out), "--epochs", str(epochs)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
            "PYTHONPATH", "")]))
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        pairs = [p for p in json.loads(out.read_text()) if p["epoch"] >= warmup]
    ratios = [p["engine_s"] / p["bare_s"] for p in pairs]
    return {"pairs": len(pairs), "steps_per_epoch": pairs[0]["steps"] if pairs else None,
            "engine_ms_per_step": median(1e3 * p["engine_s"] / p["steps"] for p in pairs),
            "bare_ms_per_step": median(1e3 * p["bare_s"] / p["steps"] for p in pairs),
            "overhead_us_per_step": median(1e6 * (p["engine_s"] - p["bare_s"]) / p["steps"] for p in pairs),
            "ratio_median": median(ratios), "control_ratio_median": median(p["control_s"] / p["bare_s"] for p in pairs),
            "raw_pairs": pairs, "epochs": epochs, "warmup_epochs": warmup}


def worker(out: str, epochs: int) -> None:
    """One rank of the overhead job: the engine and a bare DDP loop, epoch by epoch."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from bench.engine_overhead import COMMON, instrument, make_bare
    from bench._common import compose
    from nnctl import distributed
    from nnctl.engine import Engine
    from nnctl.reporting import console

    torch.set_num_threads(1)
    dist = distributed.join(*distributed.detect())
    console.quiet = True
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-") as run_dir:
        cfg = compose([*COMMON, "model=cnn", f"trainer.max_epochs={epochs}", f"paths.run_dir={run_dir}"])
        engine = Engine(cfg, run_dir)
        steps = engine.batches_per_epoch("train")
        per = cfg.data.batch_size
        keep = torch.arange(steps * per * dist.world)[dist.rank::dist.world]  # this rank's half, `steps` batches

        def ddp_bare():
            bare = make_bare(engine)  # the whole training set, a copy of the initial weights
            bare.x, bare.y = bare.x[keep], bare.y[keep]
            bare.model = DistributedDataParallel(bare.model)  # the optimizer holds the same parameters
            return bare

        pairs: list[dict[str, float]] = []
        instrument(engine, ddp_bare(), pairs, control=ddp_bare())  # the control: an identical bare loop (A/A)
        engine.fit()
    if dist.main:
        Path(out).write_text(json.dumps(pairs))
    dist.teardown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="scaling runs per process count")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per scaling run")
    parser.add_argument("--overhead-epochs", type=int, default=24, help="epochs of the overhead job")
    parser.add_argument("--warmup", type=int, default=2, help="overhead epochs dropped at the start")
    parser.add_argument("--worker", metavar="OUT", help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.epochs)
        return {}
    if args.quick:
        args.repeats, args.epochs, args.overhead_epochs, args.warmup = 1, 2, 4, 1
    started = time.perf_counter()
    scale = scaling(args.repeats, args.epochs)
    over = overhead(args.overhead_epochs, args.warmup)
    met = over["ratio_median"] <= GOAL_RATIO
    text = table(["measure", "value"], [
        ["samples/s, 1 process", scale["samples_per_s_1"]],
        ["samples/s, 2 processes", scale["samples_per_s_2"]],
        ["2 / 1", scale["speedup"]],
        ["engine ms/step under DDP", over["engine_ms_per_step"]],
        ["bare DDP loop ms/step", over["bare_ms_per_step"]],
        ["engine / bare (median of pairs)", over["ratio_median"]],
        ["A/A: bare copy / bare (median of pairs)", over["control_ratio_median"]],
        ["engine overhead us/step", over["overhead_us_per_step"]],
    ])
    print("\n" + text)
    print(f"goal engine/bare <= {GOAL_RATIO}: {verdict(met)}")
    headline = (f"engine/bare under DDP {over['ratio_median']:.3f} (A/A {over['control_ratio_median']:.3f}); "
                f"2 vs 1 process {scale['speedup']:.2f}x samples/s")
    result = {"scaling": scale, "overhead": over, "goal": f"engine / bare DDP loop <= {GOAL_RATIO}", "met": met,
              "table": text, "headline": headline,
              "seconds": round(time.perf_counter() - started, 1)}
    write_result(NAME, result)
    return result


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main(sys.argv[1:])
