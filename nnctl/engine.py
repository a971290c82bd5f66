"""The one training and evaluation engine behind `nnctl train` and `nnctl eval`.

The engine builds every component from the resolved config with `hydra.utils.instantiate`, then runs the loop in
`fit`. What a batch means (loss, metrics) belongs to the objective, how the learning rate moves belongs to the
schedule, and how numbers are shown belongs to `reporting`, so the loop stays the same for every model family.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nnctl import checkpoint as ck
from nnctl.ema import EMA
from nnctl.errors import Interrupted, UserError
from nnctl.metrics import Averages
from nnctl.reporting import TensorBoard, console, epoch_progress, print_metrics, write_json
from nnctl.runtime import pick_device, seed_everything
from nnctl.schedulers import current_lr

log = logging.getLogger(__name__)


class Tracker:
    """Best value of a monitored metric, and how many checks in a row failed to improve it."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0, key: str = "monitor") -> None:
        self.monitor, self.sign, self.min_delta = monitor, (1.0 if mode == "max" else -1.0), min_delta
        self.key = key  # the config key that named the monitor, for error messages
        self.best, self.bad_checks = -math.inf, 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this check's value; True when it is the best so far."""
        if self.monitor not in metrics:
            raise UserError(f"metric {self.monitor!r} is not produced by this run; choose one of "
                            f"{', '.join(sorted(metrics))}", key=self.key)
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
        # Plain attributes, not OmegaConf nodes: a node lookup costs ~15 us, and the step loop reads several.
        self.t = t = _Settings(OmegaConf.to_container(cfg.trainer, resolve=True), "trainer.")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = pick_device(t.device)
        seed_everything(t.seed, t.deterministic)
        self.precision = instantiate(cfg.precision)
        self.precision.check(self.device)
        self.data = instantiate(cfg.data).setup(self.device)
        net = instantiate(cfg.model)(in_shape=self.data.in_shape, num_classes=self.data.num_classes)
        if hasattr(net, "init_from_data"):  # data-dependent initialization (e.g. patch whitening)
            net.to(self.device).init_from_data(self.data.sample_images(t.init_samples))
        self.net: nn.Module = instantiate(cfg.adapter)(net).to(self.device)  # the module whose weights we save
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.data.memory_format = torch.channels_last
        self.model = torch.compile(self.net) if t.compile else self.net  # what runs forward passes
        self.ema = EMA(self.net, t.ema.decay) if t.ema.enabled else None
        self.objective = instantiate(cfg.objective)(num_classes=self.data.num_classes)
        self.scaler = self.precision.grad_scaler(self.device)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.best = Tracker(t.checkpoint.monitor, t.checkpoint.mode, key="trainer.checkpoint.monitor")
        self.stopper = Tracker(t.early_stopping.monitor, t.early_stopping.mode, t.early_stopping.min_delta,
                               key="trainer.early_stopping.monitor")
        self.history: dict[str, dict[str, float]] = {}
        self.sums = Averages()
        self.optimizer: torch.optim.Optimizer | None = None
        self._signal: int | None = None
        self._bad_steps, self._last_finite = 0, float("nan")

    # -- sizes --------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, split: str) -> int:
        n = self.data.num_batches(split)
        limit = self.t.limit_train_batches if split == "train" else self.t.limit_val_batches
        if limit is None:
            return n
        return min(n, limit) if isinstance(limit, int) else max(1, int(n * limit))

    def total_steps(self) -> int:
        t = self.t
        steps = t.max_epochs * (self.batches_per_epoch("train") // t.grad_accum_steps)
        return min(steps, t.max_steps) if t.max_steps else steps

    # -- optimization setup -------------------------------------------------------------------------------------
    def configure_optimization(self, total_steps: int | None = None) -> None:
        """Build the optimizer and a schedule planned over `total_steps` (default: the whole run)."""
        t = self.t
        if self.batches_per_epoch("train") < t.grad_accum_steps:
            raise UserError(f"an epoch has {self.batches_per_epoch('train')} batch(es), fewer than "
                            f"trainer.grad_accum_steps={t.grad_accum_steps}; lower data.batch_size or the "
                            "accumulation", key="trainer.grad_accum_steps")
        build = instantiate(self.cfg.optimizer)  # a partial: parameters come from the model
        groups = param_groups(self.net, build.keywords.get("weight_decay", 0.0), t.decay_norm_bias)
        if self.device.type == "cuda" and "fused" in inspect.signature(build.func).parameters:
            build.keywords.setdefault("fused", True)  # one kernel for the whole update instead of one per tensor
        with _user_errors("optimizer"):  # torch validates its arguments here (betas, eps, ...)
            self.optimizer = build(params=groups)
        with _user_errors("scheduler"):
            self.schedule = instantiate(self.cfg.scheduler)(
                optimizer=self.optimizer, total_steps=self.total_steps() if total_steps is None else total_steps,
                steps_per_epoch=self.batches_per_epoch("train") // t.grad_accum_steps)

    def replan_schedule(self) -> int:
        """After a full load_state_dict: give the steps left to the configured end a fresh schedule, started as the
        configured schedule starts (warmup, peak lr), while the optimizer keeps its moments. Returns those steps."""
        t = self.t
        per_epoch = self.batches_per_epoch("train") // t.grad_accum_steps
        remaining = min((t.max_epochs - self.epoch) * per_epoch - self.batch_in_epoch // t.grad_accum_steps,
                        self.total_steps() - self.step)
        moments = self.optimizer.state_dict()
        self.configure_optimization(total_steps=remaining)  # a fresh optimizer at the configured lr, a new schedule
        planned = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(moments)
        for group, fresh in zip(self.optimizer.param_groups, planned):
            group.update(fresh)  # lr and schedule bookkeeping from the new plan; moments from the run
        return remaining

    # -- the training loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if self.optimizer is None:
            self.configure_optimization()
        tb = TensorBoard(self.run_dir / "tensorboard")
        tb.config(self.cfg)
        n_batches, accum, max_steps = self.batches_per_epoch("train"), t.grad_accum_steps, self.total_steps()
        started, done = time.perf_counter(), self.step >= max_steps
        with self._stop_on_signals(), contextlib.closing(tb):
            while self.epoch < t.max_epochs and not done:
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                samples = self.data.batch_size * accum  # per optimizer step
                window, epoch_window = _Window(self.step, samples), _Window(self.step, samples)
                with epoch_progress(t.progress and console.is_terminal) as bar:
                    task = bar.add_task(f"epoch {self.epoch + 1}/{t.max_epochs}", total=n_batches,
                                        completed=self.batch_in_epoch, stats="")
                    for i, batch in enumerate(self.data.train_batches(self.epoch, t.seed, self.batch_in_epoch,
                                                                      n_batches), start=self.batch_in_epoch):
                        # forward and loss under the precision context
                        with self.precision.autocast(self.device):
                            loss, stats = self.objective.training_step(self.model, batch)
                        # scaled backward; gradients add up over grad_accum_steps micro-batches
                        self.scaler.scale(loss / accum if accum > 1 else loss).backward()  # no extra node at 1
                        self.sums.add(len(batch[1]), stats, {"loss": loss})  # on device: no host sync
                        if (i + 1) % accum:
                            continue
                        # clip, step (skipped on a non-finite loss or fp16 overflow), zero grads, schedule, EMA
                        grad_norm = self._optimizer_step(loss)
                        self.schedule.after_step()
                        self.step, self.batch_in_epoch = self.step + 1, i + 1
                        if self.ema is not None and self.step % t.ema.every_n_steps == 0:
                            self.ema.update(self.net)
                        # periodic logging: the only place the loop waits for the device
                        if self.step % t.log_every_n_steps == 0:
                            self._log_step(tb, bar, task, window, grad_norm)
                        # a pending SIGINT/SIGTERM ends the run here, between two steps, with last.pt saved
                        if self._signal is not None:
                            self._interrupt()
                        if self.step >= max_steps:
                            done = True
                            break
                    bar.update(task, completed=self.batch_in_epoch)  # the log cadence may end short of it
                # validation, epoch-level schedule, checkpoints, early stopping
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                train = self.sums.means("train/")  # waits for the device, so the epoch's throughput is exact
                self.history["throughput"] = {"train/samples_per_s": epoch_window.rate(self.step)}
                metrics = {**train, **self.evaluate("val")}
                self.sums = Averages()
                self.schedule.after_epoch(metrics)
                tb.scalars({**metrics, **self.history["throughput"]}, self.step)
                self._checkpoint(metrics)
                log.info("epoch %d: %s", self.epoch, _brief(metrics))
                console.print(f"epoch {self.epoch}: {_brief(metrics)}")
                if t.early_stopping.enabled and not self.stopper.update(metrics) \
                        and self.stopper.bad_checks > t.early_stopping.patience:
                    console.print(f"early stopping: {t.early_stopping.monitor} has not improved for "
                                  f"{self.stopper.bad_checks} epochs")
                    break
                if self._signal is not None:
                    self._interrupt()
            return self._finish(tb, time.perf_counter() - started)

    def _optimizer_step(self, loss: torch.Tensor) -> torch.Tensor | None:
        t = self.t
        if self._skip_nonfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        grad_norm = None
        if t.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when this step's loss is NaN/inf (its update is skipped); stops after max_bad_steps in a row.

        Checking needs the loss on the host. On CPU that costs nothing; on CUDA it would stall the pipeline every
        step, so there the check runs at the logging cadence and fp16's grad scaler guards the steps in between.
        """
        if self.device.type == "cuda" and (self.step + 1) % self.t.log_every_n_steps:
            return False
        value = loss.item()  # no detach needed: item() reads the value
        if math.isfinite(value):
            self._bad_steps, self._last_finite = 0, value
            return False
        self._bad_steps += 1
        if self._bad_steps >= self.t.max_bad_steps:
            raise UserError(f"loss was {value} for {self._bad_steps} consecutive steps (up to step {self.step + 1}, "
                            f"last finite loss {self._last_finite:.4g}); the learning rate is likely too high: lower "
                            "optimizer.lr, set trainer.grad_clip_norm=1.0, or use precision=fp32. The last good "
                            "checkpoint was kept", key="trainer.max_bad_steps")
        log.warning("step %d: non-finite loss %s, update skipped", self.step + 1, value)
        return True

    def _log_step(self, tb: TensorBoard, bar: Any, task: Any, window: "_Window",
                  grad_norm: torch.Tensor | None) -> None:
        if grad_norm is None:
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        samples_per_s = window.rate(self.step)  # since the last log
        running = self.sums.means("train/")
        scalars = {"train/loss_running": running["train/loss"], "lr": current_lr(self.optimizer),
                   "train/grad_norm": float(grad_norm), "train/samples_per_s": samples_per_s}
        tb.scalars(scalars, self.step)
        bar.update(task, completed=self.batch_in_epoch,
                   stats=f"loss {running['train/loss']:.4f}  lr {scalars['lr']:.2e}  {samples_per_s:,.0f} samples/s")

    # -- interrupts ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag; the loop stops between steps. A second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                raise KeyboardInterrupt
            self._signal = signum
            console.print(f"\n{signal.Signals(signum).name} received: finishing this step and saving last.pt "
                          "(send again to stop at once)")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _interrupt(self) -> None:
        path = None
        if self.t.checkpoint.enabled:
            path = self.run_dir / "checkpoints" / ck.LAST
            ck.save_checkpoint(self.state_dict(self.history.get("last", {})), path)
        raise Interrupted(self._signal, path, self.run_dir)

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on `split` ('val' or 'test') with the evaluation weights (the EMA when on), keys prefixed."""
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        metrics = Averages()
        limit = self.batches_per_epoch("val") if split == "val" else None
        for batch in self.data.eval_batches(split, limit):
            with self.precision.autocast(self.device):
                self.objective.eval_update(model, batch, metrics, self.cfg.eval.tta)
        model.train(was_training)
        return metrics.means(f"{split}/")

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Everything needed to continue exactly. MODEL holds the evaluation weights (EMA when on)."""
        evaluated = self.ema.module if self.ema is not None else self.net
        return {
            ck.CONFIG: OmegaConf.to_yaml(self.cfg, resolve=True),
            ck.MODEL: evaluated.state_dict(),
            ck.OPTIMIZER: self.optimizer.state_dict() if self.optimizer else {},
            ck.SCHEDULER: self.schedule.state_dict() if self.optimizer else {},
            ck.SCALER: self.scaler.state_dict(),
            ck.EPOCH: self.epoch, ck.STEP: self.step, ck.BATCH_IN_EPOCH: self.batch_in_epoch,
            ck.TRACKERS: {"best": self.best.state_dict(), "early_stopping": self.stopper.state_dict(),
                          "history": self.history, "epoch_sums": self.sums.state_dict()},
            ck.METRICS: metrics,
            ck.RNG: ck.rng_state(),
            ck.EXTRA: {"train_model": self.net.state_dict(), "ema_updates": self.ema.updates}
            if self.ema is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any], full: bool) -> None:
        """Load the evaluation weights; with `full`, everything needed to continue training exactly."""
        target = self.ema.module if self.ema is not None else self.net
        _load_weights(target, state[ck.MODEL])
        if not full:
            return
        extra = state[ck.EXTRA]
        if self.ema is not None:
            if "train_model" not in extra:
                raise UserError("the checkpoint was trained without EMA; resume with trainer/ema=off",
                                key="trainer.ema")
            _load_weights(self.net, extra["train_model"])
            self.ema.updates = int(extra["ema_updates"])
        self.configure_optimization()
        self.optimizer.load_state_dict(state[ck.OPTIMIZER])
        self.schedule.load_state_dict(state[ck.SCHEDULER])
        self.scaler.load_state_dict(state[ck.SCALER])
        self.epoch, self.step, self.batch_in_epoch = state[ck.EPOCH], state[ck.STEP], state[ck.BATCH_IN_EPOCH]
        trackers = state[ck.TRACKERS]
        self.best.load_state_dict(trackers["best"])
        self.stopper.load_state_dict(trackers["early_stopping"])
        self.history = trackers["history"]
        self.sums = Averages(trackers["epoch_sums"])
        ck.set_rng_state(state[ck.RNG])

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        c = self.t.checkpoint
        self.history["last"] = dict(metrics)
        due = self.epoch % c.every_n_epochs == 0 or self.epoch == self.t.max_epochs
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


@contextlib.contextmanager
def _user_errors(group: str) -> Iterator[None]:
    """A constructor rejecting its configured arguments is the user's to fix: name the group."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UserError(f"{exc}; check the {group} settings (nnctl train --cfg job shows them)", key=group) from exc


class _Settings:
    """A config subtree as plain attributes. A missing key raises OmegaConf's error with its full key, so a
    deleted required key (~trainer.max_epochs) is reported like any other config mistake."""

    def __init__(self, tree: dict[str, Any], prefix: str) -> None:
        self.__dict__["_prefix"] = prefix
        for k, v in tree.items():
            self.__dict__[k] = _Settings(v, f"{prefix}{k}.") if isinstance(v, dict) else v

    def __getattr__(self, name: str) -> Any:  # only reached for missing keys
        from omegaconf.errors import ConfigAttributeError

        exc = ConfigAttributeError(f"Missing key {name}")
        exc.full_key = f"{self.__dict__['_prefix']}{name}"
        raise exc


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc)).rstrip(".")
        raise UserError(f"the checkpoint's weights do not fit the model built from this config ({detail[:200]}); "
                        "drop the model.* or data.* overrides that change layer shapes", key="model") from None


def _split(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{split}/")}


def _brief(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class _Window:
    """Throughput over the steps since the last `rate` call (wall clock; callers first synchronize the device)."""

    def __init__(self, step: int, samples_per_step: int) -> None:
        self.step, self.time, self.samples_per_step = step, time.perf_counter(), samples_per_step

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.samples_per_step / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate
