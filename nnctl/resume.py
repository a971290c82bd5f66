"""`nnctl train resume=PATH|auto`: the stored config, the checkpoint to continue from, and the run dir."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from nnctl import checkpoint as ck
from nnctl.errors import UserError

log = logging.getLogger(__name__)
IDENTITY_GROUPS = ("model", "data", "objective", "optimizer", "scheduler", "precision", "adapter")
# Keys a resumed run may change: how long and how it trains/logs, where files are, how data is read.
RESUME_MAY_CHANGE = ("trainer.", "eval.", "paths.", "logger.", "data.root", "data.num_workers",
                     "data.eval_batch_size", "data.download")
EXTEND = "trainer.extend_schedule"  # a decision for this resume only: never inherited from the stored config
LENGTH = ("max_epochs", "max_steps")  # the trainer keys that set how long a run (and its schedule) is


def _identity(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        return {g: OmegaConf.to_container(cfg[g], resolve=True) for g in IDENTITY_GROUPS if g in cfg}
    except Exception:  # an old run whose config no longer resolves cannot be the same config
        return None


def _first_difference(old: Any, new: Any, prefix: str) -> str:
    """'model.hidden_sizes: [16] -> [256, 128]' for the first key where two plain configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if old.get(k, "<absent>") != new.get(k, "<absent>"):
                return _first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}.{k}")
    return f"{prefix}: {old!r} -> {new!r}"


def find_auto(cfg: DictConfig) -> Path:
    """The newest run under paths.output_dir/train whose model/data/optimization config equals `cfg`'s."""
    want = _identity(cfg)
    root = Path(cfg.paths.output_dir) / "train"
    candidates = sorted(root.glob("*/*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for last in candidates:
        stored = last.parent.parent / ".hydra" / "config.yaml"
        if stored.is_file() and _identity(OmegaConf.load(stored)) == want:
            return last
    raise UserError(f"no resumable run with this config under {root} ({len(candidates)} run(s) checked); "
                    "drop resume=auto to start a new run", key="resume")


def resume_config(cfg: DictConfig, overrides: Sequence[str], config_dir: Path) -> tuple[DictConfig, dict, Path]:
    """Stored config + the command line's key=value overrides; group changes (model=...) are refused."""
    path = find_auto(cfg) if cfg.resume == "auto" else ck.resolve_checkpoint(cfg.resume, prefer=ck.LAST,
                                                                             key="resume")
    if path.parent.name != "checkpoints":  # the run dir is derived from the path; never write next to a loose file
        raise UserError(f"{path} is not inside a run's checkpoints/ dir, so there is no run to continue; pass the "
                        "run dir (outputs/train/<date>/<time>), or start a new run without resume=", key="resume")
    state = ck.load_checkpoint(path, key="resume", shards=False)  # a sharded run's weights stay in its folder
    missing = [k for k in (ck.OPTIMIZER, ck.SCHEDULER, ck.SCALER, ck.BATCH_IN_EPOCH, ck.TRACKERS, ck.RNG)
               if k not in state]
    if missing:
        raise UserError(f"{path} lacks the training state needed to resume ({', '.join(missing)}); evaluate it "
                        "with nnctl eval or start a new run", key="resume")
    stored = OmegaConf.create(state[ck.CONFIG])
    if OmegaConf.select(stored, EXTEND) is not None:
        OmegaConf.update(stored, EXTEND, False)
    if isinstance(overrides, ListConfig):  # iterating a ListConfig would resolve ${...} inside override strings
        overrides = OmegaConf.to_container(overrides, resolve=False)
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        root = key.split(".", 1)[0]
        if key == "logger":  # which trackers record the run may change; each continues its own run if it can
            stored.logger = cfg.logger
            continue
        if "." not in key or root in ("experiment", "debug"):  # a group choice: must not change what trains
            # experiment=/debug= can set any group; a group option must select what the checkpoint trained
            groups = IDENTITY_GROUPS if root in ("experiment", "debug") else (root,) if root in IDENTITY_GROUPS else ()
            for group in groups:
                now, then = (_identity(cfg) or {}).get(group), (_identity(stored) or {}).get(group)
                if now != then:
                    raise UserError(f"'{item}' gives a different {group} than the checkpoint was trained with "
                                    f"({_first_difference(then, now, group)}); resume continues the stored config: "
                                    f"drop '{item}', or start a new run without resume=", key="resume")
            continue
        old, new = OmegaConf.select(stored, key), OmegaConf.select(cfg, key)
        if old != new and not key.startswith(RESUME_MAY_CHANGE):
            # The restored optimizer/scheduler/data-order state would silently override such a change.
            raise UserError(f"{key} differs from the checkpoint's ({old!r} -> {new!r}) and cannot change on "
                            "resume; resume may change trainer.*, eval.*, paths.*, logger.* and "
                            "data.root/num_workers/eval_batch_size. Start a new run instead", key="resume")
        if old != new and key != EXTEND:
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
        OmegaConf.update(stored, key, new, force_add=True)
    if "logger" not in stored:  # a checkpoint from before the logger group: today's default trackers
        stored.logger = cfg.logger
    stored.resume = str(path)
    run_dir = path.parent.parent
    log.info("resuming %s at epoch %d, step %d", run_dir, state[ck.EPOCH], state[ck.STEP])
    return stored, state, run_dir


def continuation(cfg: DictConfig, state: dict[str, Any]) -> str:
    """How a resumed run goes on: "exact" (as if never stopped), "replan" (a fresh schedule over the steps left,
    asked for with trainer.extend_schedule=true) or "done" (the checkpoint is already as long as the run asks).

    A run that finished a length-bound schedule (cosine, one-cycle: its lr has reached the end value) is not
    trained longer at that lr: without trainer.extend_schedule that is refused with the two ways forward.
    """
    from hydra.utils import get_class

    stored, t = OmegaConf.create(state[ck.CONFIG]).trainer, cfg.trainer
    epoch, step = state[ck.EPOCH], state[ck.STEP]
    if cfg.get("stages"):  # the stages fix the run's length (trainer.max_epochs follows them), each its schedule
        from nnctl.stages import Stages

        return "done" if epoch >= Stages(cfg).total_epochs or (t.max_steps and step >= t.max_steps) else "exact"
    if epoch >= t.max_epochs or (t.max_steps and step >= t.max_steps):
        return "done"
    finished = epoch >= stored.max_epochs or bool(stored.max_steps and step >= stored.max_steps)
    changed = any(stored.get(k) != t.get(k) for k in LENGTH)
    schedule = cfg.scheduler._target_.rpartition(".")[2]
    if not changed or not getattr(get_class(cfg.scheduler._target_), "length_bound", True):
        return "exact"  # same length, or a schedule that continues the same curve over any length
    if t.get("extend_schedule", False):
        return "replan"
    if finished:
        raise UserError(
            f"the run finished its {schedule} schedule (epoch {epoch}, step {step}): its learning rate is at the "
            "final value, so training on would continue at that lr. To train longer, start a fresh schedule from "
            f"its weights with nnctl train init_from={cfg.resume} ..., or continue this run with a new {schedule} "
            "schedule over the added epochs/steps by adding trainer.extend_schedule=true", key="resume")
    log.warning("the %s schedule keeps the length it was planned for (max_epochs=%s, max_steps=%s); add %s=true "
                "to plan the steps left afresh", schedule, stored.max_epochs, stored.max_steps, EXTEND)
    return "exact"
