"""What a run must remember to continue exactly, and when it writes it: the checkpoint dict, best/last/top-k files,
and the trackers behind checkpoint selection and early stopping."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch.nn as nn
from omegaconf import OmegaConf

from nnctl import adapters, sharded
from nnctl import checkpoint as ck
from nnctl.errors import UserError
from nnctl.metrics import StepSums

if TYPE_CHECKING:
    from nnctl.engine import Engine


LATEST = "latest"  # a monitor under which each check is the best so far: best.pt = the most recent weights


class Tracker:
    """Best value of a monitored metric, and how many checks in a row failed to improve it. Monitor `latest`: every
    check improves (models whose validation numbers do not rank them, e.g. a GAN's adversarial losses)."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0, key: str = "monitor") -> None:
        self.monitor, self.min_delta = monitor, min_delta
        self.sign = 1.0 if mode == "max" or monitor == LATEST else -1.0  # latest: the newest ranks first
        self.key = key  # the config key that named the monitor, for error messages
        self.best, self.bad_checks = -math.inf, 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this check's value; True when it is the best so far."""
        if self.monitor == LATEST:
            self.bad_checks = 0
            return True
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


def state_dict(engine: "Engine", metrics: dict[str, float]) -> dict[str, Any]:
    """Everything needed to continue exactly. MODEL holds the evaluation weights (EMA when on); with sharded
    checkpoints, MODEL and OPTIMIZER hold this rank's shards (for `sharded.save`)."""
    local = is_sharded(engine)
    optimizers, schedules = engine.optim.state_dict(local) if engine.optim else ({}, {})
    state = {
        ck.CONFIG: OmegaConf.to_yaml(engine.stored_cfg, resolve=True),
        # the whole model (FSDP gathers it from the shards) or this rank's shards; for adapter runs only what trained
        ck.MODEL: adapters.model_state(engine.net, engine.eval_net,
                                       engine.dist.local_model_state if local else engine.dist.model_state),
        ck.OPTIMIZER: optimizers,
        ck.SCHEDULER: schedules,
        ck.SCALER: engine.scaler.state_dict(),
        ck.EPOCH: engine.epoch, ck.STEP: engine.step, ck.BATCH_IN_EPOCH: engine.batch_in_epoch,
        ck.TRACKERS: {"best": engine.best.state_dict(), "early_stopping": engine.stopper.state_dict(),
                      "history": engine.history, "epoch_sums": _epoch_sums(engine)},
        ck.METRICS: metrics,
        ck.RNG: ck.rng_state(),
        ck.EXTRA: {"train_model": adapters.model_state(engine.net, engine.net), "ema_updates": engine.ema.updates}
        if engine.ema is not None else {},
        ck.LOGGERS: engine.loggers.state() if engine.loggers is not None else engine.logger_state,
    }
    # what the data said about itself, and what the model depends on (e.g. a tokenizer built from the training text):
    # commands such as nnctl generate rebuild model and tokenizer from the checkpoint alone
    state[ck.DATA] = {"spec": engine.spec, **(engine.data.state_dict() if hasattr(engine.data, "state_dict") else {})}
    if adapters.is_adapted(engine.net):  # the weights above need this base to mean anything
        state[ck.BASE] = base_reference(engine)
    return state


def _epoch_sums(engine: "Engine") -> dict[str, Any]:
    """The epoch's training sums so far: per-step values in one process (a resumed run then sums exactly the
    values an uninterrupted one does), the totals over all ranks with several (one all_reduce, on every rank)."""
    if engine.dist.initialized:
        return engine.dist.reduce(engine.sums.totals()).state_dict()
    return engine.sums.state_dict()


def base_reference(engine: "Engine") -> dict[str, str]:
    """The starting checkpoint (path, sha256) and the fingerprint of the frozen base weights."""
    return {**engine.base, **adapters.base_reference(engine.net)}


def load_state_dict(engine: "Engine", state: dict[str, Any], full: bool) -> None:
    """Load the evaluation weights; with `full`, everything needed to continue training exactly."""
    if ck.BASE in state:
        from nnctl.finetune import check_base

        check_base(state[ck.BASE], base_reference(engine))
    if ck.SHARDS in state:  # a sharded checkpoint: each rank reads its shards of the weights from the folder
        sharded.load_model(engine, state)
    else:
        load_weights(engine.eval_net, state[ck.MODEL], engine.dist.load_model_state)
    if not full:
        return
    extra = state[ck.EXTRA]
    if engine.ema is not None:
        if "train_model" not in extra:
            raise UserError("the checkpoint was trained without EMA; resume with trainer/ema=off", key="trainer.ema")
        load_weights(engine.net, extra["train_model"])
        engine.ema.updates = int(extra["ema_updates"])
    engine.configure_optimization()
    if ck.SHARDS in state:
        engine.optim.load_state_dict(sharded.load_optimizers(engine, state), state[ck.SCHEDULER], local=True)
    else:
        engine.optim.load_state_dict(state[ck.OPTIMIZER], state[ck.SCHEDULER])
    engine.scaler.load_state_dict(state[ck.SCALER])
    engine.epoch, engine.step, engine.batch_in_epoch = state[ck.EPOCH], state[ck.STEP], state[ck.BATCH_IN_EPOCH]
    engine.unfreezing.apply(engine.net, engine.epoch)  # what trains depends on the epoch alone
    trackers = state[ck.TRACKERS]
    engine.best.load_state_dict(trackers["best"])
    engine.stopper.load_state_dict(trackers["early_stopping"])
    engine.history = trackers["history"]
    # the epoch's sums so far, over all ranks: rank 0 carries them on, so the epoch's reduction counts them once
    engine.sums = StepSums(trackers["epoch_sums"] if engine.dist.main else None)
    ck.set_rng_state(state[ck.RNG])
    engine.logger_state = state.get(ck.LOGGERS, {})  # tracker runs to continue


def save_epoch(engine: "Engine", metrics: dict[str, float]) -> None:
    """After validation: update the best tracker, write best.pt (and top-k) when it improved, and last.pt."""
    c = engine.t.checkpoint
    engine.history["last"] = dict(metrics)
    boundary = engine.stages is not None and engine.stages.is_last_epoch(engine.epoch)
    if boundary:
        engine.history.setdefault("stages", {})[engine.stage.name] = dict(metrics, epoch=engine.epoch)
    due = engine.epoch % c.every_n_epochs == 0 or engine.epoch == engine.t.max_epochs or boundary
    improved = engine.best.update(metrics) if due else False
    if improved:
        engine.history["best"] = dict(metrics, epoch=engine.epoch)
    if not (c.enabled and due and (improved or c.save_last or boundary)):  # alike on every rank (reduced metrics)
        return
    directory = engine.run_dir / "checkpoints"
    state = state_dict(engine, metrics)  # on every rank: FSDP gathers the weights collectively
    if is_sharded(engine):  # every rank writes its shards; rank 0 gets what the .pt files hold
        state = sharded.save(directory, state, engine.dist, engine.step)
    if not engine.dist.main:
        return
    if improved:
        ck.save_checkpoint(state, directory / ck.BEST)
        if adapters.is_adapted(engine.eval_net):  # the same adapter weights in peft's own format, for plain peft
            engine.eval_net.save_pretrained(directory / PEFT_DIR)
        if c.save_top_k:
            _keep_top_k(engine, state, metrics, directory, c.save_top_k)
    if c.save_last:
        ck.save_checkpoint(state, directory / ck.LAST)
    if boundary:  # the model as each stage left it
        ck.save_checkpoint(state, directory / f"stage{engine.stage.index + 1}-{engine.stage.name}.pt")
    if is_sharded(engine):
        sharded.collect(directory)


PEFT_DIR = "best_peft"  # beside best.pt: adapter_model.safetensors + adapter_config.json


def save_last(engine: "Engine") -> Path | None:
    """last.pt at the current step (an interrupt mid-epoch); None when checkpoints are off."""
    if not engine.t.checkpoint.enabled:
        return None
    path = engine.run_dir / "checkpoints" / ck.LAST
    state = state_dict(engine, engine.history.get("last", {}))
    if is_sharded(engine):
        state = sharded.save(path.parent, state, engine.dist, engine.step)
    if engine.dist.main:
        ck.save_checkpoint(state, path)
        if is_sharded(engine):
            sharded.collect(path.parent)
    return path


def is_sharded(engine: "Engine") -> bool:
    """Whether this run saves sharded checkpoints (trainer.checkpoint.sharded; absent in older runs' configs)."""
    return bool(getattr(engine.t.checkpoint, "sharded", False))


def _keep_top_k(engine: "Engine", state: dict[str, Any], metrics: dict[str, float], directory: Path,
                k: int) -> None:
    name = engine.best.monitor.replace("/", "_")
    value = engine.epoch if engine.best.monitor == LATEST else metrics[engine.best.monitor]  # latest: by epoch
    ck.save_checkpoint(state, directory / f"epoch={engine.epoch:03d}-{name}={value:.4f}.pt")
    ranked = sorted(directory.glob("epoch=*.pt"), key=lambda p: engine.best.sign * float(p.stem.split("=")[-1]),
                    reverse=True)
    for stale in ranked[k:]:
        stale.unlink(missing_ok=True)


def load_weights(module: nn.Module, weights: dict[str, Any], load: Callable[..., None] | None = None) -> None:
    """`load(module, weights)` defaults to module.load_state_dict (FSDP loads whole weights into shards)."""
    try:
        adapters.load_model_state(module, weights, load)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc)).rstrip(".")
        raise UserError(f"the checkpoint's weights do not fit the model built from this config ({detail[:200]}); "
                        "drop the model.* or data.* overrides that change layer shapes", key="model") from None
