"""Voice activity: the stretch of a query that holds speech, found by Silero VAD (the ``silero-vad``
package; its small neural model ships inside the package, nothing is downloaded).

MISA averages over every frame of the query, so non-speech inside it costs dearly: 11 s of faint
noise (-40 dBFS) before a caption left its image out of the top 10 for 16 of 16 captions. An energy
threshold (``encoders.trim_silence``) keeps such noise, since it is far louder than silence; the VAD
tells it from speech. Only the ends are cut (from the first to the last stretch of speech, with a
margin), so pauses inside the speech keep their timing.

WebRTC's VAD (webrtcvad-wheels) was tried first: 50x cheaper, but after a caption it took 3 s of
trailing -40 dBFS white noise for speech; Silero found the caption within 0.02 s at noise levels up
to -20 dBFS.

Silero's own loop (``get_speech_timestamps``) calls the model once per 32 ms frame, about 7 ms per
second of audio on one core. Only the model's LSTM carries anything from frame to frame: here the
spectrogram and convolutions run over every frame at once and the LSTM in one ``torch.lstm`` call
(``speech_probabilities``), with the package's own weights and its own thresholding
(``get_speech_timestamps_from_probs``). The spans are the same as its loop's (tests/test_vad.py;
probabilities within 1e-4) at a fraction of the time (bench/bench_vad.py; figures in docs/search.md).

Every query has its own length, and oneDNN makes a new convolution and LSTM primitive for every new
input shape (about 4 ms each here): so the frames are zero-padded to a multiple of ``FRAME_MULTIPLE``
and the padding's probabilities dropped. The LSTM runs forward in time, so frames after the last
real one change nothing before it; a server then meets a few dozen shapes in its life, not one per query.
"""

from __future__ import annotations

import math
import threading
import warnings

import torch

from encoders import trim_silence
from search.threads import one_core

MARGIN_SECONDS = 0.25  # kept on each side, as trim_silence does (the training captions have 0.09-0.31 s)
VAD_RATES = (8000, 16000)  # the rates Silero VAD takes
FRAME_SAMPLES = {16000: 512, 8000: 256}  # Silero's frame (32 ms) at each rate
CONTEXT_SAMPLES = {16000: 64, 8000: 32}  # the end of the previous frame, which the model sees before each frame
FRAME_MULTIPLE = 16  # frames (0.5 s) the network's input is padded to a multiple of, so shapes repeat
_loaded = threading.Lock()
_model = None  # the package's TorchScript model; only its stateless parts and weights are used here


def _silero():
    global _model
    with _loaded:
        if _model is None:
            threads = torch.get_num_threads()  # silero_vad's import sets them to 1, for the whole process
            from silero_vad import load_silero_vad

            torch.set_num_threads(threads)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)  # the package's importlib.resources.path
                _model = load_silero_vad()
    return _model


def speech_probabilities(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(N,) float waveform at ``sample_rate`` (8 or 16 kHz) -> (frames,) Silero's speech probability of
    each 32 ms frame, as its streaming loop computes them (the last frame zero-padded), in one pass."""
    if sample_rate not in VAD_RATES:
        raise ValueError(f"the VAD takes audio at {VAD_RATES} Hz, got {sample_rate}")
    silero = _silero()
    net = silero._model if sample_rate == 16000 else silero._model_8k
    size, context = FRAME_SAMPLES[sample_rate], CONTEXT_SAMPLES[sample_rate]
    samples = waveform.detach().to("cpu", torch.float32).reshape(-1)
    count = max(1, -(-samples.numel() // size))
    padded = -(-count // FRAME_MULTIPLE) * FRAME_MULTIPLE  # a shape seen before (see the module's notes)
    frames = torch.nn.functional.pad(samples, (0, padded * size - samples.numel())).view(padded, size)
    before = torch.cat([frames.new_zeros(1, context), frames[:-1, -context:]])
    with torch.inference_mode():
        features = net.encoder(net.run_extractors(torch.cat([before, frames], 1))).squeeze(-1)  # (frames, 128)
        cell = net.decoder.rnn  # an LSTMCell, run over the frames as a one-layer LSTM
        zeros = features.new_zeros(1, 1, cell.weight_hh.shape[1])
        with one_core():  # a hundred tiny steps: a team of two costs more than it gives (search.threads)
            hidden = torch.lstm(features.unsqueeze(1), (zeros, zeros),
                                [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh],
                                True, 1, 0.0, False, False, False)[0]  # biases, layers, dropout, train, bidir, batch_first
        return net.decoder.decoder(hidden.squeeze(1).unsqueeze(-1)).squeeze(1).mean(1)[:count]


def padded_sample_counts(max_seconds: float, sample_rate: int) -> range:
    """One length of audio, in samples, for each shape the network meets on audio of up to
    ``max_seconds`` (frames padded to a multiple of FRAME_MULTIPLE): what a server warms at start."""
    step = FRAME_SAMPLES[sample_rate] * FRAME_MULTIPLE
    return range(step, math.ceil(max_seconds * sample_rate / step) * step + 1, step)


def speech_spans(waveform: torch.Tensor, sample_rate: int) -> list[tuple[int, int]]:
    """(N,) float waveform at ``sample_rate`` (8 or 16 kHz) -> [start, stop) samples of each stretch
    of speech, in order; empty when there is none. Silero's default thresholds and durations."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    probabilities = speech_probabilities(waveform, sample_rate).tolist()  # checks the rate, even of no audio
    if waveform.numel() == 0:
        return []
    stamps = get_speech_timestamps_from_probs(probabilities, sampling_rate=sample_rate,
                                              audio_length_samples=waveform.numel())
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def keep_speech(waveform: torch.Tensor, sample_rate: int, margin_seconds: float = MARGIN_SECONDS) -> torch.Tensor:
    """The query's speech: its leading and trailing silence trimmed (``encoders.trim_silence``), then
    cut from the first to the last stretch the VAD hears, ``margin_seconds`` wider each side. Where
    the VAD hears no speech at all (a hum, a whistle), only the silence trim.

    Trimming first makes the answer independent of how much silence surrounds a query: the VAD sees
    the same samples either way (it reads 32 ms chunks from the start, so an offset would move its cut)."""
    return speech_cut(trim_silence(waveform, sample_rate, margin_seconds), sample_rate, margin_seconds)


def speech_cut(trimmed: torch.Tensor, sample_rate: int, margin_seconds: float = MARGIN_SECONDS) -> torch.Tensor:
    """keep_speech's second step: ``trimmed`` (its silence already trimmed with ``margin_seconds``) cut
    from the first to the last stretch of speech, ``margin_seconds`` wider each side; ``trimmed``
    itself (the same tensor) when that keeps all of it or the VAD hears no speech."""
    spans = speech_spans(trimmed, sample_rate)
    if not spans:
        return trimmed
    margin = round(margin_seconds * sample_rate)
    start, stop = max(0, spans[0][0] - margin), min(trimmed.numel(), spans[-1][1] + margin)
    return trimmed if (start, stop) == (0, trimmed.numel()) else trimmed[start:stop]
