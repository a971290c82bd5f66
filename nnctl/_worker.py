"""One worker of `nnctl train trainer.nproc_per_node=N`: `python -m nnctl._worker CONFIG.yaml`.

The launcher (nnctl.launch.launch) has composed and resolved the config once and created the run dir; the
elastic agent sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. No Hydra here: one run dir per job.
Exit codes follow `nnctl train`: 0, 2 for a user error (one line on stderr), 128+signal after a graceful stop.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def _die_with_launcher() -> None:
    """Linux: have the kernel SIGKILL this worker when the launcher dies, even by kill -9 (the elastic agent starts
    workers in sessions of their own, so they would otherwise train on as orphans and write into the run dir)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def share_cores() -> None:
    """Give this worker its share of the intra-op threads: N workers each starting torch's default (every core)
    oversubscribe the CPU (measured on 2 cores, 2 CPU workers: 23.6-27.1 s an epoch, 18.0 s with one thread each).
    torchrun does the same with OMP_NUM_THREADS=1; an OMP_NUM_THREADS the user set wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by the elastic agent: workers on this node
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)  # an exception's message reaches the launcher's error line


def _main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from nnctl import checkpoint as ck
    from nnctl import distributed
    from nnctl.commands import train, user_message
    from nnctl.errors import USER_ERROR_EXIT, Interrupted

    _die_with_launcher()
    share_cores()
    cfg = OmegaConf.load(argv[0])
    run_dir = Path(cfg.paths.run_dir)
    found = distributed.detect()
    dist = distributed.join(*found) if found else distributed.current()
    if dist.main:  # continue the launcher's log file, in Hydra's format
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    try:
        state = ck.load_checkpoint(Path(cfg.resume), key="resume", shards=False) if cfg.resume else None
        train(cfg, run_dir, state)
    except Interrupted as exc:
        if dist.main:
            print(f"nnctl train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        message = user_message(exc, "train")
        if message is None:
            raise
        print(f"nnctl train: error: {message}" + (f" (rank {dist.rank})" if dist.rank else ""), file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
