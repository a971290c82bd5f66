"""The one training and evaluation engine behind `nnctl train` and `nnctl eval`.

The engine builds every component from the resolved config with `hydra.utils.instantiate`, then runs the loop in
`fit`. What a batch means (loss, metrics) belongs to the objective, how the learning rate moves belongs to the
schedule, and how numbers are shown belongs to `reporting`, so the loop stays the same for every model family.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nnctl import checkpoint as ck
from nnctl.errors import UserError
from nnctl.reporting import TensorBoard, console, epoch_progress, print_metrics, print_model_summary, write_json
from nnctl.runtime import pick_device, seed_everything
from nnctl.schedulers import current_lr

log = logging.getLogger(__name__)


class Tracker:
    """Best value of a monitored metric, and how many checks in a row failed to improve it."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        self.monitor, self.sign, self.min_delta = monitor, (1.0 if mode == "max" else -1.0), min_delta
        self.best, self.bad_checks = -math.inf, 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this check's value; True when it is the best so far."""
        if self.monitor not in metrics:
            raise UserError(f"metric {self.monitor!r} is not produced by this run; choose one of "
                            f"{', '.join(sorted(metrics))}", key="monitor")
        score = self.sign * metrics[self.monitor]
        improved = math.isfinite(score) and score > self.best + self.min_delta
        self.best, self.bad_checks = (score, 0) if improved else (self.best, self.bad_checks + 1)
        return improved

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.bad_checks = float(state["best"]), int(state["bad_checks"])


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only; norm scales and biases (1-D tensors) are left undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Engine:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        t = cfg.trainer
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = pick_device(t.device)
        seed_everything(t.seed, t.deterministic)
        self.precision = instantiate(cfg.precision)
        self.precision.check(self.device)
        self.data = instantiate(cfg.data).setup(self.device)
        net = instantiate(cfg.model)(in_shape=self.data.in_shape, num_classes=self.data.num_classes)
        self.model: nn.Module = instantiate(cfg.adapter)(net).to(self.device)
        self.objective = instantiate(cfg.objective)(num_classes=self.data.num_classes)
        self.scaler = self.precision.grad_scaler(self.device)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.best = Tracker(t.checkpoint.monitor, t.checkpoint.mode)
        self.stopper = Tracker(t.early_stopping.monitor, t.early_stopping.mode, t.early_stopping.min_delta)
        self.history: dict[str, dict[str, float]] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    # -- sizes --------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, split: str) -> int:
        n = self.data.num_batches(split)
        limit = self.cfg.trainer[f"limit_{'train' if split == 'train' else 'val'}_batches"]
        if limit is None:
            return n
        return min(n, limit) if isinstance(limit, int) else max(1, int(n * limit))

    def total_steps(self) -> int:
        t = self.cfg.trainer
        steps = t.max_epochs * (self.batches_per_epoch("train") // t.grad_accum_steps)
        return min(steps, t.max_steps) if t.max_steps else steps

    # -- optimization setup -------------------------------------------------------------------------------------
    def configure_optimization(self) -> None:
        t = self.cfg.trainer
        if self.batches_per_epoch("train") < t.grad_accum_steps:
            raise UserError(f"an epoch has {self.batches_per_epoch('train')} batch(es), fewer than "
                            f"trainer.grad_accum_steps={t.grad_accum_steps}; lower data.batch_size or the "
                            "accumulation", key="trainer.grad_accum_steps")
        build = instantiate(self.cfg.optimizer)  # a partial: parameters come from the model
        groups = param_groups(self.model, build.keywords.get("weight_decay", 0.0), t.decay_norm_bias)
        self.optimizer = build(params=groups)
        self.schedule = instantiate(self.cfg.scheduler)(
            optimizer=self.optimizer, total_steps=self.total_steps(),
            steps_per_epoch=self.batches_per_epoch("train") // t.grad_accum_steps)

    # -- the training loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t, cfg = self.cfg.trainer, self.cfg
        if self.optimizer is None:
            self.configure_optimization()
        tb = TensorBoard(self.run_dir / "tensorboard")
        tb.config(cfg)
        n_batches, accum, max_steps = self.batches_per_epoch("train"), t.grad_accum_steps, self.total_steps()
        started, done = time.perf_counter(), self.step >= max_steps
        try:
            while self.epoch < t.max_epochs and not done:
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                sums, window = self._new_sums(), _Window(self.step)
                with epoch_progress(t.progress and console.is_terminal) as bar:
                    task = bar.add_task(f"epoch {self.epoch + 1}/{t.max_epochs}", total=n_batches,
                                        completed=self.batch_in_epoch, stats="")
                    for i, batch in enumerate(self.data.train_batches(self.epoch, t.seed, self.batch_in_epoch,
                                                                      n_batches), start=self.batch_in_epoch):
                        # forward and loss under the precision context
                        with self.precision.autocast(self.device):
                            loss, stats = self.objective.training_step(self.model, batch)
                        # scaled backward; gradients add up over grad_accum_steps micro-batches
                        self.scaler.scale(loss / accum).backward()
                        self._accumulate(sums, loss, stats, len(batch[0]))  # on device: no host sync
                        if (i + 1) % accum:
                            continue
                        # clip, step (the scaler skips it on fp16 overflow), zero grads, per-step schedule
                        grad_norm = self._optimizer_step()
                        self.schedule.after_step()
                        self.step, self.batch_in_epoch = self.step + 1, i + 1
                        # periodic logging: the only place the loop waits for the device
                        if self.step % t.log_every_n_steps == 0 or self.batch_in_epoch == n_batches:
                            self._log_step(tb, bar, task, sums, window, grad_norm)
                        if self.step >= max_steps:
                            done = True
                            break
                # validation, epoch-level schedule, checkpoints, early stopping
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                metrics = {**self._epoch_means(sums, "train"), **self.evaluate("val")}
                self.schedule.after_epoch(metrics)
                tb.scalars(metrics, self.step)
                self._checkpoint(metrics)
                log.info("epoch %d: %s", self.epoch, _brief(metrics))
                console.print(f"epoch {self.epoch}: {_brief(metrics)}")
                if t.early_stopping.enabled and self.stopper.update(metrics) is False \
                        and self.stopper.bad_checks > t.early_stopping.patience:
                    console.print(f"early stopping: {t.early_stopping.monitor} has not improved for "
                                  f"{self.stopper.bad_checks} epochs")
                    break
            return self._finish(tb, time.perf_counter() - started)
        finally:
            tb.close()

    def _optimizer_step(self) -> torch.Tensor | None:
        t = self.cfg.trainer
        grad_norm = None
        if t.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _new_sums(self) -> dict[str, torch.Tensor]:
        return {}

    def _accumulate(self, sums: dict[str, torch.Tensor], loss: torch.Tensor, stats: dict[str, torch.Tensor],
                    n: int) -> None:
        for name, value in (("loss", loss.detach()), *stats.items()):
            value = value.float() * n
            sums[name] = sums[name] + value if name in sums else value
        sums["_n"] = sums.get("_n", 0) + n
        sums["_bad"] = sums.get("_bad", 0) + (~torch.isfinite(loss.detach())).int()

    def _epoch_means(self, sums: dict[str, Any], prefix: str) -> dict[str, float]:
        n = max(1, sums.get("_n", 0))
        return {f"{prefix}/{k}": float(v) / n for k, v in sums.items() if not k.startswith("_")}

    def _log_step(self, tb: TensorBoard, bar: Any, task: Any, sums: dict[str, Any], window: "_Window",
                  grad_norm: torch.Tensor | None) -> None:
        if grad_norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        samples_per_s = window.rate(self.step, self.cfg.data.batch_size * self.cfg.trainer.grad_accum_steps)
        running = self._epoch_means(sums, "train")
        if int(sums["_bad"]) >= self.cfg.trainer.max_bad_steps:
            raise UserError(f"loss was not finite in {int(sums['_bad'])} step(s) by step {self.step}; lower "
                            "optimizer.lr, set trainer.grad_clip_norm, or use precision=fp32 "
                            "(last.pt from the last good epoch is kept)", key="trainer.max_bad_steps")
        scalars = {"train/step_loss": running["train/loss"], "lr": current_lr(self.optimizer),
                   "train/grad_norm": float(grad_norm), "train/samples_per_s": samples_per_s}
        tb.scalars(scalars, self.step)
        bar.update(task, completed=self.batch_in_epoch,
                   stats=f"loss {running['train/loss']:.4f}  lr {scalars['lr']:.2e}  {samples_per_s:,.0f} samples/s")
        self.history["throughput"] = {"train/samples_per_s": samples_per_s}

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current weights on `split` ('val' or 'test'), keys prefixed by the split."""
        was_training = self.model.training
        self.model.eval()
        metrics = self.objective.eval_metrics().to(self.device)
        limit = self.batches_per_epoch("val") if split == "val" else None
        for batch in self.data.eval_batches(split, limit):
            with self.precision.autocast(self.device):
                self.objective.eval_update(self.model, batch, metrics, bool(self.cfg.eval.tta))
        self.model.train(was_training)
        return {f"{split}/{k}": float(v) for k, v in metrics.compute().items()}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            ck.CONFIG: OmegaConf.to_yaml(self.cfg, resolve=True),
            ck.MODEL: self.model.state_dict(),
            ck.OPTIMIZER: self.optimizer.state_dict() if self.optimizer else {},
            ck.SCHEDULER: self.schedule.state_dict() if self.optimizer else {},
            ck.SCALER: self.scaler.state_dict(),
            ck.EPOCH: self.epoch, ck.STEP: self.step, ck.BATCH_IN_EPOCH: self.batch_in_epoch,
            ck.TRACKERS: {"best": self.best.state_dict(), "early_stopping": self.stopper.state_dict()},
            ck.METRICS: metrics,
            ck.RNG: ck.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], full: bool) -> None:
        """Load weights (and with `full`, everything needed to continue training exactly)."""
        try:
            self.model.load_state_dict(state[ck.MODEL])
        except RuntimeError as exc:
            raise UserError("the checkpoint's weights do not fit the configured model "
                            f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}); "
                            "use the model config stored with the checkpoint", key="model") from None
        if not full:
            return
        self.configure_optimization()
        self.optimizer.load_state_dict(state[ck.OPTIMIZER])
        self.schedule.load_state_dict(state[ck.SCHEDULER])
        self.scaler.load_state_dict(state[ck.SCALER])
        self.epoch, self.step, self.batch_in_epoch = state[ck.EPOCH], state[ck.STEP], state[ck.BATCH_IN_EPOCH]
        self.best.load_state_dict(state[ck.TRACKERS]["best"])
        self.stopper.load_state_dict(state[ck.TRACKERS]["early_stopping"])
        ck.set_rng_state(state[ck.RNG])

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        c = self.cfg.trainer.checkpoint
        self.history.update(last={k: v for k, v in metrics.items()})
        due = self.epoch % c.every_n_epochs == 0 or self.epoch == self.cfg.trainer.max_epochs
        improved = self.best.update(metrics) if due else False
        if improved:
            self.history["best"] = dict(metrics, epoch=self.epoch)
        if not (c.enabled and due):
            return
        directory = self.run_dir / "checkpoints"
        state = self.state_dict(metrics)
        if improved:
            ck.save_checkpoint(state, directory / ck.BEST)
            if c.save_top_k:
                self._keep_top_k(state, metrics, directory, c.save_top_k)
        if c.save_last:
            ck.save_checkpoint(state, directory / ck.LAST)

    def _keep_top_k(self, state: dict[str, Any], metrics: dict[str, float], directory: Path, k: int) -> None:
        name = self.best.monitor.replace("/", "_")
        ck.save_checkpoint(state, directory / f"epoch={self.epoch:03d}-{name}={metrics[self.best.monitor]:.4f}.pt")
        ranked = sorted(directory.glob("epoch=*.pt"), key=lambda p: self.best.sign * float(p.stem.split("=")[-1]),
                        reverse=True)
        for stale in ranked[k:]:
            stale.unlink(missing_ok=True)

    # -- end of run -----------------------------------------------------------------------------------------------
    def _finish(self, tb: TensorBoard, seconds: float) -> dict[str, Any]:
        best_path = self.run_dir / "checkpoints" / ck.BEST
        if best_path.is_file():  # test with the best weights, exactly as `nnctl eval` will load them
            self.load_state_dict(ck.load_checkpoint(best_path, self.device), full=False)
        test = self.evaluate("test")
        tb.scalars(test, self.step)
        last, best = self.history.get("last", {}), self.history.get("best", self.history.get("last", {}))
        rows = {"train": _split(last, "train"), "val (best)": _split(best, "val"), "test": _split(test, "test")}
        result = {"train": rows["train"], "val": rows["val (best)"], "test": rows["test"],
                  "best_epoch": best.get("epoch"), "epochs": self.epoch, "global_step": self.step,
                  "train_seconds": round(seconds, 2), **self.history.get("throughput", {}),
                  "checkpoint": str(best_path) if best_path.is_file() else None}
        tb.hparams(self.cfg, {f"{s}/{k}": v for s in ("val", "test") for k, v in result[s].items()})
        write_json(self.run_dir / "metrics.json", result)
        print_metrics(f"nnctl train: {self.epoch} epoch(s), {self.step} steps, {seconds:.1f}s", rows)
        console.print(f"run dir: {self.run_dir}")
        return result


def _split(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{split}/")}


def _brief(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class _Window:
    """Throughput over the steps since the last log (wall clock; the log itself synchronizes the device)."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def rate(self, step: int, samples_per_step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * samples_per_step / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate
