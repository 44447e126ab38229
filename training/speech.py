"""Speech synthesis for the spoken-scenes corpus: pluggable engines that return word-timed 16 kHz audio.

An engine (``SpeechEngine``) lists its voices and turns a caption into an ``Utterance``: a waveform
at 16 kHz and the time span of every spoken word. ``ENGINES`` maps engine names to their classes;
adding an engine means writing one class and one row there. Three exist: ``espeak`` (formant
synthesis, many accents and variants), ``festival`` (diphone and HTS voices, see ``FestivalEngine``)
and ``flite`` (clustergen and diphone voices, see ``FliteEngine``): different enough that a model
trained on some can be tested on another.

The espeak-ng engine drives libespeak-ng through ctypes in synchronous mode. Word onsets come from
its word events (and its phoneme events where espeak speaks two words as one, e.g. "on the"); word
ends come from the audio: the next word's onset minus the silence before it (short-time energy).

Voices are split into train and val once and for all (``train_val_voices``): the split depends on
the voice id only, never on a seed, so val voices never occur in any training corpus.
"""

from __future__ import annotations

import atexit
import ctypes
import difflib
import hashlib
import math
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import soundfile

SAMPLE_RATE = 16_000
VAL_VOICE_FRACTION = 0.2
# Energy frames for word boundaries: 10 ms; a frame is speech when within SPEECH_RANGE_DB of the loud frames.
FRAME_SECONDS = 0.010
SPEECH_RANGE_DB = 40.0
PEAK_LIMIT = 0.98


@dataclass(frozen=True)
class Voice:
    """One voice of one engine; ``name`` is what the engine understands (espeak: ``"en-us+f3"``)."""

    engine: str
    name: str
    language: str

    @property
    def id(self) -> str:
        """Globally unique voice id, e.g. ``"espeak:en-us+f3"``; the manifests' ``speaker``."""
        return f"{self.engine}:{self.name}"


@dataclass(frozen=True)
class TimedWord:
    """A spoken word and its span in the waveform, in seconds."""

    word: str
    start: float
    end: float


@dataclass
class Utterance:
    """Synthesized speech: ``waveform`` (N,) float32 in [-1, 1] at ``sample_rate`` Hz, and its words."""

    waveform: np.ndarray
    sample_rate: int
    words: list[TimedWord]

    @property
    def duration(self) -> float:
        return len(self.waveform) / self.sample_rate


class SpeechEngine(Protocol):
    """A speech synthesizer usable by the corpus generator.

    Engines must be cheap to construct and picklable (worker processes build their own), and
    ``synthesize`` must be deterministic: the same arguments give the same samples in any process.
    """

    name: str

    def voices(self) -> list[Voice]:
        """Every voice this engine offers to the corpus, sorted by id."""
        ...

    def synthesize(self, text: str, voice: Voice, rate: int, pitch: int) -> Utterance:
        """Speak ``text``: rate in words per minute (80-450), pitch 0-100 (50 = the voice's own).

        Returns 16 kHz audio whose ``words`` are the words of ``text`` (lowercased, punctuation
        stripped, see ``caption_words``) in order, with their spans in the audio.
        """
        ...


class SpeechEngineError(RuntimeError):
    """A speech engine that is missing, failed to start, or failed to speak a text."""


_WORD_CHARS = re.compile(r"[^\w']+")


def caption_words(text: str) -> list[tuple[str, int]]:
    """The spoken words of ``text`` and the character offset where each starts.

    ``"a red circle, a star"`` -> ``[("a", 0), ("red", 2), ("circle", 6), ("a", 14), ("star", 16)]``:
    whitespace-separated tokens, lowercased, punctuation stripped, empty tokens dropped.
    """
    words = []
    for match in re.finditer(r"\S+", text):
        word = _WORD_CHARS.sub("", match.group()).lower()
        if word:
            words.append((word, match.start()))
    return words


def check_request(engine_name: str, text: str, voice: Voice, rate: int, pitch: int) -> list[tuple[str, int]]:
    """Validate the arguments of ``SpeechEngine.synthesize``; returns ``caption_words(text)``.

    ValueError when the voice belongs to another engine, rate is outside 80-450 words per minute,
    pitch outside 0-100, or the text holds no word.
    """
    if voice.engine != engine_name:
        raise ValueError(f"voice {voice.id} belongs to engine {voice.engine!r}, not {engine_name!r}")
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be 80-450 words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be 0-100 (50 = normal), got {pitch}")
    words = caption_words(text)
    if not words:
        raise ValueError(f"nothing to speak in text {text!r}")
    return words


# ----------------------------------------------------------------------------------------------
# Signal helpers shared by every engine


def fast_fft_length(minimum: int) -> int:
    """The smallest 2^a 3^b 5^c >= minimum: a length FFTs handle without their slow prime-size path."""
    best = 1 << max(minimum - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            candidate = power35
            while candidate < minimum:
                candidate *= 2
            best = min(best, candidate)
            power35 *= 3
        power5 *= 5
    return best


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain: ``waveform`` (N,) at ``orig_rate`` -> (M,) float32.

    M = ceil(N * new_rate / orig_rate). The signal is zero-padded (so the FFT's wrap-around meets
    silence), its spectrum cut or extended at the new Nyquist frequency, and transformed back.
    Pure numpy and deterministic (the same bytes in every process), which the corpus relies on.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"resample: waveform must be 1-D (N,), got shape {waveform.shape}")
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {orig_rate} -> {new_rate}")
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    n_out = math.ceil(len(waveform) * up / down)
    if up == down or len(waveform) == 0:
        return waveform.astype(np.float32)
    blocks = fast_fft_length(math.ceil((len(waveform) + 256) / down))
    n_in, n_new = blocks * down, blocks * up
    spectrum = np.fft.rfft(waveform, n=n_in)
    kept = min(len(spectrum), n_new // 2 + 1)
    new_spectrum = np.zeros(n_new // 2 + 1, dtype=complex)
    new_spectrum[:kept] = spectrum[:kept]
    new_spectrum[min(n_in, n_new) // 2:] = 0.0  # no energy at or above the lower Nyquist frequency
    return (np.fft.irfft(new_spectrum, n=n_new)[:n_out] * (n_new / n_in)).astype(np.float32)


def frame_levels_db(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS level of consecutive 10 ms frames: waveform (N,) -> (ceil(N / frame),) dBFS."""
    frame = max(1, round(FRAME_SECONDS * sample_rate))
    n_frames = math.ceil(len(waveform) / frame)
    padded = np.zeros(n_frames * frame, np.float32)
    padded[: len(waveform)] = waveform
    power = (padded.reshape(n_frames, frame).astype(np.float64) ** 2).mean(axis=1)
    return 10.0 * np.log10(power + 1e-12)


def speech_frames(levels_db: np.ndarray) -> np.ndarray:
    """Which frames carry speech: (F,) dB -> (F,) bool, within SPEECH_RANGE_DB of the loud frames."""
    audible = levels_db[levels_db > -100.0]
    if audible.size == 0:
        return np.zeros_like(levels_db, dtype=bool)
    reference = np.percentile(audible, 95)
    return levels_db > max(reference - SPEECH_RANGE_DB, -80.0)


def timed_words(waveform: np.ndarray, sample_rate: int, words: list[str], onsets: list[float],
                ends: list[float] | None = None) -> list[TimedWord]:
    """Word spans from onsets and the audio: each word runs from its onset to its end, with the
    silence at both ends of that stretch removed (10 ms energy frames).

    waveform: (N,) float; words and onsets (seconds, non-decreasing): one per word. ends (seconds,
    one per word): where each word ends when the engine knows it; without them a word ends at the
    next word's onset, and the last one where speech energy ends.
    """
    if len(words) != len(onsets) or (ends is not None and len(ends) != len(words)):
        raise ValueError(f"timed_words: {len(words)} words but {len(onsets)} onsets"
                         + ("" if ends is None else f" and {len(ends)} ends"))
    frame = FRAME_SECONDS
    active = speech_frames(frame_levels_db(waveform, sample_rate))
    n_frames = len(active)
    duration = len(waveform) / sample_rate
    stops = [*onsets[1:], duration] if ends is None else ends
    out = []
    for i, word in enumerate(words):
        lo = min(int(round(onsets[i] / frame)), n_frames)
        hi = min(max(int(round(stops[i] / frame)), lo + 1), n_frames)
        speech = np.flatnonzero(active[lo:hi])
        if speech.size:  # trim the silence on both sides of the word
            start, end = (lo + speech[0]) * frame, (lo + speech[-1] + 1) * frame
        else:  # no energy above threshold: keep the whole stretch
            start, end = onsets[i], max(onsets[i], stops[i])
        out.append(TimedWord(word, float(min(start, duration)), float(min(end, duration))))
    return out


def warped_utterance(samples: np.ndarray, native_rate: int, warp: float, words: list[str],
                     spans: list[tuple[float, float]]) -> Utterance:
    """An engine's int16 samples read as if recorded at native_rate * warp (every frequency and the
    tempo scale by warp), at 16 kHz, with its word spans (seconds, in the engine's own timing)
    scaled to match and trimmed to speech energy by ``timed_words``."""
    warped_rate = round(native_rate * warp)
    scale = native_rate / warped_rate
    waveform = resample(samples.astype(np.float32) / 32768.0, warped_rate, SAMPLE_RATE)
    return Utterance(waveform, SAMPLE_RATE, timed_words(waveform, SAMPLE_RATE, words,
                                                        [start * scale for start, _ in spans],
                                                        [end * scale for _, end in spans]))


def finish_utterance(utterance: Utterance, *, lead_seconds: float, trail_seconds: float,
                     level_dbfs: float) -> Utterance:
    """Frame the speech with exactly ``lead_seconds`` / ``trail_seconds`` of audio before the first word
    and after the last (zero-padded where the engine gave less), and scale it so that its loud frames
    (95th percentile of 10 ms RMS) sit at ``level_dbfs``, peaks limited to 0.98.
    """
    if lead_seconds < 0 or trail_seconds < 0:
        raise ValueError(f"finish_utterance: lead/trail must be >= 0 s, got {lead_seconds}, {trail_seconds}")
    if not utterance.words:
        raise ValueError("finish_utterance: the utterance has no words")
    sr = utterance.sample_rate
    first = round(utterance.words[0].start * sr)
    last = round(utterance.words[-1].end * sr)
    begin, stop = first - round(lead_seconds * sr), last + round(trail_seconds * sr)
    framed = np.zeros(stop - begin, np.float32)
    src = utterance.waveform[max(begin, 0): min(stop, len(utterance.waveform))]
    framed[max(-begin, 0): max(-begin, 0) + len(src)] = src

    levels = frame_levels_db(framed, sr)
    loud = np.percentile(levels[speech_frames(levels)], 95) if speech_frames(levels).any() else -100.0
    gain = 10.0 ** ((level_dbfs - loud) / 20.0) if loud > -100.0 else 1.0
    peak = float(np.abs(framed).max()) * gain
    if peak > PEAK_LIMIT:
        gain *= PEAK_LIMIT / peak
    framed *= np.float32(gain)

    shift = begin / sr
    words = [replace(w, start=round(w.start - shift, 3), end=round(w.end - shift, 3)) for w in utterance.words]
    return Utterance(framed, sr, words)


# ----------------------------------------------------------------------------------------------
# espeak-ng

ESPEAK_LIBRARY = "libespeak-ng.so.1"
# Accents of English espeak-ng ships: voice file name (what espeak_SetVoiceByName takes) -> language.
ESPEAK_ACCENTS = {
    "en-us": "en-us", "en": "en-gb", "en-gb-scotland": "en-gb-scotland", "en-gb-x-rp": "en-gb-x-rp",
    "en-gb-x-gbclan": "en-gb-x-gbclan", "en-gb-x-gbcwmd": "en-gb-x-gbcwmd", "en-029": "en-029",
    "en-us-nyc": "en-us-nyc",
}
# Variants from espeak-ng-data/voices/!v judged intelligible from their definitions: the numbered
# male/female voices, three Klatt voices and the contributed voices that only move pitch and
# formants. Left out: heavy echo or robot effects (RicishayMax*, robosoft*, UniRobot, anikaRobot,
# Demonic, Marco, Alicia), whispered or unvoiced (whisper, whisperf, caleb), extreme pitch or
# formant scaling (announcer, zac, Jacky, Lee, kaukovalta, Tweaky), near-duplicates (Gene2,
# iven2-4, steph2-3, edward2, klatt4-6, AnxiousAndy, Storm), the test variant "fast" and
# "Mr serious" (a space in its name). "" is each accent's own default voice.
ESPEAK_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "croak", "grandma", "grandpa",
    "Alex", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique", "Hugo", "Mario", "Michael",
    "Mike", "Nguyen", "adam", "anika", "antonio", "aunty", "belinda", "benjamin", "boris", "david", "ed",
    "edward", "gustave", "iven", "john", "linda", "marcelo", "max", "michel", "miguel", "norbert",
    "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph", "travis", "victor",
)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EVENT_WORD, _EVENT_PHONEME = 1, 7
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH = 1, 2, 3
# espeak's own volume (100 = default) is lowered so loud voices do not clip inside espeak.
_ESPEAK_VOLUME = 60


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_EspeakEvent))


class _EspeakLibrary:
    """The process's one initialized libespeak-ng.

    espeak keeps synthesis state in C statics (pitch flutter phase and the like) that carry over
    from one utterance to the next, so the same text sounds slightly different depending on what
    the process said before. To make every utterance a pure function of its inputs, this process
    never synthesizes itself: it holds a freshly initialized espeak, and each utterance is spoken
    by a forked child that starts from that pristine state and sends back samples and events
    through a pipe (about 10-20 ms per utterance, of which about 3 ms is the fork).
    """

    def __init__(self, library: str):
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as exc:
            raise SpeechEngineError(
                f"espeak-ng library {library!r} not found ({exc}); install it with "
                "`apt-get install libespeak-ng1` (Debian/Ubuntu)") from exc
        self.libc = ctypes.CDLL(None)
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise SpeechEngineError("espeak_Initialize failed: is espeak-ng-data installed (apt-get install "
                                    "espeak-ng-data)?")
        self.samples: list[bytes] = []
        self.events: list[tuple[int, int, int]] = []
        self.callback = _SynthCallback(self._collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self.callback)
        # Load the English dictionary and voice tables once (children then start warm). Every
        # process runs this same warm-up, so the state the children fork from is the same everywhere.
        self._speak_here("warm up", "en", 175, 50)
        self.samples.clear()
        self.events.clear()
        data_path = ctypes.c_char_p()
        self.version = self.lib.espeak_Info(ctypes.byref(data_path)).decode()
        self.data_path = Path(data_path.value.decode()) if data_path.value else None

    def _collect(self, wav, n_samples, events) -> int:
        if wav and n_samples > 0:
            self.samples.append(ctypes.string_at(wav, 2 * n_samples))
        i = 0
        while events[i].type != 0:
            event = events[i]
            if event.type in (_EVENT_WORD, _EVENT_PHONEME):
                self.events.append((event.type, event.text_position, event.sample))
            i += 1
        return 0

    def voice_files(self, folder: str) -> set[str]:
        """Lowercased names of the voice files under espeak-ng-data/<folder> (what SetVoiceByName matches)."""
        root = self.data_path / folder if self.data_path else None
        if root is None or not root.is_dir():
            return set()
        return {p.name.lower() for p in root.rglob("*") if p.is_file()}

    def speak(self, text: str, voice_name: str, rate: int, pitch: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Samples (N,) int16 at ``sample_rate`` and events [(type, text_position, sample)], spoken by a fork."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak from the pristine state, send everything back, never return
            status = 1
            try:
                os.close(read_fd)
                payload = self._speak_here(text, voice_name, rate, pitch)
                status = 0
            except BaseException as exc:  # noqa: BLE001 - the parent reports it
                payload = f"{type(exc).__name__}: {exc}".encode()
            finally:
                try:
                    with os.fdopen(write_fd, "wb") as pipe:
                        pipe.write(struct.pack("<iq", status, len(payload)) + payload)
                finally:
                    os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        if len(data) < 12:
            raise SpeechEngineError(f"espeak child process died while speaking {text!r} with {voice_name}")
        status, size = struct.unpack_from("<iq", data)
        payload = data[12: 12 + size]
        if status != 0:
            raise SpeechEngineError(f"espeak failed to speak {text!r} with voice {voice_name}: {payload.decode()}")
        n_events = struct.unpack_from("<q", payload)[0]
        events = np.frombuffer(payload, np.int32, count=3 * n_events, offset=8).reshape(-1, 3)
        samples = np.frombuffer(payload, np.int16, offset=8 + 12 * n_events)
        return samples, [tuple(int(v) for v in row) for row in events]

    def _speak_here(self, text: str, voice_name: str, rate: int, pitch: int) -> bytes:
        if self.lib.espeak_SetVoiceByName(voice_name.encode()) != 0:
            raise SpeechEngineError(f"espeak has no voice {voice_name!r}")
        for parameter, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_VOLUME, _ESPEAK_VOLUME)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self.libc.srand(0)  # Klatt voices draw noise from rand()
        encoded = text.encode("utf-8")
        error = self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if error != 0:
            raise SpeechEngineError(f"espeak_Synth returned error {error}")
        events = np.asarray(self.events, np.int32).reshape(-1, 3)
        return struct.pack("<q", len(events)) + events.tobytes() + b"".join(self.samples)


_espeak: _EspeakLibrary | None = None
_espeak_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child gets fresh locks, and never talks to its parent's festival processes.
    global _espeak_lock, _festival_lock
    _espeak_lock = threading.Lock()
    _festival_lock = threading.Lock()
    _festival_processes.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _espeak_library(library: str) -> _EspeakLibrary:
    # One initialized espeak per process, created on first use (also in spawned workers). A forked
    # process inherits its parent's, which is still pristine because the parent never speaks.
    global _espeak
    if _espeak is None:
        _espeak = _EspeakLibrary(library)
    return _espeak


class EspeakEngine:
    """espeak-ng through libespeak-ng (ctypes): English accents x voice variants."""

    name = "espeak"

    def __init__(self, library: str = ESPEAK_LIBRARY):
        self.library = library

    def voices(self) -> list[Voice]:
        """Accent x variant voices installed here (of ESPEAK_ACCENTS x ESPEAK_VARIANTS), sorted by id."""
        with _espeak_lock:
            espeak = _espeak_library(self.library)
            languages, variants = espeak.voice_files("lang"), espeak.voice_files("voices/!v")
        accents = [a for a in ESPEAK_ACCENTS if a in languages]
        if not accents:
            raise SpeechEngineError(f"espeak-ng {espeak.version} at {espeak.data_path} has none of the English "
                                    f"voices {', '.join(ESPEAK_ACCENTS)}")
        voices = [Voice(self.name, f"{accent}+{variant}" if variant else accent, ESPEAK_ACCENTS[accent])
                  for accent in accents for variant in ESPEAK_VARIANTS if not variant or variant.lower() in variants]
        return sorted(voices, key=lambda v: v.id)

    def synthesize(self, text: str, voice: Voice, rate: int, pitch: int) -> Utterance:
        """Speak ``text`` (see ``SpeechEngine.synthesize``) -> 16 kHz Utterance with timed words."""
        words = check_request(self.name, text, voice, rate, pitch)
        with _espeak_lock:
            espeak = _espeak_library(self.library)
            samples, events = espeak.speak(text, voice.name, int(rate), int(pitch))
        native_rate = espeak.sample_rate
        if samples.size == 0:
            raise SpeechEngineError(f"espeak produced no audio for {text!r} with {voice.id}")
        onsets = _word_onsets(text, words, events, native_rate, len(samples) / native_rate)
        waveform = resample(samples.astype(np.float32) / 32768.0, native_rate, SAMPLE_RATE)
        return Utterance(waveform, SAMPLE_RATE, timed_words(waveform, SAMPLE_RATE, [w for w, _ in words], onsets))


def _word_onsets(text: str, words: list[tuple[str, int]], events: list[tuple[int, int, int]],
                 sample_rate: int, duration: float) -> list[float]:
    """Onset (seconds) of each caption word from espeak's word and phoneme events.

    espeak reports a word's character position (1-based) and start sample. Some word pairs are
    spoken as one word ("on the", "in the") and get a single event; their stretch is split at
    the phoneme boundary that best matches the words' letter counts.
    """
    starts_at = np.array([offset for _, offset in words])
    onsets: list[float | None] = [None] * len(words)
    phonemes = []
    for kind, position, sample in events:
        if kind == _EVENT_PHONEME:
            phonemes.append(sample / sample_rate)
            continue
        index = int(np.searchsorted(starts_at, position - 1, side="right")) - 1
        if 0 <= index < len(words) and onsets[index] is None:
            onsets[index] = sample / sample_rate
    if onsets[0] is None:
        onsets[0] = 0.0
    phonemes.sort()
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and onsets[j] is None:
            j += 1
        if j > i + 1:  # words i+1 .. j-1 were spoken together with word i
            end = onsets[j] if j < len(words) else duration
            _split_merged(onsets, i, j, end, [len(w) for w, _ in words[i:j]], phonemes)
        i = j
    for a, b in zip(onsets, onsets[1:], strict=False):
        if b < a:
            raise SpeechEngineError(f"espeak word events out of order for {text!r}: {onsets}")
    return onsets  # type: ignore[return-value]


def _split_merged(onsets: list, first: int, stop: int, end: float, letters: list[int], phonemes: list[float]) -> None:
    begin = onsets[first]
    inside = [p for p in phonemes if begin <= p < end]
    total = sum(letters)
    cumulative = np.cumsum(letters)[:-1] / total
    n_words = stop - first
    for k, fraction in enumerate(cumulative, start=1):
        if len(inside) >= n_words:
            q = min(max(round(fraction * len(inside)), k), len(inside) - (n_words - k))
            onsets[first + k] = inside[q]
        else:
            onsets[first + k] = begin + fraction * (end - begin)


# ----------------------------------------------------------------------------------------------
# Festival

FESTIVAL_BINARY = "festival"
# Base voices the corpus uses (festival voice names) -> language; those installed here are offered.
# Debian packages: festvox-kallpc16k (kal_diphone), festvox-kdlpc16k (ked_diphone), festvox-us-slt-hts.
FESTIVAL_BASE_VOICES = {"cmu_us_slt_arctic_hts": "en-us", "kal_diphone": "en-us", "ked_diphone": "en-us"}
# Vocal-tract variants of each base voice (festival and flite): its spectral envelope (formants)
# scaled by this factor (> 1: a shorter vocal tract). Voice "kal_diphone+tract108" is kal_diphone
# scaled by 1.08; the factor 1.00 is the base voice as recorded, named without a suffix.
TRACT_FACTORS = (0.88, 0.92, 0.96, 1.00, 1.04, 1.08, 1.12)
# The speaking rate (words per minute) at which a festival voice speaks at its own default speed.
FESTIVAL_REFERENCE_WPM = 175
# Pitch 0..100 moves the voice's f0 by this many octaves at most (0 -> down, 100 -> up).
PITCH_RANGE_OCTAVES = 0.5
FESTIVAL_TIMEOUT_SECONDS = 60.0
_FESTIVAL_INSTALL_HINT = ("install it with `apt-get install festival festvox-kallpc16k festvox-kdlpc16k "
                          "festvox-us-slt-hts` (Debian/Ubuntu)")

# Scheme loaded once into each festival process, after its base voice is selected. ``mm_say`` speaks
# one text with every per-utterance setting given explicitly (so no setting of an earlier
# utterance carries over), writes the wave to a file and prints, for each top-level token of the
# text, the span of its words ("MM-T start end token", "MM-T - - token" when it has no spoken word),
# then "MM-END ok" (or "MM-END error").
_FESTIVAL_SCHEME = r"""
(set! mm_stretch (Parameter.get 'Duration_Stretch))
(if (not mm_stretch) (set! mm_stretch 1.0))
(set! mm_int_lr (if (symbol-bound? 'int_lr_params) int_lr_params nil))
(set! mm_hts (if (symbol-bound? 'hts_engine_params) hts_engine_params nil))
(define (mm_f0 params factor)
  (mapcar (lambda (p) (if (member (car p) '(target_f0_mean target_f0_std))
                          (list (car p) (* factor (car (cdr p)))) p))
          params))
(define (mm_words tok)
  (let ((words nil))
    (mapcar (lambda (w) (if (item.relation w 'Word) (set! words (cons w words)))) (item.daughters tok))
    (reverse words)))
(define (mm_token tok)
  (let ((words (mm_words tok)))
    (if words
        (format t "MM-T %f %f %s\n" (item.feat (car words) 'word_start)
                (item.feat (car (last words)) 'word_end) (item.name tok))
        (format t "MM-T - - %s\n" (item.name tok)))))
(define (mm_say text stretch f0 speed wavefile)
  (unwind-protect
    (let ((u nil))
      (Parameter.set 'Duration_Stretch (* mm_stretch stretch))
      (if mm_int_lr (set! int_lr_params (mm_f0 mm_int_lr f0)))
      (if mm_hts (set! hts_engine_params (append mm_hts (list (list "-r" speed)))))
      (set! u (utt.synth (eval (list 'Utterance 'Text text))))
      (utt.save.wave u wavefile 'riff)
      (mapcar (lambda (tok) (if (not (item.parent tok)) (mm_token tok))) (utt.relation.items u 'Token))
      (format t "MM-END ok\n"))
    (format t "MM-END error\n"))
  (fflush))
(format t "MM-READY\n")
(fflush)
"""


@dataclass(frozen=True)
class TractVoice:
    """What a voice name of a tract-variant engine means: a base voice, and the factor its formants
    are scaled by. Subclasses name the engine and its base voices."""

    base: str
    tract: float

    ENGINE: ClassVar[str] = ""
    BASES: ClassVar[dict[str, str]] = {}

    @classmethod
    def parse(cls, name: str) -> TractVoice:
        """``"kal_diphone+tract108"`` -> (base "kal_diphone", tract 1.08); ValueError for other names."""
        base, _, variant = name.partition("+")
        tract = 1.0
        if variant:
            if not re.fullmatch(r"tract\d{3}", variant):
                raise ValueError(f"{cls.ENGINE} voice {name!r}: the variant must look like '+tract108', got {variant!r}")
            tract = int(variant[5:]) / 100
        if base not in cls.BASES or tract not in TRACT_FACTORS:
            raise ValueError(f"{cls.ENGINE} voice {name!r} is not one of the corpus voices (bases "
                             f"{', '.join(cls.BASES)}; tract factors {TRACT_FACTORS})")
        return cls(base, tract)

    @property
    def name(self) -> str:
        return self.base if self.tract == 1.0 else f"{self.base}+tract{round(self.tract * 100):03d}"

    @classmethod
    def offered(cls, installed: frozenset[str], install_hint: str) -> list[Voice]:
        """Base voice x tract factor for the base voices among ``installed``, sorted by id."""
        bases = [base for base in cls.BASES if base in installed]
        if not bases:
            raise SpeechEngineError(f"{cls.ENGINE} has none of the voices {', '.join(cls.BASES)} "
                                    f"(it lists {sorted(installed) or 'none'}); {install_hint}")
        voices = [Voice(cls.ENGINE, cls(base, tract).name, cls.BASES[base]) for base in bases for tract in TRACT_FACTORS]
        return sorted(voices, key=lambda v: v.id)


class FestivalVoice(TractVoice):
    ENGINE = "festival"
    BASES = FESTIVAL_BASE_VOICES


def _scheme_string(text: str) -> str:
    # A Scheme string literal; whitespace of any kind becomes a plain space (festival splits on it anyway).
    flat = " ".join(text.split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _FestivalProcess:
    """One long-lived ``festival --pipe`` with one base voice loaded, speaking one text at a time.

    Festival keeps no state between utterances that changes the audio (checked by the tests): the
    same text with the same settings gives the same samples whatever the process said before.
    """

    def __init__(self, binary: str, base_voice: str):
        self.base_voice = base_voice
        self.workdir = Path(tempfile.mkdtemp(prefix="matchmap-festival-"))
        self.wav_path = self.workdir / "utterance.wav"
        try:
            self.process = subprocess.Popen([binary, "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, cwd=self.workdir)
        except OSError as exc:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise SpeechEngineError(f"cannot start festival ({binary!r}: {exc}); {_FESTIVAL_INSTALL_HINT}") from exc
        self._buffer = b""
        self._send(f"(voice_{base_voice})\n{_FESTIVAL_SCHEME}")
        lines = self._read_until(b"MM-READY", what=f"loading voice {base_voice}")
        if any(b"SIOD ERROR" in line or b"not found" in line.lower() for line in lines):
            output = b"\n".join(lines).decode(errors="replace")
            self.close()
            raise SpeechEngineError(f"festival could not load voice {base_voice!r}: {output.strip()}")

    def _send(self, commands: str) -> None:
        try:
            self.process.stdin.write(commands.encode("utf-8") + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SpeechEngineError(f"festival ({self.base_voice}) exited unexpectedly: {exc}") from exc

    def _read_until(self, marker: bytes, what: str) -> list[bytes]:
        """Output lines up to and including the first line that starts with ``marker``."""
        deadline = time.monotonic() + FESTIVAL_TIMEOUT_SECONDS
        fd = self.process.stdout.fileno()
        lines: list[bytes] = []
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                lines.append(line)
                if line.startswith(marker):
                    return lines
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0.0))
            if not ready:
                self.close()
                raise SpeechEngineError(f"festival ({self.base_voice}) gave no answer within "
                                        f"{FESTIVAL_TIMEOUT_SECONDS:.0f} s while {what}")
            chunk = os.read(fd, 65536)
            if not chunk:
                output = b"\n".join(lines).decode(errors="replace").strip()
                self.close()
                raise SpeechEngineError(f"festival ({self.base_voice}) exited while {what}: {output}")
            self._buffer += chunk

    def say(self, text: str, stretch: float, f0_factor: float, speed: float) -> tuple[np.ndarray, int, list[bytes]]:
        """Samples (N,) int16, their sample rate and the "MM-T" token lines of one utterance."""
        self._send(f"(mm_say {_scheme_string(text)} {stretch:.6f} {f0_factor:.6f} {speed:.6f} "
                   f"{_scheme_string(str(self.wav_path))})")
        lines = self._read_until(b"MM-END", what=f"speaking {text!r}")
        if lines[-1].strip() != b"MM-END ok":
            output = b"\n".join(lines[:-1]).decode(errors="replace").strip()
            raise SpeechEngineError(f"festival ({self.base_voice}) failed to speak {text!r}: {output}")
        samples, native_rate = soundfile.read(self.wav_path, dtype="int16")
        return samples, int(native_rate), [line for line in lines if line.startswith(b"MM-T ")]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


# This process's festival processes, (binary, base voice) -> process: started on first use, shared
# by every FestivalEngine of the process (the corpus generator makes one per split), stopped at exit.
_festival_processes: dict[tuple[str, str], _FestivalProcess] = {}
_festival_lock = threading.Lock()


def _festival_process(binary: str, base_voice: str) -> _FestivalProcess:
    # The caller holds _festival_lock.
    process = _festival_processes.get((binary, base_voice))
    if process is None or process.process.poll() is not None:
        process = _festival_processes[binary, base_voice] = _FestivalProcess(binary, base_voice)
    return process


def stop_festival() -> None:
    """Stop this process's festival processes (the next utterance starts them again)."""
    with _festival_lock:
        for process in _festival_processes.values():
            process.close()
        _festival_processes.clear()


atexit.register(stop_festival)


@cache
def _installed_festival_voices(binary: str) -> frozenset[str]:
    try:
        result = subprocess.run([binary, "-b", "(print (voice.list))"], capture_output=True, text=True, timeout=60,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeechEngineError(f"cannot run festival ({binary!r}: {exc}); {_FESTIVAL_INSTALL_HINT}") from exc
    return frozenset(re.findall(r"[\w-]+", result.stdout))


class FestivalEngine:
    """Festival through long-lived ``festival --pipe`` processes (one per base voice and process, started
    on first use, stopped at exit or by ``stop_festival``).

    Voices are base voice x vocal-tract factor (FESTIVAL_BASE_VOICES x TRACT_FACTORS). Per
    utterance, ``rate`` sets the duration (diphone voices: Duration_Stretch; HTS: the engine's
    speed) and ``pitch`` the f0 (diphone voices: the intonation model's target mean and spread).
    The tract factor f is applied by reading festival's output as if sampled f times faster, which
    scales formants, f0 and tempo by f; festival speaks f times slower beforehand and, for diphone
    voices, at an f0 target divided by f, so only the formants move. The HTS voice has no f0
    control here, so its ``pitch`` joins that resampling factor: its pitch and formants move together.
    Word spans come from festival's own segment timings (word_start and word_end of the words of
    each caption word), trimmed to speech energy by ``timed_words``.
    """

    name = "festival"

    def __init__(self, binary: str = FESTIVAL_BINARY):
        self.binary = binary

    def voices(self) -> list[Voice]:
        """Base voice x tract factor for the base voices installed here, sorted by id."""
        return FestivalVoice.offered(_installed_festival_voices(self.binary), _FESTIVAL_INSTALL_HINT)

    def synthesize(self, text: str, voice: Voice, rate: int, pitch: int) -> Utterance:
        """Speak ``text`` (see ``SpeechEngine.synthesize``) -> 16 kHz Utterance with timed words."""
        words = check_request(self.name, text, voice, rate, pitch)
        variant = FestivalVoice.parse(voice.name)
        pitch_factor = 2.0 ** ((pitch - 50) / 50 * PITCH_RANGE_OCTAVES)
        hts = variant.base.endswith("_hts")
        warp = variant.tract * pitch_factor if hts else variant.tract
        tempo = FESTIVAL_REFERENCE_WPM / rate  # duration relative to the voice's own, after the warp
        with _festival_lock:
            samples, native_rate, token_lines = _festival_process(self.binary, variant.base).say(
                text, stretch=tempo * warp, f0_factor=pitch_factor / variant.tract, speed=1.0 / (tempo * warp))
        if samples.size == 0:
            raise SpeechEngineError(f"festival produced no audio for {text!r} with {voice.id}")
        return warped_utterance(samples, native_rate, warp, [w for w, _ in words],
                                _festival_word_spans(text, words, token_lines))


def _festival_word_spans(text: str, words: list[tuple[str, int]], token_lines: list[bytes]) -> list[tuple[float, float]]:
    """(start, end) in seconds of each caption word from festival's token lines ("MM-T start end token").

    Festival splits the text at whitespace into tokens, strips their punctuation and speaks each as
    zero or more words ("25" -> "twenty five"); a caption word spans its token's words. Tokens that
    normalize to nothing (a lone comma) are not caption words and are skipped.
    """
    spans = []
    for line in token_lines:
        _, start, end, *name = line.decode("utf-8", errors="replace").split(" ", 3)
        word = _WORD_CHARS.sub("", name[0] if name else "").lower()
        if word:
            spans.append((word, None if start == "-" else (float(start), float(end))))
    spoken = [w for w, _ in spans]
    expected = [w for w, _ in words]
    if spoken != expected:
        raise SpeechEngineError(f"festival read {text!r} as the words {spoken}, not {expected}")
    missing = [w for w, span in spans if span is None]
    if missing:
        raise SpeechEngineError(f"festival spoke no sound for the word(s) {missing} of {text!r}")
    return [span for _, span in spans]


# ----------------------------------------------------------------------------------------------
# flite


FLITE_BINARY = "flite"
# Base voices (flite -voice names, all compiled into Debian's flite) -> language. kal16 is the same
# diphone database as festival's kal_diphone; slt is the same speaker as festival's HTS voice, made
# with another method (clustergen); awb (Scottish English) and rms are speakers no other engine has.
# Left out: "kal" (kal16 at 8 kHz) and "awb_time" (speaks only clock times).
FLITE_BASE_VOICES = {"awb": "en-gb-scotland", "kal16": "en-us", "rms": "en-us", "slt": "en-us"}
FLITE_REFERENCE_WPM = 175
FLITE_TIMEOUT_SECONDS = 60.0
_FLITE_INSTALL_HINT = "install it with `apt-get install flite` (Debian/Ubuntu)"


class FliteVoice(TractVoice):
    ENGINE = "flite"
    BASES = FLITE_BASE_VOICES


def _run_flite(binary: str, args: list[str], what: str) -> str:
    try:
        result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=FLITE_TIMEOUT_SECONDS,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeechEngineError(f"cannot run flite ({binary!r}: {exc}) while {what}; {_FLITE_INSTALL_HINT}") from exc
    if result.returncode != 0:
        raise SpeechEngineError(f"flite failed while {what} (exit {result.returncode}): "
                                f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


@cache
def _installed_flite_voices(binary: str) -> frozenset[str]:
    listing = _run_flite(binary, ["-lv"], "listing its voices")  # "Voices available: kal awb_time kal16 ..."
    return frozenset(listing.partition(":")[2].split())


@cache
def _flite_token_phones(binary: str, token: str) -> tuple[str, ...]:
    """The phones flite speaks for one text token on its own (lexicon, letter-to-sound, number expansion)."""
    out = _run_flite(binary, ["-ps", "-o", "none", "-t", token], f"looking up the phones of {token!r}")
    return tuple(p for p in out.split() if p != "pau")


def _flite_segments(output: str) -> list[tuple[str, float, float]]:
    """``flite -psdur`` output ("pau:0.174 ax:0.200 ...", each phone with its end time) -> (phone, start, end)."""
    segments, start = [], 0.0
    for item in output.split():
        phone, _, end = item.rpartition(":")
        if not phone:
            continue
        segments.append((phone, start, float(end)))
        start = float(end)
    return segments


def _flite_word_spans(binary: str, text: str, words: list[tuple[str, int]],
                      segments: list[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """(start, end) in seconds of each caption word: the phones of each word's token, looked up alone,
    aligned to the phones flite spoke for the whole text (difflib; context may change a vowel)."""
    spoken = [seg for seg in segments if seg[0] != "pau"]
    expected: list[str] = []
    owner: list[int] = []  # caption word of each expected phone
    for i, (word, offset) in enumerate(words):
        token = text[offset:].split(maxsplit=1)[0]
        phones = _flite_token_phones(binary, token)
        if not phones:
            raise SpeechEngineError(f"flite speaks no sound for the word {word!r} of {text!r}")
        expected.extend(phones)
        owner.extend([i] * len(phones))
    matched: list[list[int]] = [[] for _ in words]  # spoken phone indices of each word
    matcher = difflib.SequenceMatcher(None, expected, [seg[0] for seg in spoken], autojunk=False)
    for tag, e0, e1, s0, s1 in matcher.get_opcodes():
        if tag in ("equal", "replace"):
            for k in range(e0, e1):  # proportional when the two runs differ in length
                matched[owner[k]].append(s0 + min(s1 - s0 - 1, (k - e0) * (s1 - s0) // (e1 - e0)))
    missing = [words[i][0] for i, m in enumerate(matched) if not m]
    if missing:
        raise SpeechEngineError(f"flite's phones for {text!r} do not cover the word(s) {missing}")
    spans = [(spoken[min(m)][1], spoken[max(m)][2]) for m in matched]
    for (a_start, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
        if b_start < a_end or a_end <= a_start:
            raise SpeechEngineError(f"flite's phones for {text!r} do not align word by word")
    return spans


class FliteEngine:
    """CMU Flite (``flite`` binary, one short process per utterance): clustergen voices (awb, rms, slt)
    and a diphone voice (kal16), none of which speaks like espeak's formant synthesis.

    Voices are base voice x vocal-tract factor (FLITE_BASE_VOICES x TRACT_FACTORS). ``rate`` sets
    flite's ``duration_stretch``. The tract factor f and the pitch factor p are applied by reading
    flite's output as if sampled f * p times faster (flite speaks that much slower beforehand), so
    formants and pitch move together: flite's f0 settings reach only some of its voices. Word spans
    come from flite's phone timings (``-psdur``), the phones of each word's token aligned to them,
    trimmed to speech energy by ``timed_words``.
    """

    name = "flite"

    def __init__(self, binary: str = FLITE_BINARY):
        self.binary = binary

    def voices(self) -> list[Voice]:
        """Base voice x tract factor for the base voices this flite has, sorted by id."""
        return FliteVoice.offered(_installed_flite_voices(self.binary), _FLITE_INSTALL_HINT)

    def synthesize(self, text: str, voice: Voice, rate: int, pitch: int) -> Utterance:
        """Speak ``text`` (see ``SpeechEngine.synthesize``) -> 16 kHz Utterance with timed words."""
        words = check_request(self.name, text, voice, rate, pitch)
        variant = FliteVoice.parse(voice.name)
        warp = variant.tract * 2.0 ** ((pitch - 50) / 50 * PITCH_RANGE_OCTAVES)
        stretch = FLITE_REFERENCE_WPM / rate * warp
        flat = " ".join(text.split())
        with tempfile.TemporaryDirectory(prefix="matchmap-flite-") as workdir:
            wav_path = Path(workdir) / "utterance.wav"
            output = _run_flite(self.binary, ["-voice", variant.base, "--setf", f"duration_stretch={stretch:.6f}",
                                              "-psdur", "-t", flat, "-o", str(wav_path)], f"speaking {text!r}")
            samples, native_rate = soundfile.read(wav_path, dtype="int16")
        if samples.size == 0:
            raise SpeechEngineError(f"flite produced no audio for {text!r} with {voice.id}")
        return warped_utterance(samples, native_rate, warp, [w for w, _ in words],
                                _flite_word_spans(self.binary, flat, caption_words(flat), _flite_segments(output)))


ENGINES: dict[str, Callable[[], SpeechEngine]] = {"espeak": EspeakEngine, "festival": FestivalEngine,
                                                  "flite": FliteEngine}


def get_engine(name: str) -> SpeechEngine:
    """The engine called ``name`` (see ``ENGINES``); ValueError naming the known ones otherwise."""
    if name not in ENGINES:
        raise ValueError(f"unknown speech engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]()


def _voice_hash(voice: Voice) -> float:
    digest = hashlib.sha256(voice.id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def train_val_voices(engine: SpeechEngine) -> tuple[list[Voice], list[Voice]]:
    """The engine's voices split into (train, val), fixed for every seed and every run.

    A voice goes to val when a stable hash (sha256) of its id falls below VAL_VOICE_FRACTION, so
    the split of a voice never changes, even when voices are added or removed.
    """
    voices = engine.voices()
    val = [v for v in voices if _voice_hash(v) < VAL_VOICE_FRACTION]
    train = [v for v in voices if _voice_hash(v) >= VAL_VOICE_FRACTION]
    if not train or not val:
        raise SpeechEngineError(f"engine {engine.name} has {len(voices)} voice(s): too few to hold some out for val")
    return train, val
