"""The one checkpoint format: a dict of tensors and plain values, written atomically, read with weights_only.

Nothing custom is pickled, so `torch.load(weights_only=True)` can read every checkpoint and refuses files that
would run code. The resolved config travels inside as YAML text, so `nnctl eval` and `resume` need nothing else.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import warnings
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
DATA = "data_state"             # what the data module built and the model depends on (e.g. a tokenizer)
LOGGERS = "loggers"             # experiment-tracker runs to continue on resume (MLflow / W&B run ids), by logger
BASE = "base"                   # adapter runs: what identifies the frozen base (init_from path + sha256, fingerprint)
SHARDS = "shards"               # sharded checkpoints: the folder (relative to the .pt) holding the weights' shards

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


def resolve_checkpoint(path: str | Path, prefer: str = BEST, key: str = "ckpt") -> Path:
    """A checkpoint file, or a run dir / checkpoints dir holding `prefer` (falling back to the other one).

    `key` names the argument the path came from (ckpt= for eval, resume= for train) in error messages.
    """
    if path is None or str(path).strip() == "":
        raise UserError("no checkpoint given; pass a checkpoint file or a run dir", key=key)
    p = Path(str(path)).expanduser()
    if p.is_dir():
        for directory in (p / "checkpoints", p):
            for name in (prefer, LAST if prefer == BEST else BEST):
                if (directory / name).is_file():
                    return directory / name
        raise UserError(f"{p} holds no checkpoint (looked for {BEST} and {LAST} in {p / 'checkpoints'} and {p}); "
                        "pass the run dir of a run that saved checkpoints, or a .pt file", key=key)
    if not p.exists():
        near = "" if p.parent.is_dir() or str(p.parent) == "" else f" ({p.parent} does not exist either)"
        raise UserError(f"{p} does not exist{near}; pass a checkpoint file (best.pt / last.pt) or a run dir "
                        "under outputs/train/", key=key)
    if not p.is_file():
        raise UserError(f"{p} is not a regular file; pass a checkpoint file or a run dir", key=key)
    return p


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", key: str = "ckpt",
                    shards: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`. Anything else is refused with a UserError naming `key`.

    torch.load runs with weights_only=True: a file that would need arbitrary classes or functions to unpickle
    (and so could run code) is refused before anything in it runs.

    A sharded checkpoint (nnctl.sharded) comes back, with `shards`, as a plain one: the whole model read from its
    folder in this process, without the optimizer state (only resume needs it). `shards=False` (resume, the
    processes of a job) leaves the weights in the folder, whose path SHARDS then gives, for every rank to read
    its own part.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); pass a checkpoint file or a run dir",
                        key=key) from exc
    if size == 0:
        raise UserError(f"{path} is empty (an interrupted copy?); use another checkpoint, e.g. the run's last.pt",
                        key=key)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip; old torch a pickle
        raise UserError(f"{path} is not a readable checkpoint (not a file written by torch.save); pass a best.pt / "
                        "last.pt written by nnctl train", key=key)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it better
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _is_weights_only_refusal(exc):
            raise UserError(f"{path} is not a readable checkpoint (corrupt pickle data: {_brief(exc)}); use another "
                            "checkpoint", key=key) from exc
        raise UserError(f"{path} was refused for safety: it holds pickled objects that are not plain tensors/values "
                        "and could run code when loaded (torch.load weights_only=True); only load checkpoints "
                        "written by nnctl", key=key) from exc
    except Exception as exc:  # zip/EOF/format errors: anything torch cannot parse is a bad file, not a bug
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {_brief(exc)}); use another "
                        "checkpoint, e.g. the run's last.pt or best.pt", key=key) from exc
    if not isinstance(state, dict) or FORMAT not in state:
        raise UserError(f"{path} is not an nnctl checkpoint (no {FORMAT!r} entry); pass a best.pt / last.pt "
                        "written by nnctl train", key=key)
    if state[FORMAT] != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {state[FORMAT]!r}, this nnctl reads format "
                        f"{FORMAT_VERSION}; use the nnctl version that wrote it", key=key)
    missing = [k for k in (CONFIG, MODEL) if k not in state]
    if missing:
        raise UserError(f"{path} is an incomplete nnctl checkpoint (missing {', '.join(missing)}); use another "
                        "checkpoint", key=key)
    try:
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(OmegaConf.create(state[CONFIG]), DictConfig):
            raise ValueError("not a mapping")
    except Exception as exc:
        raise UserError(f"{path} holds an unreadable config ({_brief(exc)}); use another checkpoint",
                        key=key) from exc
    if SHARDS in state:
        from nnctl import sharded

        folder = sharded.folder_of(path, state, key)
        if not shards:
            return {**state, SHARDS: str(folder)}
        weights = sharded.read_model(folder, state[MODEL])
        state = {k: v for k, v in state.items() if k not in (SHARDS, OPTIMIZER)}
        state[MODEL] = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    return state


def _brief(exc: BaseException) -> str:
    """The first sentence of an exception's first line (torch's messages go on for a paragraph)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    text = re.split(r"(?<=[a-z0-9)'])\. ", text, maxsplit=1)[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if len(text) < 200 else f"{type(exc).__name__}: {text[:200]}..."


def _is_weights_only_refusal(exc: BaseException) -> bool:
    """True when torch's weights_only unpickler refused a global/opcode (vs. plain corrupt pickle bytes)."""
    return re.search(r"unsupported (global|operand)|not an allowed global", str(exc), re.IGNORECASE) is not None
