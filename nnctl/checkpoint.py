"""The one checkpoint format: a dict of tensors and plain values, written atomically, read with weights_only.

Nothing custom is pickled, so `torch.load(weights_only=True)` can read every checkpoint and refuses files that
would run code. The resolved config travels inside as YAML text, so `nnctl eval` and `resume` need nothing else.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnctl.errors import UserError

FORMAT_VERSION = 1
# Keys of the checkpoint dict.
FORMAT = "nnctl_format"
CONFIG = "config_yaml"
MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "grad_scaler"
EPOCH = "epoch"                 # epochs fully completed
STEP = "global_step"            # optimizer steps taken
BATCH_IN_EPOCH = "batch_in_epoch"  # batches of the current epoch already consumed (0 at epoch boundaries)
TRACKERS = "trackers"           # best-metric / early-stopping bookkeeping
METRICS = "metrics"             # metrics at save time
RNG = "rng"
EXTRA = "extra"                 # state of optional components (e.g. EMA weights)

BEST, LAST = "best.pt", "last.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states, as tensors and plain values only."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a temp file in the same dir, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {FORMAT: FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file, or a run dir / checkpoints dir holding `prefer` (falling back to the other one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for directory in (p / "checkpoints", p):
            for name in (prefer, LAST if prefer == BEST else BEST):
                if (directory / name).is_file():
                    return directory / name
        raise UserError(f"{p} holds no checkpoint (looked for checkpoints/{BEST} and checkpoints/{LAST}); "
                        "pass a run dir of a finished run or a .pt file", key="ckpt")
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass a checkpoint file or a run dir", key="ckpt")
    return p


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`. Anything else is refused with a UserError."""
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (an interrupted copy?); use another checkpoint", key="ckpt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} contains objects that are not plain tensors/values and was refused for "
                        "safety (it could run code); only nnctl checkpoints can be loaded", key="ckpt") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(exc).splitlines()[0]})",
                        key="ckpt") from exc
    if not isinstance(state, dict) or state.get(FORMAT) != FORMAT_VERSION or CONFIG not in state:
        raise UserError(f"{path} is not an nnctl checkpoint (no {FORMAT}/{CONFIG} entries)", key="ckpt")
    return state
