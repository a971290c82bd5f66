"""Where a run's weights start, and which of them train when and how fast: `init_from`, `finetune.freeze`,
`finetune.lr_mult`, `finetune.unfreeze_schedule`.

`init_from=PATH` loads the weights of an nnctl checkpoint (not its optimizer or progress: a new run). Tensors whose
shape no longer fits (a new head for other classes) keep their fresh initialization, and the run says which. The
engine calls `starting_point` right after building the model and before the adapter wraps it, and builds the
`Unfreezing` of the schedule after it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator

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


# -- progressive unfreezing --------------------------------------------------------------------------------------------
SCHEDULE_KEY = "finetune.unfreeze_schedule"


class Unfreezing:
    """`finetune.unfreeze_schedule`: which parameters train in each epoch, e.g. the head alone, then the last block
    too, then everything.

        unfreeze_schedule:
          - {epoch: 0, unfreeze: [head]}            # from the start: only these train
          - {epoch: 2, unfreeze: ['features\\.[6-8]']}   # after 2 epochs: these too
          - {epoch: 4, unfreeze: ['.*']}            # after 4 epochs: everything

    A parameter the schedule names is in the optimizer from the first step, in the group its `finetune.lr_mult` and
    the weight-decay split give it (so the learning-rate schedule scales it like every other), and is frozen
    (requires_grad=False: no gradient, so no update, no weight decay and no optimizer state) until its epoch. Its
    Adam moments then start at its first update, with their own step count, as for a parameter that has just
    joined. Which parameters train depends on the epoch alone, so a run resumed from any checkpoint trains the
    same ones. Parameters the schedule never names, and those of `finetune.freeze`, stay frozen. Without a
    schedule every method is a no-op.
    """

    def __init__(self, steps: list[tuple[int, list[str]]]) -> None:
        self.steps = steps  # (epochs done, names of the parameters that train from then on), epochs increasing
        self.names = {n for _, names in steps for n in names}

    def trainable(self, epoch: int) -> set[str]:
        """Names of the scheduled parameters that train in (0-based) epoch `epoch`."""
        return {n for start, names in self.steps if start <= epoch for n in names}

    def apply(self, net: nn.Module, epoch: int) -> None:
        """Set requires_grad of every scheduled parameter for epoch `epoch`."""
        if not self.steps:
            return
        train = self.trainable(epoch)
        for name, p in net.named_parameters():
            if name in self.names:
                p.requires_grad_(name in train)

    def after_epoch(self, engine: Any, metrics: dict[str, float]) -> None:
        """Epoch hook: after epoch `engine.epoch` (its checkpoint written), unfreeze what the next epoch trains."""
        if self.steps:
            newly = self.trainable(engine.epoch) - self.trainable(engine.epoch - 1)
            self.apply(engine.net, engine.epoch)
            if newly:
                log.info("unfreeze_schedule: %d parameter tensor(s) train from epoch %d on", len(newly),
                         engine.epoch + 1)

    @contextlib.contextmanager
    def all_trainable(self, net: nn.Module) -> Iterator[None]:
        """While the optimizer is built: every scheduled parameter counts as trainable, so each has its place in
        the optimizer's parameter groups from the start."""
        if not self.steps:
            yield
            return
        before = {n: p.requires_grad for n, p in net.named_parameters() if n in self.names}
        for name, p in net.named_parameters():
            if name in self.names:
                p.requires_grad_(True)
        try:
            yield
        finally:
            for name, p in net.named_parameters():
                if name in before:
                    p.requires_grad_(before[name])


def unfreezing(cfg: DictConfig, net: nn.Module, world: int = 1) -> Unfreezing:
    """The run's `finetune.unfreeze_schedule` on `net` (the model as the adapter left it), checked; its epoch-0
    state applied. An empty schedule (the default) changes nothing."""
    schedule = OmegaConf.to_container(cfg.finetune, resolve=True).get("unfreeze_schedule") \
        if cfg.get("finetune") is not None else None
    if not schedule:
        return Unfreezing([])
    if not isinstance(schedule, list):
        raise UserError(f"got {schedule!r}; expected a list of {{epoch: E, unfreeze: [regex, ...]}}", key=SCHEDULE_KEY)
    from nnctl.adapters import is_adapted

    if is_adapted(net):
        raise UserError("progressive unfreezing trains base weights, which an adapter keeps frozen; use it with "
                        "adapter=none (full fine-tuning), or train the adapter without a schedule", key=SCHEDULE_KEY)
    if world > 1:
        raise UserError("progressive unfreezing runs in one process (DDP fixes the trained parameters when it wraps "
                        "the model); set trainer.nproc_per_node=1", key=SCHEDULE_KEY)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}  # finetune.freeze: frozen throughout
    steps: list[tuple[int, list[str]]] = []
    for i, entry in enumerate(schedule):
        where = f"{SCHEDULE_KEY}[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"epoch", "unfreeze"}:
            raise UserError(f"got {entry!r}; each entry is {{epoch: E, unfreeze: [regex, ...]}}, e.g. "
                            "{epoch: 2, unfreeze: [head]}", key=where)
        epoch, patterns = entry["epoch"], entry["unfreeze"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise UserError(f"got epoch {epoch!r}; expected the number of epochs after which these parameters "
                            "train (an integer >= 0)", key=where)
        if steps and epoch <= steps[-1][0]:
            raise UserError(f"epochs must increase from entry to entry: epoch {epoch} follows epoch "
                            f"{steps[-1][0]}", key=SCHEDULE_KEY)
        if not steps and epoch != 0:
            raise UserError(f"the first entry is at epoch {epoch}, so nothing would train before it; begin with "
                            "what trains from the start, e.g. {epoch: 0, unfreeze: [head]}", key=SCHEDULE_KEY)
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not patterns:
            raise UserError(f"got unfreeze {patterns!r}; expected a non-empty list of regexes", key=where)
        names = [n for pattern in patterns for n, _ in _matching(net, str(pattern), f"{where}.unfreeze")]
        steps.append((epoch, sorted(set(names) - frozen)))
    if steps[-1][0] >= cfg.trainer.max_epochs:
        log.warning("%s: the entry at epoch %d lies beyond the run's %d epoch(s) and never takes effect", SCHEDULE_KEY,
                    steps[-1][0], cfg.trainer.max_epochs)
    named = {n for _, names in steps for n in names}
    for name, p in net.named_parameters():  # before the optimizer is built: what the schedule does not name is frozen
        if name not in named:
            p.requires_grad_(False)
    plan = Unfreezing(steps)
    plan.apply(net, 0)
    log.info("unfreeze_schedule: %s", "; ".join(f"after {e} epoch(s) +{len(n)} tensor(s)" for e, n in steps))
    return plan
