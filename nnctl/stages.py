"""Staged (curriculum) training: named stages, each with its own number of epochs and config overrides merged
over the base config in order.

    stages:
      - {name: short, epochs: 2, overrides: {data.max_len: 6}}
      - {name: full, epochs: 4, overrides: {data.max_len: 12, optimizer.lr: 3.0e-4}}

Epoch and step counters are global; the run lasts the stages' epochs in total (trainer.max_epochs is set to that).
At a boundary the engine rebuilds what the new stage changes (data, objective, trainer settings), restarts the
learning-rate schedule over the stage's steps from the stage's optimizer settings, and keeps the optimizer's state
(momentum, Adam moments): a curriculum changes the lesson, not what was learned about the loss surface.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nnctl.errors import UserError

# What defines the trained model and the meaning of its checkpoint state cannot change between stages.
FIXED = ("model", "adapter", "precision", "optimizer._target_", "scheduler._target_", "objective._target_",
         "init_from", "finetune", "trainer.max_epochs", "trainer.max_steps", "trainer.seed", "trainer.device", "trainer.ema", "stages",
         "resume", "paths", "hydra", "command")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    first_epoch: int  # global epoch index where the stage starts
    epochs: int
    cfg: DictConfig   # the base config with this stage's overrides merged in


class Stages:
    def __init__(self, cfg: DictConfig) -> None:
        items = cfg.stages
        if not isinstance(items, ListConfig) or not items:
            raise UserError("expected a non-empty list of {name, epochs, overrides} mappings", key="stages")
        self.stages: list[Stage] = []
        first, names = 0, set()
        for i, item in enumerate(items):
            key = f"stages[{i}]"
            if not isinstance(item, DictConfig) or set(item) - {"name", "epochs", "overrides"}:
                raise UserError("each stage is a mapping with name, epochs and overrides (and nothing else), e.g. "
                                "{name: warmup, epochs: 2, overrides: {optimizer.lr: 0.01}}", key=key)
            name, epochs = item.get("name", f"stage{i}"), item.get("epochs")
            if not isinstance(name, str) or name in names:
                raise UserError(f"got name {name!r}; each stage needs its own name", key=f"{key}.name")
            if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
                raise UserError(f"got {epochs!r}; expected an integer >= 1", key=f"{key}.epochs")
            names.add(name)
            overrides = item.get("overrides")
            overrides = OmegaConf.create({}) if overrides is None else overrides
            self.stages.append(Stage(i, name, first, epochs, self._merge(cfg, overrides, key)))
            first += epochs
        self.total_epochs = first
        # The run lasts as long as its stages; the stored config says so too.
        for c in (cfg, *(s.cfg for s in self.stages)):
            OmegaConf.update(c, "trainer.max_epochs", first)

    @staticmethod
    def _merge(base: DictConfig, overrides: Any, key: str) -> DictConfig:
        if not isinstance(overrides, DictConfig):
            raise UserError("overrides is a mapping of dotted config keys to values, e.g. {data.batch_size: 64}",
                            key=f"{key}.overrides")
        cfg = copy.deepcopy(base)
        known = _dotted_keys(base)
        for dotted, value in OmegaConf.to_container(overrides, resolve=True).items():
            if dotted.startswith(FIXED) or any(dotted == f.split(".")[0] for f in FIXED):
                raise UserError(f"a stage cannot change {dotted} (it defines the model or the run); stages may "
                                "change data.*, optimizer and scheduler settings, objective settings and trainer "
                                "step mechanics", key=f"{key}.overrides")
            if dotted not in known:
                near = difflib.get_close_matches(dotted, known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise UserError(f"{dotted}: not a key of the config{hint}", key=f"{key}.overrides")
            OmegaConf.update(cfg, dotted, value, merge=True)
        return cfg

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> Stage:
        return self.stages[index]

    def at(self, epoch: int) -> Stage:
        """The stage that global epoch `epoch` (0-based) belongs to; the last one past the end."""
        for stage in self.stages:
            if epoch < stage.first_epoch + stage.epochs:
                return stage
        return self.stages[-1]

    def of_checkpoint(self, epochs_done: int, batch_in_epoch: int) -> Stage:
        """The stage whose schedule a checkpoint at this point holds: the stage of the epoch under way, or at an
        epoch boundary the stage that just finished (the next stage starts when training resumes)."""
        return self.at(epochs_done if batch_in_epoch or epochs_done == 0 else epochs_done - 1)

    def is_last_epoch(self, epoch: int) -> bool:
        """Whether 1-based epoch count `epoch` ends a stage."""
        return any(epoch == s.first_epoch + s.epochs for s in self.stages)


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k in cfg.keys():
        name = f"{prefix}{k}"
        out.append(name)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            out.extend(_dotted_keys(node, f"{name}."))
    return out
