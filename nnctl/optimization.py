"""Optimizers, learning-rate schedules and loss scaling for one run.

An objective may update several parameter groups in turn (a GAN's discriminator, then its generator); each group
gets its own optimizer built from `cfg.optimizer` and its own schedule from `cfg.scheduler`. A plain objective has
one group, "main". One batch is one global step, whatever the number of groups.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from typing import Any, Iterator

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from nnctl.errors import UserError

log = logging.getLogger(__name__)
# Devices whose losses the NaN guard reads in batches (a read per step would stall their queue); see check_losses.
BATCHED_LOSS_READS = ("cuda",)


def param_groups(params: Any, weight_decay: float, decay_norm_bias: bool,
                 lr: float | None = None) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only; norm scales and biases (1-D tensors) are left undecayed.

    `params` is a module or an iterable of parameters; frozen parameters are left out. A parameter tagged with
    `lr_mult` (finetune.lr_mult) goes into a group of its own whose `lr` is `lr * lr_mult`; schedules scale each
    group's initial lr, so the ratio holds throughout.
    """
    params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
    groups = []
    for mult in sorted({getattr(p, "lr_mult", 1.0) for p in params}, reverse=True):
        same = [p for p in params if getattr(p, "lr_mult", 1.0) == mult]
        extra = {} if mult == 1.0 or lr is None else {"lr": lr * mult}
        if decay_norm_bias:
            groups.append({"params": same, "weight_decay": weight_decay, **extra})
        else:
            groups += [{"params": [p for p in same if p.ndim >= 2], "weight_decay": weight_decay, **extra},
                       {"params": [p for p in same if p.ndim < 2], "weight_decay": 0.0, **extra}]
    return groups or [{"params": [], "weight_decay": weight_decay}]


@contextlib.contextmanager
def user_errors(group: str) -> Iterator[None]:
    """A constructor rejecting its configured arguments is the user's to fix: name the group."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UserError(f"{exc}; check the {group} settings (nnctl train --cfg job shows them)", key=group) from exc


class Optimization:
    """One optimizer and schedule per parameter group, one loss scaler, and the non-finite-loss guard."""

    def __init__(self, cfg: DictConfig, groups: dict[str, list[nn.Parameter]], device: torch.device,
                 scaler: torch.amp.GradScaler, trainer: Any, total_steps: int, steps_per_epoch: int,
                 dist: Any = None, net: nn.Module | None = None) -> None:
        """`dist` (nnctl.distributed.Dist) and `net`: with several processes, the NaN guard decides on every
        rank's loss, and optimizer state is saved and loaded whole (gathered from FSDP shards)."""
        from nnctl.distributed import Dist

        self.t, self.device, self.scaler = trainer, device, scaler
        self.dist, self.net = dist or Dist(), net
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, Any] = {}
        for name, params in groups.items():
            build = instantiate(cfg.optimizer)  # a partial: parameters come from the model
            split = param_groups(params, build.keywords.get("weight_decay", 0.0), trainer.decay_norm_bias,
                                 build.keywords.get("lr"))
            if not any(g["params"] for g in split):
                raise UserError(f"nothing to train in the {name!r} parameter group: every parameter is frozen; "
                                "check the adapter / finetune.freeze settings", key="optimizer")
            if device.type == "cuda" and "fused" in inspect.signature(build.func).parameters:
                build.keywords.setdefault("fused", True)  # one kernel for the whole update instead of one per tensor
            with user_errors("optimizer"):  # torch validates its arguments here (betas, eps, ...)
                self.optimizers[name] = build(params=[g for g in split if g["params"]])
            with user_errors("scheduler"):
                self.schedules[name] = instantiate(cfg.scheduler)(
                    optimizer=self.optimizers[name], total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        self.scaling = scaler.is_enabled()  # fp16 loss scaling (a disabled scaler would only pass calls through)
        self._bad_steps, self._last_finite = 0, float("nan")
        # Reading a loss on the host is free on the CPU, so there every loss is checked before its update. On a GPU
        # it would stall the queue every step: there the losses wait on the device and are read together, on
        # logging steps and before anything is saved (check_losses).
        self.deferred = device.type in BATCHED_LOSS_READS
        # one process reads its loss itself (the guard reads one every CPU step: a Python call less)
        self._read_loss = torch.Tensor.item if self.dist.world == 1 else self.dist.mean_loss
        self._unread: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read, oldest first

    @property
    def first(self) -> torch.optim.Optimizer:
        return next(iter(self.optimizers.values()))

    def step(self, name: str, loss: torch.Tensor, step: int, norm: bool = False) -> torch.Tensor | None:
        """Clip and apply group `name`'s update (skipped on a non-finite loss or an fp16 overflow), then clear
        every group's gradients: a generator's loss also reaches the discriminator's weights. Returns the
        gradient norm (unscaled) when clipping computes it or `norm` asks for it (a logging step), else None."""
        opt = self.optimizers[name]
        if self._skip_nonfinite(loss, step):
            self.zero_grad()
            return None
        if self.dist.in_turn is not None:  # updates in turn (a GAN) under DDP: average this group's gradients
            self.dist.average_gradients([p for g in opt.param_groups for p in g["params"]])
        grad_norm = None
        if self.t.grad_clip_norm is not None or norm:
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = (nn.utils.clip_grad_norm_(params, self.t.grad_clip_norm) if self.t.grad_clip_norm is not None
                         else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)()  # FSDP: the norm over all shards
        if self.scaling:  # fp16: step unless the gradients overflowed, then adjust the scale
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        for each in self.optimizers.values():  # (zero_grad inline: a call less on every step)
            each.zero_grad(set_to_none=True)
        return grad_norm

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def after_step(self) -> None:
        for schedule in self.schedules.values():
            schedule.after_step()

    def after_epoch(self, metrics: dict[str, float]) -> None:
        for schedule in self.schedules.values():
            schedule.after_epoch(metrics)

    def _skip_nonfinite(self, loss: torch.Tensor, step: int) -> bool:
        """True when this step's loss is NaN/inf (its update is skipped); stops after max_bad_steps in a row.

        The guarantee: every update's loss is checked, and a non-finite one is caught before the next checkpoint,
        so the last good checkpoint is kept. On the CPU each loss is checked before its own update. On a GPU the losses
        wait on the device and are checked on logging steps, so a non-finite loss is caught within
        trainer.log_every_n_steps steps, and before every checkpoint (check_losses).
        """
        if self.deferred:
            if (step + 1) % self.t.log_every_n_steps:
                self._unread.append((step, loss.detach()))
                return False
            self.check_losses()  # the earlier steps' first, in order
        value = self._read_loss(loss)  # the mean over ranks: every rank decides alike
        if math.isfinite(value):  # the common case, on the hot path of every CPU step
            self._bad_steps, self._last_finite = 0, value
            return False
        return not self._finite(value, step, applied=False)

    def check_losses(self) -> None:
        """Check the losses still waiting on the device (one transfer), in step order. Their updates have run: with
        fp16 the grad scaler skipped the non-finite ones, so they count towards max_bad_steps as skipped steps;
        otherwise the weights took a non-finite update and the run stops here, before anything is saved."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        values = self.dist.mean_losses(torch.stack([loss for _, loss in unread]).float())
        for (step, _), value in zip(unread, values):
            self._finite(value, step, applied=not self.scaling)

    def _finite(self, value: float, step: int, applied: bool) -> bool:
        """Count a loss read on the host; raise when the run must stop."""
        if math.isfinite(value):
            self._bad_steps, self._last_finite = 0, value
            return True
        self._bad_steps += 1
        if self._bad_steps >= self.t.max_bad_steps or applied:
            late = (f"; on {self.device.type} the loss is read every trainer.log_every_n_steps steps, after this "
                    "update had run" if applied else "")
            raise UserError(f"loss was {value} for {self._bad_steps} consecutive steps (up to step {step + 1}, "
                            f"last finite loss {self._last_finite:.4g}{late}); the learning rate is likely too high: "
                            "lower optimizer.lr, set trainer.grad_clip_norm=1.0, or use precision=fp32. The last good "
                            "checkpoint was kept", key="trainer.max_bad_steps")
        log.warning("step %d: non-finite loss %s, update skipped", step + 1, value)
        return False

    # -- checkpoint state -------------------------------------------------------------------------------------------
    def state_dict(self, local: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(optimizer states, schedule states), each keyed by group name. `local`: each optimizer's state as this
        rank's shards (sharded checkpoints), else whole."""
        return ({n: self.dist.optimizer_state(self.net, o, local) for n, o in self.optimizers.items()},
                {n: s.state_dict() for n, s in self.schedules.items()})

    def load_state_dict(self, optimizers: dict[str, Any], schedules: dict[str, Any], local: bool = False) -> None:
        if set(optimizers) != set(self.optimizers):
            raise UserError(f"the checkpoint holds optimizer state for {sorted(optimizers)}, this run optimizes "
                            f"{sorted(self.optimizers)}; resume with the configuration it was trained with",
                            key="resume")
        for name, opt in self.optimizers.items():
            self.dist.load_optimizer_state(self.net, opt, optimizers[name], local)
            self.schedules[name].load_state_dict(schedules[name])
