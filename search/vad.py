"""Voice activity: the stretch of a query that holds speech, found by Silero VAD (the ``silero-vad``
package; its small neural model ships inside the package, nothing is downloaded).

MISA averages over every frame of the query, so non-speech inside it costs dearly: 11 s of faint
noise (-40 dBFS) before a caption left its image out of the top 10 for 16 of 16 captions. An energy
threshold (``encoders.trim_silence``) keeps such noise, since it is far louder than silence; the VAD
tells it from speech. Only the ends are cut (from the first to the last stretch of speech, with a
margin), so pauses inside the speech keep their timing.

WebRTC's VAD (webrtcvad-wheels) was tried first: 50x cheaper, but after a caption it took 3 s of
trailing -40 dBFS white noise for speech; Silero found the caption within 0.02 s at noise levels up
to -20 dBFS. It costs about 7 ms per second of audio on one core (bench/bench_robustness.py).
"""

from __future__ import annotations

import threading
import warnings

import torch

from encoders import trim_silence

MARGIN_SECONDS = 0.25  # kept on each side, as trim_silence does (the training captions have 0.09-0.31 s)
VAD_RATES = (8000, 16000)  # the rates Silero VAD takes
_models = threading.local()  # the model keeps state across chunks: one per thread


def _model():
    if not hasattr(_models, "vad"):
        from silero_vad import load_silero_vad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            _models.vad = load_silero_vad()
    return _models.vad


def speech_spans(waveform: torch.Tensor, sample_rate: int) -> list[tuple[int, int]]:
    """(N,) float waveform at ``sample_rate`` (8 or 16 kHz) -> [start, stop) samples of each stretch
    of speech, in order; empty when there is none."""
    if sample_rate not in VAD_RATES:
        raise ValueError(f"the VAD takes audio at {VAD_RATES} Hz, got {sample_rate}")
    from silero_vad import get_speech_timestamps

    samples = waveform.detach().to("cpu", torch.float32)
    with torch.inference_mode():
        stamps = get_speech_timestamps(samples, _model(), sampling_rate=sample_rate)
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def keep_speech(waveform: torch.Tensor, sample_rate: int, margin_seconds: float = MARGIN_SECONDS) -> torch.Tensor:
    """The query's speech: its leading and trailing silence trimmed (``encoders.trim_silence``), then
    cut from the first to the last stretch the VAD hears, ``margin_seconds`` wider each side. Where
    the VAD hears no speech at all (a hum, a whistle), only the silence trim.

    Trimming first makes the answer independent of how much silence surrounds a query: the VAD sees
    the same samples either way (it reads 32 ms chunks from the start, so an offset would move its cut)."""
    waveform = trim_silence(waveform, sample_rate, margin_seconds)
    spans = speech_spans(waveform, sample_rate)
    if not spans:
        return waveform
    margin = round(margin_seconds * sample_rate)
    return waveform[max(0, spans[0][0] - margin) : min(waveform.numel(), spans[-1][1] + margin)]
