"""Where a run's weights start, and which of them train how fast: `init_from`, `finetune.freeze`, `finetune.lr_mult`.

`init_from=PATH` loads the weights of an nnctl checkpoint (not its optimizer or progress: a new run). Tensors whose
shape no longer fits (a new head for other classes) keep their fresh initialization, and the run says which. The
engine calls `starting_point` right after building the model and before the adapter wraps it.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from nnctl import checkpoint as ck
from nnctl.errors import UserError

log = logging.getLogger(__name__)


def starting_point(cfg: DictConfig, net: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """Load `init_from` into `net`, apply `finetune.*`; returns (net, reference to the starting checkpoint)."""
    reference: dict[str, str] = {}
    if cfg.get("init_from") is not None:
        reference = load_init(net, cfg.init_from)
    tune = OmegaConf.to_container(cfg.finetune) if cfg.get("finetune") is not None else {}
    _freeze(net, list(tune.get("freeze") or []))
    _lr_multipliers(net, dict(tune.get("lr_mult") or {}))
    return net, reference


def load_init(net: nn.Module, path: str) -> dict[str, str]:
    """Copy every fitting tensor of the checkpoint at `path` into `net`; warn about the re-initialized rest."""
    if not Path(str(path)).expanduser().exists():
        raise UserError(f"{path} does not exist; pass the nnctl checkpoint (or run dir) to start from. An adapter "
                        "checkpoint needs the base checkpoint it was trained from: restore it at this path",
                        key="init_from")
    file = ck.resolve_checkpoint(path, prefer=ck.BEST, key="init_from")
    state = ck.load_checkpoint(file, key="init_from")
    if state.get(ck.BASE):
        raise UserError(f"{file} holds adapter weights only; export it with merge=true (nnctl export) and start "
                        "from a full checkpoint", key="init_from")
    weights, own = state[ck.MODEL], net.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise UserError(f"no tensor of {file} fits this model (it was trained as a different architecture); "
                        "start from a checkpoint of the same model", key="init_from")
    net.load_state_dict(fits, strict=False)
    fresh = [k for k in own if k not in fits]
    if fresh:
        log.warning("init_from: %d tensor(s) do not fit the checkpoint and were re-initialized: %s", len(fresh),
                    ", ".join(fresh))
    unused = [k for k in weights if k not in own]
    if unused:
        log.warning("init_from: %d checkpoint tensor(s) have no place in this model: %s", len(unused),
                    ", ".join(unused[:10]))
    return {"init_from": str(file.resolve()), "sha256": sha256_file(file)}


def check_base(stored: dict[str, str], current: dict[str, str]) -> None:
    """An adapter checkpoint is only meaningful on the base it was trained on: refuse any other."""
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            where = stored.get("init_from") or "the model built from the stored config"
            raise UserError(f"the adapter checkpoint's base {where} changed since training ({key}: "
                            f"{str(stored.get(key))[:16]} -> {str(current.get(key))[:16]}); restore the original "
                            "base weights (same file / model.path)", key="init_from")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _matching(net: nn.Module, pattern: str, key: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose name fully matches the regex `pattern` or lies under a module of that name."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{pattern!r} is not a valid regex ({exc})", key=key) from None
    found = [(n, p) for n, p in net.named_parameters()
             if rx.fullmatch(n) or any(rx.fullmatch(n.rsplit(".", i)[0]) for i in range(1, n.count(".") + 1))]
    if not found:
        top = ", ".join(n for n, _ in net.named_children())
        raise UserError(f"{pattern!r} matches no parameter; module names start with: {top}", key=key)
    return found


def _freeze(net: nn.Module, patterns: list[str]) -> None:
    for pattern in patterns:
        for _, p in _matching(net, str(pattern), "finetune.freeze"):
            p.requires_grad_(False)


def _lr_multipliers(net: nn.Module, mults: dict[str, Any]) -> None:
    """Tag parameters with `lr_mult`; `nnctl.optimization.param_groups` gives each multiplier its own group."""
    for pattern, mult in mults.items():
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise UserError(f"got {mult!r} for {pattern!r}; expected a number > 0", key="finetune.lr_mult")
        for _, p in _matching(net, str(pattern), "finetune.lr_mult"):
            p.lr_mult = float(mult)
