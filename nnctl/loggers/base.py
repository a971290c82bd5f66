"""The one logging interface the engine talks to, and the fan-out that feeds every selected tracker.

Each tracker adapter (`tensorboard`, `csv`, `mlflow`, `wandb`) subclasses `Logger` and overrides what its tracker
can show; the base methods do nothing, so e.g. the CSV file simply ignores images. The engine holds one `Loggers`,
built by `build_loggers` from the `logger` config group: every entry there is a `_partial_` whose run-time inputs
(`run`: where and what this run is, `state`: the tracker's saved run id on resume) are completed here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError

log = logging.getLogger(__name__)

PLUMBING = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")  # how a component is built, not what
NOT_HPARAMS = ("paths", "hydra", "logger", "resume", "command")  # where/how a run is recorded, not what it trains
STATUSES = ("FINISHED", "FAILED", "KILLED")  # close(status): MLflow's run statuses, mapped by the other trackers


@dataclass(frozen=True)
class RunInfo:
    """What every tracker needs to name a run: its dir, a name, the sweep it belongs to, the command line."""

    dir: Path
    name: str                    # the run dir's name; "<sweep>/<job>" for a multirun job
    group: str | None = None     # the sweep ("<date>/<time>" of its dir) for a multirun job, else None
    overrides: list[str] = field(default_factory=list)  # the command-line overrides, e.g. ["optimizer=sgd"]

    @classmethod
    def current(cls, run_dir: Path) -> "RunInfo":
        """From Hydra's runtime config when a Hydra app is running (nnctl train), else from the run dir alone."""
        run_dir = Path(run_dir)
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hc = HydraConfig.get()
        except (ImportError, ValueError):  # not inside a Hydra app (e.g. the engine driven from Python)
            return cls(run_dir, run_dir.name)
        overrides = [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]
        if hc.mode == RunMode.MULTIRUN:
            sweep = Path(hc.sweep.dir)
            group = f"{sweep.parent.name}/{sweep.name}"
            return cls(run_dir, f"{sweep.name}/{run_dir.name}", group, overrides)
        return cls(run_dir, run_dir.name, None, overrides)


class Logger:
    """One experiment tracker. Every method is optional: the base does nothing."""

    def config(self, cfg: DictConfig) -> None:
        """The resolved config, once at the start of `fit`."""

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite scalar values at an optimizer step (the fan-out drops NaN/inf before they get here)."""

    def text(self, tag: str, text: str, step: int) -> None:
        """A block of text (markdown where the tracker renders it)."""

    def images(self, tag: str, image: np.ndarray, step: int) -> None:
        """One image, H x W x 3 uint8 (the fan-out tiles a batch into a grid)."""

    def hparams(self, params: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """The run's hyperparameters (flat, see `flat_params`) with its final metrics, at the end of the run."""

    def artifact(self, path: Path) -> None:
        """A file worth keeping with the run (the best checkpoint); trackers upload it only when asked to."""

    def state(self) -> dict[str, Any]:
        """What resuming needs to continue the same tracker run (e.g. its run id); plain values only."""
        return {}

    def close(self, status: str = "FINISHED") -> None:
        """End the run: `status` is one of STATUSES."""


class Loggers(Logger):
    """The trackers of one run, by config name. Used as a context manager: leaving it closes every tracker with
    FINISHED, FAILED (an exception) or KILLED (Ctrl-C / SIGTERM)."""

    def __init__(self, loggers: Mapping[str, Logger]) -> None:
        self.loggers = dict(loggers)

    def config(self, cfg: DictConfig) -> None:
        for logger in self.loggers.values():
            logger.config(cfg)

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if finite:
            for logger in self.loggers.values():
                logger.scalars(finite, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers.values():
            logger.text(tag, text, step)

    def images(self, tag: str, images: Any, step: int) -> None:
        """`images`: a float tensor N x C x H x W (any range: each image is scaled to its own min..max), or a
        PNG file."""
        if not self.loggers:
            return
        grid = _to_grid(images)  # once, not per tracker
        for logger in self.loggers.values():
            logger.images(tag, grid, step)

    def hparams(self, params: Mapping[str, Any], final: Mapping[str, float]) -> None:
        final = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for logger in self.loggers.values():
            logger.hparams(params, final)

    def artifact(self, path: Path) -> None:
        for logger in self.loggers.values():
            logger.artifact(Path(path))

    def state(self) -> dict[str, Any]:
        return {name: s for name, logger in self.loggers.items() if (s := logger.state())}

    def close(self, status: str = "FINISHED") -> None:
        for name, logger in self.loggers.items():
            try:
                logger.close(status)
            except Exception as exc:  # one tracker failing to finish must not hide the run's result or the others
                log.warning("logger %s: closing failed: %s", name, exc)

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        self.close("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


def build_loggers(cfg: DictConfig, run_dir: Path, state: Mapping[str, Any] | None = None) -> Loggers:
    """Every tracker under `cfg.logger`, started for this run; `state` (from a checkpoint) continues their runs.

    A tracker that cannot start (unreachable server, missing package) raises UserError here, before training.
    """
    from hydra.utils import instantiate

    node = cfg.get("logger") or {}
    if not isinstance(node, (dict, DictConfig)):
        raise UserError(f"got {node!r}; expected trackers chosen as logger=<option> or logger=[tensorboard,csv]",
                        key="logger")
    run, state = RunInfo.current(run_dir), state or {}
    built: dict[str, Logger] = {}
    try:
        for name, sub in node.items():
            if not isinstance(sub, DictConfig) or "_target_" not in sub:
                raise UserError(f"got {OmegaConf.to_container(sub) if OmegaConf.is_config(sub) else sub!r}; "
                                "expected a tracker config with a _target_ (choose trackers with logger=<option>)",
                                key=f"logger.{name}")
            built[name] = instantiate(sub)(run=run, state=state.get(name))
    except BaseException:
        Loggers(built).close("FAILED")
        raise
    return Loggers(built)


def flat_params(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as {"optimizer.lr": 0.001, ...}: what the run trains, without build plumbing (_target_, ...)
    or where/how it is recorded (paths, hydra, logger). Lists become strings; values are scalars or None."""
    tree = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    tree = {k: v for k, v in tree.items() if k not in NOT_HPARAMS}
    return dict(flatten(strip_plumbing(tree)))


def strip_plumbing(tree: Any) -> Any:
    """A plain config tree without the `_target_`/`_partial_` keys (for trackers that show nested configs)."""
    if isinstance(tree, dict):
        return {k: strip_plumbing(v) for k, v in tree.items() if k not in PLUMBING}
    return tree


def flatten(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        yield prefix[:-1], str(list(tree))
    else:
        yield prefix[:-1], tree


def _to_grid(images: Any) -> np.ndarray:
    """A batch N x C x H x W (any float range) or a PNG path -> one H x W x 3 uint8 image (a grid of the batch)."""
    if isinstance(images, (str, Path)):
        from PIL import Image

        with Image.open(images) as img:
            return np.asarray(img.convert("RGB"))
    import torch
    from torchvision.utils import make_grid

    batch = images.detach().float().cpu()
    if batch.shape[1] == 1:  # grayscale: the same channel three times
        batch = batch.expand(-1, 3, -1, -1)
    grid = make_grid(batch, nrow=int(math.ceil(math.sqrt(len(batch)))), normalize=True, scale_each=True, padding=1)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # HWC
