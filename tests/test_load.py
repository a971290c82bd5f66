"""Load: a 100-job sweep of a tiny model finishes, every job leaves its metrics, one bad point fails alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnctl.cli import main


def test_hundred_job_sweep_with_one_bad_point(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    seeds = ",".join(str(s) for s in range(-1, 99))  # seed -1 is invalid: exactly one job must fail
    code = main(["train", "-m", f"trainer.seed={seeds}", "data=synthetic", "data.num_samples=64",
                 "data.image_size=4", "data.batch_size=16", "model=mlp", "model.hidden_sizes=[8]",
                 "trainer.max_epochs=1", "trainer.checkpoint.enabled=false", f"hydra.sweep.dir={sweep}"])
    out = capsys.readouterr().out
    assert code == 1  # a sweep with a failed job says so in its exit code
    assert "99 of 100 job(s) finished, 1 failed" in out
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 100
    failed = [j for j in jobs if (j / "error.txt").exists()]
    assert [j.name for j in failed] == ["0"]
    assert "trainer.seed" in (failed[0] / "error.txt").read_text().splitlines()[0]
    for job in jobs[1:]:
        metrics = json.loads((job / "metrics.json").read_text())
        assert 0.0 <= metrics["test"]["acc"] <= 1.0 and metrics["epochs"] == 1
