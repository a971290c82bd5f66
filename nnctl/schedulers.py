"""Learning-rate schedules behind one interface: `after_step()` every optimizer step, `after_epoch(metrics)`
after validation. Each schedule knows its own cadence, so the engine loop needs no per-scheduler branches."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs


class Schedule:
    """Wraps a torch scheduler that is stepped every optimizer step."""

    per_step = True
    # True when the lr curve is planned over the run's total steps and so ends with the run (cosine, one-cycle);
    # False when it is defined step by step, and a longer run is the same curve continued (step, plateau, ...).
    length_bound = False

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class _FactorLR:
    """Each group's lr = its initial lr x fn(step), written straight into the optimizer's groups: LambdaLR's
    arithmetic and state_dict keys (checkpoints of either load into the other), without its per-step bookkeeping
    and the wrapper it puts around optimizer.step, ~50 us a step: a hundredth of a small model's step on a CPU."""

    def __init__(self, optimizer: Optimizer, fn: Any) -> None:
        self.optimizer, self.fn = optimizer, fn
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        factor = self.fn(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        # LambdaLR keeps a callable object's attributes (e.g. the planned total steps) once per group
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch,
                "lr_lambdas": [dict(vars(self.fn)) for _ in self.base_lrs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs, self.last_epoch = list(state["base_lrs"]), state["last_epoch"]
        fn_state = next((s for s in state.get("lr_lambdas", []) if s is not None), None)
        if fn_state is not None:
            vars(self.fn).update(fn_state)


class Constant(Schedule):
    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(_FactorLR(optimizer, _One()))


class _One:
    """A constant factor as an object: its (empty) attributes are what a checkpoint keeps of it."""

    def __call__(self, step: int) -> float:
        return 1.0


class _WarmupCosineFactor:
    def __init__(self, total: int, warmup: int, floor: float) -> None:
        self.total, self.warmup, self.floor = max(1, total), warmup, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Cosine(Schedule):
    length_bound = True

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int,
                 min_lr_ratio: float = 0.0) -> None:
        super().__init__(_FactorLR(optimizer, _WarmupCosineFactor(total_steps, 0, min_lr_ratio)))


class WarmupCosine(Schedule):
    length_bound = True

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_fraction: float = 0.05,
                 min_lr_ratio: float = 0.0) -> None:
        warmup = max(1, int(total_steps * warmup_fraction))
        super().__init__(_FactorLR(optimizer, _WarmupCosineFactor(total_steps, warmup, min_lr_ratio)))


class CosineWarmRestarts(Schedule):
    """SGDR, stepped per optimizer step with T_0 measured in steps."""

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, first_cycle_epochs: int = 1,
                 cycle_mult: int = 2, min_lr_ratio: float = 0.0) -> None:
        base = optimizer.param_groups[0]["lr"]
        super().__init__(lrs.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, first_cycle_epochs * steps_per_epoch),
                                                         T_mult=cycle_mult, eta_min=base * min_lr_ratio))


class OneCycle(Schedule):
    length_bound = True

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, pct_start: float = 0.25,
                 div_factor: float = 25.0, final_div_factor: float = 1e3, anneal: str = "cos") -> None:
        max_lr = [g["lr"] for g in optimizer.param_groups]
        super().__init__(lrs.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(2, total_steps),
                                        pct_start=pct_start, div_factor=div_factor,
                                        final_div_factor=final_div_factor, anneal_strategy=anneal,
                                        cycle_momentum=False))


class Step(Schedule):
    per_step = False

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, step_epochs: int = 1,
                 gamma: float = 0.5) -> None:
        super().__init__(lrs.StepLR(optimizer, step_size=step_epochs, gamma=gamma))


class Exponential(Schedule):
    per_step = False

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, gamma: float = 0.9) -> None:
        super().__init__(lrs.ExponentialLR(optimizer, gamma=gamma))


class Plateau(Schedule):
    per_step = False

    def __init__(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, monitor: str = "val/loss",
                 mode: str = "min", factor: float = 0.5, patience: int = 2) -> None:
        super().__init__(lrs.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience))
        self.monitor = monitor

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            from nnctl.errors import UserError

            raise UserError(f"metric {self.monitor!r} is not logged; choose one of {', '.join(sorted(metrics))}",
                            key="scheduler.monitor")
        self.scheduler.step(metrics[self.monitor])


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
