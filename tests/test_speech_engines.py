"""The festival and flite speech engines and corpora that mix engines: word timings, determinism,
voices, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from matchmap.cli import main
from training.manifest import load_manifest
from training.speech import (
    ENGINES,
    FESTIVAL_BASE_VOICES,
    FLITE_BASE_VOICES,
    FestivalEngine,
    FestivalVoice,
    FliteEngine,
    FliteVoice,
    SpeechEngineError,
    Voice,
    caption_words,
    frame_levels_db,
    get_engine,
    speech_frames,
    stop_festival,
    train_val_voices,
)
from training.synth import synthesize_corpus

CAPTION = "there is a big red circle, and a small blue star on the grass"


@pytest.fixture(scope="module")
def festival() -> FestivalEngine:
    return FestivalEngine()


def festival_voice(name: str) -> Voice:
    return Voice("festival", name, "en-us")


@pytest.fixture(scope="module")
def flite() -> FliteEngine:
    return FliteEngine()


def flite_voice(name: str) -> Voice:
    return Voice("flite", name, "en-us")


def median_f0(waveform: np.ndarray, sample_rate: int) -> float:
    """Median pitch (Hz) of the clearly voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    frame, hop = round(0.04 * sample_rate), round(0.02 * sample_rate)
    lo, hi = sample_rate // 400, sample_rate // 60
    floor = 0.05 * float(np.abs(waveform).max())
    pitches = []
    for start in range(0, len(waveform) - frame, hop):
        x = waveform[start: start + frame].astype(np.float64)
        x -= x.mean()
        if np.sqrt(np.mean(x ** 2)) < floor:
            continue
        ac = np.correlate(x, x, "full")[frame - 1:]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.6 * ac[0]:
            pitches.append(sample_rate / lag)
    return float(np.median(pitches))


def spectral_centroid(waveform: np.ndarray, sample_rate: int) -> float:
    power = np.abs(np.fft.rfft(waveform.astype(np.float64))) ** 2
    return float((power * np.fft.rfftfreq(len(waveform), 1 / sample_rate)).sum() / power.sum())


def assert_spans_line_up_with_the_speech(utterance, label: str) -> None:
    assert utterance.sample_rate == 16000 and utterance.waveform.dtype == np.float32
    assert [w.word for w in utterance.words] == [w for w, _ in caption_words(CAPTION)]
    for a, b in zip(utterance.words, utterance.words[1:], strict=False):
        assert a.start < a.end <= b.start < b.end, (a, b)
    assert utterance.words[-1].end <= utterance.duration

    levels = frame_levels_db(utterance.waveform, utterance.sample_rate)
    active = speech_frames(levels)
    loud = np.percentile(levels[active], 95)
    inside = np.zeros(len(levels), bool)
    for word in utterance.words:
        span = slice(round(word.start / 0.01), round(word.end / 0.01))
        inside[span] = True
        assert levels[span].max() > loud - 20, f"{label}: no speech inside the span of {word}"
    # Nearly all speech energy lies inside the word spans; what lies outside is silence.
    assert active[~inside].sum() <= 0.03 * active.sum(), label
    # The comma makes a pause: the gap between "circle" and "and" is real silence in the audio.
    circle, after = utterance.words[5], utterance.words[6]
    assert (circle.word, after.word) == ("circle", "and")
    gap = levels[round(circle.end / 0.01) + 2: round(after.start / 0.01) - 2]
    assert after.start - circle.end >= 0.08 and gap.size and gap.max() < loud - 30, label


@pytest.mark.parametrize("name, engine_class", [("festival", FestivalEngine), ("flite", FliteEngine)])
def test_engine_is_registered(name, engine_class):
    assert ENGINES[name] is engine_class
    assert isinstance(get_engine(name), engine_class)


@pytest.mark.parametrize("engine, base", [("festival", b) for b in sorted(FESTIVAL_BASE_VOICES)]
                         + [("flite", b) for b in sorted(FLITE_BASE_VOICES)])
def test_word_spans_line_up_with_the_speech(engine, base):
    utterance = get_engine(engine).synthesize(CAPTION, Voice(engine, base, "en-us"), rate=175, pitch=50)
    assert_spans_line_up_with_the_speech(utterance, f"{engine}:{base}")


@pytest.mark.parametrize("engine, base", [("festival", "kal_diphone"), ("flite", "rms")])
def test_every_caption_word_is_kept_whatever_the_engine_does_with_punctuation(engine, base):
    text = "A red-circle, 2 stars ; on the grass."
    utterance = get_engine(engine).synthesize(text, Voice(engine, base, "en-us"), rate=175, pitch=50)
    assert [w.word for w in utterance.words] == ["a", "redcircle", "2", "stars", "on", "the", "grass"]
    red_circle, two = utterance.words[1], utterance.words[2]
    assert two.end - two.start > 0.08  # "two" is spoken, not skipped
    assert red_circle.end - red_circle.start > 0.4  # "red" and "circle" both


def test_festival_is_deterministic_whatever_it_spoke_before(festival):
    voice = festival_voice("cmu_us_slt_arctic_hts+tract092")
    first = festival.synthesize(CAPTION, voice, rate=150, pitch=40)
    festival.synthesize("a white hexagon in the snow", festival_voice("ked_diphone+tract108"), rate=200, pitch=70)
    festival.synthesize("look at a black cross", voice, rate=120, pitch=65)
    again = festival.synthesize(CAPTION, voice, rate=150, pitch=40)
    stop_festival()  # the next utterance starts a new festival process
    fresh = FestivalEngine().synthesize(CAPTION, voice, rate=150, pitch=40)
    for other in (again, fresh):
        assert other.waveform.tobytes() == first.waveform.tobytes()
        assert other.words == first.words
    other_variant = festival.synthesize(CAPTION, festival_voice("cmu_us_slt_arctic_hts+tract096"), rate=150, pitch=40)
    assert other_variant.waveform.tobytes() != first.waveform.tobytes()


def test_festival_rate_pitch_and_vocal_tract_do_what_they_say(festival):
    text = "a small green heart and a purple star"
    diphone = festival_voice("kal_diphone")
    slow = festival.synthesize(text, diphone, rate=100, pitch=50)
    fast = festival.synthesize(text, diphone, rate=200, pitch=50)
    speech_seconds = [u.words[-1].end - u.words[0].start for u in (slow, fast)]
    assert 1.7 <= speech_seconds[0] / speech_seconds[1] <= 2.3

    for voice in (diphone, festival_voice("cmu_us_slt_arctic_hts")):
        low, high = (festival.synthesize(text, voice, rate=175, pitch=p) for p in (20, 80))
        ratio = median_f0(high.waveform, 16000) / median_f0(low.waveform, 16000)
        assert 1.3 <= ratio <= 1.7, (voice.id, ratio)  # 2 ** 0.6 = 1.52 expected

    # A diphone voice's tract variants move the formants and keep the pitch.
    short, long = (festival.synthesize(text, festival_voice(f"kal_diphone+tract{t}"), rate=175, pitch=50)
                   for t in ("112", "088"))
    assert abs(median_f0(short.waveform, 16000) / median_f0(long.waveform, 16000) - 1) < 0.06
    assert spectral_centroid(short.waveform, 16000) > 1.1 * spectral_centroid(long.waveform, 16000)
    assert abs(short.duration - long.duration) < 0.1


@pytest.mark.parametrize("engine_class, voice_class", [(FestivalEngine, FestivalVoice), (FliteEngine, FliteVoice)])
def test_voices_split_once_and_for_all(engine_class, voice_class):
    voices = engine_class().voices()
    assert [v.id for v in voices] == sorted(v.id for v in voices)
    assert {voice_class.parse(v.name).base for v in voices} == set(voice_class.BASES)
    assert all(voice_class.parse(v.name).name == v.name for v in voices)
    train, val = train_val_voices(engine_class())
    assert (train, val) == train_val_voices(engine_class())
    train_ids, val_ids = {v.id for v in train}, {v.id for v in val}
    assert not train_ids & val_ids and train_ids | val_ids == {v.id for v in voices}
    assert 0.1 <= len(val) / len(voices) <= 0.35
    # Val holds unheard variants of at least two base voices (the in-engine test is not one speaker).
    assert len({voice_class.parse(v.name).base for v in val}) >= 2


def test_festival_names_what_is_wrong(festival):
    with pytest.raises(ValueError, match="'\\+tract108'"):
        FestivalVoice.parse("kal_diphone+deep")
    with pytest.raises(ValueError, match="not one of the corpus voices"):
        FestivalVoice.parse("kal_diphone+tract150")
    with pytest.raises(ValueError, match="belongs to engine 'espeak'"):
        festival.synthesize("a red circle", Voice("espeak", "en-us", "en-us"), rate=175, pitch=50)
    with pytest.raises(ValueError, match="rate must be 80-450"):
        festival.synthesize("a red circle", festival_voice("kal_diphone"), rate=20, pitch=50)
    with pytest.raises(SpeechEngineError, match="apt-get install festival"):
        FestivalEngine(binary="/nonexistent/festival").voices()


def test_flite_is_deterministic_and_rate_pitch_and_vocal_tract_do_what_they_say(flite):
    voice = flite_voice("awb+tract092")
    first = flite.synthesize(CAPTION, voice, rate=150, pitch=40)
    flite.synthesize("a white hexagon in the snow", flite_voice("slt+tract108"), rate=200, pitch=70)
    again = FliteEngine().synthesize(CAPTION, voice, rate=150, pitch=40)
    assert again.waveform.tobytes() == first.waveform.tobytes() and again.words == first.words

    text = "a small green heart and a purple star"
    rms = flite_voice("rms")
    slow, fast = (flite.synthesize(text, rms, rate=r, pitch=50) for r in (100, 200))
    speech_seconds = [u.words[-1].end - u.words[0].start for u in (slow, fast)]
    assert 1.7 <= speech_seconds[0] / speech_seconds[1] <= 2.3
    low, high = (flite.synthesize(text, rms, rate=175, pitch=p) for p in (20, 80))
    assert 1.3 <= median_f0(high.waveform, 16000) / median_f0(low.waveform, 16000) <= 1.7  # 2 ** 0.6 = 1.52
    assert abs(high.duration - low.duration) < 0.15  # pitch does not change the tempo
    # Tract variants move the formants (and, in flite, the pitch with them), not the tempo.
    short, long = (flite.synthesize(text, flite_voice(f"kal16+tract{t}"), rate=175, pitch=50) for t in ("112", "088"))
    assert spectral_centroid(short.waveform, 16000) > 1.1 * spectral_centroid(long.waveform, 16000)
    assert abs(short.duration - long.duration) < 0.15


def test_flite_names_what_is_wrong(flite):
    with pytest.raises(ValueError, match="flite voice 'kal_diphone' is not one of the corpus voices"):
        FliteVoice.parse("kal_diphone")
    with pytest.raises(ValueError, match="belongs to engine 'festival'"):
        flite.synthesize("a red circle", festival_voice("kal_diphone"), rate=175, pitch=50)
    with pytest.raises(SpeechEngineError, match="apt-get install flite"):
        FliteEngine(binary="/nonexistent/flite").voices()


def test_three_engine_corpus_is_the_same_whatever_the_workers_and_names_every_engine(tmp_path):
    inline = tmp_path / "inline"
    synthesize_corpus(inline, pairs=10, val_pairs=6, seed=4, engines=("espeak", "festival", "flite"), workers=1,
                      progress=False)
    pooled = tmp_path / "pooled"
    result = CliRunner().invoke(main, ["synth", str(pooled), "--pairs", "10", "--val-pairs", "6", "--seed", "4",
                                       "--engines", "espeak,festival,flite", "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output

    files = sorted(p.relative_to(inline) for p in inline.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(pooled) for p in pooled.rglob("*") if p.is_file())
    assert [f for f in files if (inline / f).read_bytes() != (pooled / f).read_bytes()] == []

    engines = {name: get_engine(name) for name in ("espeak", "festival", "flite")}
    splits = {name: train_val_voices(engine) for name, engine in engines.items()}
    for split, index in (("train", 0), ("val", 1)):
        manifest = load_manifest(Path(pooled) / f"{split}.json")
        assert manifest.extra["corpus"]["engines"] == ["espeak", "festival", "flite"]
        assert {e.engine for e in manifest.entries} == {"espeak", "festival", "flite"}, split
        for entry in manifest.entries:
            assert entry.speaker == f"{entry.engine}:{entry.voice}"
            assert entry.speaker in {v.id for v in splits[entry.engine][index]}, (split, entry.speaker)
            assert [w.word for w in entry.words] == entry.asr_text.split()
            duration = soundfile.info(manifest.audio_path(entry)).duration
            assert 0.09 <= entry.words[0].start <= 0.31 and entry.words[-1].end <= duration
