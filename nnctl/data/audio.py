"""Audio datasets: a user's folder of recordings (`data=audio_folder`) and generated tones (`data=audio_tones`).

Clips are decoded once, mixed to mono, resampled to `sample_rate`, padded/trimmed to `clip_seconds` and held as one
float tensor [N, samples] on the training device. Two representations:

- `waveform` (classifiers): batches of raw clips, augmented on the device (random time shift, gain, additive
  noise) from a generator seeded by (seed, epoch, batch index), so a resumed run sees the batches an uninterrupted
  run would; the model owns the log-mel front end (nnctl.audio.LogMel), so a checkpoint maps sound to a prediction.
- `logmel` (generative image models, e.g. diffusion): the same front end applied once, giving normalized
  one-channel images [N, 1, n_mels, frames], with `pixel_mean`/`pixel_std` like an image dataset.

Both carry `frontend` (the LogMel settings with the sample rate) in their spec, so samples can be turned back into
sound (nnctl sample) and a classifier and a generator of the same data share one transform.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nnctl.data.base import _mix
from nnctl.data.formats import class_folders
from nnctl.errors import UserError

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
REPRESENTATIONS = ("waveform", "logmel")
Batch = tuple[torch.Tensor, torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]  # clips [N, samples] float32, labels [N] int64


class AudioData:
    """Base of the audio datasets: splitting, device residency, augmentation and batching. Subclasses implement
    `load() -> (splits, classes)` with splits {"train": ..., optionally "val", "test"} of clips at `sample_rate`."""

    name = "audio"

    def __init__(self, sample_rate: int, clip_seconds: float, batch_size: int, eval_batch_size: int,
                 val_fraction: float, split_seed: int, augment: dict, frontend: dict,
                 representation: str = "waveform", limit: int | None = None, root: str | None = None,
                 download: bool = False, missing_hint: str | None = None) -> None:
        if representation not in REPRESENTATIONS:
            raise UserError(f"got {representation!r}; choose one of {', '.join(REPRESENTATIONS)}",
                            key="data.representation")
        self.sample_rate, self.num_samples = int(sample_rate), max(1, int(round(sample_rate * clip_seconds)))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed, self.limit, self.root = val_fraction, split_seed, limit, root
        self.missing_hint = missing_hint
        self.shift = int(round(float(augment.get("shift_seconds", 0.0)) * self.sample_rate))
        self.gain_db, self.noise = float(augment.get("gain_db", 0.0)), float(augment.get("noise", 0.0))
        self.frontend = {"sample_rate": self.sample_rate, **dict(frontend)}
        self.representation = representation
        self.splits: dict[str, Split] = {}
        self.device = torch.device("cpu")

    def load(self) -> tuple[dict[str, Split], list[str]]:
        raise NotImplementedError

    # -- the contract used by the engine --------------------------------------------------------------------------
    def setup(self, device: torch.device) -> "AudioData":
        """Load, split off validation (fixed by split_seed), move to `device`; for `logmel`, transform. Idempotent."""
        if self.splits:
            return self
        splits, self.classes = self.load()
        train = splits["train"]
        if "val" not in splits:
            perm = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.split_seed))
            n_val = max(1, int(round(len(train[1]) * self.val_fraction)))
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            splits["val"] = (train[0][val_idx], train[1][val_idx])
            train = (train[0][train_idx], train[1][train_idx])
        if self.limit:
            train = (train[0][: self.limit], train[1][: self.limit])
        if len(train[1]) < self.batch_size:
            raise UserError(f"{len(train[1])} training clip(s) is fewer than one batch; lower data.batch_size or "
                            "add recordings", key="data.batch_size")
        splits["train"] = train
        splits.setdefault("test", splits["val"])  # no test set: the validation split doubles as the test split
        self.device = device
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
        if self.representation == "logmel":
            self._to_logmel()
        log.info("data %s: train %d, val %d, test %d clips of %d samples at %d Hz, %d classes (%s)", self.name,
                 len(train[1]), len(self.splits["val"][1]), len(self.splits["test"][1]), self.num_samples,
                 self.sample_rate, len(self.classes), self.representation)
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> dict:
        # image_origin: log-mel images (what the model sees, or the data's image view) have the lowest mel band in
        # row 0; grids and PNGs draw it at the bottom, as spectrograms are drawn
        common = {"target": "class", "num_classes": self.num_classes, "classes": list(self.classes),
                  "frontend": dict(self.frontend), "num_samples": self.num_samples, "image_origin": "lower"}
        if self.representation == "logmel":
            return {**common, "input": "image", "in_shape": self.in_shape, "pixel_mean": [self.mean],
                    "pixel_std": [self.std]}
        return {**common, "input": "audio"}

    def num_batches(self, split: str) -> int:
        n = len(self.splits[split][1])
        return n // self.batch_size if split == "train" else math.ceil(n / self.eval_batch_size)

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Shuffled (drop_last) batches [start, stop) of `epoch`; waveforms are augmented per batch from a
        generator seeded by (seed, epoch, batch index)."""
        x, y = self.splits["train"]
        n_batches = self.num_batches("train")
        stop = n_batches if stop is None else min(stop, n_batches)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        order = order[: n_batches * self.batch_size].view(n_batches, self.batch_size).to(self.device)
        for i in range(start, stop):
            xb, yb = x[order[i]], y[order[i]]
            if self.representation == "waveform":
                xb = self._augment(xb, torch.Generator(device=self.device).manual_seed(_mix(seed, epoch, i)))
            yield xb, yb

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[Batch]:
        x, y = self.splits[split]
        for idx in torch.arange(len(y), device=self.device).split(self.eval_batch_size)[:stop]:
            yield x[idx], y[idx]

    @torch.no_grad()
    def sample_images(self, n: int) -> torch.Tensor:
        """Log-mel images [n, 1, n_mels, frames] in [0, 1] of the first `n` training clips, unaugmented: what the
        model sees, for the trackers' `train/samples` grid."""
        return self.pixels(self.splits["train"][0][:n])

    @torch.no_grad()
    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of this data (waveforms, or normalized log-mel images) -> log-mel images [B, 1, n_mels, frames]
        in [0, 1], lowest band in row 0: how plots (e.g. nnctl eval's worst_k.png) show clips."""
        if self.representation == "logmel":
            return (x * self.std + self.mean).clamp(0, 1)
        from nnctl.audio import frontend

        return frontend(self.frontend).to(x.device).eval()(x)

    # -- internals ------------------------------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Per clip: a circular time shift of up to +-shift samples, a gain of up to +-gain_db, and Gaussian noise
        with a standard deviation drawn uniformly in [0, noise]. x: [B, samples]."""
        b, n = x.shape
        if self.shift > 0:
            offset = torch.randint(-self.shift, self.shift + 1, (b, 1), generator=gen, device=x.device)
            x = x.gather(1, (torch.arange(n, device=x.device)[None] - offset) % n)  # [B, samples]
        if self.gain_db > 0:
            db = (torch.rand(b, 1, generator=gen, device=x.device) * 2 - 1) * self.gain_db
            x = x * torch.pow(10.0, db / 20)
        if self.noise > 0:
            level = torch.rand(b, 1, generator=gen, device=x.device) * self.noise
            x = x + level * torch.randn(x.shape, generator=gen, device=x.device)
        return x

    def _to_logmel(self) -> None:
        """Replace every split's clips with normalized log-mel images [N, 1, n_mels, frames]."""
        from nnctl.audio import frontend

        transform = frontend(self.frontend).to(self.device).eval()
        images = {k: torch.cat([transform(c) for c in x.split(256)]) for k, (x, _) in self.splits.items()}
        self.in_shape = tuple(int(s) for s in images["train"].shape[1:])  # (1, n_mels, frames)
        self.mean = float(images["train"].mean())
        self.std = max(float(images["train"].std()), 1e-3)
        self.splits = {k: ((images[k] - self.mean) / self.std, y) for k, (_, y) in self.splits.items()}


# -- a user's recordings ----------------------------------------------------------------------------------------------
class AudioFolder(AudioData):
    """<root>/<class>/*.wav|flac|ogg with a val_fraction split, or <root>/{train,val[,test]}/<class>/*."""

    name = "audio_folder"

    def load(self) -> tuple[dict[str, Split], list[str]]:
        root = Path(str(self.root))
        if self.missing_hint and not root.is_dir():  # a dataset made by a script: say how to make it
            raise UserError(f"{root} does not exist; {self.missing_hint.format(root=root)}", key="data.root")
        split_dirs, train_dir, classes = class_folders(root, "audio files", "*.wav")
        rates: set[int] = set()
        splits = {"train": self._read(train_dir, classes, rates)}
        splits.update({s: self._read(split_dirs[s], classes, rates) for s in ("val", "test") if s in split_dirs})
        if rates - {self.sample_rate}:
            log.warning("recordings at %s Hz resampled to data.sample_rate=%d Hz",
                        ", ".join(str(r) for r in sorted(rates)), self.sample_rate)
        return splits, classes

    def _read(self, directory: Path, classes: list[str], rates: set[int]) -> Split:
        """Decode every audio file of `directory`/<class>/; unreadable and empty files are skipped and counted."""
        import soundfile as sf

        clips, labels, bad = [], [], []
        for label, cls in enumerate(classes):
            for path in sorted((directory / cls).glob("*")):
                if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
                    continue
                try:
                    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [frames, channels]
                except (RuntimeError, OSError, ValueError, TypeError):  # sf.LibsndfileError is a RuntimeError
                    bad.append(path)
                    continue
                if len(wave) == 0:
                    bad.append(path)
                    continue
                rates.add(int(rate))
                clips.append(self._fit(_resample(wave.mean(axis=1), int(rate), self.sample_rate)))
                labels.append(label)
        if bad:
            log.warning("skipped %d unreadable or empty audio file(s) under %s, e.g. %s", len(bad), directory, bad[0])
        if not clips:
            raise UserError(f"no readable audio files (.wav, .flac, .ogg) under {directory}/<class>/",
                            key="data.root")
        return torch.from_numpy(np.stack(clips)), torch.tensor(labels, dtype=torch.int64)

    def _fit(self, wave: np.ndarray) -> np.ndarray:
        """Zero-pad at the end or trim to num_samples."""
        out = np.zeros(self.num_samples, dtype=np.float32)
        out[: min(len(wave), self.num_samples)] = wave[: self.num_samples]
        return out


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy's resample_poly, a Kaiser-windowed anti-aliasing filter) from `rate` to
    `target` Hz."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


# -- generated sounds -------------------------------------------------------------------------------------------------
def _tone(t: np.ndarray, f: float) -> np.ndarray:
    return np.sin(2 * np.pi * f * t)


def _chirp(t: np.ndarray, f0: float, f1: float) -> np.ndarray:
    """A linear sweep from f0 to f1 Hz over the clip."""
    return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1])))


# name -> clip from (t [samples] in seconds, base frequency, rng): the classes of data=audio_tones, in order
SOUNDS = {
    "tone": lambda t, f, rng: _tone(t, f),
    "chirp_up": lambda t, f, rng: _chirp(t, f * 0.5, f * 2),
    "chirp_down": lambda t, f, rng: _chirp(t, f * 2, f * 0.5),
    "noise_burst": lambda t, f, rng: rng.standard_normal(len(t)) * 0.5 * (np.abs(t - t.mean()) < t[-1] / 4),
    "square": lambda t, f, rng: np.sign(_tone(t, f / 2)) * 0.5,
    "tremolo": lambda t, f, rng: _tone(t, f) * (0.5 + 0.5 * _tone(t, 8.0 / t[-1])),
    "two_tones": lambda t, f, rng: 0.5 * (_tone(t, f) + _tone(t, f * 1.5)),
    "clicks": lambda t, f, rng: (np.arange(len(t)) % max(1, len(t) // 6) < 8).astype(float),
}


class AudioTones(AudioData):
    """Seeded synthetic sounds (tones, chirps, noise bursts, ...), one kind per class, each clip with its own
    random base frequency, level and a little noise: offline audio for a fresh machine and the tests."""

    name = "audio_tones"

    def __init__(self, num_samples: int, num_classes: int, noise_level: float, **kw: Any) -> None:
        super().__init__(**kw)
        if not 2 <= num_classes <= len(SOUNDS):
            raise UserError(f"got {num_classes}; audio_tones has 2 to {len(SOUNDS)} kinds of sound",
                            key="data.num_classes")
        self.count, self.kinds, self.noise_level = num_samples, list(SOUNDS)[:num_classes], noise_level

    def load(self) -> tuple[dict[str, Split], list[str]]:
        rng = np.random.default_rng(self.split_seed)
        t = np.arange(self.num_samples) / self.sample_rate
        nyquist = self.sample_rate / 2

        def make(n: int) -> Split:
            y = np.arange(n) % len(self.kinds)
            rng.shuffle(y)
            clips = np.empty((n, self.num_samples), dtype=np.float32)
            for i, label in enumerate(y):
                f = rng.uniform(0.05, 0.2) * nyquist  # chirps reach 2f < nyquist
                wave = SOUNDS[self.kinds[label]](t, f, rng) * rng.uniform(0.3, 0.9)
                clips[i] = wave + self.noise_level * rng.standard_normal(self.num_samples)
            return torch.from_numpy(clips.clip(-1, 1)), torch.from_numpy(y.astype(np.int64))

        return {"train": make(self.count), "test": make(max(len(self.kinds), self.count // 4))}, self.kinds

