"""Staged (curriculum) training: stage configs, boundaries, checkpoints per stage, exact resume across a boundary."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnctl import checkpoint as ck
from nnctl.cli import main

STAGES = ("stages=[{name: plain, epochs: 1, overrides: {data.augment.crop_padding: 0, optimizer.lr: 0.01}},"
          " {name: shifted, epochs: 2, overrides: {data.augment.crop_padding: 1, data.batch_size: 16}}]")
TINY = ["data=digits", "data.batch_size=32", "model=cnn", "model.channels=[8,16]", "trainer.deterministic=true",
        "trainer.progress=false", "trainer.early_stopping.enabled=false", "trainer.log_every_n_steps=5", STAGES]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.MODEL]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY, f"hydra.run.dir={run}"]) == 0
    return run


def test_stages_set_length_data_and_schedule_per_stage(straight: Path) -> None:
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["epochs"] == 3  # the stages' epochs in total
    # 1293 training digits: stage 1 at batch 32 = 40 steps, stage 2 at batch 16 = 80 steps per epoch
    assert metrics["global_step"] == 40 + 2 * 80
    assert set(metrics["stages"]) == {"plain", "shifted"} and metrics["stages"]["plain"]["epoch"] == 1
    names = sorted(p.name for p in (straight / "checkpoints").glob("stage*.pt"))
    assert names == ["stage1-plain.pt", "stage2-shifted.pt"]
    # the stored config is the base config (stages re-applied on resume/eval), with the run's total length
    stored = ck.load_checkpoint(straight / "checkpoints" / "stage1-plain.pt")
    assert "crop_padding: 1" in stored[ck.CONFIG] and "max_epochs: 3" in stored[ck.CONFIG]
    # each stage restarts its schedule from its own lr: warmup_cosine ends near 0 in stage 1, restarts at 3e-3
    lrs = stored[ck.OPTIMIZER]["main"]["param_groups"][0]
    assert lrs["initial_lr"] == pytest.approx(0.01)
    last = ck.load_checkpoint(straight / "checkpoints" / ck.LAST)[ck.OPTIMIZER]["main"]["param_groups"][0]
    assert last["initial_lr"] == pytest.approx(3e-3)


def test_kill9_after_a_stage_boundary_then_resume_is_bitwise_identical(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *TINY, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    boundary = run / "checkpoints" / "stage1-plain.pt"
    while not boundary.exists():
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.EPOCH] in (1, 2)
    assert main(["train", f"resume={run}"]) == 0
    a, b = _weights(run), _weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "metrics.json").read_text())["test"] == json.loads(
        (straight / "metrics.json").read_text())["test"]


def test_eval_of_a_staged_run_reproduces_its_test_metrics(straight: Path, tmp_path: Path) -> None:
    assert main(["eval", f"ckpt={straight}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    want = json.loads((straight / "metrics.json").read_text())["test"]
    assert got == pytest.approx(want, abs=1e-6)
