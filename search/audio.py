"""Query audio: bytes from a request -> a checked mono waveform at the model's sample rate.

Everything a client can send is checked here before any model work: the container or PCM layout,
the sample rate, the duration (from the header, before decoding, so a huge file costs nothing),
non-finite samples and silence. Problems raise :class:`InvalidQuery` or ``encoders.AudioDecodeError``,
each naming the input and what to change.
"""

from __future__ import annotations

import io
import math

import soundfile
import torch

from encoders import AUDIO_FORMATS_TEXT, AudioDecodeError, AudioTooLong, load_audio, waveform_from_pcm
from search.errors import InvalidQuery

# Sample rates a query may declare. Outside this range a rate is a mistake (0, a byte count, ...)
# and resampling from an absurd rate would cost unbounded memory.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 192_000
# Largest resampling filter bank (coefficients) a query's sample rate may need.
MAX_RESAMPLING_FILTER = 4_000_000
# A waveform whose peak stays below this (about -80 dBFS, under one 16-bit step) holds no speech.
SILENCE_PEAK = 1e-4


def check_sample_rate(sample_rate: int, field: str, target_rate: int = 16000, *, label: str | None = None) -> None:
    """Raise InvalidQuery unless ``sample_rate`` (Hz, of request field ``field``; ``label``: how the
    message calls it, default the field) is plausible and converts to ``target_rate`` at a bounded cost."""
    label = label or field
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidQuery(
            f"{label} is {sample_rate} Hz; it must be the rate of the samples, between "
            f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz (e.g. 16000)",
            field=field,
        )
    # Polyphase resampling builds a (target/g) x (rate/g) filter bank, g = gcd: tiny for the usual
    # rates (44100 -> 16000: 160 x 441) but gigabytes for rates with no common factor (191999 Hz).
    g = math.gcd(sample_rate, target_rate)
    if (target_rate // g) * (sample_rate // g) > MAX_RESAMPLING_FILTER:
        raise InvalidQuery(
            f"{label} is {sample_rate} Hz, which does not convert to {target_rate} Hz at a reasonable cost "
            "(the rates share no common factor); send audio at a common rate such as 8000, 16000, 22050, "
            "44100 or 48000 Hz",
            field=field,
        )


def _check_duration(seconds: float, max_seconds: float, label: str, field: str) -> None:
    if seconds > max_seconds:
        raise InvalidQuery(
            f"{label} lasts {seconds:.2f} s, longer than this server's limit of {max_seconds:g} s; "
            "send a shorter query",
            field=field,
        )


def decode_audio(
    data: bytes,
    *,
    sample_rate: int | None = None,
    target_rate: int = 16000,
    max_seconds: float = 30.0,
    name: str = "audio",
) -> torch.Tensor:
    """Decode one query's audio and check it is usable speech.

    data: a file's bytes (any of encoders.AUDIO_FORMATS_TEXT) when ``sample_rate`` is None, else raw mono
    signed 16-bit little-endian PCM at ``sample_rate`` Hz; ``name``: the request field, used in
    messages and as the BadRequest field. Returns (N,) float32 at ``target_rate``.
    Raises InvalidQuery (empty, bad rate, silent, longer than ``max_seconds``) or AudioDecodeError
    (undecodable, truncated, odd PCM byte count, NaN/inf samples).
    """
    if not data:
        raise InvalidQuery(f"{name} is empty: send an audio file ({AUDIO_FORMATS_TEXT}) or raw 16-bit PCM samples",
                           field=name)
    if sample_rate is None:
        waveform = _decode_encoded(data, target_rate, max_seconds, name)
    else:
        check_sample_rate(sample_rate, f"{name}.sample_rate", target_rate)
        _check_duration(len(data) / 2 / sample_rate, max_seconds, name, name)
        waveform = waveform_from_pcm(data, sample_rate, target_rate)
    check_not_silent(waveform, name)
    return waveform


def _decode_encoded(data: bytes, target_rate: int, max_seconds: float, name: str) -> torch.Tensor:
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.SoundFileError, RuntimeError):
        info = None  # not decodable: load_audio below raises the precise AudioDecodeError
    if info is not None:
        check_sample_rate(info.samplerate, name, target_rate, label=f"{name}'s sample rate")
        # Streaming writers leave the length unknown (frames 0 or 2**63); load_audio stops reading
        # at the limit then.
        if 0 < info.frames < 2**31 - 1:
            _check_duration(info.frames / info.samplerate, max_seconds, name, name)
    try:
        waveform = load_audio(data, sample_rate=target_rate, name=name, max_seconds=max_seconds)
    except AudioTooLong as error:
        _check_duration(error.seconds, max_seconds, name, name)
        raise
    _check_duration(waveform.numel() / target_rate, max_seconds, name, name)
    return waveform


def check_not_silent(waveform: torch.Tensor, name: str) -> None:
    """Raise InvalidQuery when ``waveform`` (N,) has no sample louder than SILENCE_PEAK."""
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    if peak < SILENCE_PEAK:
        level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
        raise InvalidQuery(f"{name} is silent ({level}): there is no speech to search with", field=name)


__all__ = ["AudioDecodeError", "check_not_silent", "check_sample_rate", "decode_audio"]
