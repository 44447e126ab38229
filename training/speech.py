"""Speech synthesis for the spoken-scenes corpus: pluggable engines that return word-timed 16 kHz audio.

An engine (``SpeechEngine``) lists its voices and turns a caption into an ``Utterance``: a waveform
at 16 kHz and the time span of every spoken word. ``ENGINES`` maps engine names to their classes;
adding an engine (festival, ...) means writing one class and one row there.

The espeak-ng engine drives libespeak-ng through ctypes in synchronous mode. Word onsets come from
its word events (and its phoneme events where espeak speaks two words as one, e.g. "on the"); word
ends come from the audio: the next word's onset minus the silence before it (short-time energy).

Voices are split into train and val once and for all (``train_val_voices``): the split depends on
the voice id only, never on a seed, so val voices never occur in any training corpus.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

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


# ----------------------------------------------------------------------------------------------
# Signal helpers shared by every engine


def _fast_fft_length(minimum: int) -> int:
    # The smallest 2^a 3^b 5^c >= minimum: lengths numpy's FFT handles without its slow prime path.
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
    blocks = _fast_fft_length(math.ceil((len(waveform) + 256) / down))
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


def timed_words(waveform: np.ndarray, sample_rate: int, words: list[str], onsets: list[float]) -> list[TimedWord]:
    """Word spans from onsets and the audio: each word runs from its onset to the next word's onset,
    with the silence at both ends of that stretch removed (10 ms energy frames); the last word ends
    where speech energy ends.

    waveform: (N,) float; words and onsets (seconds, non-decreasing): one per word.
    """
    if len(words) != len(onsets):
        raise ValueError(f"timed_words: {len(words)} words but {len(onsets)} onsets")
    frame = FRAME_SECONDS
    active = speech_frames(frame_levels_db(waveform, sample_rate))
    n_frames = len(active)
    bounds = [*onsets, len(waveform) / sample_rate]
    duration = len(waveform) / sample_rate
    out = []
    for i, word in enumerate(words):
        lo = min(int(round(bounds[i] / frame)), n_frames)
        hi = min(max(int(round(bounds[i + 1] / frame)), lo + 1), n_frames)
        speech = np.flatnonzero(active[lo:hi])
        if speech.size:  # trim the silence on both sides of the word
            start, end = (lo + speech[0]) * frame, (lo + speech[-1] + 1) * frame
        else:  # no energy above threshold: keep the onset-to-onset stretch
            start, end = bounds[i], max(bounds[i], bounds[i + 1])
        out.append(TimedWord(word, float(min(start, duration)), float(min(end, duration))))
    return out


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


def _reset_lock_after_fork() -> None:
    global _espeak_lock
    _espeak_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


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
        if voice.engine != self.name:
            raise ValueError(f"voice {voice.id} belongs to engine {voice.engine!r}, not {self.name!r}")
        if not 80 <= rate <= 450:
            raise ValueError(f"rate must be 80-450 words per minute, got {rate}")
        if not 0 <= pitch <= 100:
            raise ValueError(f"pitch must be 0-100 (50 = normal), got {pitch}")
        words = caption_words(text)
        if not words:
            raise ValueError(f"nothing to speak in text {text!r}")
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


ENGINES: dict[str, Callable[[], SpeechEngine]] = {"espeak": EspeakEngine}


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
