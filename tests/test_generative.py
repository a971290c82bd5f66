"""Generative models end to end on the bundled 8x8 digits: each family trains from the CLI with the loss behaving
as it should, resumes bitwise after kill -9, and `nnctl sample` / `nnctl eval eval.feature_ckpt=...` work on its
checkpoints."""
from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from nnctl import checkpoint as ck
from nnctl.cli import main

BASE = ["data=digits", "data.batch_size=32", "data.augment.crop_padding=0", "trainer.deterministic=true", "trainer.progress=false", "trainer.device=cpu", "trainer.max_epochs=3",
        "trainer.log_every_n_steps=5", "optimizer=adam"]
FAMILIES = {
    "gan": ["model=gan", "objective=gan", "model.arch=mlp", "model.hidden=64", "model.latent_dim=16",
            "optimizer.lr=2e-4", "optimizer.betas=[0.5,0.999]", "scheduler=none", "objective.label_smoothing=0.1",
            "objective.grid_samples=16", "trainer/checkpoint=loss"],
    "dcgan": ["model=gan", "model.width=16", "model.latent_dim=16", "model.conditional=true", "optimizer.lr=2e-4",
              "optimizer.betas=[0.5,0.999]", "scheduler=none", "trainer.max_epochs=2"],  # objective=auto
    "vae": ["model=vae", "objective=vae", "model.channels=[8,16]", "model.hidden=64", "model.latent_dim=4",
            "objective.kl_warmup_steps=30", "optimizer.lr=3e-3", "objective.grid_samples=16",
            "trainer/checkpoint=loss"],
    "diffusion": ["model=diffusion", "objective=diffusion", "model.channels=[16,32]", "model.conditional=true",
                  "model.sample_steps=4", "model.timesteps=100", "optimizer.lr=2e-3", "trainer/ema=on",
                  "trainer.ema.decay=0.9", "objective.grid_samples=16", "trainer/checkpoint=loss",
                  "objective.snr_gamma=5.0"],  # the min-SNR weighting of the fashion_mnist_ddpm preset
}


def _run(root: Path, name: str, *extra: str) -> Path:
    run = root / name
    assert main(["train", *BASE, *FAMILIES[name], f"hydra.run.dir={run}", f"paths.root_dir={root}", *extra]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run per family (the references of the resume tests, the checkpoints of the rest)."""
    root = tmp_path_factory.mktemp("generative")
    return {name: _run(root, name) for name in FAMILIES}


def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _images(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trains_and_writes_sample_grids(name: str, runs: dict[str, Path]) -> None:
    run = runs[name]
    epochs = 2 if name == "dcgan" else 3
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)]
    assert "samples" in _images(run)
    if name in ("dcgan", "diffusion"):  # conditional: one column per class (10 digits of 8x8, 2-px borders)
        with Image.open(run / "samples" / "epoch_001.png") as image:
            assert image.size[0] == 10 * 10 + 2
    metrics = json.loads((run / "metrics.json").read_text())
    if name == "dcgan":  # checkpoint.monitor=auto: a GAN's best.pt is its newest epoch, not its lowest loss
        assert metrics["monitor"] == "latest" and metrics["best_epoch"] == epochs
    assert all(math.isfinite(v) for split in ("train", "val", "test") for v in metrics[split].values())
    if name == "vae":  # the ELBO improves; its parts are reported in nats per image
        elbo = _scalars(run, "val/elbo")
        assert elbo[-1] > elbo[0] + 1 and {"rec", "kl", "elbo"} <= set(metrics["test"])
        assert metrics["test"]["loss"] == pytest.approx(metrics["test"]["rec"] + metrics["test"]["kl"], rel=1e-5)
    elif name == "diffusion":
        losses = _scalars(run, "train/loss")
        assert losses[-1] < 0.8 * losses[0]
    else:  # both networks keep learning: D neither wins outright nor collapses
        assert 0.05 < metrics["train"]["loss_discriminator"] < 5 and math.isfinite(metrics["train"]["loss_generator"])
        assert 0.05 < metrics["train"]["d_fake"] < metrics["train"]["d_real"] < 0.99


@pytest.mark.parametrize("name", ["gan", "vae", "diffusion"])
def test_kill9_then_resume_is_bitwise_identical(name: str, runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *BASE, *FAMILIES[name], f"hydra.run.dir={run}",
                             f"paths.root_dir={tmp_path}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    last = run / "checkpoints" / ck.LAST
    deadline = time.time() + 300
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert ck.load_checkpoint(last)[ck.EPOCH] == 1
    assert main(["train", f"resume={run}", f"paths.root_dir={tmp_path}"]) == 0
    a, b = ck.load_checkpoint(last), ck.load_checkpoint(runs[name] / "checkpoints" / ck.LAST)
    assert a[ck.MODEL].keys() == b[ck.MODEL].keys()
    for k in a[ck.MODEL]:
        assert torch.equal(a[ck.MODEL][k], b[ck.MODEL][k]), k
    assert a[ck.OPTIMIZER].keys() == b[ck.OPTIMIZER].keys()  # the GAN's two optimizers both came back


def _sample(root: Path, run: Path, out: str, *extra: str) -> Path:
    assert main(["sample", f"ckpt={run}", f"out={root / out}", f"paths.root_dir={root}", "device=cpu", *extra]) == 0
    return root / out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sample_is_deterministic_per_seed(name: str, runs: dict[str, Path], tmp_path: Path) -> None:
    extra = ["steps=3", "guidance=2.0"] if name == "diffusion" else []
    a = _sample(tmp_path, runs[name], "a.png", "num_samples=12", "nrow=4", *extra)
    b = _sample(tmp_path, runs[name], "b.png", "num_samples=12", "nrow=4", *extra)
    c = _sample(tmp_path, runs[name], "c.png", "num_samples=12", "nrow=4", "seed=1", *extra)
    assert _digest(a) == _digest(b) != _digest(c)
    if name == "diffusion":  # rescaled guidance: its own images, the same for the same seed
        r1, r2 = (_sample(tmp_path, runs[name], f"r{i}.png", "num_samples=12", "nrow=4", "guidance_rescale=0.7",
                          *extra) for i in (1, 2))
        assert _digest(r1) == _digest(r2) != _digest(a)
    with Image.open(a) as image:  # 3 rows of 4 8x8 images with 2-px borders
        assert image.size == (4 * 10 + 2, 3 * 10 + 2)
    assert main(["sample", f"ckpt={runs[name]}", f"out_dir={tmp_path / 'each'}", "num_samples=5", "device=cpu",
                 f"paths.root_dir={tmp_path}", *extra]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{i:04d}.png" for i in range(5)]


def test_sample_modes(runs: dict[str, Path], tmp_path: Path) -> None:
    for name in ("gan", "vae", "dcgan"):
        with Image.open(_sample(tmp_path, runs[name], f"{name}_walk.png", "mode=interpolate", "num_samples=16")) as im:
            assert im.size == (8 * 10 + 2, 2 * 10 + 2)  # two rows of 8 steps
    with Image.open(_sample(tmp_path, runs["vae"], "rec.png", "mode=reconstruct", "num_samples=8")) as im:
        assert im.size == (8 * 10 + 2, 2 * 10 + 2)  # 8 test images beside their reconstructions
    with Image.open(_sample(tmp_path, runs["diffusion"], "classes.png", "num_samples=20", "steps=2")) as im:
        assert im.size == (10 * 10 + 2, 2 * 10 + 2)  # cycling through the classes: one column per class
    a = _sample(tmp_path, runs["diffusion"], "ddpm3.png", "class_label=3", "sampler=ddpm", "num_samples=4")
    b = _sample(tmp_path, runs["diffusion"], "ddim3.png", "class_label=3", "sampler=ddim", "num_samples=4")
    assert _digest(a) != _digest(b)


def test_eval_reports_quality_in_classifier_features(runs: dict[str, Path], tmp_path: Path) -> None:
    clf = tmp_path / "clf"
    assert main(["train", "data=digits", "model=cnn", "model.channels=[16,32]", "trainer.max_epochs=2",
                 "trainer.progress=false", "trainer.device=cpu", f"hydra.run.dir={clf}",
                 f"paths.root_dir={tmp_path}"]) == 0
    for name in ("gan", "diffusion"):
        out = tmp_path / f"eval_{name}"
        assert main(["eval", f"ckpt={runs[name]}", f"eval.feature_ckpt={clf}", "eval.quality_samples=120",
                     f"hydra.run.dir={out}", f"paths.root_dir={tmp_path}"]) == 0
        test = json.loads((out / "metrics.json").read_text())["test"]
        assert test["quality_samples"] == 120 and test["fd_classifier"] > 0 and math.isfinite(test["kid_classifier"])
        assert ("class_acc_of_samples" in test) == (name == "diffusion")  # conditional models only
        assert test["loss"] == pytest.approx(json.loads((runs[name] / "metrics.json").read_text())["test"]["loss"])
    # the samples scored can be drawn with other sampler settings than the model's own
    out = tmp_path / "eval_diffusion_guided"
    assert main(["eval", f"ckpt={runs['diffusion']}", f"eval.feature_ckpt={clf}", "eval.quality_samples=120",
                 "eval.steps=3", "eval.guidance=3.0", f"hydra.run.dir={out}", f"paths.root_dir={tmp_path}"]) == 0
    guided = json.loads((out / "metrics.json").read_text())["test"]
    plain = json.loads((tmp_path / "eval_diffusion" / "metrics.json").read_text())["test"]
    assert guided["fd_classifier"] != pytest.approx(plain["fd_classifier"])


def test_unconditional_diffusion_exports_a_diffusers_pipeline(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline

    run = tmp_path / "run"
    args = [a for a in FAMILIES["diffusion"] if a != "model.conditional=true"]
    assert main(["train", *BASE, *args, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}"]) == 0
    assert main(["sample", f"ckpt={run}", f"export={tmp_path / 'pipe'}", f"paths.root_dir={tmp_path}"]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_each_timestep(prediction: str) -> None:
    """objective.snr_gamma: per-image MSE times min(SNR, gamma)/SNR (noise) or min(SNR, gamma)/(SNR + 1) (velocity),
    with SNR = alpha_bar / (1 - alpha_bar) of the image's timestep; plain MSE without it."""
    from nnctl.models.diffusion import Diffusion
    from nnctl.objectives.generative import DiffusionObjective

    model = Diffusion((1, 8, 8), 10, channels=(8, 16), norm_groups=4, timesteps=100, schedule="cosine",
                      prediction=prediction)
    plain = DiffusionObjective([0.5], [0.5])
    weighted = DiffusionObjective([0.5], [0.5], snr_gamma=5.0)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    gen = torch.Generator().manual_seed(0)
    torch.randn(x.shape, generator=gen)  # _loss draws the noise, then the timesteps, from `gen`
    t = torch.randint(0, 100, (6,), generator=gen)
    mse = plain._loss(model, x, y, torch.Generator().manual_seed(0), 0.0)
    loss = weighted._loss(model, x, y, torch.Generator().manual_seed(0), 0.0)
    alpha_bar = model.noise_schedule().alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=5.0) / (snr if prediction == "epsilon" else snr + 1)
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clip are exercised
    torch.testing.assert_close(loss.double(), mse.double() * expected, rtol=1e-5, atol=0)
