"""Places-format manifests: round trips, real Places JSON, and bad entries reported all at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from training.manifest import Entry, ManifestError, combine_manifests, load_manifest, write_manifest


def test_a_written_manifest_loads_back_equal_and_rewrites_byte_identical(tiny_corpus, tmp_path):
    original = load_manifest(tiny_corpus / "train.json")
    copy = tmp_path / "elsewhere.json"  # outside the corpus: base paths become absolute
    write_manifest(original, copy)
    again = load_manifest(copy)
    assert again.entries == original.entries
    assert (again.image_base_path, again.audio_base_path) == (original.image_base_path, original.audio_base_path)
    assert again.extra == original.extra
    assert json.loads(copy.read_text())["image_base_path"] == str(tiny_corpus / "images" / "train")

    beside = tiny_corpus / "train.rewritten.json"  # inside the corpus: the same bytes as synth wrote
    try:
        write_manifest(original, beside)
        assert beside.read_bytes() == (tiny_corpus / "train.json").read_bytes()
    finally:
        beside.unlink()


def test_ground_truth_fields_are_typed(tiny_corpus):
    entry = load_manifest(tiny_corpus / "val.json").entries[0]
    assert entry.engine == "espeak" and entry.speaker == f"espeak:{entry.voice}"
    assert entry.words and all(isinstance(w.start, float) and w.end >= w.start for w in entry.words)
    assert entry.objects and all(len(o.bbox) == 4 for o in entry.objects)
    assert {"rate", "pitch"} <= entry.extra.keys()


@pytest.fixture
def places_dir(tiny_corpus, tmp_path) -> Path:
    """A folder laid out like Places: images/ and wavs/ subfolders, one real wav and png copied in."""
    manifest = load_manifest(tiny_corpus / "val.json")
    entry = manifest.entries[0]
    (tmp_path / "images" / "a" / "abbey").mkdir(parents=True)
    (tmp_path / "wavs" / "1").mkdir(parents=True)
    shutil.copy(manifest.image_path(entry), tmp_path / "images" / "a" / "abbey" / "gsun_1.jpg.png")
    shutil.copy(manifest.audio_path(entry), tmp_path / "wavs" / "1" / "utt1.wav")
    return tmp_path


def places_item(n: int) -> dict:
    return {"wav": "wavs/1/utt1.wav", "image": "a/abbey/gsun_1.jpg.png", "uttid": f"A1_GSUN_{n}",
            "speaker": "A1B2C3", "asr_text": "a church with a tower"}


def test_real_places_json_without_the_extras_loads_and_round_trips(places_dir, tmp_path, monkeypatch):
    document = {
        "image_base_path": str(places_dir / "images"),  # Places ships absolute base paths
        "audio_base_path": str(places_dir),
        "data": [places_item(0), {**places_item(1), "duration": 3.2}],
    }
    path = places_dir / "places_train.json"
    path.write_text(json.dumps(document))
    monkeypatch.chdir(tmp_path.parent)  # paths must not depend on the working directory

    manifest = load_manifest(path)
    assert [e.uttid for e in manifest.entries] == ["A1_GSUN_0", "A1_GSUN_1"]
    first, second = manifest.entries
    assert first.words is None and first.objects is None and first.background is None
    assert second.extra == {"duration": 3.2}
    assert manifest.audio_path(first).is_file() and manifest.image_path(first).is_file()

    rewritten = tmp_path / "rewritten.json"
    write_manifest(manifest, rewritten)
    reloaded = json.loads(rewritten.read_text())
    assert reloaded["data"] == document["data"]
    assert load_manifest(rewritten).entries == manifest.entries


def test_relative_base_paths_resolve_against_the_manifest_folder(places_dir, tmp_path, monkeypatch):
    document = {"image_base_path": "images", "audio_base_path": ".", "data": [places_item(0)]}
    (places_dir / "relative.json").write_text(json.dumps(document))
    monkeypatch.chdir(tmp_path.parent)
    manifest = load_manifest(places_dir / "relative.json")
    assert manifest.image_base_path == places_dir / "images"
    assert manifest.audio_path(manifest.entries[0]) == places_dir / "wavs" / "1" / "utt1.wav"


@pytest.fixture
def broken_manifest(places_dir) -> tuple[Path, dict[str, Path]]:
    """Six entries: two good ones and one each of missing wav, empty wav, wav with no samples, corrupt png."""
    bad = {
        "missing": places_dir / "wavs" / "1" / "gone.wav",
        "empty": places_dir / "wavs" / "1" / "empty.wav",
        "no_samples": places_dir / "wavs" / "1" / "no_samples.wav",
        "corrupt": places_dir / "images" / "a" / "abbey" / "corrupt.png",
    }
    bad["empty"].write_bytes(b"")
    soundfile.write(bad["no_samples"], np.zeros(0, np.int16), 16000, subtype="PCM_16")
    bad["corrupt"].write_bytes(b"this is not a png at all" * 10)
    items = [places_item(0), places_item(1)]
    items.insert(1, {**places_item(2), "wav": "wavs/1/gone.wav"})
    items.insert(2, {**places_item(3), "wav": "wavs/1/empty.wav"})
    items.insert(3, {**places_item(4), "wav": "wavs/1/no_samples.wav"})
    items.append({**places_item(5), "image": "a/abbey/corrupt.png"})
    document = {"image_base_path": "images", "audio_base_path": ".", "data": items}
    path = places_dir / "broken.json"
    path.write_text(json.dumps(document))
    return path, bad


def test_every_bad_entry_is_reported_with_its_path_in_one_error(broken_manifest):
    path, bad = broken_manifest
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message
    assert len(caught.value.problems) == 4
    for name, index, reason in (("missing", 1, "does not exist"), ("empty", 2, "empty file"),
                                ("no_samples", 3, "0 samples"), ("corrupt", 5, "undecodable image")):
        line = next(line for line in message.splitlines() if str(bad[name]) in line)
        assert f"entry {index} (uttid A1_GSUN_" in line and reason in line


def test_skip_bad_keeps_the_good_entries_and_says_what_it_skipped(broken_manifest, capsys):
    path, bad = broken_manifest
    manifest = load_manifest(path, skip_bad=True)
    assert [e.uttid for e in manifest.entries] == ["A1_GSUN_0", "A1_GSUN_1"]
    err = capsys.readouterr().err
    assert "skipped 4 of 6 entries" in err
    assert all(str(p) in err for p in bad.values())


def test_a_truncated_image_is_caught_by_the_deep_check_only(places_dir):
    image = places_dir / "images" / "a" / "abbey" / "gsun_1.jpg.png"
    truncated = image.with_name("truncated.png")
    truncated.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    document = {"image_base_path": "images", "audio_base_path": ".",
                "data": [{**places_item(0), "image": "a/abbey/truncated.png"}]}
    path = places_dir / "truncated.json"
    path.write_text(json.dumps(document))
    assert len(load_manifest(path).entries) == 1  # the header is intact
    with pytest.raises(ManifestError, match="truncated.png: undecodable image"):
        load_manifest(path, deep_check=True)


def test_malformed_entries_and_files_are_named(tmp_path):
    document = {"image_base_path": ".", "audio_base_path": ".",
                "data": [{"wav": "a.wav", "image": "a.png"}, "not an entry",
                         {**places_item(0), "words": [{"word": "a", "start": 1.0, "end": 0.5}]}]}
    path = tmp_path / "malformed.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check_files=False)
    problems = caught.value.problems
    assert [p.index for p in problems] == [0, 1, 2]
    assert "missing key 'uttid'" in problems[0].reason and "expected a JSON object" in problems[1].reason
    assert "ends (0.5) before it starts (1.0)" in problems[2].reason

    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="file does not exist"):
        load_manifest(tmp_path / "absent.json")
    path.write_text(json.dumps({"data": {}}))
    with pytest.raises(ManifestError, match="missing key 'image_base_path'"):
        load_manifest(path)


def test_entry_json_keeps_unknown_keys():
    item = {**places_item(0), "words": [{"word": "a", "start": 0.1, "end": 0.2}], "custom": [1, 2]}
    assert Entry.from_json(item).to_json() == item


def test_combined_manifests_keep_every_file_and_make_repeated_uttids_unique(tiny_corpus, tmp_path):
    train, val = load_manifest(tiny_corpus / "train.json"), load_manifest(tiny_corpus / "val.json")
    combined = combine_manifests([train, val, train])
    parts = [(train, e) for e in train.entries] + [(val, e) for e in val.entries] + [(train, e) for e in train.entries]
    assert len(combined.entries) == len(parts)
    for entry, (source, original) in zip(combined.entries, parts, strict=True):
        assert combined.audio_path(entry).resolve() == source.audio_path(original).resolve()
        assert combined.image_path(entry).resolve() == source.image_path(original).resolve()
        assert (entry.words, entry.objects, entry.asr_text) == (original.words, original.objects, original.asr_text)
    uttids = [e.uttid for e in combined.entries]
    assert len(set(uttids)) == len(uttids)
    assert uttids[len(train.entries)] == val.entries[0].uttid  # unique already: unchanged
    assert uttids[0] == f"0/{train.entries[0].uttid}" and uttids[-1] == f"2/{train.entries[-1].uttid}"
    write_manifest(combined, tmp_path / "both.json")  # a combined manifest is an ordinary one
    assert load_manifest(tmp_path / "both.json").entries == combined.entries
    assert combine_manifests([val]) is val
    with pytest.raises(ValueError, match="no manifests"):
        combine_manifests([])
