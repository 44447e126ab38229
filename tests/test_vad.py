"""search.vad computes Silero's speech probabilities in one pass; they must be what the package's own
frame-by-frame loop computes, so the spans (and every query's cut) stay the same."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from silero_vad import get_speech_timestamps

from search import vad
from training.manifest import load_manifest


def streaming(waveform: torch.Tensor, sample_rate: int) -> tuple[list[float], list[tuple[int, int]]]:
    """The package's reference: its model called once per frame, state carried by the model."""
    model = vad._silero()
    size = vad.FRAME_SAMPLES[sample_rate]
    model.reset_states()
    probabilities = []
    with torch.inference_mode():
        for start in range(0, waveform.numel(), size):
            frame = torch.nn.functional.pad(waveform[start : start + size], (0, max(0, start + size - waveform.numel())))
            probabilities.append(model(frame, sample_rate).item())
        spans = get_speech_timestamps(waveform, model, sampling_rate=sample_rate)
    return probabilities, [(s["start"], s["end"]) for s in spans]


def captions(tiny_corpus, count: int) -> list[torch.Tensor]:
    val = load_manifest(tiny_corpus / "val.json")
    out = []
    for entry in val.entries[:count]:
        samples, rate = sf.read(val.audio_path(entry), dtype="float32")
        assert rate == 16000
        out.append(torch.from_numpy(samples))
    return out


@pytest.mark.parametrize("sample_rate", [16000, 8000])
def test_one_pass_probabilities_and_spans_are_the_streaming_loops(tiny_corpus, sample_rate):
    rng = np.random.default_rng(0)
    waves = captions(tiny_corpus, 4)
    noise = torch.from_numpy(rng.normal(0, 0.01, 16000 * 2).astype(np.float32))  # faint noise, then a caption
    waves += [torch.cat([noise, waves[0], noise[:7000]]), torch.zeros(16000), waves[1][:300]]
    for wave in waves:
        if sample_rate != 16000:
            wave = torchaudio.functional.resample(wave, 16000, sample_rate)
        want_probabilities, want_spans = streaming(wave, sample_rate)
        got = vad.speech_probabilities(wave, sample_rate)
        assert got.shape == (len(want_probabilities),)
        np.testing.assert_allclose(got.numpy(), want_probabilities, atol=1e-4)
        assert vad.speech_spans(wave, sample_rate) == want_spans
    assert any(streaming(w, 16000)[1] for w in captions(tiny_corpus, 4))  # the captions do hold speech
    assert vad.speech_spans(torch.zeros(16000), 16000) == [] and vad.speech_spans(torch.zeros(0), 16000) == []


def test_other_rates_are_refused_by_name():
    with pytest.raises(ValueError, match="22050"):
        vad.speech_probabilities(torch.zeros(22050), 22050)
    with pytest.raises(ValueError, match="22050"):
        vad.speech_spans(torch.zeros(0), 22050)  # even with no audio to look at


def test_queries_of_every_length_reach_the_network_in_a_few_shapes(monkeypatch, tiny_corpus):
    """oneDNN makes primitives per input shape: 22 query lengths must reach the LSTM as a few frame
    counts (multiples of FRAME_MULTIPLE), with each query's probabilities those of its own frames."""
    seen: list[int] = []
    lstm = torch.lstm
    monkeypatch.setattr(vad.torch, "lstm", lambda x, *rest: seen.append(x.shape[0]) or lstm(x, *rest))
    caption = captions(tiny_corpus, 1)[0]
    lengths = range(16000, 48000, 1500)
    for n in lengths:
        wave = torch.nn.functional.pad(caption, (0, max(0, n - caption.numel())))[:n]
        assert vad.speech_probabilities(wave, 16000).shape == (-(-n // vad.FRAME_SAMPLES[16000]),)
    assert len(set(seen)) <= 5 < len(set(lengths)) and all(s % vad.FRAME_MULTIPLE == 0 for s in seen)


def test_loading_the_vad_leaves_torchs_threads_as_they_were():
    """silero_vad's import sets torch's threads to 1 for the whole process: every query's encoding and
    scoring then ran on one core of two (docs/search.md, "A hundred thousand images in 20 ms")."""
    code = ("import torch; torch.set_num_threads(2); from search import vad; "
            "vad.speech_probabilities(torch.zeros(16000), 16000); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split()[-1] == "2"
