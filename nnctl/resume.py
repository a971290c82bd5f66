"""`nnctl train resume=PATH|auto`: the stored config, the checkpoint to continue from, and the run dir."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from nnctl import checkpoint as ck
from nnctl.errors import UserError

log = logging.getLogger(__name__)
IDENTITY_GROUPS = ("model", "data", "objective", "optimizer", "scheduler", "precision", "adapter")


def _identity(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        return {g: OmegaConf.to_container(cfg[g], resolve=True) for g in IDENTITY_GROUPS if g in cfg}
    except Exception:  # an old run whose config no longer resolves cannot be the same config
        return None


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
    path = find_auto(cfg) if cfg.resume == "auto" else ck.resolve_checkpoint(cfg.resume, prefer=ck.LAST)
    state = ck.load_checkpoint(path)
    stored = OmegaConf.create(state[ck.CONFIG])
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        root = key.split(".", 1)[0]
        if "." not in key or root in ("experiment", "debug"):  # a group choice: must not change what trains
            if root in IDENTITY_GROUPS and _identity(cfg)[root] != _identity(stored).get(root):
                raise UserError(f"the checkpoint was trained with a different {root} config; drop '{item}' "
                                "or start a new run without resume=", key="resume")
            continue
        old, new = OmegaConf.select(stored, key), OmegaConf.select(cfg, key)
        if root in IDENTITY_GROUPS and root not in ("optimizer", "scheduler", "data") and old != new:
            raise UserError(f"{key} differs from the checkpoint's ({old!r} -> {new!r}); resume cannot change "
                            "the model", key="resume")
        if old != new:
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
        OmegaConf.update(stored, key, new, force_add=True)
    stored.resume = str(path)
    run_dir = path.parent.parent
    log.info("resuming %s at epoch %d, step %d", run_dir, state[ck.EPOCH], state[ck.STEP])
    return stored, state, run_dir
