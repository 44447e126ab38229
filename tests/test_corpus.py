"""The spoken-scenes corpus: determinism, voices, captions against ground truth, word timings, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from PIL import Image

from matchmap.cli import main
from training.manifest import Manifest, load_manifest
from training.scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, MAX_OVERLAP, SHAPES, SIZES
from training.speech import EspeakEngine, Voice, caption_words, resample, train_val_voices
from training.synth import synthesize_corpus


def corpus_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed1_corpora(tmp_path_factory) -> tuple[Path, Path]:
    """The same small corpus (seed 1) made twice: in this process and with two worker processes."""
    inline, pooled = tmp_path_factory.mktemp("seed1_inline"), tmp_path_factory.mktemp("seed1_pooled")
    synthesize_corpus(inline, pairs=6, val_pairs=4, seed=1, workers=1, progress=False)
    synthesize_corpus(pooled, pairs=6, val_pairs=4, seed=1, workers=2, progress=False)
    return inline, pooled


def both_splits(root: Path) -> list[tuple[Manifest, str]]:
    return [(load_manifest(root / f"{split}.json"), split) for split in ("train", "val")]


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(seed1_corpora):
    inline, pooled = corpus_files(seed1_corpora[0]), corpus_files(seed1_corpora[1])
    assert len(inline) == 2 + 2 * (6 + 4)  # two manifests, a png and a wav per pair
    assert inline.keys() == pooled.keys()
    differing = [name for name in inline if inline[name] != pooled[name]]
    assert differing == []


def test_another_seed_gives_another_corpus(tiny_corpus, seed1_corpora):
    seed0 = load_manifest(tiny_corpus / "train.json").entries[0]
    seed1 = load_manifest(seed1_corpora[0] / "train.json").entries[0]
    assert (seed0.asr_text, seed0.speaker) != (seed1.asr_text, seed1.speaker)


def test_layout_and_formats(tiny_corpus):
    for manifest, split in both_splits(tiny_corpus):
        assert len(manifest.entries) == {"train": 24, "val": 12}[split]
        assert len({e.uttid for e in manifest.entries}) == len(manifest.entries)
        for entry in manifest.entries:
            assert manifest.audio_path(entry).parent == tiny_corpus / "audio" / split
            info = soundfile.info(manifest.audio_path(entry))
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
            with Image.open(manifest.image_path(entry)) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))


def test_val_voices_are_fixed_and_never_used_for_training(tiny_corpus, seed1_corpora):
    engine = EspeakEngine()
    train, val = train_val_voices(engine)
    assert (train, val) == train_val_voices(EspeakEngine())  # no seed, no state: the same split every time
    train_ids, val_ids = {v.id for v in train}, {v.id for v in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {v.id for v in engine.voices()}
    assert 0.15 <= len(val) / (len(train) + len(val)) <= 0.25
    assert len({v.language for v in val}) >= 4  # val covers several accents, not one
    for root in (tiny_corpus, *seed1_corpora):  # corpora of seeds 0 and 1
        for manifest, split in both_splits(root):
            allowed = train_ids if split == "train" else val_ids
            assert {e.speaker for e in manifest.entries} <= allowed


def test_voice_ids_name_engine_and_voice():
    assert Voice("espeak", "en-us+f3", "en-us").id == "espeak:en-us+f3"


def test_every_object_is_named_exactly_once_and_truthfully(tiny_corpus):
    for manifest, _ in both_splits(tiny_corpus):
        for entry in manifest.entries:
            words = [w.word for w in entry.words]
            assert entry.asr_text == " ".join(words)
            assert words == [w.lower() for w in words] and all(w.isalpha() for w in words)
            assert 1 <= len(entry.objects) <= 3
            assert sum(w in SHAPES for w in words) == len(entry.objects)
            assert sum(w in COLORS for w in words) == len(entry.objects)
            for obj in entry.objects:
                spans = [i for i in range(len(words) - 1) if words[i: i + 2] == [obj.color, obj.shape]]
                assert len(spans) == 1, f"{entry.uttid}: {obj} in {entry.asr_text!r}"
                size_word = words[spans[0] - 1] if spans[0] > 0 else None
                assert size_word not in SIZES or size_word == obj.size
            mentioned = [w for w in words if w in BACKGROUNDS]
            assert mentioned in ([], [entry.background])


def test_boxes_lie_in_the_image_and_hold_their_object(tiny_corpus):
    for manifest, _ in both_splits(tiny_corpus):
        for entry in manifest.entries:
            pixels = np.asarray(Image.open(manifest.image_path(entry))).astype(int)
            boxes = [obj.bbox for obj in entry.objects]
            for obj in entry.objects:
                x0, y0, x1, y1 = obj.bbox
                assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
                extent = max(x1 - x0, y1 - y0) / IMAGE_SIZE
                low, high = SIZES[obj.size]
                assert low - 0.02 <= extent <= high + 0.02, (entry.uttid, obj)
                # The middle of the box is inside every shape: it shows the object's color.
                center = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
                assert np.abs(center - np.asarray(COLORS[obj.color])).max() <= 20, (entry.uttid, obj, center)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    w = min(a[2], b[2]) - max(a[0], b[0])
                    h = min(a[3], b[3]) - max(a[1], b[1])
                    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                    assert max(w, 0) * max(h, 0) <= (MAX_OVERLAP + 0.05) * smaller


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def span(audio: np.ndarray, sample_rate: int, start: float, end: float) -> np.ndarray:
    return audio[int(start * sample_rate): int(end * sample_rate)]


def test_word_timings_line_up_with_the_audio(tiny_corpus):
    for manifest, _ in both_splits(tiny_corpus):
        for entry in manifest.entries:
            audio, sr = soundfile.read(manifest.audio_path(entry), dtype="float32")
            words = entry.words
            duration = len(audio) / sr
            assert 0.09 <= words[0].start <= 0.31 and 0.09 <= duration - words[-1].end <= 0.31
            assert all(a.end <= b.start + 1e-6 and a.start < a.end for a, b in zip(words, words[1:], strict=False))

            assert all(0.02 <= w.end - w.start <= 1.2 for w in words), entry.uttid
            silences = [span(audio, sr, 0, words[0].start), span(audio, sr, words[-1].end, duration)]
            silences += [span(audio, sr, a.end, b.start)
                         for a, b in zip(words, words[1:], strict=False) if b.start - a.end > 0.08]
            loudest_silence = max(rms(s) for s in silences)
            speech = [rms(span(audio, sr, w.start, w.end)) for w in words]
            assert min(speech) > 10 * max(loudest_silence, 1e-4), (entry.uttid, loudest_silence, min(speech))


def test_caption_words_strip_punctuation_and_keep_offsets():
    assert caption_words("A red circle, a star.") == [("a", 0), ("red", 2), ("circle", 6), ("a", 14), ("star", 16)]


def test_espeak_merged_words_still_get_their_own_spans():
    # espeak speaks "on the" as one word; both must come back, in order, with their own spans.
    engine = EspeakEngine()
    voice = next(v for v in engine.voices() if v.name == "en-us")
    utterance = engine.synthesize("a red circle on the grass", voice, rate=175, pitch=50)
    assert [w.word for w in utterance.words] == ["a", "red", "circle", "on", "the", "grass"]
    on, the = utterance.words[3], utterance.words[4]
    assert on.start < on.end <= the.start < the.end
    assert utterance.sample_rate == 16000 and utterance.waveform.dtype == np.float32


def test_resample_keeps_a_tone_and_removes_what_the_new_rate_cannot_hold():
    t = np.arange(22050) / 22050
    out = resample(np.sin(2 * np.pi * 1000 * t), 22050, 16000)
    assert len(out) == 16000
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(out - expected)[400:-400].max() < 1e-3
    above_nyquist = resample(np.sin(2 * np.pi * 9000 * t), 22050, 16000)
    assert np.abs(above_nyquist)[400:-400].max() < 1e-3


def test_cli_refuses_to_overwrite_a_corpus_unless_forced(tmp_path):
    runner = CliRunner()
    args = ["synth", str(tmp_path), "--pairs", "2", "--val-pairs", "1", "--workers", "1", "--quiet"]
    first = runner.invoke(main, [*args, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"train": str(tmp_path / "train.json"), "val": str(tmp_path / "val.json"),
                                        "pairs": 2, "val_pairs": 1, "world": "shapes"}
    assert first.stderr == ""  # --quiet: no progress bar
    before = corpus_files(tmp_path)
    second = runner.invoke(main, args + ["--seed", "5"])
    assert second.exit_code != 0 and "--force" in second.output and "train.json" in second.output
    assert corpus_files(tmp_path) == before
    forced = runner.invoke(main, args + ["--seed", "5", "--force"])
    assert forced.exit_code == 0, forced.output
    assert corpus_files(tmp_path) != before
    assert len(load_manifest(tmp_path / "train.json").entries) == 2


def test_cli_names_an_unknown_engine(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--pairs", "1", "--engines", "espeak,nope"])
    assert result.exit_code != 0
    assert "unknown speech engine 'nope'" in result.output and "espeak" in result.output
