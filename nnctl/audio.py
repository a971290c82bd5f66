"""Audio signal processing in torch: the log-mel front end (STFT -> mel filterbank -> dB scaled to [0, 1]), its
approximate inverse (mel -> linear spectrum -> Griffin-Lim), and .wav output.

A log-mel spectrogram here is a one-channel image with pixels in [0, 1]: `top_db` decibels below full scale map to
0 and full scale to 1, a fixed mapping (not per clip), so generated spectrograms can be turned back into sound at
their level. The front end's settings are the data's `frontend` block, carried in the data's spec, so a classifier
that owns a LogMel and the `logmel` representation a diffusion model learns are the same transform.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from nnctl.errors import UserError


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                   norm: str | None = "slaney") -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft // 2 + 1] on Slaney's scale, as librosa.filters.mel computes them;
    norm="slaney" scales each triangle to unit area per Hz, None keeps peaks at 1."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # band edges
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]  # [n_mels + 2, F]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))  # [n_mels, F]
    if norm == "slaney":
        weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


class LogMel(nn.Module):
    """Waveforms [B, samples] -> log-mel images [B, 1, n_mels, frames] in [0, 1].

    The STFT is scaled by the window's sum, so a full-scale sine peaks near 0 dB whatever n_fft is. In training mode
    SpecAugment masks `time_masks` bands of up to `time_mask_width` frames and `freq_masks` bands of up to
    `freq_mask_width` mel bins (set to 0, silence) per clip, drawn from torch's global generator, which the engine
    checkpoints: a resumed run draws the same masks."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, fmin: float = 0.0,
                 fmax: float | None = None, top_db: float = 80.0, time_masks: int = 0, time_mask_width: int = 0,
                 freq_masks: int = 0, freq_mask_width: int = 0) -> None:
        super().__init__()
        if n_fft < 2 or hop_length < 1 or n_mels < 1:
            raise UserError(f"got n_fft={n_fft}, hop_length={hop_length}, n_mels={n_mels}; expected n_fft >= 2, "
                            "hop_length >= 1, n_mels >= 1", key="data.frontend")
        if n_mels > n_fft // 2 + 1:
            raise UserError(f"got n_mels={n_mels} mel bands from only {n_fft // 2 + 1} frequency bins; lower "
                            "data.frontend.n_mels or raise data.frontend.n_fft", key="data.frontend.n_mels")
        self.sample_rate, self.n_fft, self.hop_length, self.top_db = sample_rate, n_fft, hop_length, top_db
        self.masks = (time_masks, time_mask_width, freq_masks, freq_mask_width)
        window = torch.hann_window(n_fft)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, norm=None),
                             persistent=False)  # derived from the config: not stored in checkpoints
        self.scale = float(window.sum())

    def frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_length  # torch.stft with center=True

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> mel power [B, n_mels, frames]."""
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          return_complex=True)  # [B, F, T]
        return self.mel @ (spec.abs() / self.scale).pow(2)  # [n_mels, F] @ [B, F, T] -> [B, n_mels, T]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        db = 10 * torch.log10(self.power(wave).clamp_min(1e-10))
        image = (db / self.top_db + 1).clamp(0, 1).unsqueeze(1)  # [B, 1, n_mels, T]: 0 dB -> 1, -top_db -> 0
        if self.training and any(self.masks):
            image = self._spec_augment(image)
        return image

    def _spec_augment(self, image: torch.Tensor) -> torch.Tensor:
        b, _, m, t = image.shape
        keep = torch.ones(b, 1, m, t, device=image.device)
        time_masks, time_width, freq_masks, freq_width = self.masks
        for count, width, size, dim in ((time_masks, time_width, t, 3), (freq_masks, freq_width, m, 2)):
            pos = torch.arange(size, device=image.device)
            for _ in range(count if width > 0 else 0):
                w = torch.randint(0, width + 1, (b,), device=image.device)
                start = (torch.rand(b, device=image.device) * (size - w + 1)).long()
                band = (pos[None] >= start[:, None]) & (pos[None] < (start + w)[:, None])  # [B, size]
                shape = (b, 1, 1, size) if dim == 3 else (b, 1, size, 1)
                keep = keep * (~band).float().view(shape)
        return image * keep

    def to_power(self, image: torch.Tensor) -> torch.Tensor:
        """Log-mel images [B, 1, n_mels, T] in [0, 1] -> mel power [B, n_mels, T] (the inverse of the dB map)."""
        db = (image.squeeze(1).float() - 1) * self.top_db
        return torch.pow(10.0, db / 10)

    def to_linear(self, mel_power: torch.Tensor) -> torch.Tensor:
        """Mel power [B, n_mels, T] -> a non-negative linear magnitude [B, F, T] (least squares through the
        filterbank's pseudo-inverse, clipped at 0), in the STFT's own (unscaled) units."""
        inverse = torch.linalg.pinv(self.mel.double()).float()  # [F, n_mels]
        return (inverse @ mel_power).clamp_min(0).sqrt() * self.scale

    def griffin_lim(self, magnitude: torch.Tensor, num_samples: int, iters: int = 32, momentum: float = 0.99,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Magnitudes [B, F, T] -> waveforms [B, num_samples] by fast Griffin-Lim (Perraudin et al. 2013), batched.
        Random initial phases from `generator`: the same generator state gives the same sound."""
        stft = lambda x: torch.stft(x, self.n_fft, self.hop_length, window=self.window, center=True,  # noqa: E731
                                    return_complex=True)
        istft = lambda s: torch.istft(s, self.n_fft, self.hop_length, window=self.window, center=True,  # noqa: E731
                                      length=num_samples)
        phase = torch.rand(magnitude.shape, generator=generator, device=magnitude.device) * (2 * math.pi)
        angles = torch.polar(torch.ones_like(magnitude), phase)
        previous = torch.zeros_like(angles)
        for _ in range(iters):
            rebuilt = stft(istft(magnitude * angles))
            accelerated = rebuilt - (momentum / (1 + momentum)) * previous
            angles = accelerated / accelerated.abs().clamp_min(1e-16)
            previous = rebuilt
        return istft(magnitude * angles).clamp(-1, 1)

    @torch.no_grad()
    def to_waveform(self, image: torch.Tensor, num_samples: int, iters: int = 32,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-mel images [B, 1, n_mels, T] in [0, 1] -> waveforms [B, num_samples] in [-1, 1]."""
        return self.griffin_lim(self.to_linear(self.to_power(image)), num_samples, iters, generator=generator)


def frontend(settings: dict[str, Any], **masks: int) -> LogMel:
    """The LogMel a data module's `frontend` spec entry describes (sample_rate included), with SpecAugment masks."""
    return LogMel(**settings, **masks)


def write_wavs(waves: torch.Tensor, sample_rate: int, directory: Path, names: Sequence[str]) -> list[Path]:
    """Waveforms [B, samples] in [-1, 1] -> 16-bit PCM .wav files `directory/<name>.wav`."""
    import soundfile as sf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for wave, name in zip(waves.detach().float().cpu().numpy(), names):
        path = directory / f"{name}.wav"
        sf.write(str(path), wave, sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def write_clips(images: torch.Tensor, spec: dict[str, Any], labels: torch.Tensor | None, directory: Path,
                iters: int = 32, seed: int = 0) -> list[Path]:
    """Generated log-mel images [B, 1, n_mels, T] in [0, 1] -> `directory/NNNN[_class].wav` at the data's sample
    rate and clip length, through Griffin-Lim with phases from `seed`."""
    settings = spec["frontend"]
    transform = frontend(settings).to(images.device)
    gen = torch.Generator(device=images.device).manual_seed(seed)
    waves = transform.to_waveform(images, spec["num_samples"], iters, gen)  # [B, samples]
    classes = spec["classes"]
    names = [f"{i:04d}" + ("" if labels is None else f"_{classes[int(c)]}")
             for i, c in enumerate(labels if labels is not None else [None] * len(waves))]
    return write_wavs(waves, int(settings["sample_rate"]), directory, names)
