"""Several processes on one CPU (gloo): the same training as one process, one run dir written by rank 0, exact
resume after kill -9 of the whole job, evaluation in one process, failing ranks, FSDP2, torchrun and submitit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from fixtures import wait_for as _wait_for
from nnctl import checkpoint as ck
from nnctl.cli import main

# BN- and dropout-free, so one process with batch 32 and two with 16 compute the same gradients. Crop augmentation
# stays on (digits' default): each sample's draw must not depend on how the batch is split.
BASE = ["data=digits", "model=mlp", "model.hidden_sizes=[32]", "model.batch_norm=false", "model.dropout=0",
        "scheduler=step", "trainer.deterministic=true", "trainer.progress=false", "trainer.device=cpu",
        "trainer.early_stopping.enabled=false", "trainer.log_every_n_steps=1"]
TWO = ["data.batch_size=16", "trainer.nproc_per_node=2"]
ONE = ["data.batch_size=32"]
EPOCHS = 3
STARTED = 600  # seconds for a background job's three processes to start and save epoch 1 on a busy machine
Spawn = Callable[[Path, list[str]], subprocess.Popen]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.MODEL]


def _losses(run: Path) -> list[float]:
    """The running training loss after every step (log_every_n_steps=1), from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss_running")]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run (module-wide reference)."""
    root = tmp_path_factory.mktemp("two")
    os.environ["NNCTL_ROOT"] = str(root)
    try:
        assert main(["train", *BASE, *TWO, f"trainer.max_epochs={EPOCHS}"]) == 0
    finally:
        os.environ.pop("NNCTL_ROOT")
    (run,) = (root / "outputs" / "train").glob("*/*")  # exactly one run dir for the job
    return run


def test_two_processes_train_like_one_with_the_global_batch(two: Path, tmp_path: Path) -> None:
    assert main(["train", *BASE, *ONE, f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={tmp_path / 'one'}"]) == 0
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(two)
    assert len(one_losses) == len(two_losses) == _metrics(two)["global_step"] > 0
    assert max(abs(a - b) for a, b in zip(one_losses, two_losses)) < 1e-5
    assert one_losses[-1] < one_losses[0]
    for split in ("train", "val", "test"):  # reduced over both ranks' shards, not rank 0's alone
        one, both = _metrics(tmp_path / "one")[split], _metrics(two)[split]
        assert all(abs(one[k] - both[k]) < 1e-5 for k in one), split


def test_one_run_dir_written_by_rank_0_only(two: Path) -> None:
    assert sorted(p.name for p in (two / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [ck.BEST, ck.LAST]
    events = list((two / "tensorboard").glob("events.out.tfevents.*"))  # ...<time>.<host>.<pid>.<n>
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, "more than one process wrote events"
    assert "epoch 3" in (two / "train.log").read_text()
    assert _metrics(two)["epochs"] == EPOCHS


def test_checkpoint_of_two_processes_evaluates_in_one(two: Path, tmp_path: Path) -> None:
    assert main(["eval", f"ckpt={two}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    evaluated, trained = _metrics(tmp_path / "eval")["test"], _metrics(two)["test"]
    assert evaluated.keys() == trained.keys()
    assert all(abs(evaluated[k] - trained[k]) < 1e-5 for k in trained)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts `nnctl train` jobs (2 processes) in the background; a job a failed test leaves running is killed."""
    jobs: list[subprocess.Popen] = []

    def start(run: Path, extra: list[str]) -> subprocess.Popen:
        jobs.append(subprocess.Popen([sys.executable, "-m", "nnctl", "train", *BASE, *TWO, f"hydra.run.dir={run}",
                                      *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        return jobs[-1]

    yield start
    for job in jobs:
        if job.poll() is None:
            job.kill()  # its workers follow their launcher
            job.communicate()


def _workers(launcher: subprocess.Popen) -> set[tuple[int, str]]:
    """(pid, start time) of the job's worker processes: the launcher's descendants running nnctl._worker. Read
    while the launcher lives (its orphans are re-parented), and only this job's, whatever else runs on the
    machine."""
    children: dict[int, list[tuple[int, str]]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _stat(proc)
        if stat:
            children.setdefault(int(stat[1]), []).append((int(proc.name), stat[19]))
    found, todo = set(), [launcher.pid]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            todo.append(pid)
            if _mentions(Path("/proc") / str(pid), "nnctl._worker"):
                found.add((pid, started))
    assert len(found) == 2, f"expected the job's 2 workers below pid {launcher.pid}, found {sorted(found)}"
    return found


def _workers_gone(workers: set[tuple[int, str]], timeout: float = 30) -> None:
    """None of `workers` still runs (they died with their launcher); a reused pid has another start time, a zombie
    has ended."""

    def running(pid: int, started: str) -> bool:
        stat = _stat(Path("/proc") / str(pid))
        return stat is not None and stat[19] == started and stat[0] != "Z"

    deadline = time.time() + timeout
    while any(running(*w) for w in workers):
        if time.time() > deadline:
            raise AssertionError(f"worker processes {sorted(workers)} outlived the launcher")
        time.sleep(0.1)


def _stat(proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ..., start time at [19]), None if gone."""
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _mentions(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 of the launcher reaches workers on Linux")
def test_kill9_of_the_job_then_resume_matches_an_uninterrupted_run(two: Path, tmp_path: Path, spawn: Spawn) -> None:
    run = tmp_path / "run"
    proc = spawn(run, [f"trainer.max_epochs={EPOCHS}", "trainer.limit_val_batches=1"])
    _wait_for(run / "checkpoints" / ck.LAST, proc, timeout=STARTED)  # epoch 1 saved, epoch 2 under way
    workers = _workers(proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    _workers_gone(workers)
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.EPOCH] < EPOCHS
    assert main(["train", f"resume={run}", "trainer.limit_val_batches=null"]) == 0
    resumed, straight = _weights(run), _weights(two)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert _metrics(run)["test"] == _metrics(two)["test"]


def test_sigterm_saves_last_and_every_rank_exits(tmp_path: Path, spawn: Spawn) -> None:
    run = tmp_path / "run"
    proc = spawn(run, ["trainer.max_epochs=50"])
    _wait_for(run / "checkpoints" / ck.LAST, proc, timeout=STARTED)
    workers = _workers(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"nnctl train resume={run}" in err
    _workers_gone(workers)
    state = ck.load_checkpoint(run / "checkpoints" / ck.LAST)
    assert state[ck.EPOCH] < 50


def test_a_failing_rank_ends_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    started = time.time()
    code = main(["train", *BASE, *TWO, "data._target_=dist_fixtures.CrashingDigits", "trainer.dist_timeout=60",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert code not in (0, 2)
    assert time.time() - started < 120
    assert "worker rank 1 failed" in capsys.readouterr().err


def test_fsdp_trains_and_its_gathered_checkpoint_evaluates_in_one_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", *BASE, *TWO, "trainer.strategy=fsdp", "model.hidden_sizes=[32,32]", "trainer.max_epochs=2",
            f"hydra.run.dir={run}"]
    assert main(args) == 0
    losses = _losses(run)
    assert losses[-1] < losses[0]
    weights = _weights(run)
    assert all(isinstance(w, torch.Tensor) and type(w) is torch.Tensor for w in weights.values())  # no DTensors
    assert main(["eval", f"ckpt={run}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    evaluated, trained = _metrics(tmp_path / "eval")["test"], _metrics(run)["test"]
    assert all(abs(evaluated[k] - trained[k]) < 1e-5 for k in trained)


# FSDP with sharded checkpoints: every rank writes its shards of weights and optimizer state, nothing is gathered
SHARDED = ["trainer.strategy=fsdp", "trainer.checkpoint.sharded=true", "model.hidden_sizes=[32,32]"]


@pytest.fixture(scope="module")
def sharded_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process FSDP run with sharded checkpoints (module-wide reference)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    assert main(["train", *BASE, *TWO, *SHARDED, f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={run}"]) == 0
    return run


def _shards_named(run: Path) -> tuple[set[str], set[str]]:
    """(shard folders on disk, shard folders the run's .pt files name)."""
    directory = run / "checkpoints"
    named = {Path(torch.load(p, weights_only=True)[ck.SHARDS]).name for p in directory.glob("*.pt")}
    return {p.name for p in (directory / "shards").iterdir()}, named


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 of the launcher reaches workers on Linux")
def test_kill9_of_a_sharded_job_then_resume_matches_an_uninterrupted_run(sharded_two: Path, tmp_path: Path,
                                                                          spawn: Spawn) -> None:
    run = tmp_path / "run"
    proc = spawn(run, [*SHARDED, f"trainer.max_epochs={EPOCHS}", "trainer.limit_val_batches=1"])
    _wait_for(run / "checkpoints" / ck.LAST, proc, timeout=STARTED)
    workers = _workers(proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    _workers_gone(workers)
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST, shards=False)[ck.EPOCH] < EPOCHS
    assert main(["train", f"resume={run}", "trainer.limit_val_batches=null"]) == 0
    resumed, straight = _weights(run), _weights(sharded_two)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    on_disk, named = _shards_named(run)
    assert on_disk == named  # no unfinished .partial, no folder that no checkpoint names


def test_sharded_checkpoint_evaluates_in_one_process_and_exports_to_one_file(sharded_two: Path,
                                                                             tmp_path: Path) -> None:
    best = sharded_two / "checkpoints" / ck.BEST
    assert torch.load(best, weights_only=True)[ck.MODEL] == {}  # nothing gathered: the weights are in the shards
    (folder,) = {p for p in (sharded_two / "checkpoints" / "shards").iterdir()
                 if p.name == Path(torch.load(best, weights_only=True)[ck.SHARDS]).name}
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    trained = _metrics(sharded_two)["test"]
    assert main(["eval", f"ckpt={sharded_two}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    evaluated = _metrics(tmp_path / "eval")["test"]
    assert evaluated.keys() == trained.keys() and all(abs(evaluated[k] - trained[k]) < 1e-5 for k in trained)
    one = tmp_path / "model.pt"
    assert main(["export", f"ckpt={sharded_two}", f"out={one}", "format=checkpoint"]) == 0
    state = ck.load_checkpoint(one)
    assert ck.OPTIMIZER not in state and ck.SHARDS not in state
    assert all(type(w) is torch.Tensor for w in state[ck.MODEL].values())
    assert main(["eval", f"ckpt={one}", f"hydra.run.dir={tmp_path / 'eval_one'}"]) == 0
    assert _metrics(tmp_path / "eval_one")["test"] == evaluated


def test_a_sharded_save_that_dies_halfway_leaves_the_previous_checkpoint(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The second epoch's save stops before DCP writes .metadata (as kill -9 would): last.pt still names the first
    epoch's complete folder, and resuming from it ends where an uninterrupted run does (one process: the same
    format, one shard)."""
    from torch.distributed.checkpoint import FileSystemWriter

    args = [*BASE, *ONE, "trainer.strategy=fsdp", "trainer.checkpoint.sharded=true", "trainer.limit_train_batches=4"]
    assert main(["train", *args, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'straight'}"]) == 0
    finish, saves = FileSystemWriter.finish, []

    def dies_at_the_second_save(self: FileSystemWriter, *a: object, **k: object) -> None:
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("killed while saving")
        finish(self, *a, **k)

    monkeypatch.setattr(FileSystemWriter, "finish", dies_at_the_second_save)
    run = tmp_path / "run"
    with pytest.raises(BaseException, match="killed while saving"):  # DCP's CheckpointException wraps it
        main(["train", *args, "trainer.max_epochs=2", f"hydra.run.dir={run}"])
    monkeypatch.setattr(FileSystemWriter, "finish", finish)
    shards = run / "checkpoints" / "shards"
    assert (shards / ".partial").is_dir() and not (shards / ".partial" / ".metadata").exists()
    last = ck.load_checkpoint(run / "checkpoints" / ck.LAST, shards=False)
    assert last[ck.EPOCH] == 1 and (Path(last[ck.SHARDS]) / ".metadata").is_file()
    assert main(["train", f"resume={run}"]) == 0
    resumed, straight = _weights(run), _weights(tmp_path / "straight")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert _shards_named(run)[0] == _shards_named(run)[1]


def test_gan_under_ddp_averages_gradients_on_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GAN updates discriminator and generator in turn, outside DDP's forward: the engine all-reduces each
    update's gradients and shares rank 0's batch norm statistics, so both ranks hold the same model, though each
    trained on its own half of every batch."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    assert main(["train", "data=digits", "model=gan", "objective=gan", "model.arch=mlp", "model.hidden=16",
                 "objective._target_=dist_fixtures.RankWeightsGAN", "data.batch_size=16", "trainer.nproc_per_node=2",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
                 "trainer.device=cpu", "trainer.progress=false", "trainer/checkpoint=loss",
                 f"hydra.run.dir={run}"]) == 0
    ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = _weights(run)
    assert any(k.endswith("running_mean") for k in saved)  # batch norm statistics are compared too
    for name, value in saved.items():
        assert torch.equal(ranks[0][name], value) and torch.equal(ranks[1][name], value), name
    assert _metrics(run)["global_step"] == 6


def test_torchrun_shares_rank_0s_run_dir(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nnctl",
           "train", *BASE, "data.batch_size=16", "trainer.max_epochs=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train").glob("*/*")
    assert (run / ".hydra" / "config.yaml").is_file() and _metrics(run)["epochs"] == 1
    assert done.stdout.count("nnctl train: 1 epoch(s)") == 1  # rank 0 prints, rank 1 is quiet


def test_submitit_local_executor_runs_a_two_task_job(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    code = main(["submit", "--local", "--tasks-per-node", "2", "--wait", "--folder", str(tmp_path / "submitit" / "%j"),
                 "--", *BASE, "data.batch_size=16", "trainer.max_epochs=1"])
    assert code == 0
    (run,) = (tmp_path / "outputs" / "train").glob("*/*")
    assert (run / ".hydra" / "config.yaml").is_file() and _metrics(run)["epochs"] == 1


def _digits(batch_size: int) -> "Digits":  # noqa: F821
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from nnctl.commands import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "data" / "digits.yaml")
    cfg.root, cfg.batch_size, cfg.eval_batch_size, cfg.augment.hflip = ".", batch_size, 100, True
    return instantiate(cfg)


@pytest.mark.parametrize("world", [2, 4])
def test_shards_of_every_batch_make_up_one_process_batches(world: int) -> None:
    """Native sharding (ImageData.shard) and slicing (any data module) give each rank its part of exactly the
    batches one process sees: order and per-sample augmentation (crop + flip) included, eval splits too."""
    from nnctl.distributed import Sharded

    device = torch.device("cpu")
    one = _digits(32).setup(device)
    native = [_digits(32).shard(r, world).setup(device) for r in range(world)]
    sliced = [Sharded(_digits(32), r, world).setup(device) for r in range(world)]
    for parts in (native, sliced):
        for epoch, start in ((0, 0), (3, 5)):
            whole = list(one.train_batches(epoch, seed=7, start=start))
            shards = [list(p.train_batches(epoch, seed=7, start=start)) for p in parts]
            assert all(len(s) == len(whole) for s in shards)
            for i, (x, y) in enumerate(whole):
                assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
                assert torch.equal(torch.cat([s[i][1] for s in shards]), y)
        for split in ("val", "test"):
            whole = list(one.eval_batches(split))
            shards = [list(p.eval_batches(split)) for p in parts]
            for i, (x, y) in enumerate(whole):
                assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
                assert torch.equal(torch.cat([s[i][1] for s in shards]), y)


@pytest.mark.slow
def test_fsdp_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The gathered checkpoint (full weights and optimizer state) loads back into the shards exactly."""
    args = [*BASE, *TWO, "trainer.strategy=fsdp", "model.hidden_sizes=[32,32]", "trainer.limit_train_batches=10"]
    assert main(["train", *args, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'straight'}"]) == 0
    assert main(["train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert main(["train", f"resume={tmp_path / 'run'}", "trainer.max_epochs=2"]) == 0
    resumed, straight = _weights(tmp_path / "run"), _weights(tmp_path / "straight")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_srun_tasks_are_detected_and_need_master_addr(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    from nnctl.distributed import detect

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so whatever detect() writes is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert main(["train"]) == 2
    assert "MASTER_ADDR: srun started several tasks but MASTER_ADDR is not set" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert detect() == (3, 4, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("3", "4", "29500")


def test_launched_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of N workers on a node takes 1/N of the intra-op threads, unless OMP_NUM_THREADS says otherwise."""
    from nnctl._worker import share_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        share_cores()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more workers than threads: one each
        share_cores()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting is left alone
        share_cores()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
