"""Augmentations change the recording, never the words: lengths, levels, SNR, padding, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from training.augment import SPEED_FACTORS, AugmentConfig, augment_logmel, augment_waveform, snr_db
from training.speech import EspeakEngine, Voice

RATE = 16000


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    utterance = EspeakEngine().synthesize("a big red circle and a small blue star", Voice("espeak", "en-us", "en-us"),
                                          rate=175, pitch=50)
    return torch.from_numpy(utterance.waveform)


def band_energy_db(wave: torch.Tensor, low: float, high: float) -> float:
    power = torch.fft.rfft(wave.double()).abs() ** 2
    freqs = torch.fft.rfftfreq(wave.shape[0], 1 / RATE)
    return 10 * float(torch.log10(power[(freqs >= low) & (freqs < high)].sum() + 1e-20))


def test_names_select_presets_and_unknown_names_are_refused():
    assert AugmentConfig.from_names("none") == AugmentConfig.none()
    cfg = AugmentConfig.from_names("speed,noise,eq,vtlp,specaugment")
    assert cfg.speed > 0 and cfg.noise > 0 and cfg.equalize > 0 and cfg.mel_warp > 0 and cfg.time_masks > 0
    assert cfg.reverb == 0
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown augmentation 'echo'; choose from speed, noise"):
        AugmentConfig.from_names("speed,echo")


def test_no_augmentation_returns_the_recording_unchanged(speech):
    assert torch.equal(augment_waveform(speech, RATE, AugmentConfig.none()), speech)


@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_noise_lands_at_the_drawn_snr_white_or_pink(speech, snr):
    cfg = replace(AugmentConfig.none(), noise=1.0, noise_snr_db=(snr, snr))
    for seed in range(6):  # both kinds (white and pink-ish) are drawn among these seeds
        torch.manual_seed(seed)
        noisy = augment_waveform(speech, RATE, cfg)
        assert noisy.shape == speech.shape
        assert abs(snr_db(speech, noisy) - snr) < 0.05


def test_equalizer_keeps_length_and_words_but_colours_and_band_limits(speech):
    cfg = replace(AugmentConfig.none(), equalize=1.0)
    changed = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = augment_waveform(speech, RATE, cfg)
        assert out.shape == speech.shape and torch.isfinite(out).all()
        # the band limit: what lies below 50 Hz is always cut, the speech band mostly kept
        assert band_energy_db(out, 0, 45) < band_energy_db(speech, 0, 45) - 20
        assert abs(band_energy_db(out, 300, 3000) - band_energy_db(speech, 300, 3000)) < 12
        changed.append(float((out - speech).abs().mean()))
    assert min(changed) > 1e-4


def test_speed_changes_length_by_one_of_the_factors(speech):
    cfg = replace(AugmentConfig.none(), speed=1.0)
    ratios = set()
    for seed in range(20):
        torch.manual_seed(seed)
        ratio = speech.shape[0] / augment_waveform(speech, RATE, cfg).shape[0]
        assert min(abs(ratio - f) for f in SPEED_FACTORS) < 0.002
        ratios.add(round(ratio, 2))
    assert len(ratios) >= 4


def test_the_same_seed_gives_the_same_augmentation(speech):
    cfg = AugmentConfig.from_names("speed,noise,eq")
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(augment_waveform(speech, RATE, cfg))
    assert torch.equal(outs[0], outs[1])


def test_spectrogram_augmentations_leave_the_padding_alone():
    logmel = torch.randn(40, 120)
    logmel[:, 90:] = 0.0
    cfg = replace(AugmentConfig.from_names("vtlp,specaugment"), mel_warp=1.0)
    torch.manual_seed(0)
    out = augment_logmel(logmel, 90, cfg)
    assert out.shape == logmel.shape
    assert torch.equal(out[:, 90:], logmel[:, 90:])
    assert not torch.equal(out[:, :90], logmel[:, :90])
    assert np.isfinite(out.numpy()).all()
