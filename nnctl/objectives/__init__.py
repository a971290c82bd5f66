"""Training objectives: what a batch means to a model (loss, metrics, sample count), kept out of the engine loop.

An objective turns (model, batch) into a loss and per-batch sums, and adds evaluation sums to running averages.
The engine only calls `training_steps`, `count` and `eval_update` (and `optimizer_groups` once), so regression,
language modelling or generative objectives plug in with their own class and `objective/<name>.yaml`.

`objective=auto` (the default) picks the objective a model names (its class attribute `objective`, e.g. a GAN's
"gan": generative models train on labelled image data whatever its target), else the one for the data's target
kind (`spec["target"]`).
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from nnctl.errors import UserError
from nnctl.metrics import Averages

Batch = Any  # whatever the data module yields: a tuple of tensors, a dict, ...
Step = tuple[str, torch.Tensor, dict[str, torch.Tensor]]  # (parameter group, mean loss, per-batch sums)


class Objective:
    """Base class. Subclasses implement `training_step` (or `training_steps` for several updates per batch)
    and `eval_update`."""

    monitor = ("val/loss", "min")  # what trainer.checkpoint.monitor=auto selects best.pt by: (metric, mode)

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and mean loss. Returns (loss, {metric name: sum over the batch}), all on the device: the
        engine averages the sums per sample (so `acc` is returned as a count of correct predictions)."""
        raise NotImplementedError

    def training_steps(self, model: nn.Module, batch: Batch) -> Iterable[Step]:
        """The updates of one batch, in order: (group, loss, sums) each; the engine runs backward and steps that
        group's optimizer before taking the next one. One group by default, computed in this call; an objective
        with several (a GAN's) yields them from a generator, so that each forward pass runs after the previous
        update. The engine calls this, and asks for each next update, under autocast when it is on."""
        loss, sums = self.training_step(model, batch)
        return (("main", loss, sums),)

    def optimizer_groups(self, net: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimizer, in update order. One optimizer over every trainable parameter by default."""
        return {"main": [p for p in net.parameters() if p.requires_grad]}

    def count(self, batch: Batch) -> int:
        """Samples in a batch (the weight of its mean loss in the epoch average). Must not wait for the device."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        first = next(iter(first.values())) if isinstance(first, dict) else first
        return len(first)

    def eval_update(self, model: nn.Module, batch: Batch, metrics: Averages, tta: str | bool | None) -> None:
        """Run the model on an evaluation batch; add its per-sample sums to `metrics` (names unprefixed)."""
        raise NotImplementedError

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the epoch's averages (e.g. perplexity = exp(loss), R^2 from sums of squares);
        may drop helper sums. Called on training and evaluation averages (unprefixed names)."""
        return means

    def after_validation(self, model: nn.Module, data: Any, epoch: int, run_dir: Path, loggers: Any,
                         step: int) -> None:
        """Called after each validation with the evaluation weights: e.g. write a text sample or an image grid to
        the run's trackers (`loggers.text(tag, text, step)`, `loggers.images(tag, N x C x H x W tensor or a PNG
        path, step)`). Nothing by default."""


# spec["target"] (or a model's `objective` name) -> the objective class that trains it ("module:Class", imported
# on use)
OBJECTIVES: dict[str, str] = {
    "class": "nnctl.objectives.classification:Classification",
    "regression": "nnctl.objectives.regression:Regression",
    "seq2seq": "nnctl.objectives.seq2seq:Seq2Seq",
    "gan": "nnctl.objectives.generative:GANObjective",
    "vae": "nnctl.objectives.generative:VAEObjective",
    "diffusion": "nnctl.objectives.generative:DiffusionObjective",
    "causal_lm": "nnctl.objectives.causal_lm:CausalLM",
    "next_token": "nnctl.objectives.language_model:LanguageModel",
}


def auto(target: str, model: nn.Module | None = None, **options: Any) -> Objective:
    """The objective the model names (`model.objective`), else the one registered for the data's target kind,
    completed with the options and spec entries its constructor accepts (e.g. label_smoothing only reaches
    classifiers)."""
    from nnctl.spec import complete

    target = getattr(model, "objective", None) or target
    if target not in OBJECTIVES:
        raise UserError(f"no objective trains a {target!r} target; registered: {', '.join(OBJECTIVES)}",
                        key="objective")
    module, name = OBJECTIVES[target].split(":")
    cls = getattr(importlib.import_module(module), name)
    return complete(functools.partial(cls), options, "objective")


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind torch.compile's and DDP's wrappers, for its attributes and methods. Training forward
    passes go through the wrapper itself: DDP all-reduces the gradients of those only."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def objective_class(cfg: Any) -> type:
    """The class of the objective a composed config trains with, found without building model or data."""
    from hydra.utils import get_object

    if cfg.objective._target_ != f"{__name__}.auto":
        return get_object(cfg.objective._target_)
    name = getattr(get_object(cfg.model._target_), "objective", None)
    if name not in OBJECTIVES:  # chosen from the data's target kind: none of those updates in turn
        return Objective
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def updates_in_turn(cls: type) -> bool:
    """Whether an objective runs several updates per batch (its own `training_steps`, e.g. a GAN's discriminator
    then generator), calling parts of the model directly rather than one forward of the whole."""
    return cls.training_steps is not Objective.training_steps


from nnctl.objectives.classification import TTA_MODES, Classification, tta_mode  # noqa: E402  (re-exported)

__all__ = ["OBJECTIVES", "TTA_MODES", "Batch", "Classification", "Objective", "Step", "auto", "objective_class",
           "tta_mode", "unwrap", "updates_in_turn"]
