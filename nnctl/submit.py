"""`nnctl submit`: run `nnctl train` as a SLURM job through submitit, one task per device on every node.

Each task exports torch.distributed's variables (submitit's TorchDistributedEnvironment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs `nnctl train` with the given overrides; nnctl detects them, rank 0
creates the run dir and the other ranks train in it (nnctl.distributed). `--local` runs the same tasks as local
processes (submitit's LocalExecutor), to try a job out without a cluster.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

USAGE = "nnctl submit [options] [--] [train overrides ...]"


class TrainTask:
    """What every SLURM task runs (pickled by submitit): `nnctl train OVERRIDES` as one rank of the job."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides

    def __call__(self) -> int:
        import submitit

        from nnctl.cli import main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = main(["train", *self.overrides])
        if code != 0:  # submitit marks the task failed and `nnctl submit --wait` reports it
            raise RuntimeError(f"nnctl train exited with code {code}")
        return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnctl submit", usage=USAGE, description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task each (default 0: CPU)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    p.add_argument("--folder", default="outputs/submitit/%j", help="submitit's logs and pickles (%%j: job id)")
    p.add_argument("--local", action="store_true", help="run the tasks as local processes instead of on SLURM")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    return p


def main(argv: list[str]) -> int:
    args, overrides = parser().parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        print(f"nnctl submit: error: unknown option {bad[0]}; see nnctl submit --help", file=sys.stderr)
        return 2
    try:
        import submitit
    except ImportError:
        print("nnctl submit: error: submitit is not installed; pip install submitit", file=sys.stderr)
        return 2
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    if args.local:
        executor: Any = submitit.LocalExecutor(folder=args.folder)
        executor.update_parameters(nodes=1, tasks_per_node=tasks, timeout_min=args.time,
                                   **({"gpus_per_node": args.gpus_per_node} if args.gpus_per_node else {}))
    else:
        executor = submitit.AutoExecutor(folder=args.folder, cluster="slurm")
        params: dict[str, Any] = {"nodes": args.nodes, "tasks_per_node": tasks, "timeout_min": args.time,
                                  "name": "nnctl-train"}
        if args.gpus_per_node:
            params["gpus_per_node"] = args.gpus_per_node
        if args.cpus_per_task:
            params["cpus_per_task"] = args.cpus_per_task
        if args.partition:
            params["slurm_partition"] = args.partition
        executor.update_parameters(**params)
    job = executor.submit(TrainTask(overrides))
    print(f"nnctl submit: job {job.job_id}: {args.nodes if not args.local else 1} node(s) x {tasks} task(s); "
          f"logs in {Path(str(job.paths.folder))}")
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as exc:  # submitit raises the failed task's error with its log
        print(f"nnctl submit: job {job.job_id} failed: {str(exc).strip().splitlines()[0]}; see "
              f"{job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"nnctl submit: job {job.job_id} finished")
    return 0
