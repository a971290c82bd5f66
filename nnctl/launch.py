"""Starting a job's processes, and one run dir for all of them.

Three ways in:
- `nnctl train trainer.nproc_per_node=N`: the Hydra job runs once (run dir, resolved config), then `launch` starts
  N workers (`python -m nnctl._worker CONFIG`) through `torch.distributed.launcher.api.elastic_launch`, torchrun's
  machinery.
- `torchrun ... -m nnctl train ...`, `srun` (one task per device), submitit: every process runs the Hydra app;
  ranks > 0 wait for rank 0's run dir (`external_args`, `publish_run_dir`: through the rendezvous store) and run
  Hydra in it without writing anything.
- A single process: nothing here does anything.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from nnctl.distributed import current, detect, join
from nnctl.errors import UserError

log = logging.getLogger(__name__)
RUN_DIR_KEY = "nnctl/run_dir"  # rank 0 publishes its run dir under this key of the rendezvous store


# -- external launch: one run dir for every rank ------------------------------------------------------------------
def external_args(args: list[str]) -> list[str]:
    """Hydra overrides for this process when an outside launcher started several: none for rank 0; ranks > 0 wait
    for rank 0's run dir and run Hydra in it without writing .hydra/ or a log file."""
    found = detect()
    if found is None:
        return args
    dist = join(*found)
    if dist.main:
        return args
    store = dist.rendezvous()
    run_dir = store.get(RUN_DIR_KEY).decode()
    if not run_dir:  # rank 0 failed before its run started, and said why
        raise SystemExit(2)
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [*args, f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null",
            f"hydra.job_logging.handlers.file.filename={os.devnull}"]


def publish_run_dir(run_dir: Path | None) -> None:
    """Rank 0 of an externally launched job: tell the other ranks the run dir (None: this job failed early)."""
    dist = current()
    if dist.world > 1 and dist.main and not dist.published:
        dist.published = True
        if dist.store is None:
            dist.rendezvous()
        dist.store.set(RUN_DIR_KEY, str(run_dir) if run_dir else "")


# -- nnctl's own launcher -------------------------------------------------------------------------------------------
def spawns(cfg: Any) -> bool:
    """Whether `nnctl train` starts the job's processes itself (trainer.nproc_per_node / nnodes > 1), after
    refusing settings that cannot work together."""
    t = cfg.trainer
    nproc, nnodes = t.get("nproc_per_node", 1), t.get("nnodes", 1)
    several = nproc * nnodes > 1 or current().world > 1
    sharded = t.checkpoint.get("sharded", False)
    if sharded and t.strategy != "fsdp":
        raise UserError("sharded checkpoints save the shards FSDP keeps on each process; set trainer.strategy=fsdp, "
                        "or trainer.checkpoint.sharded=false (a DDP replica saves one whole file)",
                        key="trainer.checkpoint.sharded")
    if t.strategy == "fsdp" and t.ema.enabled and (several or sharded):
        raise UserError("an EMA copy of a model sharded by FSDP is not supported; use trainer/ema=off or "
                        "trainer.strategy=ddp", key="trainer.strategy")
    if not several:
        return False
    if t.get("sync_batchnorm", False):
        from nnctl.runtime import pick_device

        if pick_device(t.device).type != "cuda":
            raise UserError("torch's SyncBatchNorm runs on GPUs only; set trainer.sync_batchnorm=false on "
                            f"{pick_device(t.device).type} (each process then normalizes with its own batch)",
                            key="trainer.sync_batchnorm")
    if t.strategy == "fsdp":
        from nnctl.objectives import objective_class, updates_in_turn

        if updates_in_turn(objective_class(cfg)):
            raise UserError(f"{objective_class(cfg).__name__} updates parts of the model in turn, calling them "
                            "outside the model's forward, where FSDP cannot gather their shards; use "
                            "trainer.strategy=ddp", key="trainer.strategy")
    if current().world > 1 and nproc * nnodes > 1:
        raise UserError(f"this process is already one of {current().world} started by torchrun/srun/submitit; "
                        "drop trainer.nproc_per_node and trainer.nnodes (the launcher sets them)",
                        key="trainer.nproc_per_node")
    if nnodes > 1 and not t.rdzv_endpoint:
        raise UserError("a job over several nodes meets at one address; set trainer.rdzv_endpoint=HOST:PORT (the "
                        "first node), or launch with srun / torchrun (README: More than one process)",
                        key="trainer.rdzv_endpoint")
    return current().world == 1


def launch(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Start trainer.nproc_per_node workers on this node (of trainer.nnodes) with torch's elastic launcher; they
    train from the resolved config and rank 0 writes into `run_dir`. Returns rank 0's metrics.json."""
    import hashlib
    import json
    import tempfile

    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from nnctl import checkpoint as ck
    from nnctl.errors import Interrupted, WorkersFailed

    t = cfg.trainer
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="nnctl-", delete=False) as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    config = LaunchConfig(
        min_nodes=t.nnodes, max_nodes=t.nnodes, nproc_per_node=t.nproc_per_node,
        run_id="nnctl-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12],  # equal on every node
        rdzv_backend="c10d", rdzv_endpoint=t.rdzv_endpoint or "localhost:0",  # port 0: a free one, no collisions
        max_restarts=0, monitor_interval=0.1, start_method="spawn")
    log.info("launching %d x %d worker(s) in %s", t.nnodes, t.nproc_per_node, run_dir)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "nnctl._worker", f.name)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise WorkersFailed(failure.exitcode, f"worker rank {rank} failed with exit code {failure.exitcode}"
                            f"{_cause(failure)}; the job stopped") from None
    except SignalException as exc:
        last = run_dir / "checkpoints" / ck.LAST
        raise Interrupted(int(exc.sigval), last if last.is_file() else None, run_dir) from None
    finally:
        Path(f.name).unlink(missing_ok=True)
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _cause(failure: Any) -> str:
    """The failing worker's exception message (recorded by the worker's @record), if it raised one."""
    message = failure.message if isinstance(failure.message, str) else ""
    if not message.strip() or message.startswith("To enable traceback"):  # no error file: it printed its own line
        return ""
    return f" ({message.strip().splitlines()[0]})"
