"""Audio: audio_folder on real WAV/FLAC files, the log-mel front end, classifiers (train -> eval reproduces, exact
resume after kill -9) and the log-mel diffusion generator writing .wav files."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import wait_for
from nnctl import checkpoint as ck
from nnctl.cli import main
from nnctl.objectives.generative import GRID_SEED

TONES = ["data=audio_tones", "data.num_samples=320", "data.num_classes=4", "data.batch_size=16",
         "data.sample_rate=4000", "model=audio_cnn", "model.backbone.channels=[8,16]", "trainer.device=cpu",
         "trainer.progress=false", "trainer.early_stopping.enabled=false"]
GENERATOR = ["data=audio_tones", "data.num_samples=64", "data.num_classes=4", "data.batch_size=16",
             "data.sample_rate=4000", "data.representation=logmel", "model=diffusion", "objective=diffusion",
             "trainer/checkpoint=loss", "model.channels=[8,16]", "model.conditional=true", "model.timesteps=50",
             "model.sample_steps=3", "objective.grid_samples=4", "trainer.max_epochs=1",
             "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.device=cpu",
             "trainer.progress=false"]


def _sine(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def make_audio_folder(root: Path) -> int:
    """<root>/{low,high}/: 440 Hz vs 1500 Hz sines as 8 kHz mono WAV and 16 kHz stereo FLAC, of varied lengths,
    plus a corrupt .wav and a zero-length .wav. Returns the number of readable clips."""
    import soundfile as sf

    good = 0
    for cls, freq in (("low", 440.0), ("high", 1500.0)):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            sf.write(str(root / cls / f"m{i}.wav"), _sine(freq * (1 + 0.02 * i), 8000, 0.3 + 0.1 * i), 8000)
            sf.write(str(root / cls / f"s{i}.flac"), _sine(freq, 16000, 0.5, channels=2), 16000)
            good += 2
    (root / "low" / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage, not a wave file" * 10)
    sf.write(str(root / "high" / "empty.wav"), np.zeros(0, dtype=np.float32), 8000)
    return good


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("audio")
    return root, make_audio_folder(root)


def _folder_data(root: Path, **kw: object):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    overrides = ["data=audio_folder", f"data.root={root}", "data.sample_rate=8000", "data.clip_seconds=0.5",
                 "data.batch_size=4", *(f"data.{k}={v}" for k, v in kw.items())]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.data).setup(torch.device("cpu"))


def test_audio_folder_decodes_resamples_mixes_down_and_skips_bad_files(audio_root: tuple[Path, int],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    root, good = audio_root
    with caplog.at_level(logging.WARNING):
        data = _folder_data(root)
    assert "skipped 2 unreadable or empty audio file(s)" in caplog.text
    assert caplog.text.count("resampled to data.sample_rate=8000 Hz") == 1 and "16000" in caplog.text
    sizes = {k: len(y) for k, (x, y) in data.splits.items()}
    assert sizes["train"] + sizes["val"] == good and data.classes == ["high", "low"]
    x, y = data.splits["train"]
    assert x.shape == (sizes["train"], 4000) and x.dtype == torch.float32  # 0.5 s at 8 kHz, mono
    # every clip, resampled or not, mixed down or not, still peaks at its class's frequency (0.5 s: 2 Hz per bin)
    peaks = torch.fft.rfft(x).abs().argmax(1).float() * 2  # [N] in Hz
    expected = torch.tensor([1500.0, 440.0])[y]  # classes sort as high, low
    assert ((peaks - expected).abs() / expected < 0.15).all(), peaks
    assert data.spec["input"] == "audio" and data.spec["frontend"]["sample_rate"] == 8000


def test_augmented_batches_depend_only_on_seed_epoch_and_index(audio_root: tuple[Path, int]) -> None:
    data = _folder_data(audio_root[0])
    full = list(data.train_batches(epoch=1, seed=7))
    resumed = list(data.train_batches(epoch=1, seed=7, start=1))
    assert len(full) >= 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(full[1:], resumed))
    other_epoch = next(data.train_batches(epoch=2, seed=7))
    assert not torch.equal(full[0][0], other_epoch[0])


def test_mel_filterbank_matches_librosa() -> None:
    import librosa

    from nnctl.audio import mel_filterbank

    for norm in ("slaney", None):
        ours = mel_filterbank(16000, 512, 40, 20.0, 7600.0, norm=norm).numpy()
        theirs = librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=20.0, fmax=7600.0, norm=norm)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_logmel_round_trip_keeps_the_pitch() -> None:
    from nnctl.audio import LogMel

    frontend = LogMel(8000, 256, 64, 64)
    wave = torch.from_numpy(_sine(1000.0, 8000, 0.5))[None]
    image = frontend(wave)
    assert image.shape == (1, 1, 64, 1 + 4000 // 64) and 0 <= float(image.min()) and float(image.max()) <= 1
    back = frontend.to_waveform(image, 4000, iters=32, generator=torch.Generator().manual_seed(0))
    spectrum = torch.fft.rfft(back[0]).abs()
    assert abs(int(spectrum.argmax()) * 2 - 1000) < 60  # 0.5 s: 2 Hz per bin
    assert float(back.abs().max()) > 0.1  # the level survives the fixed dB mapping


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("audio_cls") / "run"
    assert main(["train", *TONES, "trainer.max_epochs=3", f"hydra.run.dir={run}"]) == 0
    return run


def test_audio_classifier_learns_and_eval_reproduces(classifier_run: Path, tmp_path: Path) -> None:
    trained = json.loads((classifier_run / "metrics.json").read_text())
    assert trained["test"]["acc"] > 0.6  # 4 classes: chance is 0.25
    eval_dir = tmp_path / "eval"
    assert main(["eval", f"ckpt={classifier_run}", f"hydra.run.dir={eval_dir}"]) == 0
    evaluated = json.loads((eval_dir / "metrics.json").read_text())["test"]
    for k, v in trained["test"].items():
        assert evaluated[k] == pytest.approx(v, abs=1e-6), k
    # the checkpoint holds the front end's settings: waveform in, prediction out
    assert "frontend" in ck.load_checkpoint(classifier_run / "checkpoints" / ck.BEST)[ck.CONFIG]


def test_audio_resnet_on_an_audio_folder_trains(audio_root: tuple[Path, int], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "data=audio_folder", f"data.root={audio_root[0]}", "data.sample_rate=8000",
                 "data.clip_seconds=0.5", "data.batch_size=4", "model=audio_resnet", "model.backbone.width=8",
                 "trainer.max_epochs=1", "trainer.device=cpu", "trainer.progress=false",
                 f"hydra.run.dir={run}"]) == 0
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["test"]["loss"])


def test_kill9_mid_epoch_then_resume_is_bitwise_identical(classifier_run: Path, tmp_path: Path) -> None:
    args = [*TONES, "trainer.max_epochs=3", "trainer.deterministic=true"]
    straight = tmp_path / "straight"
    assert main(["train", *args, f"hydra.run.dir={straight}"]) == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / ck.LAST, proc)  # epoch 1 is saved; epoch 2 is under way
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert main(["train", f"resume={run}"]) == 0
    a = ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.MODEL]
    b = ck.load_checkpoint(straight / "checkpoints" / ck.LAST)[ck.MODEL]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generator_trains_and_samples_valid_deterministic_wavs(tmp_path: Path) -> None:
    import soundfile as sf

    run = tmp_path / "gen"
    assert main(["train", *GENERATOR, f"hydra.run.dir={run}"]) == 0
    assert (run / "samples" / "epoch_001.png").is_file()
    written = []
    for name in ("a", "b"):
        assert main(["sample", f"ckpt={run}", "num_samples=4", f"out={tmp_path / name}.png", "seed=3",
                     "griffin_lim_iters=4", "device=cpu"]) == 0
        written.append(sorted((tmp_path / name).glob("*.wav")))
    assert [p.name for p in written[0]] == ["0000_tone.wav", "0001_chirp_up.wav", "0002_chirp_down.wav",
                                           "0003_noise_burst.wav"]
    for a, b in zip(*written):
        assert a.read_bytes() == b.read_bytes()  # the same seed: the same sound
        wave, rate = sf.read(str(a))
        assert rate == 4000 and wave.shape == (2000,) and np.isfinite(wave).all()
    assert (tmp_path / "a.png").is_file()
    # the validation grid is drawn as nnctl sample draws spectrograms: the grid's seed gives the same PNG
    assert main(["sample", f"ckpt={run}", "num_samples=4", f"out={tmp_path / 'grid'}.png", f"seed={GRID_SEED}",
                 "griffin_lim_iters=1", "device=cpu"]) == 0
    assert _png(tmp_path / "grid.png").tolist() == _png(run / "samples" / "epoch_001.png").tolist()


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def _loudest_row(images: torch.Tensor) -> torch.Tensor:
    """Images [B, ..., H, W] (channels anywhere before H) -> the row of each with the most energy [B]."""
    return images.flatten(1, -3).mean(1).mean(-1).argmax(-1)


@pytest.mark.parametrize("representation", ["waveform", "logmel"])
def test_plots_and_grids_draw_low_frequencies_at_the_bottom(audio_root: tuple[Path, int], representation: str,
                                                           tmp_path: Path) -> None:
    from nnctl.objectives.generative import DiffusionObjective
    from nnctl.plots import display_images
    from nnctl.spec import complete

    data = _folder_data(audio_root[0], representation=representation)
    x, y = data.splits["train"]
    low, high = y == data.classes.index("low"), y == data.classes.index("high")  # 440 Hz vs 1500 Hz sines
    drawn = display_images(data, x).permute(0, 3, 1, 2)  # what nnctl eval's worst_k.png and nnctl explain show
    rows = _loudest_row(drawn)
    height = drawn.shape[2]
    assert (rows[low] > height // 2).all() and (rows[low].min() > rows[high].max())  # row 0 is the top of a PNG
    if representation == "waveform":
        return  # the per-epoch grids below are a generator's: generators learn log-mel images

    class Replay(torch.nn.Module):  # a "generator" whose samples are the data's own images
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
            return data.pixels(x[torch.cat([low.nonzero()[:1, 0], high.nonzero()[:1, 0]])])  # [low, high]

    class Trackers:
        def images(self, tag: str, png: Path, step: int) -> None:
            self.png = png

    objective = complete(DiffusionObjective, data.spec, "objective", grid_samples=2)
    objective.after_validation(Replay(), data, 1, tmp_path, trackers := Trackers(), 0)
    grid = torch.from_numpy(_png(trackers.png).astype(np.float32))  # [H', W'] or [H', W', 3]: one row of 2 images
    grid = grid.mean(-1) if grid.ndim == 3 else grid
    pad = 2  # the grid's border
    left, right = grid[pad:pad + height, pad:grid.shape[1] // 2], grid[pad:pad + height, grid.shape[1] // 2:]
    low_row, high_row = (int(_loudest_row(half[None, None])) for half in (left, right))
    assert low_row > height // 2 and low_row > high_row


def test_spoken_digit_presets_build_the_same_images_and_train_a_step(audio_root: tuple[Path, int],
                                                                     tmp_path: Path) -> None:
    """The classifier preset is the generator preset's feature extractor: the same log-mel images (nnctl eval's
    quality scores refuse a classifier of other shapes)."""
    from hydra import compose, initialize_config_dir

    from nnctl.engine import Engine

    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    shapes = {}
    for preset in ("spoken_digits_cnn", "spoken_digits_ddpm"):
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose("train", overrides=[f"experiment={preset}", f"data.root={audio_root[0]}",
                                              "data.batch_size=4", "trainer.device=cpu", "paths.run_dir=unused"])
        engine = Engine(cfg, tmp_path / preset)
        shapes[preset] = (engine.spec["in_shape"], engine.spec["image_origin"])
        for _, loss, _ in engine.objective.training_steps(engine.model, next(engine.data.train_batches(0, 0))):
            assert loss.ndim == 0 and torch.isfinite(loss)
    assert shapes["spoken_digits_cnn"] == shapes["spoken_digits_ddpm"] == ((1, 32, 63), "lower")
