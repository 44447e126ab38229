"""Augmentations that change the voice or the recording but never the words.

Each one is switchable by name (``AugmentConfig.from_names``) so its effect on unheard voices and
engines can be measured alone. Waveform augmentations run before the front end; spectrogram ones
(mel-axis warping, SpecAugment masks) after it, inside the caption's true length only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from training.speech import fast_fft_length

# Speed factors are drawn from a fixed set so resampling ratios stay cheap (small gcd with 16 kHz).
SPEED_FACTORS = (0.88, 0.92, 0.96, 1.0, 1.04, 1.08, 1.12)


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how strongly. Probabilities are per utterance."""

    speed: float = 0.0  # probability of a speed (tempo and pitch) change by a factor in SPEED_FACTORS
    noise: float = 0.0  # probability of additive white/pink noise at an SNR in noise_snr_db
    noise_snr_db: tuple[float, float] = (5.0, 30.0)
    reverb: float = 0.0  # probability of a synthetic room impulse response (RT60 in reverb_rt60)
    reverb_rt60: tuple[float, float] = (0.15, 0.6)
    equalize: float = 0.0  # probability of a smooth random EQ curve with random band limits
    mel_warp: float = 0.0  # probability of warping the mel axis (vocal tract length) by mel_warp_range
    mel_warp_range: tuple[float, float] = (0.88, 1.12)
    time_masks: int = 0  # SpecAugment: number of time masks, each up to time_mask_frames wide
    time_mask_frames: int = 20
    freq_masks: int = 0  # SpecAugment: number of mel-bin masks, each up to freq_mask_bins wide
    freq_mask_bins: int = 6
    names: tuple[str, ...] = field(default=(), compare=False)

    PRESETS = {
        "speed": {"speed": 0.8},
        "noise": {"noise": 0.5},
        "reverb": {"reverb": 0.4},
        "eq": {"equalize": 0.5},
        "vtlp": {"mel_warp": 0.8},
        "specaugment": {"time_masks": 2, "freq_masks": 2},
    }

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls()

    @classmethod
    def from_names(cls, names: str | list[str] | tuple[str, ...]) -> AugmentConfig:
        """``"speed,specaugment"`` or a list of preset names; ``"none"`` or ``""`` for no augmentation."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
        settings: dict = {}
        for name in names:
            if name not in cls.PRESETS:
                raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(cls.PRESETS)} or none")
            settings.update(cls.PRESETS[name])
        return replace(cls(), **settings, names=tuple(names))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _chance(probability: float) -> bool:
    return probability > 0 and torch.rand(()).item() < probability


def augment_waveform(wave: torch.Tensor, sample_rate: int, cfg: AugmentConfig) -> torch.Tensor:
    """wave: (N,) float in [-1, 1] -> (N',) float; randomness from torch's global generator."""
    if _chance(cfg.speed):
        factor = SPEED_FACTORS[int(torch.randint(len(SPEED_FACTORS), ()).item())]
        if factor != 1.0:
            # playing resampled audio at the original rate changes tempo and pitch together
            wave = AF.resample(wave, round(sample_rate * factor), sample_rate)
    if _chance(cfg.equalize):
        wave = _random_equalizer(wave, sample_rate)
    if _chance(cfg.reverb):
        wave = synthetic_reverb(wave, sample_rate, _uniform(*cfg.reverb_rt60))
    if _chance(cfg.noise):
        wave = _add_noise(wave, _uniform(*cfg.noise_snr_db))
    return wave


def _random_equalizer(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """A smooth random gain curve (+-9 dB) and a random band limit, applied in the frequency domain
    (zero-padded to a fast FFT length: a caption's length is often a large prime times something)."""
    n_fft = fast_fft_length(wave.shape[0])
    spectrum = torch.fft.rfft(wave, n=n_fft)
    bins = spectrum.shape[0]
    knots = torch.empty(8).uniform_(-9.0, 9.0)
    gain_db = F.interpolate(knots.view(1, 1, -1), size=bins, mode="linear", align_corners=True).view(-1)
    freqs = torch.linspace(0, sample_rate / 2, bins)
    low_cut, high_cut = _uniform(50, 300), _uniform(3000, sample_rate / 2)
    gain = 10 ** (gain_db / 20) * (freqs >= low_cut) * (freqs <= high_cut)
    return torch.fft.irfft(spectrum * gain, n=n_fft)[: wave.shape[0]]


def synthetic_reverb(wave: torch.Tensor, sample_rate: int, rt60: float, *, tail_gain: float = 0.3,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Convolve with exponentially decaying noise (a diffuse room tail, ``tail_gain`` of the direct
    path's energy) plus the direct path; peak level kept. Randomness from ``generator`` (default: torch's)."""
    length = int(rt60 * sample_rate)
    t = torch.arange(length) / sample_rate
    tail = torch.randn(length, generator=generator) * torch.exp(-6.9 * t / rt60)  # -60 dB at rt60
    tail[0] = 0.0
    impulse = torch.cat([torch.ones(1), tail_gain * tail / tail.norm().clamp_min(1e-8)])
    out = AF.fftconvolve(wave, impulse)[: wave.shape[0]]
    return out * (wave.abs().max() / out.abs().max().clamp_min(1e-8))


def _add_noise(wave: torch.Tensor, snr_db: float) -> torch.Tensor:
    noise = torch.randn_like(wave)
    if torch.rand(()).item() < 0.5:  # pink-ish: integrate white noise once, then remove drift
        noise = torch.cumsum(noise, 0)
        noise = noise - _moving_average(noise, 401)
    return mix_at_snr(wave, noise, snr_db)


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """clean + noise scaled so that their power ratio is ``snr_db`` (same shapes)."""
    power = clean.pow(2).mean().clamp_min(1e-10)
    return clean + noise * torch.sqrt(power / (noise.pow(2).mean().clamp_min(1e-10) * 10 ** (snr_db / 10)))


def _moving_average(x: torch.Tensor, width: int) -> torch.Tensor:
    """Centred moving average of x (N,) over ``width`` (odd) samples; at the ends, over the samples
    that exist. O(N) through a float64 running sum."""
    half = width // 2
    total = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(x.double(), 0)])
    index = torch.arange(x.shape[0])
    lo, hi = (index - half).clamp(min=0), (index + half + 1).clamp(max=x.shape[0])
    return ((total[hi] - total[lo]) / (hi - lo)).to(x.dtype)


def augment_logmel(logmel: torch.Tensor, length: int, cfg: AugmentConfig) -> torch.Tensor:
    """logmel: (n_mels, T) normalized, true frames [0, length) -> same shape; padding stays untouched."""
    if cfg.mel_warp <= 0 and cfg.time_masks == 0 and cfg.freq_masks == 0:
        return logmel
    logmel = logmel.clone()
    n_mels = logmel.shape[0]
    if _chance(cfg.mel_warp):
        alpha = _uniform(*cfg.mel_warp_range)
        # sample bin k of the output from bin k / alpha of the input (clamped at the top)
        source = (torch.arange(n_mels, dtype=torch.float32) / alpha).clamp(max=n_mels - 1)
        lower = source.floor().long()
        upper = (lower + 1).clamp(max=n_mels - 1)
        weight = (source - lower).unsqueeze(1)
        true = logmel[:, :length]
        logmel[:, :length] = true[lower] * (1 - weight) + true[upper] * weight
    for _ in range(cfg.freq_masks):
        width = int(torch.randint(0, cfg.freq_mask_bins + 1, ()).item())
        start = int(torch.randint(0, max(1, n_mels - width), ()).item())
        logmel[start:start + width, :length] = 0.0
    for _ in range(cfg.time_masks):
        width = min(int(torch.randint(0, cfg.time_mask_frames + 1, ()).item()), max(0, length // 8))
        start = int(torch.randint(0, max(1, length - width), ()).item())
        logmel[:, start:start + width] = 0.0
    return logmel


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB of ``noisy`` against ``clean`` (same length)."""
    noise = noisy - clean
    return 10 * math.log10(clean.pow(2).mean().item() / max(noise.pow(2).mean().item(), 1e-20))
