"""MLflow: one MLflow run per nnctl run, in a local SQLite store by default or on any tracking server.

Params are the flattened config (`flat_params`), metrics go in batches, the resolved config is the artifact
`config.yaml`, and with `log_artifacts` the best checkpoint and the sample images are uploaded. The run id is saved
in the checkpoint, so `nnctl train resume=...` continues the same MLflow run.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError
from nnctl.loggers.base import Logger, RunInfo, flat_params

log = logging.getLogger(__name__)
KEY = "logger.mlflow"
MAX_PARAMS, MAX_METRICS = 100, 1000  # per log_batch call (MLflow's limits)
FLUSH_SECONDS = 10.0                  # metrics wait at most this long in the buffer (one write per batch)


class MLflowLogger(Logger):
    def __init__(self, run: RunInfo, state: dict[str, Any] | None = None, tracking_uri: str = "",
                 experiment_name: str = "nnctl", artifact_location: str | None = None,
                 tags: Mapping[str, str] | None = None, log_artifacts: bool = False, timeout_s: float = 5.0) -> None:
        _check_reachable(tracking_uri, timeout_s)
        # A remote server that stops answering mid-run should cost seconds, not MLflow's default retry storm.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables" per store
        self.log_artifacts, self._buffer, self._flushed = log_artifacts, [], time.monotonic()
        try:
            self.client = MlflowClient(tracking_uri=_prepare_store(tracking_uri))
            self.run_id = (state or {}).get("run_id")
            if self.run_id:  # resume: the same run, running again
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self._experiment(experiment_name, artifact_location or _local_artifacts(tracking_uri))
                run_tags = {"nnctl.run_dir": str(run.dir), "nnctl.overrides": " ".join(run.overrides),
                            "mlflow.source.name": "nnctl train", **({"sweep": run.group} if run.group else {}),
                            **{str(k): str(v) for k, v in (tags or {}).items()}}
                self.run_id = self.client.create_run(experiment, run_name=run.name, tags=run_tags).info.run_id
        except MlflowException as exc:
            raise UserError(f"MLflow refused {tracking_uri!r}: {_first_line(exc)}; set {KEY}.tracking_uri to a "
                            "reachable server or a sqlite:/// file", key=f"{KEY}.tracking_uri") from exc
        log.info("mlflow: run %s in %s", self.run_id, tracking_uri)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            # The kind tag makes MLflow's UI open the experiment on its runs table, not its GenAI traces view.
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def config(self, cfg: DictConfig) -> None:
        from mlflow.entities import Param

        # A resumed run already has its params; MLflow refuses to change one (e.g. a longer trainer.max_epochs).
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:6000]) for k, v in flat_params(cfg).items() if k not in logged]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg), "config.yaml")

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, v, now, step) for k, v in metrics.items())
        if len(self._buffer) >= MAX_METRICS // 2 or time.monotonic() - self._flushed > FLUSH_SECONDS:
            self._flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")

    def images(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.log_artifacts:
            self.client.log_image(self.run_id, image, artifact_file=f"{tag}.png")

    def hparams(self, params: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """Params went in at the start; the final metrics (best val, test) become `final/*` metrics."""
        self.scalars({f"final/{k}": v for k, v in final.items()}, 0)
        self._flush()

    def artifact(self, path: Path) -> None:
        if self.log_artifacts and path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=path.parent.name)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self, status: str = "FINISHED") -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, status)

    def _flush(self) -> None:
        for i in range(0, len(self._buffer), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + MAX_METRICS])
        self._buffer, self._flushed = [], time.monotonic()


def _check_reachable(uri: str, timeout_s: float) -> None:
    """For an http(s) server: one TCP connect with a short timeout, so a wrong URI fails in seconds before
    training, instead of after MLflow's retries."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it (mlflow server "
                        f"--host {parsed.hostname} --port {port}), or drop {KEY}.tracking_uri to log to the local "
                        "store", key=f"{KEY}.tracking_uri") from None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:///path URI (relative, or absolute with four slashes), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:" else None


def _prepare_store(uri: str) -> str:
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def _local_artifacts(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to the database (MLflow's default is ./mlartifacts in whatever
    dir the run started in)."""
    db = _sqlite_path(uri)
    return (db.parent.resolve() / "artifacts").as_uri() if db is not None else None


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
