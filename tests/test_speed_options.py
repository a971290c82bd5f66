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


def test_translate_tta_views_are_the_training_crops_of_the_same_shift() -> None:
    """flip_translate's shifted views fill the border as the training crops do (black, then normalized), so the
    model is asked about images like those it trained on; the objective takes the statistics from the data."""
    from nnctl.data.augment import Normalize, apply_crop_flip

    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return x.flatten(1)[:, :10]  # [B, 10] stand-in logits

    raw = torch.randint(0, 256, (3, 2, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.3, 0.6]), torch.tensor([0.2, 0.1])
    norm = Normalize(mean, std)
    objective = Classification(num_classes=10, pixel_mean=mean.tolist(), pixel_std=std.tolist())
    objective.predict(Spy(), norm(raw), tta="flip_translate")
    assert len(seen) == 6  # image, mirror, then each shifted view and its mirror
    zero = torch.zeros(3, dtype=torch.long)
    for view, shift in ((seen[2], 0), (seen[4], 2)):  # crop offsets 0 and 2 of a 1-px padding: the two diagonals
        crop = norm(apply_crop_flip(raw, 1, zero + shift, zero + shift, None))
        assert torch.allclose(view, crop, atol=1e-5)
    assert (seen[2][:, 1, 0, :] == (0 - 0.6) / 0.1).all()  # the border really is black, per channel


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


def test_airbench_whitening_layer_decorrelates_patches() -> None:
    from nnctl.models.airbench import AirBench

    # Smooth random images: neighbouring pixels (and channels) correlate strongly, as in real photos.
    x = torch.rand(256, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.avg_pool2d(x + x.mean(dim=1, keepdim=True), 3, stride=1, padding=1)
    net = AirBench((3, 16, 16), 10, widths=[8, 8, 8])
    assert net.whiten.out_channels == 2 * 3 * 2 * 2  # null width: every eigenvector and its negative
    assert AirBench((1, 28, 28), 10, widths=[8, 8, 8]).whiten.out_channels == 8  # grayscale: no dead filters
    raw = torch.nn.functional.unfold(x, 2).transpose(1, 2).reshape(-1, 12)  # [N*15*15, 12] patches
    assert torch.cov(raw.T).fill_diagonal_(0).abs().max() > 0.01  # correlated before
    net.init_from_data(x)
    w = net.whiten.weight
    assert torch.equal(w[12:], -w[:12]) and not w.requires_grad
    out = torch.nn.functional.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12)  # [N*15*15, 12]
    cov = torch.cov(out.T)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    assert off_diagonal.abs().max() < 1e-3  # decorrelated after
    assert torch.all(torch.diagonal(cov) <= 1.0 + 1e-3)  # unit variance, shrunk where eigenvalues are tiny
    assert torch.diagonal(cov)[0] > 0.9


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_airbench_activation_is_configurable_and_trains(act: str) -> None:
    from nnctl.models.airbench import AirBench

    torch.manual_seed(0)
    net = AirBench((1, 12, 12), 3, widths=[8, 8, 8], activation=act)
    x, y = torch.randn(32, 1, 12, 12), torch.arange(32) % 3
    net.init_from_data(x)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert type(net.act).__name__ == {"gelu": "GELU", "relu": "ReLU"}[act]


def test_factor_schedules_match_torch_lambdalr() -> None:
    """The cosine schedules set the lr straight into the optimizer's groups (no LambdaLR bookkeeping per step): the
    same learning rates, bit for bit, as torch's LambdaLR with the same factor, and each loads the other's state."""
    import copy

    from torch.optim.lr_scheduler import LambdaLR

    from nnctl.schedulers import WarmupCosine, _WarmupCosineFactor

    def optimizer() -> torch.optim.Optimizer:
        w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
        return torch.optim.AdamW([{"params": [w]}, {"params": [b], "lr": 0.03}], lr=0.1)

    ours_opt, torch_opt = optimizer(), optimizer()
    ours = WarmupCosine(ours_opt, total_steps=40, steps_per_epoch=10, warmup_fraction=0.1, min_lr_ratio=0.05)
    theirs = LambdaLR(torch_opt, _WarmupCosineFactor(40, 4, 0.05))
    for _ in range(25):
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in torch_opt.param_groups]
        torch_opt.step()  # (LambdaLR warns when it steps before its optimizer)
        ours.after_step(), theirs.step()
    state = ours.state_dict()
    assert state["last_epoch"] == theirs.state_dict()["last_epoch"] == 25
    # a LambdaLR checkpoint resumes into ours (and the planned length comes with it) and the other way round
    resumed = WarmupCosine(optimizer(), total_steps=99, steps_per_epoch=10)
    resumed.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert resumed.state_dict() == state
    back = LambdaLR(optimizer(), _WarmupCosineFactor(99, 1, 0.0))
    back.load_state_dict(copy.deepcopy(state))
    assert back.state_dict()["last_epoch"] == 25 and vars(back.lr_lambdas[0]) == vars(_WarmupCosineFactor(40, 4, 0.05))
