"""Crash safety and exact resumption: kill -9, SIGTERM, non-finite losses, resume=auto, atomic checkpoints."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nnctl import checkpoint as ck
from fixtures import wait_for as _wait_for
from nnctl.cli import main

# Deterministic and CPU-cheap, but long enough per epoch (40 steps) that a signal lands mid-epoch.
TINY = ["data=digits", "data.batch_size=32", "model=cnn", "model.channels=[8,16]", "scheduler=step",
        "trainer.deterministic=true", "trainer.progress=false", "trainer.max_epochs=3",
        "trainer.early_stopping.enabled=false", "trainer.log_every_n_steps=5"]


def _weights(run: Path, name: str = ck.LAST) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(run / "checkpoints" / name)[ck.MODEL]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _metrics(run: Path) -> dict:
    import json

    return json.loads((run / "metrics.json").read_text())


_STRAIGHT: dict[tuple[str, ...], Path] = {}


def _straight(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> Path:
    """The uninterrupted reference run for these overrides (computed once per module)."""
    if extra not in _STRAIGHT:
        run = tmp_path_factory.mktemp("straight") / "run"
        assert main(["train", *TINY, f"hydra.run.dir={run}", *extra]) == 0
        _STRAIGHT[extra] = run
    return _STRAIGHT[extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _straight(tmp_path_factory)


def _spawn(run: Path, extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnctl", "train", *TINY, f"hydra.run.dir={run}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill9_mid_epoch_then_resume_is_bitwise_identical(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _spawn(run)
    _wait_for(run / "checkpoints" / ck.LAST, proc)  # epoch 1 is saved; epoch 2 is under way
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.EPOCH] == 1
    assert main(["train", f"resume={run}"]) == 0
    _assert_bitwise_equal(_weights(run), _weights(straight))
    assert _metrics(run)["test"] == _metrics(straight)["test"]
    assert _metrics(run)["val"] == _metrics(straight)["val"]


@pytest.mark.parametrize(("signum", "extra"), [(signal.SIGTERM, ()), (signal.SIGINT, ("trainer/ema=on",))],
                         ids=["sigterm", "sigint-ema"])
def test_signal_saves_mid_epoch_and_resume_is_bitwise_identical(signum: int, extra: tuple[str, ...],
                                                                tmp_path: Path,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    reference = _straight(tmp_path_factory, *extra)
    run = tmp_path / "run"
    proc = _spawn(run, list(extra))
    _wait_for(run / "checkpoints" / ck.LAST, proc)
    time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"nnctl train resume={run}" in err
    state = ck.load_checkpoint(run / "checkpoints" / ck.LAST)
    assert (state[ck.EPOCH], state[ck.BATCH_IN_EPOCH]) != (3, 0), "the run finished before the signal"
    assert main(["train", f"resume={run}"]) == 0
    _assert_bitwise_equal(_weights(run), _weights(reference))  # with EMA: the averaged weights, restored exactly
    assert _metrics(run)["train"] == _metrics(reference)["train"]  # epoch sums survive a mid-epoch stop
    assert _metrics(run)["test"] == _metrics(reference)["test"]


def test_epoch_sums_are_the_same_wherever_they_are_read_or_saved() -> None:
    """Training sums are kept per step and summed when read: reads at any steps (of everything, or of the losses
    only), and a checkpoint at any step loaded into a fresh run, give bitwise the same totals, in the same order
    (what makes train metrics survive a mid-epoch stop)."""
    import io

    from nnctl.metrics import Averages, Later, StepSums
    from nnctl.objectives.classification import _correct

    gen = torch.Generator().manual_seed(0)
    steps = []
    for n in torch.randint(1, 65, (150,), generator=gen).tolist():  # sizes vary: means are weighted by n
        logits, y = torch.randn(n, 5, generator=gen), torch.randint(0, 5, (n,), generator=gen)
        steps.append((n, {"acc": torch.randint(0, n + 1, (), generator=gen), "hits": Later(_correct, (logits, y))},
                      {"loss": 3 * torch.rand((), generator=gen)}))

    def totals(reads: set[int], saved_at: int | None = None, held: int = StepSums.HELD_ELEMENTS) -> Averages:
        sums = StepSums()
        sums.HELD_ELEMENTS = held  # elements of `Later` inputs held before they are reduced
        for i, step in enumerate(steps):
            if i == saved_at:  # a checkpoint, loaded as `nnctl train resume=` does
                buffer = io.BytesIO()
                torch.save(sums.state_dict(), buffer)
                buffer.seek(0)
                sums = StepSums(torch.load(buffer, weights_only=True))
                sums.HELD_ELEMENTS = held
            sums.add(*step)
            waiting = sum(t.numel() for s in sums._sums for v in s.values() if isinstance(v, Later) for t in v.inputs)
            assert waiting <= 2 * held  # the waiting inputs are reduced early: memory stays bounded
            if i in reads:  # the step log reads the losses only, leaving the statistics waiting
                assert set(sums.totals(means_only=i % 2 == 0).means()) == ({"loss"} if i % 2 == 0 else
                                                                             {"acc", "hits", "loss"})
        return sums.totals()

    straight = totals(reads=set())
    for reads, saved_at, held in [(set(range(0, 150, 7)), None, StepSums.HELD_ELEMENTS),
                                  ({3, 64, 65, 149}, 100, StepSums.HELD_ELEMENTS), (set(range(150)), 37, 500),
                                  (set(), None, 1000)]:  # a small `held` reduces the waiting `Later`s early
        other = totals(reads, saved_at, held)
        assert other.sums["_n"] == straight.sums["_n"] == sum(n for n, _, _ in steps)
        assert list(other.sums) == list(straight.sums) == ["acc", "hits", "loss", "_n"]
        for name in ("acc", "hits", "loss"):
            assert torch.equal(other.sums[name], straight.sums[name]), name
    assert int(straight.sums["acc"]) == sum(int(s["acc"]) for _, s, _ in steps)  # counts stay exact
    hits = [int((s["hits"].inputs[0].argmax(1) == s["hits"].inputs[1]).sum()) for _, s, _ in steps]
    assert int(straight.sums["hits"]) == sum(hits)  # each step's `Later` counts its own samples
    one_by_one = Averages()
    for n, sums, means in steps:
        one_by_one.add(n, {"acc": sums["acc"], "hits": torch.tensor(float(hits.pop(0)))}, means)
    assert straight.means() == pytest.approx(one_by_one.means(), rel=1e-6)
    # a checkpoint written with totals only (Averages' state) continues from them
    continued = StepSums(dict(one_by_one.state_dict()))
    n, _, means = steps[0]
    continued.add(*steps[0])
    expected = (float(one_by_one.sums["loss"]) + n * float(means["loss"])) / (one_by_one.sums["_n"] + n)
    assert continued.totals().means()["loss"] == pytest.approx(expected)
    clash = StepSums()  # a name both summed and averaged would interleave two kinds of value in one buffer
    clash.add(1, {"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="both a total and a mean"):
        clash.totals()


def test_resume_extends_a_finished_run_and_auto_finds_it(straight: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """scheduler=step does not depend on the run's length: a finished run trained on is the same as a longer run."""
    monkeypatch.chdir(tmp_path)
    short = [a for a in TINY if not a.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    assert main(["train", *short]) == 0
    (run,) = (tmp_path / "outputs" / "train").glob("*/*")
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.EPOCH] == 2
    # resume=auto matches on the model/data/optimization config, then a longer run continues the same dir
    assert main(["train", *short, "resume=auto", "trainer.max_epochs=3"]) == 0
    assert ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.EPOCH] == 3
    assert _metrics(run)["epochs"] == 3
    _assert_bitwise_equal(_weights(run), _weights(straight))


def _digests(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_without_more_epochs_trains_and_rewrites_nothing(
        straight: Path, capsys: pytest.CaptureFixture) -> None:
    before = _digests(straight)
    capsys.readouterr()
    assert main(["train", f"resume={straight}"]) == 0
    out = capsys.readouterr().out
    assert "nothing left to train" in out and "3 epoch(s)" in out and "trainer.max_epochs" in out
    assert _digests(straight) == before  # no re-evaluation: metrics.json, TensorBoard and checkpoints untouched


# The default recipe: digits, CNN, AdamW and warmup_cosine, a schedule planned over the run's length.
DIGITS = ["trainer.max_epochs=1", "trainer.progress=false", "trainer.log_every_n_steps=1", "trainer.device=cpu"]


def _lrs_after(run: Path, step: int) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("lr") if e.step > step]


def test_extend_schedule_trains_a_finished_run_longer_under_a_fresh_schedule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from nnctl.engine import Engine

    finished = tmp_path / "finished"
    assert main(["train", *DIGITS, f"hydra.run.dir={finished}"]) == 0
    state = ck.load_checkpoint(finished / "checkpoints" / ck.LAST)
    peak = float(OmegaConf.create(state[ck.CONFIG]).optimizer.lr)
    assert state[ck.OPTIMIZER]["main"]["param_groups"][0]["lr"] < 0.01 * peak  # the schedule has ended
    extended, final_lr = tmp_path / "extended", tmp_path / "final_lr"
    shutil.copytree(finished, extended)
    shutil.copytree(finished, final_lr)

    capsys.readouterr()
    assert main(["train", f"resume={extended}", "trainer.max_epochs=2", "trainer.extend_schedule=true"]) == 0
    out = capsys.readouterr().out
    # warnings reach the console once each (and the log file); INFO stays in the log file
    assert out.count("warning: resuming with trainer.max_epochs changed: 1 -> 2") == 1, out
    assert out.count("get a fresh WarmupCosine schedule") == 1, out
    (log_file,) = (tmp_path / "outputs" / "train").glob("*/*/train.log")  # the resume command's own Hydra dir
    log_text = log_file.read_text()
    assert "resuming with trainer.max_epochs changed" in log_text and "resuming " + str(extended) in log_text
    assert "resuming " + str(extended) not in out
    lrs = _lrs_after(extended, state[ck.STEP])
    assert len(lrs) == state[ck.STEP] and max(lrs) > 0.9 * peak and lrs[-1] < 0.01 * peak  # warmup, peak, decay

    # For comparison, the same resume without the new plan: the extra epoch runs at the final lr of the first.
    monkeypatch.setattr(Engine, "replan_schedule", lambda self: 0)
    assert main(["train", f"resume={final_lr}", "trainer.max_epochs=2", "trainer.extend_schedule=true"]) == 0
    assert max(_lrs_after(final_lr, state[ck.STEP])) < 0.01 * peak
    test_loss = {run.name: _metrics(run)["test"]["loss"] for run in (finished, extended, final_lr)}
    assert test_loss["extended"] < 0.6 * test_loss["final_lr"], test_loss
    assert test_loss["final_lr"] < test_loss["finished"], test_loss


@pytest.mark.parametrize("batched", [False, True], ids=["every-step", "batched-reads"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(batched: bool, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU checks each loss before its update; a GPU reads them in batches, on logging steps and before every
    checkpoint. Forced here on the CPU with a logging cadence longer than the run, only the read before epoch 2's
    checkpoint can catch the divergence: that checkpoint is never written."""
    from nnctl import optimization

    if batched:
        monkeypatch.setattr(optimization, "BATCHED_LOSS_READS", ("cpu",))
    run = tmp_path / "run"
    # Epoch 1 trains normally; the per-epoch x1e8 learning-rate jump then makes SGD diverge to inf/NaN.
    exploding = [*(a for a in TINY if not a.startswith("trainer.log_every_n_steps")), "optimizer=sgd",
                 "scheduler=exponential", "scheduler.gamma=1e8", f"hydra.run.dir={run}",
                 f"trainer.log_every_n_steps={1000 if batched else 5}"]
    code = main(["train", *exploding])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "trainer.max_bad_steps" in err and "optimizer.lr" in err and "last finite loss" in err
    assert ("after this update had run" in err) == batched, err
    state = ck.load_checkpoint(run / "checkpoints" / ck.LAST)
    assert state[ck.EPOCH] == 1 and all(torch.isfinite(w).all() for w in state[ck.MODEL].values()
                                        if w.is_floating_point())


def test_resume_refuses_changes_it_cannot_honour(straight: Path, capsys: pytest.CaptureFixture) -> None:
    before = (straight / "checkpoints" / ck.LAST).read_bytes()
    assert main(["train", f"resume={straight}", "optimizer.lr=0.5"]) == 2
    assert "optimizer.lr differs" in capsys.readouterr().err
    assert (straight / "checkpoints" / ck.LAST).read_bytes() == before


def test_kill9_during_checkpoint_writes_never_corrupts(tmp_path: Path) -> None:
    """Kill a process that rewrites last.pt in a tight loop at random moments; the file always loads."""
    path = tmp_path / ck.LAST
    ck.save_checkpoint({ck.CONFIG: "a: 1", ck.MODEL: {"w": torch.zeros(3)}}, path)
    writer = (f"import torch\nfrom pathlib import Path\nfrom nnctl import checkpoint as ck\ni = 0\n"
              f"while True:\n    i += 1\n    ck.save_checkpoint({{ck.CONFIG: 'a: 1', ck.MODEL: "
              f"{{'w': torch.full((300_000,), float(i))}}}}, Path({str(path)!r}))\n")
    rng = random.Random(0)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(1.5 + rng.random())  # past the torch import, at a random point of some write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = ck.load_checkpoint(path)
        w = state[ck.MODEL]["w"]
        assert torch.all(w == w[0]), "a torn write was observed"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != ck.LAST]
    # Temp files of killed writers may remain, but they never shadow the real checkpoint.
    assert all(n.startswith(f".{ck.LAST}.") and n.endswith(".tmp") for n in leftovers)
