"""`nnctl train` / `nnctl eval` end to end, in-process through nnctl.cli.main, on tiny models and datasets."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

import fixtures as fx
from nnctl.cli import main

# A tiny CNN, no progress bar: each run is a second or two on a CPU.
TINY = ["model=cnn", "model.channels=[8,16]", "model.convs_per_block=1", "trainer.progress=false",
        "trainer.device=cpu"]
CHECKPOINT_KEYS = {"model", "optimizer", "config_yaml", "epoch", "global_step"}


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def only_run(root: Path, command: str = "train") -> Path:
    runs = fx.run_dirs(root, command)
    assert len(runs) == 1, f"expected one {command} run under {root}/outputs, found {runs}"
    return runs[0]


def scalars(run_dir: Path, tag: str) -> list[float]:
    """Values of one TensorBoard scalar tag, in step order, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert tag in acc.Tags()["scalars"], f"{tag} not in {acc.Tags()['scalars']}"
    return [e.value for e in acc.Scalars(tag)]


def assert_close_metrics(a: dict[str, float], b: dict[str, float], tol: float) -> None:
    assert set(a) == set(b) and {"loss", "acc"} <= set(a)
    for k in a:
        assert abs(a[k] - b[k]) <= tol, f"{k}: {a[k]} vs {b[k]}"


# -- run dir layout on each fixture dataset ----------------------------------------------------------------------------
def layout_args(name: str, data_root: fx.DataRoot, image_folder: fx.Images) -> list[str]:
    return {
        "mnist": ["data=mnist", f"data.root={data_root.path}", "data.batch_size=32"],
        "cifar10": ["data=cifar10", f"data.root={data_root.path}", "data.batch_size=32"],
        "image_folder": ["data=image_folder", f"data.root={image_folder[0]}", "data.image_size=16",
                         "data.batch_size=8"],
        "image_folder_streamed": ["data=image_folder", f"data.root={image_folder[0]}", "data.image_size=16",
                                  "data.batch_size=8", "data.in_memory=false", "data.num_workers=0"],
    }[name]


@pytest.mark.parametrize("name", ["mnist", "cifar10", "image_folder", "image_folder_streamed"])
def test_train_writes_the_run_dir_layout(name: str, cli: Callable[..., int], tmp_path: Path, data_root: fx.DataRoot,
                                         image_folder: fx.Images) -> None:
    rc = cli("train", *TINY, *layout_args(name, data_root, image_folder), "trainer.max_epochs=2")
    assert rc == 0
    run = only_run(tmp_path)
    assert run.is_relative_to(tmp_path / "outputs" / "train")
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= {p.name for p in (run / ".hydra").iterdir()}
    for name_ in ("best.pt", "last.pt"):
        state = torch.load(run / "checkpoints" / name_, weights_only=True)
        assert CHECKPOINT_KEYS <= set(state)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(scalars(run, "val/acc")) == 2  # one point per epoch
    m = metrics_of(run)
    for split in ("train", "val", "test"):
        assert math.isfinite(m[split]["loss"]) and 0.0 <= m[split]["acc"] <= 1.0
    # mnist/cifar10: 200 - 20 val = 180 images, 5 batches of 32; images: 36 - 4 val = 32, 4 batches of 8
    assert m["epochs"] == 2 and m["global_step"] == 2 * (5 if name in ("mnist", "cifar10") else 4)
    # throughput is measured over each whole epoch (the step-log cadence of 50 is never reached here)
    assert m["train/samples_per_s"] > 0 and len(scalars(run, "train/samples_per_s")) == 2
    log = (run / "train.log").read_text()
    assert "epoch 2:" in log


def test_mnist_fixture_is_learnable(cli: Callable[..., int], tmp_path: Path, data_root: fx.DataRoot) -> None:
    # the fixtures' class patterns are real signal: a small MLP separates them in a few epochs
    rc = cli("train", "model=mlp", "model.hidden_sizes=[32]", "trainer.progress=false", "data=mnist",
             f"data.root={data_root.path}", "data.batch_size=16", "optimizer.lr=0.01", "trainer.max_epochs=4")
    assert rc == 0
    assert metrics_of(only_run(tmp_path))["test"]["acc"] >= 0.9


# -- learning, and eval reproducing training's numbers -----------------------------------------------------------------
DIGITS = [*TINY, "model.channels=[16,32]", "data=digits", "data.batch_size=32", "optimizer.lr=0.02",
          "trainer.max_epochs=3"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3-epoch digits run shared by the eval tests (training is the expensive part)."""
    root = tmp_path_factory.mktemp("digits_run")
    with pytest.MonkeyPatch.context() as mp:  # the function-scoped `isolated` fixture is not active here
        mp.chdir(root)
        mp.setenv("NNCTL_ROOT", str(root))
        assert main(["train", *DIGITS, f"paths.root_dir={root}"]) == 0
    return only_run(root)


def test_digits_loss_decreases_and_test_accuracy_is_high(digits_run: Path) -> None:
    losses = scalars(digits_run, "train/loss")  # one point per epoch
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    val_losses = scalars(digits_run, "val/loss")
    assert val_losses[-1] < val_losses[0]
    m = metrics_of(digits_run)
    assert m["test"]["acc"] > 0.8 and m["best_epoch"] in (1, 2, 3)


def eval_metrics(cli: Callable[..., int], root: Path, *args: str) -> dict:
    before = set(fx.run_dirs(root, "eval"))
    assert cli("eval", *args) == 0
    new = set(fx.run_dirs(root, "eval")) - before
    assert len(new) == 1
    return metrics_of(new.pop())


def test_eval_reproduces_training_test_metrics(digits_run: Path, cli: Callable[..., int], tmp_path: Path) -> None:
    trained = metrics_of(digits_run)
    best = digits_run / "checkpoints" / "best.pt"
    out = eval_metrics(cli, tmp_path, f"ckpt={best}")
    assert out["checkpoint"] == str(best) and out["epoch"] == trained["best_epoch"]
    assert_close_metrics(out["test"], trained["test"], 1e-6)
    # a run dir resolves to its best.pt
    assert_close_metrics(eval_metrics(cli, tmp_path, f"ckpt={digits_run}")["test"], trained["test"], 1e-6)


def test_eval_val_split_and_batch_size_override(digits_run: Path, cli: Callable[..., int], tmp_path: Path) -> None:
    trained = metrics_of(digits_run)
    best = digits_run / "checkpoints" / "best.pt"
    val = eval_metrics(cli, tmp_path, f"ckpt={best}", "split=val")
    assert "test" not in val
    assert_close_metrics(val["val"], trained["val"], 1e-5)  # training's val row is the best epoch's
    odd = eval_metrics(cli, tmp_path, f"ckpt={best}", "data.eval_batch_size=7")  # 359 = 51 * 7 + 2
    assert_close_metrics(odd["test"], trained["test"], 1e-5)


# -- sweeps -----------------------------------------------------------------------------------------------------------
SWEEP_TINY = [*TINY, "data=digits", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
              "trainer.max_epochs=1"]


def sweep_jobs(root: Path) -> list[Path]:
    return sorted((root / "outputs" / "multirun" / "train").glob("*/*/[0-9]*"), key=lambda p: int(p.name))


def test_multirun_runs_every_point_in_its_own_dir(cli: Callable[..., int], tmp_path: Path) -> None:
    rc = cli("train", "-m", "optimizer=sgd,adamw", "optimizer.lr=0.01,0.001", *SWEEP_TINY)
    assert rc == 0
    jobs = sweep_jobs(tmp_path)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    points = set()
    for job in jobs:
        m = metrics_of(job)
        assert m["global_step"] == 3 and math.isfinite(m["test"]["loss"])
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        opt = "sgd" if "optimizer=sgd" in overrides else "adamw"
        lr = "0.01" if "optimizer.lr=0.01" in overrides else "0.001"
        points.add((opt, lr))
        assert (job / "checkpoints" / "best.pt").is_file()
    assert points == {("sgd", "0.01"), ("sgd", "0.001"), ("adamw", "0.01"), ("adamw", "0.001")}


def test_multirun_reports_a_failed_point_and_finishes_the_others(cli: Callable[..., int], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    rc = cli("train", "-m", "optimizer.lr=0.01,-1", *SWEEP_TINY)
    assert rc != 0
    good, bad = sweep_jobs(tmp_path)
    assert metrics_of(good)["global_step"] == 3
    assert not (bad / "metrics.json").exists()
    assert "optimizer.lr" in (bad / "error.txt").read_text()
    out = capsys.readouterr()
    assert "1 of 2" in out.out + out.err and "optimizer.lr" in out.out + out.err


def test_warnings_reach_the_console_once_per_job(cli: Callable[..., int], tmp_path: Path, image_folder: fx.Images,
                                                 capsys: pytest.CaptureFixture) -> None:
    """WARNING records print on the console (and stay in the log file); INFO records only go to the log file."""
    args = [*TINY, "data=image_folder", f"data.root={image_folder[0]}", "data.image_size=16", "data.batch_size=8",
            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.max_epochs=1"]
    warning = "warning: skipped 1 unreadable image file(s)"
    for sweep, jobs in ((["-m", "trainer.seed=1,2"], 2), ([], 1)):
        capsys.readouterr()
        assert cli("train", *sweep, *args) == 0
        out = capsys.readouterr().out
        assert out.count(warning) == jobs, out
        assert "data image_folder: train" not in out  # an INFO record
    logs = sorted((tmp_path / "outputs").glob("**/train.log"))
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        assert text.count("skipped 1 unreadable image file(s)") == 1 and "data image_folder: train" in text


def test_bitsandbytes_kernels_advice_stays_off_the_console(cli: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """On AVX512-BF16 CPUs bitsandbytes advises at import to install `kernels` for a packed 4-bit layout that nnctl
    keeps off (configs/hydra/default.yaml quiets that logger); other warnings still print."""
    import logging

    from nnctl.engine import Engine

    fit = Engine.fit

    def warn_then_fit(self: Engine) -> dict:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        logging.getLogger("nnctl.engine").warning("a warning of nnctl's own")
        return fit(self)

    monkeypatch.setattr(Engine, "fit", warn_then_fit)
    assert cli("train", *TINY, "data=digits", "trainer.max_epochs=1", "trainer.limit_train_batches=1") == 0
    out = capsys.readouterr().out
    assert "warning: a warning of nnctl's own" in out and "gemm_4bit_forward" not in out


# -- precision, schedulers, debug modes --------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_trains_on_cpu(precision: str, cli: Callable[..., int], tmp_path: Path) -> None:
    rc = cli("train", *SWEEP_TINY, f"precision={precision}", "trainer.limit_train_batches=5")
    assert rc == 0
    run = only_run(tmp_path)
    m = metrics_of(run)
    assert m["global_step"] == 5
    assert math.isfinite(m["train"]["loss"]) and math.isfinite(m["test"]["loss"])  # NaN would be written as null
    assert all(math.isfinite(v) for v in scalars(run, "train/loss"))


def test_gradient_accumulation_trains_like_one_large_batch(cli: Callable[..., int], tmp_path: Path) -> None:
    """Two micro-batches of 32 per update and one batch of 64 see the same samples (consecutive blocks of the same
    shuffle) and average the same gradient (SGD: its scale matters too): the weights end alike."""
    plain = ["model=mlp", "model.hidden_sizes=[32]", "model.batch_norm=false", "model.dropout=0",
             "optimizer=sgd", "trainer.progress=false", "trainer.device=cpu", "data=digits", "trainer.max_epochs=1"]
    weights, steps = {}, {}
    for name, args in {"accumulated": ["data.batch_size=32", "trainer.grad_accum_steps=2"],
                       "large": ["data.batch_size=64"]}.items():
        assert cli("train", *plain, *args, f"hydra.run.dir={tmp_path / name}") == 0
        state = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        weights[name], steps[name] = state["model"], state["global_step"]
    assert steps["accumulated"] == steps["large"] == 20  # digits' 1,294 training images: 20 updates of 64
    assert weights["accumulated"].keys() == weights["large"].keys()
    for key, value in weights["large"].items():
        torch.testing.assert_close(weights["accumulated"][key], value, rtol=1e-4, atol=1e-5)


SCHEDULERS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "scheduler").glob("*.yaml"))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_trains_an_epoch(scheduler: str, cli: Callable[..., int], tmp_path: Path) -> None:
    rc = cli("train", *SWEEP_TINY, f"scheduler={scheduler}", "trainer.log_every_n_steps=1")
    assert rc == 0
    run = only_run(tmp_path)
    assert metrics_of(run)["global_step"] == 3
    lrs = scalars(run, "lr")  # logged after each step; float32 in the event file
    peak = 3e-3  # adamw's lr bounds every schedule
    assert len(lrs) == 3 and all(0 <= lr <= peak * (1 + 1e-6) for lr in lrs) and max(lrs) > 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package_learns(cli: Callable[..., int], tmp_path: Path) -> None:
    # the real 70k images, found through extra_dirs with an empty data root; 10k of them for 2 epochs of an MLP
    # (~77% test accuracy; chance is 10%, so labels and images of the real files line up)
    rc = cli("train", "model=mlp", "model.hidden_sizes=[128]", "trainer.progress=false", "data=fashion_mnist",
             "data.limit=10000", "data.batch_size=64", "trainer.max_epochs=2")
    assert rc == 0
    m = metrics_of(only_run(tmp_path))
    assert m["test"]["acc"] > 0.7


def test_debug_fast_writes_no_checkpoints(cli: Callable[..., int], tmp_path: Path) -> None:
    assert cli("train", *TINY, "data=digits", "debug=fast") == 0
    run = only_run(tmp_path)
    assert not list(run.glob("checkpoints/*.pt"))
    m = metrics_of(run)
    assert m["global_step"] == 2 and m["epochs"] == 1 and m["checkpoint"] is None


def test_debug_overfit_drives_one_batch_loss_to_zero(cli: Callable[..., int], tmp_path: Path) -> None:
    rc = cli("train", "debug=overfit", "data=digits", "data.batch_size=16", "model=mlp", "model.hidden_sizes=[64]",
             "model.dropout=0", "optimizer=adam", "optimizer.lr=0.01", "scheduler=none", "trainer.max_epochs=60",
             "trainer.progress=false")
    assert rc == 0
    run = only_run(tmp_path)
    losses = scalars(run, "train/loss")
    assert len(losses) == 60 and losses[0] > 1.0 and losses[-1] < 0.05
    assert metrics_of(run)["val"]["acc"] == 1.0  # val is the same batch


def test_gradient_norm_is_logged_before_the_gradients_are_cleared(cli: Callable[..., int], tmp_path: Path) -> None:
    assert cli("train", *TINY, "trainer.max_epochs=1", "trainer.log_every_n_steps=5") == 0
    norms = scalars(only_run(tmp_path), "train/grad_norm")
    assert norms and all(math.isfinite(v) and v > 0 for v in norms)  # measured, not the norm of cleared grads
