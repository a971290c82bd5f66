"""TensorBoard: scalars, the resolved config as text, sample images, and hparams with the final metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nnctl.loggers.base import Logger, RunInfo


class TensorBoardLogger(Logger):
    def __init__(self, run: RunInfo, state: dict[str, Any] | None = None, dir: str = "tensorboard") -> None:
        # imported here: they pull in tensorboard
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run.dir) / dir))  # a relative `dir` lands in the run dir
        self._summary = Summary
        self._tags: set[str] = set()  # scalar tags written, so hparams names only metrics that have values

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """All values as one event of protobuf Values made here (this runs in the step loop): torch's add_scalar
        writes an event per value, and its scalar() goes through numpy and a Summary per value."""
        values = [self._summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()]
        self.writer.file_writer.add_summary(self._summary(value=values), step)
        self._tags.update(metrics)

    def config(self, cfg: DictConfig) -> None:
        self.text("config", OmegaConf.to_yaml(cfg), 0)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)  # a code block

    def images(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, params: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """The hparams plugin's experiment and session summaries, written into this run's own event file.

        SummaryWriter.add_hparams would also write each metric as a new scalar (an `hparam/*` card per metric in
        the scalars dashboard, one point each); the plugin reads a metric's value from the scalar of the same tag
        in the session's dir, so naming tags this run already logged (val/*, test/*) shows their last values in
        the HPARAMS tab without new cards.
        """
        from torch.utils.tensorboard.summary import hparams

        values = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
        metrics = {k: v for k, v in final.items() if k in self._tags}
        for summary in hparams(values, metrics):
            self.writer.file_writer.add_summary(summary)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.flush()
        self.writer.close()
