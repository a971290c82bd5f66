"""Speed options change speed, not results: EMA, flip TTA, channels_last, torch.compile."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnctl import checkpoint as ck
from nnctl.cli import main
from nnctl.models.cnn import CNN
from nnctl.objectives import Classification

TINY = ["data=digits", "model=cnn", "model.channels=[8,16]", "trainer.progress=false",
        "trainer.deterministic=true", "trainer.early_stopping.enabled=false"]


def _train(run: Path, *overrides: str) -> dict:
    base = [a for a in TINY if not (a.startswith("model.") and any(o.startswith("model=") for o in overrides))]
    assert main(["train", *base, f"hydra.run.dir={run}", *overrides]) == 0
    return json.loads((run / "metrics.json").read_text())


def test_ema_weights_differ_from_raw_and_are_what_the_checkpoint_evaluates(tmp_path: Path) -> None:
    run = tmp_path / "ema"
    metrics = _train(run, "trainer/ema=on", "trainer.ema.decay=0.9", "trainer.max_epochs=2")
    state = ck.load_checkpoint(run / "checkpoints" / ck.BEST)
    ema, raw = state[ck.MODEL], state[ck.EXTRA]["train_model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    # `nnctl eval` loads MODEL; it must reproduce the test metrics the run reported (computed with EMA weights).
    assert main(["eval", f"ckpt={run}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test"] == pytest.approx(metrics["test"], abs=1e-6)
    # ...and the raw weights score differently, so the check above is not vacuous.
    from omegaconf import OmegaConf

    from nnctl.engine import Engine

    cfg = OmegaConf.create(state[ck.CONFIG])
    engine = Engine(cfg, tmp_path / "scratch")
    engine.ema.module.load_state_dict(raw)
    assert engine.evaluate("test")["test/loss"] != pytest.approx(metrics["test"]["loss"], abs=1e-6)


def test_flip_tta_changes_nothing_for_flip_invariant_input() -> None:
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, channels=(8, 16)).eval()
    objective = Classification(num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    symmetric = x + x.flip(3)
    with torch.no_grad():
        assert torch.allclose(objective.predict(model, symmetric, tta=True),
                              objective.predict(model, symmetric, tta=False), atol=1e-6)
        # on ordinary input TTA does average two different predictions
        assert not torch.allclose(objective.predict(model, x, tta=True), objective.predict(model, x, tta=False))


def test_channels_last_matches_default_layout(tmp_path: Path) -> None:
    base = _train(tmp_path / "a", "trainer.max_steps=5")
    nhwc = _train(tmp_path / "b", "trainer.max_steps=5", "trainer.channels_last=true")
    assert nhwc["train"]["loss"] == pytest.approx(base["train"]["loss"], rel=1e-4)
    assert nhwc["test"]["acc"] == pytest.approx(base["test"]["acc"], abs=0.01)


def test_compile_gives_the_same_loss_within_tolerance(tmp_path: Path) -> None:
    common = ["model=mlp", "model.hidden_sizes=[32]", "model.dropout=0", "trainer.max_steps=4"]
    eager = _train(tmp_path / "eager", *common)
    compiled = _train(tmp_path / "compiled", *common, "trainer.compile=true")
    assert compiled["train"]["loss"] == pytest.approx(eager["train"]["loss"], rel=1e-3)
    assert compiled["test"]["loss"] == pytest.approx(eager["test"]["loss"], rel=1e-3)
    # compiled modules save under the original parameter names, so eval/resume need no unwrapping
    assert not any(k.startswith("_orig_mod") for k in ck.load_checkpoint(
        tmp_path / "compiled" / "checkpoints" / ck.BEST)[ck.MODEL])


def test_tta_setting_is_used_by_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run, "data=synthetic", "data.augment.hflip=true", "trainer.max_epochs=1")
    out = {}
    for tta in ("false", "true"):
        assert main(["eval", f"ckpt={run}", f"eval.tta={tta}", f"hydra.run.dir={tmp_path / tta}"]) == 0
        out[tta] = json.loads((tmp_path / tta / "metrics.json").read_text())["test"]["loss"]
    assert out["true"] != out["false"]
