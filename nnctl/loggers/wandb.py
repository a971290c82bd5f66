"""Weights & Biases: offline by default (the run is written under the run dir; `wandb sync` uploads it later),
online when `logger.wandb.mode=online`. A multirun sweep is one W&B group; the run id is saved in the checkpoint,
so `nnctl train resume=...` continues the same W&B run. Offline mode never touches the network and nothing ever
prompts for a login.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError
from nnctl.loggers.base import NOT_HPARAMS, Logger, RunInfo, strip_plumbing

log = logging.getLogger(__name__)
KEY = "logger.wandb"
MODES = ("offline", "online", "disabled")  # checked by nnctl.validate


class WandbLogger(Logger):
    def __init__(self, run: RunInfo, state: dict[str, Any] | None = None, project: str = "nnctl",
                 entity: str | None = None, group: str | None = None, tags: Sequence[str] = (),
                 mode: str = "offline", dir: str = ".", job_type: str = "train", log_artifacts: bool = False) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("the wandb package is not installed; pip install wandb, or choose other trackers "
                            "(logger=tensorboard)", key="logger") from None
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            raise UserError("no W&B credentials for online mode; run `wandb login` or set WANDB_API_KEY, or keep "
                            f"{KEY}.mode=offline and `wandb sync` the run later", key=f"{KEY}.mode")
        state = state or {}
        self.wandb, self.log_artifacts = wandb, log_artifacts
        # W&B refuses tags over 64 characters. A resumed run keeps the tags of the command that started it.
        run_tags = [*(str(t) for t in tags), *(o[:64] for o in run.overrides)] if not state else None
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  save_code=False, x_save_requirements=False)
        directory = Path(run.dir) / dir  # a relative `dir` lands in the run dir
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, entity=entity, group=group or state.get("group") or run.group,
                                  name=run.name, id=state.get("run_id"), resume="allow", mode=mode,
                                  dir=str(directory), job_type=job_type, tags=run_tags or None, settings=settings,
                                  reinit="create_new")
        except (wandb.errors.Error, OSError) as exc:
            raise UserError(f"W&B could not start the run: {str(exc).strip().splitlines()[0][:300]}; check "
                            f"{KEY}.project/entity, or use {KEY}.mode=offline", key=KEY) from exc
        self.group = self.run.group

    def config(self, cfg: DictConfig) -> None:
        tree = OmegaConf.to_container(cfg, resolve=True)
        tree = strip_plumbing({k: v for k, v in tree.items() if k not in NOT_HPARAMS})
        self.run.config.update(tree, allow_val_change=True)  # a resume may change e.g. trainer.max_epochs

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def images(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def hparams(self, params: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """The config went in at the start; the final metrics (best val, test) go in the run summary."""
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def artifact(self, path: Path) -> None:
        if self.log_artifacts and path.is_file():
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run.id, **({"group": self.group} if self.group else {})}

    def close(self, status: str = "FINISHED") -> None:
        offline = self.run.settings.mode == "offline"
        directory = self.run.dir and Path(self.run.dir).parent
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        if offline:
            from nnctl.reporting import console

            log.info("wandb: offline run %s saved in %s", self.run.id, directory)
            console.print(f"wandb: offline run saved; upload it with: wandb sync {directory}", markup=False)
