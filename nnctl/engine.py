"""The one training and evaluation engine behind `nnctl train` and `nnctl eval`.

The engine builds every component from the resolved config with `hydra.utils.instantiate`, completing model and
objective partials with what the data module says about itself (its `spec`), then runs the loop in `fit`. What a
batch is and means belongs to the data module and the objective, how parameters move to optimization, what is
saved to run_state, how progress is shown to step_log, so the loop stays the same for every model family.
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
from nnctl import adapters, distributed, run_state
from nnctl.ema import EMA
from nnctl.finetune import starting_point, unfreezing
from nnctl.images import as_drawn
from nnctl.errors import Interrupted, UserError
from nnctl.interrupts import SignalFlag
from nnctl.metrics import Averages, StepSums
from nnctl.objectives import updates_in_turn
from nnctl.optimization import Optimization, param_groups  # noqa: F401  (param_groups: public via the engine)
from nnctl.precision import each_under
from nnctl.loggers import Loggers, build_loggers, flat_params
from nnctl.reporting import console, epoch_progress, print_metrics, write_json
from nnctl.run_state import Tracker  # noqa: F401  (public via the engine)
from nnctl.runtime import pick_device, seed_everything
from nnctl.spec import complete, to_device
from nnctl.stages import Stages
from nnctl.step_log import Window, brief, log_step, split

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, cfg: DictConfig, run_dir: Path, progress: tuple[int, int] = (0, 0)) -> None:
        """`progress` = (epochs done, batches into the next epoch) of the checkpoint about to be loaded, if any:
        with `stages`, the engine is built in the stage that checkpoint was trained in."""
        self.stored_cfg, self.run_dir = cfg, Path(run_dir)  # stored_cfg: the run's config, saved in checkpoints
        self.stages = Stages(cfg) if cfg.get("stages") else None
        self.stage = self.stages.of_checkpoint(*progress) if self.stages else None
        self.cfg = cfg = self.stage.cfg if self.stage else cfg  # the config in force (the current stage's)
        # Plain attributes, not OmegaConf nodes: a node lookup costs ~15 us, and the step loop reads several.
        self.t = t = _Settings(OmegaConf.to_container(cfg.trainer, resolve=True), "trainer.")
        self.dist = distributed.current()  # this process's rank among the job's (a world of one by default)
        self.device = self.dist.setup(t, pick_device(t.device))
        seed_everything(t.seed, t.deterministic)
        self.precision = instantiate(cfg.precision)
        self.precision.check(self.device)
        self.data = self.dist.build_data(cfg.data).setup(self.device)  # yields this rank's share of each batch
        self.spec: dict[str, Any] = dict(self.data.spec)
        _check_image_features(cfg, self.spec)
        adapter = instantiate(cfg.adapter)
        # qlora's 4-bit settings, for a model loader that quantizes as it loads (Hugging Face: BitsAndBytesConfig)
        net = complete(instantiate(cfg.model), self.spec, "model",
                       **adapters.load_quantization(adapter, cfg.get("init_from")))
        if hasattr(net, "init_from_data"):  # data-dependent initialization (e.g. patch whitening)
            net.to(self.device).init_from_data(self.data.sample_images(t.init_samples))
        net, self.base = starting_point(cfg, net)  # init_from weights, finetune.freeze / lr_mult
        self.net: nn.Module = adapter(net).to(self.device)  # the module whose weights we save
        self.unfreezing = unfreezing(cfg, self.net, self.dist.world)  # finetune.unfreeze_schedule (no-op without)
        if t.grad_checkpointing:
            from nnctl.models import checkpoint_blocks

            checkpoint_blocks(self.net)
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.data.memory_format = torch.channels_last
        # the model is offered too: objective=auto follows a model that names its objective (generative models)
        self.objective = complete(instantiate(cfg.objective), self.spec, "objective", model=net)
        # DDP / FSDP2 with several processes; an objective updating in turn (a GAN) averages gradients itself
        model = self.dist.wrap(self.net, self.device, in_turn=updates_in_turn(type(self.objective)),
                               sync_batchnorm=getattr(t, "sync_batchnorm", False))
        self.model = torch.compile(model) if t.compile else model  # what runs forward passes
        self.ema = EMA(self.net, t.ema.decay) if t.ema.enabled else None
        self._resolve_monitor()
        t = self.t
        self.scaler = self.precision.grad_scaler(self.device)
        # re-entered by every training forward; in float32 there is nothing to enter
        self.autocast = None if self.precision.dtype is torch.float32 else self.precision.autocast(self.device)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.best = Tracker(t.checkpoint.monitor, t.checkpoint.mode, key="trainer.checkpoint.monitor")
        self.stopper = Tracker(t.early_stopping.monitor, t.early_stopping.mode, t.early_stopping.min_delta,
                               key="trainer.early_stopping.monitor")
        self.history: dict[str, dict[str, float]] = {}
        self.sums = StepSums()  # the epoch's training statistics, read at logging steps and the epoch's end
        self.optim: Optimization | None = None
        self.signals = SignalFlag()
        # called as hook(engine, metrics) after each epoch's checkpoint; the first unfreezes what the next epoch trains
        self.epoch_hooks: list[Any] = [self.unfreezing.after_epoch]
        self.loggers: Loggers | None = None  # the experiment trackers, while fit runs
        self.logger_state: dict[str, Any] = {}  # their run ids from a checkpoint, to continue the same runs

    def _resolve_monitor(self) -> None:
        """trainer.checkpoint.monitor/mode `auto` become the objective's (val/acc for classifiers, val/loss
        otherwise), in every config this run uses, before anything (a plateau schedule) interpolates them."""
        checkpoint = self.cfg.trainer.checkpoint
        if "auto" not in (checkpoint.monitor, checkpoint.mode):
            return
        metric, mode = self.objective.monitor
        chosen = {"monitor": metric if checkpoint.monitor == "auto" else checkpoint.monitor,
                  "mode": mode if checkpoint.mode == "auto" else checkpoint.mode}
        for cfg in {id(c): c for c in (self.stored_cfg, self.cfg, *(s.cfg for s in self.stages or ()))}.values():
            for key, value in chosen.items():
                OmegaConf.update(cfg, f"trainer.checkpoint.{key}", value)
        self.t = _Settings(OmegaConf.to_container(self.cfg.trainer, resolve=True), "trainer.")

    @property
    def eval_net(self) -> nn.Module:
        """The weights that are evaluated and saved as the model: the EMA when on."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The (first) optimizer."""
        return self.optim.first

    @property
    def schedule(self) -> Any:
        """The (first) learning-rate schedule."""
        return next(iter(self.optim.schedules.values()))

    # -- sizes --------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, split: str) -> int:
        n = self.data.num_batches(split)
        limit = self.t.limit_train_batches if split == "train" else self.t.limit_val_batches
        if limit is None:
            return n
        return min(n, limit) if isinstance(limit, int) else max(1, int(n * limit))

    def total_steps(self) -> int:
        """Optimizer steps the learning-rate schedule spans: the run, or with stages the current stage."""
        t = self.t
        epochs = self.stage.epochs if self.stage else t.max_epochs
        steps = epochs * (self.batches_per_epoch("train") // t.grad_accum_steps)
        return min(steps, t.max_steps) if t.max_steps else steps

    # -- optimization setup -------------------------------------------------------------------------------------
    def configure_optimization(self, total_steps: int | None = None) -> None:
        """Build the optimizers, with schedules planned over `total_steps` (default: `total_steps()`)."""
        t, n = self.t, self.batches_per_epoch("train")
        if n < t.grad_accum_steps:
            raise UserError(f"an epoch has {n} batch(es), fewer than trainer.grad_accum_steps={t.grad_accum_steps}; "
                            "lower data.batch_size or the accumulation", key="trainer.grad_accum_steps")
        with self.unfreezing.all_trainable(self.net):  # parameters unfrozen later have their groups from the start
            groups = self.objective.optimizer_groups(self.net)
            if len(groups) > 1 and t.grad_accum_steps > 1:
                raise UserError(f"this objective updates {', '.join(groups)} in turn every batch, which gradient "
                                "accumulation cannot split; set trainer.grad_accum_steps=1 and raise "
                                "data.batch_size", key="trainer.grad_accum_steps")
            self.optim = Optimization(self.cfg, groups, self.device, self.scaler, t,
                                      self.total_steps() if total_steps is None else total_steps,
                                      n // t.grad_accum_steps, self.dist, self.net)

    def restart_schedule(self, total_steps: int | None = None) -> None:
        """Fresh optimizers and schedules from the config in force (planned over `total_steps`), keeping the
        optimizers' state (momentum, Adam moments): a new lr plan, not a new start."""
        moments = self.optim.state_dict()[0]
        self.configure_optimization(total_steps)
        for name, opt in self.optim.optimizers.items():
            state = opt.state_dict()
            state["state"] = moments[name]["state"]  # hyperparameters (lr, ...) come from the config in force
            opt.load_state_dict(state)

    def replan_schedule(self) -> int:
        """After a full load_state_dict of a finished run resumed for longer: the steps left to the configured end
        get the configured schedule afresh (warmup, peak lr, decay). Returns those steps."""
        t = self.t
        per_epoch = self.batches_per_epoch("train") // t.grad_accum_steps
        remaining = min((t.max_epochs - self.epoch) * per_epoch - self.batch_in_epoch // t.grad_accum_steps,
                        self.total_steps() - self.step)
        self.restart_schedule(remaining)
        return remaining

    # -- the training loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if self.optim is None:
            self.configure_optimization()
        # only rank 0 talks to the trackers; the others log nowhere
        self.loggers = loggers = (build_loggers(self.stored_cfg, self.run_dir, self.logger_state) if self.dist.main
                                  else Loggers({}))
        max_steps = (t.max_steps or math.inf) if self.stages else self.total_steps()
        done = self.step >= max_steps
        if self.stage and self.stages.at(self.epoch) is self.stage:
            console.print(f"stage {self.stage.index + 1}/{len(self.stages)}: {self.stage.name}")
        with self.signals, loggers:  # leaving it closes every tracker: finished, failed or killed
            loggers.config(self.stored_cfg)
            if hasattr(self.data, "sample_images"):  # what the model sees, once per run, drawn as the data is
                loggers.images("train/samples", as_drawn(self.data.sample_images(16),
                                                         self.spec.get("image_origin", "upper")), self.step)
            started = time.perf_counter()
            while self.epoch < t.max_epochs and not done:
                if self.stages and self.stages.at(self.epoch) is not self.stage:
                    self._enter_stage(self.stages.at(self.epoch))
                t, n_batches, accum = self.t, self.batches_per_epoch("train"), self.t.grad_accum_steps
                self.model.train()
                self.optim.zero_grad()
                samples = self.data.batch_size * accum  # per optimizer step
                window, epoch_window = Window(self.step, samples), Window(self.step, samples)
                with epoch_progress(t.progress and console.is_terminal) as bar:
                    task = bar.add_task(f"epoch {self.epoch + 1}/{t.max_epochs}", total=n_batches,
                                        completed=self.batch_in_epoch, stats="")
                    for i, batch in enumerate(self.data.train_batches(self.epoch, t.seed, self.batch_in_epoch,
                                                                      n_batches), start=self.batch_in_epoch):
                        # forward, scaled backward and (every grad_accum_steps batches) each group's update
                        batch = to_device(batch, self.device)
                        if (i + 1) % accum:  # a micro-batch that does not step: DDP all-reduces with the one that does
                            with self.dist.no_sync(self.model):
                                self._train_batch(batch, accum, stepping=False)
                            continue
                        grad_norm = self._train_batch(batch, accum, stepping=True)
                        self.optim.after_step()
                        self.step, self.batch_in_epoch = self.step + 1, i + 1
                        if self.ema is not None and self.step % t.ema.every_n_steps == 0:
                            self.ema.update(self.net)
                        # periodic logging: the only place the loop waits for the device
                        if self.step % t.log_every_n_steps == 0:
                            log_step(loggers, bar, task, window, self.dist.reduce(self.sums.totals(means_only=True)),
                                     self.optimizer, grad_norm, self.step, self.batch_in_epoch)
                        # a pending SIGINT/SIGTERM ends the run here, between two steps, with last.pt saved
                        if (signum := self.dist.vote_stop(self.signals.received)) is not None:
                            self._interrupt(signum)
                        if self.step >= max_steps:
                            done = True
                            break
                    bar.update(task, completed=self.batch_in_epoch)  # the log cadence may end short of it
                self.optim.check_losses()  # losses still waiting on the device: none is non-finite before a save
                # validation, epoch-level schedule, checkpoints, early stopping
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                # waits for the device: exact throughput
                train = self._means(self.dist.reduce(self.sums.totals()), "train")
                self.history["throughput"] = {"train/samples_per_s": epoch_window.rate(self.step)}
                metrics = {**train, **self.evaluate("val")}
                self.objective.after_validation(self.eval_net, self.data, self.epoch, self.run_dir, loggers,
                                                 self.step)
                self.sums = StepSums()
                self.optim.after_epoch(metrics)
                stage = {"stage": self.stage.index} if self.stage else {}
                loggers.scalars({**metrics, **self.history["throughput"], **stage}, self.step)
                run_state.save_epoch(self, metrics)
                for hook in self.epoch_hooks:  # e.g. a tuning trial reporting its metric (may stop the run)
                    hook(self, metrics)
                where = f" (stage {self.stage.name})" if self.stage else ""
                log.info("epoch %d%s: %s", self.epoch, where, brief(metrics))
                console.print(f"epoch {self.epoch}{where}: {brief(metrics)}")
                if t.early_stopping.enabled and not self.stopper.update(metrics) \
                        and self.stopper.bad_checks > t.early_stopping.patience:
                    console.print(f"early stopping: {t.early_stopping.monitor} has not improved for "
                                  f"{self.stopper.bad_checks} epochs")
                    break
                if (signum := self.dist.vote_stop(self.signals.received, now=True)) is not None:
                    self._interrupt(signum)
            return self._finish(loggers, time.perf_counter() - started)

    def _train_batch(self, batch: Any, accum: int, stepping: bool) -> torch.Tensor | None:
        """Run the objective's updates for one batch; record its losses and sums for the epoch's running averages
        (kept on the device as they are: no op, no host sync). Returns the last update's gradient norm when
        clipping computed one."""
        losses, sums, grad_norm = {}, None, None
        # the gradient norm is measured on logging steps only (before the gradients are cleared)
        logging_step = stepping and (self.step + 1) % self.t.log_every_n_steps == 0
        if self.autocast is None:
            updates = self.objective.training_steps(self.model, batch)
        else:  # every forward under autocast: in the call (one update), or as each is asked for (a generator)
            with self.autocast:
                updates = each_under(self.autocast, iter(self.objective.training_steps(self.model, batch)))
        for name, loss, stats in updates:
            if self.t.l1:
                loss = loss + self.t.l1 * sum(p.abs().sum() for p in self.net.parameters() if p.ndim >= 2)
            share = loss / accum if accum > 1 else loss  # no extra node at accum 1
            (self.scaler.scale(share) if self.optim.scaling else share).backward()
            losses["loss" if name == "main" else f"loss_{name}"] = loss.detach()
            sums = stats if sums is None else {**sums, **stats}  # one update (the usual case): its dict as it is
            if stepping:
                grad_norm = self.optim.step(name, loss, self.step, norm=logging_step)
        self.sums.add(self.objective.count(batch), sums or {}, losses)
        return grad_norm

    def _enter_stage(self, stage: Any) -> None:
        """Switch to the next curriculum stage: rebuild what its config changes, restart the schedule over its
        steps, keep the optimizer's state."""
        before, cfg = self.cfg, stage.cfg
        self.stage, self.cfg = stage, cfg
        self.t = _Settings(OmegaConf.to_container(cfg.trainer, resolve=True), "trainer.")
        if cfg.data != before.data:
            memory_format = getattr(self.data, "memory_format", None)
            self.data = self.dist.build_data(cfg.data).setup(self.device)
            if memory_format is not None:
                self.data.memory_format = memory_format
            self.spec = dict(self.data.spec)
        if cfg.objective != before.objective or cfg.data != before.data:  # its settings, or what the data says
            self.objective = complete(instantiate(cfg.objective), self.spec, "objective", model=self.net)
        self.restart_schedule()  # over the stage's steps, from the stage's optimizer settings
        console.print(f"stage {stage.index + 1}/{len(self.stages)}: {stage.name}")

    def _interrupt(self, signum: int) -> None:
        self.optim.check_losses()  # a non-finite loss stops the run before last.pt is overwritten
        raise Interrupted(signum, run_state.save_last(self), self.run_dir)

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
                self.objective.eval_update(model, to_device(batch, self.device), metrics, self.cfg.eval.tta)
        model.train(was_training)
        return self._means(self.dist.reduce(metrics), split)  # every rank's share of the split

    def _means(self, sums: Averages, split: str) -> dict[str, float]:
        return {f"{split}/{k}": v for k, v in self.objective.summarize(sums.means()).items()}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self, metrics: dict[str, float]) -> dict[str, Any]:
        return run_state.state_dict(self, metrics)

    def load_state_dict(self, state: dict[str, Any], full: bool) -> None:
        run_state.load_state_dict(self, state, full)

    # -- end of run -----------------------------------------------------------------------------------------------
    def _finish(self, loggers: Loggers, seconds: float) -> dict[str, Any]:
        best_path = self.run_dir / "checkpoints" / ck.BEST
        self.dist.barrier()  # rank 0 has written it
        if best_path.is_file():  # test with the best weights, exactly as `nnctl eval` will load them
            self.load_state_dict(ck.load_checkpoint(best_path, self.device, shards=False), full=False)
        test = self.evaluate("test")
        loggers.scalars(test, self.step)
        last, best = self.history.get("last", {}), self.history.get("best", self.history.get("last", {}))
        rows = {"train": split(last, "train"), "val (best)": split(best, "val"), "test": split(test, "test")}
        result = {"train": rows["train"], "val": rows["val (best)"], "test": rows["test"],
                  "best_epoch": best.get("epoch"), "epochs": self.epoch, "global_step": self.step,
                  "train_seconds": round(seconds, 2), **self.history.get("throughput", {}),
                  "monitor": self.best.monitor, "mode": self.t.checkpoint.mode,
                  "checkpoint": str(best_path) if best_path.is_file() else None}
        if self.stages:
            result["stages"] = self.history.get("stages", {})
        final = {f"{s}/{k}": v for s in ("val", "test") for k, v in result[s].items()}
        loggers.hparams(flat_params(self.stored_cfg), final)
        if best_path.is_file():
            loggers.artifact(best_path)
        if self.dist.main:
            write_json(self.run_dir / "metrics.json", result)
        print_metrics(f"nnctl train: {self.epoch} epoch(s), {self.step} steps, {seconds:.1f}s", rows)
        console.print(f"run dir: {self.run_dir}")
        return result


def _check_image_features(cfg: DictConfig, spec: dict[str, Any]) -> None:
    """Image-only speed and evaluation options, asked of data that is not images, are a config mistake."""
    if spec.get("input") == "image":
        return
    kind = spec.get("input", "non-image")
    if cfg.trainer.channels_last:
        raise UserError(f"channels_last is a memory layout for image tensors and this data yields {kind} input; "
                        "set trainer.channels_last=false", key="trainer.channels_last")
    if cfg.eval.get("tta") not in (None, False, "none"):
        raise UserError(f"test-time augmentation flips and shifts images and this data yields {kind} input; set "
                        "eval.tta=none", key="eval.tta")


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
