"""Search and insight end to end on tiny models: sweep summaries, nnctl tune, lr-find, eval's confusion matrix and
nnctl explain. Every test composes the real config through nnctl.cli.main (or Hydra's compose) and shrinks it."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

import fixtures as fx
from nnctl.cli import main

CNN = ["model=cnn", "model.channels=[8,16]", "model.convs_per_block=1", "trainer.progress=false", "trainer.device=cpu"]
ROOT = Path(__file__).resolve().parent.parent


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- sweep summaries --------------------------------------------------------------------------------------------------
def test_a_2x2_sweep_prints_and_writes_a_ranked_summary(cli: Callable[..., int], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    rc = cli("train", "-m", "optimizer.lr=0.01,0.000001", "model.dropout=0.0,0.3", *CNN, "data=digits",
             "scheduler=none", "trainer.limit_train_batches=20", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}")
    assert rc == 0
    out = capsys.readouterr().out
    summary = _json(sweep / "summary.json")
    assert summary["monitor"] == "val/acc" and summary["varied"] == ["optimizer.lr", "model.dropout"]
    values = [row["monitor"] for row in summary["jobs"]]
    truth = {str(j): _json(sweep / str(j) / "metrics.json")["val"]["acc"] for j in range(4)}
    assert values == sorted(truth.values(), reverse=True)  # ranked best first by val/acc
    assert [truth[row["job"]] for row in summary["jobs"]] == values
    # lr 1e-2 learns in 20 steps, lr 1e-6 does not: both lr=0.01 jobs rank first
    assert {row["params"]["optimizer.lr"] for row in summary["jobs"][:2]} == {"0.01"}
    assert all(row["status"] == "ok" and row["test"] is not None for row in summary["jobs"])
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == [row["job"] for row in summary["jobs"]] and "optimizer.lr" in rows[0]
    best = summary["jobs"][0]
    assert summary["best"]["command"].startswith("nnctl train ") and "optimizer.lr=0.01" in summary["best"]["command"]
    assert summary["best"]["command"] in out.replace("\n", "") or summary["best"]["command"].split()[2] in out
    assert f"model.dropout={best['params']['model.dropout']}" in summary["best"]["command"]
    # TensorBoard's HPARAMS dashboard, read back from the event files: the 4 jobs side by side with the lr
    from tensorboard_hparams import sessions

    groups = sessions(sweep)
    assert sorted(g.name for g in groups) == [f"{j}/tensorboard" for j in range(4)]
    assert {round(g.hparams["optimizer.lr"].number_value, 6) for g in groups} == {0.01, 0.000001}
    assert all(any(m.name.tag == "val/acc" for m in g.metric_values) for g in groups)  # the runs' own tags


def test_summary_of_an_interrupted_sweep_marks_incomplete_and_failed_jobs(cli: Callable[..., int], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    rc = cli("train", "-m", "optimizer.lr=0.01,0.001,-1", "data=synthetic", "data.num_samples=128", "model=mlp",
             "model.hidden_sizes=[8]", "trainer.max_epochs=1", "trainer.device=cpu", "trainer.progress=false",
             f"hydra.sweep.dir={sweep}")
    assert rc == 1
    (sweep / "1" / "metrics.json").unlink()  # as if the sweep was killed during job 1
    (sweep / "summary.json").unlink()
    capsys.readouterr()
    assert main(["summary", str(sweep)]) == 0
    out = capsys.readouterr().out
    summary = _json(sweep / "summary.json")
    assert [(r["job"], r["status"]) for r in summary["jobs"]] == [("0", "ok"), ("1", "incomplete"), ("2", "failed")]
    assert "incomplete" in out and "optimizer.lr: got -1" in out
    assert summary["best"]["job"] == "0"
    assert main(["summary", str(tmp_path / "nowhere")]) == 2
    assert "SWEEP_DIR:" in capsys.readouterr().err


# -- nnctl tune -------------------------------------------------------------------------------------------------------
# One good point first (enqueued), then learning rates too small to learn anything in 2 epochs: with the median
# pruner every bad trial is pruned after its first epoch, whatever order the sampler picks.
TUNE = [*CNN, "data=digits", "scheduler=none", "trainer.limit_train_batches=20", "search.sampler=random", "search.pruner=median",
        "search.startup_trials=1", "search.warmup_epochs=0", "search.overrides=['trainer.max_epochs=2']",
        "~search.params",  # drop the default space, then add a one-key one
        "+search.params={optimizer.lr: {type: float, low: 1.0e-9, high: 1.0e-8, log: true}}",
        "search.enqueue=[{optimizer.lr: 0.01}]"]


def tune_args(study: Path, n_trials: int) -> list[str]:
    return [*TUNE, f"study_dir={study}", f"search.n_trials={n_trials}"]


def trial_states(study: Path) -> list[str]:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study / "study.journal")))
    return [t.state.name for t in optuna.load_study(study_name="nnctl", storage=storage).trials]


def test_tune_prunes_bad_trials_and_writes_summary_preset_and_plots(cli: Callable[..., int], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "study"
    assert cli("tune", *tune_args(study, 3)) == 0
    assert trial_states(study) == ["COMPLETE", "PRUNED", "PRUNED"]
    pruned = _json(study / "trials" / "1" / "pruned.json")
    assert pruned["epoch"] == 1 and pruned["best"] < 0.5
    assert (study / "trials" / "1" / "checkpoints" / "last.pt").is_file()  # an ordinary run dir up to the prune
    summary = _json(study / "summary.json")
    assert [r["status"] for r in summary["jobs"]] == ["ok", "pruned", "pruned"] and summary["varied"] == [
        "optimizer.lr"]
    assert summary["jobs"][0]["monitor"] > 0.5
    pruning = _json(study / "pruning.json")  # two trials stopped after 1 of 2 epochs: each skipped one epoch
    assert pruning["pruned"] == 2 and pruning["pruned_epochs_mean"] == 1 and pruning["epoch_seconds_mean"] > 0
    assert pruning["seconds_saved"] == pytest.approx(2 * pruning["epoch_seconds_mean"])
    preset = (study / "experiment" / "best.yaml").read_text()
    assert preset.startswith("# @package _global_") and yaml.safe_load(preset) == {"optimizer": {"lr": 0.01}}
    for name in ("optimization_history", "parallel_coordinate"):
        assert (study / f"{name}.png").stat().st_size > 5000
    # the preset works as printed: --config-dir <study> experiment=best
    capsys.readouterr()
    assert main(["train", "--config-dir", str(study), "experiment=best", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optimizer"]["lr"] == 0.01


def test_tune_preset_builds_on_the_experiment_the_trials_started_from(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from nnctl.tune import write_preset

    write_preset(tmp_path, {"optimizer.lr": 0.123}, "val/acc", 0.9, 3, base="fashion_mnist_fast")
    capsys.readouterr()
    assert main(["train", "--config-dir", str(tmp_path), "experiment=best", "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optimizer"]["lr"] == 0.123 and cfg["model"]["_target_"].endswith("AirBench")  # both apply


def _nnctl(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "NNCTL_ROOT": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "nnctl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_tune_resumes_after_an_interrupt_without_repeating_finished_trials(tmp_path: Path) -> None:
    study = tmp_path / "study"
    args = tune_args(study, 4)
    # batches of 8, all of them: trials long enough (~0.2 s an epoch) for the signal to land inside trial 1
    proc = _nnctl("tune", *[a for a in args if not a.startswith(("search.overrides", "trainer.limit_train_batches"))],
                  "search.overrides=['trainer.max_epochs=2','data.batch_size=8']", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (study / "trials" / "1" / "tensorboard").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (study / "trials").glob("*/metrics.json")}
    assert "0" in finished
    before = trial_states(study)
    assert before[-2:] == ["FAIL", "WAITING"]  # the interrupted trial, queued to run again on resume
    assert main(["tune", *args]) == 0
    states = trial_states(study)
    assert states[: len(before) - 1] == before[:-1] and states[len(before) - 1] != "WAITING"
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 4
    for name, mtime in finished.items():  # finished trials were not run again
        assert (study / "trials" / name / "metrics.json").stat().st_mtime_ns == mtime


def test_a_signal_during_a_trial_that_is_then_pruned_still_stops_the_study(cli: Callable[..., int], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT read by the engine's handler after the trial's last step but before its epoch's pruning: the trial ends
    as pruned, and the study stops there instead of going on with the next trial."""
    from nnctl import tune

    prune = tune.Reporter.__call__

    def signal_then_prune(self: tune.Reporter, engine: Any, metrics: dict[str, float]) -> None:
        if engine.epoch == 1 and self.trial.number == 1:
            engine.signals.received = signal.SIGINT  # what the handler records when Ctrl-C comes during validation
        prune(self, engine, metrics)

    monkeypatch.setattr(tune.Reporter, "__call__", signal_then_prune)
    study = tmp_path / "study"
    assert cli("tune", *tune_args(study, 4)) == 130
    assert trial_states(study) == ["COMPLETE", "PRUNED"]  # trials 2 and 3 never started


def test_two_processes_share_one_study(tmp_path: Path) -> None:
    study = tmp_path / "study"
    procs = [_nnctl("tune", *tune_args(study, 4), cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    states = trial_states(study)
    # which trials the median pruner stops depends on which trials the other process has finished by then: the
    # pruning itself is tested in one process (above)
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states, states
    assert sorted(p.name for p in (study / "trials").iterdir()) == ["0", "1", "2", "3"]
    assert all("trial" in o or "run dir" in o for o in outs)


# -- lr-find ----------------------------------------------------------------------------------------------------------
def test_lr_find_restores_the_model_exactly_and_suggests_a_finite_lr(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from nnctl.engine import Engine
    from nnctl.lr_find import range_test

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("lr-find", overrides=[*CNN, "data=digits", f"paths.run_dir={tmp_path}"])
    engine = Engine(cfg, tmp_path)
    engine.configure_optimization()
    before = {k: v.clone() for k, v in engine.net.state_dict().items()}
    opt_before = engine.optimizer.state_dict()["param_groups"][0]["lr"]
    result = range_test(engine, 1e-6, 10.0, 100)
    after = engine.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise, BN statistics included
    assert engine.optimizer.state_dict()["param_groups"][0]["lr"] == opt_before and not engine.optimizer.state
    assert result["suggestion"] is not None and math.isfinite(result["suggestion"])
    assert 1e-4 < result["suggestion"] < 1.0  # where a small CNN on digits actually learns
    assert len(result["lr"]) < 100 or result["smoothed"][-1] > min(result["smoothed"])  # stopped on divergence
    assert min(result["smoothed"]) < result["smoothed"][0] - 0.3  # a real descent


def test_lr_find_command_writes_plot_and_json(cli: Callable[..., int], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "lr"
    assert cli("lr-find", *CNN, "data=digits", "lr_find.num_steps=40", "lr_find.start_lr=1e-5",
               f"hydra.run.dir={run}") == 0
    result = _json(run / "lr_find.json")
    assert len(result["lr"]) <= 40 and (run / "lr_find.png").stat().st_size > 5000
    assert "optimizer.lr=" in capsys.readouterr().out


# -- eval's confusion matrix, nnctl explain ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained on digits to ~90 % test accuracy (about 10 s)."""
    base = tmp_path_factory.mktemp("digits")
    run = base / "run"
    assert main(["train", *CNN, "model.channels=[16,32]", "data=digits", "trainer.max_epochs=4", "scheduler=none",
                 "optimizer.lr=0.01", f"paths.root_dir={base}", f"hydra.run.dir={run}"]) == 0
    assert _json(run / "metrics.json")["test"]["acc"] > 0.8
    return run


def test_eval_writes_confusion_matrix_and_per_class_table(digits_run: Path, cli: Callable[..., int], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "ev"
    assert cli("eval", f"ckpt={digits_run}", "eval.worst_k=4", f"hydra.run.dir={out_dir}") == 0
    m = _json(out_dir / "metrics.json")
    cm = torch.tensor(m["confusion_matrix"])
    n = int(cm.sum())
    assert cm.shape == (10, 10) and n == 359  # digits' fixed test split (20 % of 1,797)
    assert abs(float(cm.diag().sum()) / n - m["test"]["acc"]) < 1e-6  # the matrix agrees with the metric
    assert sum(r["support"] for r in m["per_class"].values()) == n
    row = m["per_class"]["3"]
    assert row["recall"] == pytest.approx(float(cm[3, 3]) / max(1, int(cm[3].sum())))
    assert (out_dir / "confusion_matrix.png").stat().st_size > 5000
    assert "per class" in capsys.readouterr().out
    wrong = int(cm.sum() - cm.diag().sum())
    assert (out_dir / "worst_k.png").is_file() == (wrong > 0) and len(m.get("worst", [])) == min(4, wrong)


# median over 16 images of (mean |attribution| on the ink) / (mean |attribution| on the background), measured on
# this run: saliency 1.3, gradcam 1.5, integrated gradients 14, occlusion 4.6; noise would give ~1
@pytest.mark.parametrize("method, ratio", [("saliency", 1.1), ("gradcam", 1.15), ("integrated_gradients", 4.0),
                                           ("occlusion", 2.0)])
def test_explain_maps_concentrate_on_the_digit(method: str, ratio: float, digits_run: Path, cli: Callable[..., int],
                                                        tmp_path: Path) -> None:
    out_dir = tmp_path / "ex"
    assert cli("explain", f"ckpt={digits_run}", f"method={method}", "num_images=16",
               f"hydra.run.dir={out_dir}") == 0
    saved = torch.load(out_dir / "attributions.pt", weights_only=True)
    maps, images = saved["maps"].abs(), saved["images"][..., 0]  # [N, H, W] each
    assert maps.shape == (16, 8, 8) and (out_dir / f"{method}.png").stat().st_size > 5000
    ink = images > 0.5
    inside = torch.stack([(m * k).sum() / k.sum() for m, k in zip(maps, ink)])
    outside = torch.stack([(m * ~k).sum() / (~k).sum() for m, k in zip(maps, ink)])
    assert (inside / outside.clamp(min=1e-12)).median() > ratio


def test_explain_target_true_as_the_readme_writes_it_explains_the_labels(digits_run: Path, cli: Callable[..., int],
                                                                        tmp_path: Path) -> None:
    out_dir = tmp_path / "ex"  # `target=true` reaches the config as a boolean, not the string "true"
    assert cli("explain", f"ckpt={digits_run}", "method=saliency", "num_images=8", "target=true",
               f"hydra.run.dir={out_dir}") == 0
    saved = torch.load(out_dir / "attributions.pt", weights_only=True)
    assert torch.equal(saved["target"], saved["labels"])
