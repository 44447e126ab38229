"""The objects world: emoji scenes, people-like captions, several per image, through `matchmap synth` and
`matchmap eval` (multi-caption recall from the manifest alone), and the pointing game's mentions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from encoders import create_model
from matchmap.cli import main
from training.data import CaptionedImages
from training.grounding import object_mentions
from training.manifest import load_manifest
from training.objects_world import (
    EXTENT,
    OBJECT_BACKGROUNDS,
    describe_object_scene,
    plural,
    random_object_scene,
)
from training.scenes import IMAGE_SIZE
from training.speech import caption_words
from training.vocabulary import SHAPE_GROUP, by_name, load_vocabulary

IMAGES = {"train": 3, "val": 3}


@pytest.fixture(scope="module")
def objects_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("objects_corpus")
    result = CliRunner().invoke(main, ["synth", str(out), "--world", "objects", "--pairs", str(IMAGES["train"]),
                                       "--val-pairs", str(IMAGES["val"]), "--captions", "2-3", "--seed", "7",
                                       "--engines", "espeak,festival", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 images" in result.output
    return out


def _name_words(obj) -> list[str]:
    return ([obj.color] if obj.color else []) + obj.category.split()


def test_each_image_has_several_captions_by_different_voices_naming_its_objects(objects_corpus):
    speakers = {}
    for split in ("train", "val"):
        manifest = load_manifest(objects_corpus / f"{split}.json")
        by_image = {}
        for entry in manifest.entries:
            by_image.setdefault(entry.image, []).append(entry)
        assert len(by_image) == IMAGES[split]
        speakers[split] = {e.speaker for e in manifest.entries}
        vocabulary = by_name()
        for entries in by_image.values():
            assert 2 <= len(entries) <= 3
            assert len({e.speaker for e in entries}) == len(entries), "an image's captions share a voice"
            assert len({e.asr_text for e in entries}) > 1 or len(entries) == 1
            for entry in entries:
                assert entry.objects and 1 <= len(entry.objects) <= 4
                spoken = [w.word for w in entry.words]
                assert spoken == [w for w, _ in caption_words(entry.asr_text)]
                for obj in entry.objects:
                    category = vocabulary[obj.category]
                    assert obj.codepoint == category.codepoint
                    assert (obj.color is not None) == (category.group == SHAPE_GROUP)
                    x0, y0, x1, y1 = obj.bbox
                    assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
                    if obj.mention is not None:  # the words that name the object alone
                        assert spoken[obj.mention[0]: obj.mention[1] + 1] == _name_words(obj), entry.asr_text
                    else:  # named in a count, or left out of this caption
                        name = plural(" ".join(_name_words(obj)))
                        assert name is None or " ".join(spoken).count(name) <= 1
                # the pointing game finds every named object's words, with their timings
                mentions, missing = object_mentions(entry)
                assert len(mentions) == sum(o.mention is not None for o in entry.objects)
                assert all(m.start < m.end for m in mentions)
    assert not speakers["train"] & speakers["val"], "validation voices must be unheard in training"


def test_eval_ranks_unique_images_of_a_multi_caption_manifest(objects_corpus, checkpoint):
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(checkpoint), str(objects_corpus / "val.json"),
                                       "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    captions = len(load_manifest(objects_corpus / "val.json").entries)
    assert report["pairs"] == captions and report["images"] == IMAGES["val"]
    # the captions of one image share one decoded copy of it in memory
    manifest = load_manifest(objects_corpus / "val.json")
    dataset = CaptionedImages(manifest, create_model(checkpoint), train=False, progress=False)
    assert len({id(image) for image in dataset.images}) == IMAGES["val"] < len(dataset)
    # with 3 images, every caption's image is within its top 3 and every image has a caption in its top
    # `captions`: R@5 and R@10 are 1 whatever the (random) model
    for kind in ("MISA", "SISA", "SIMA"):
        assert report[kind]["speech_to_image"]["R@5"] == 1.0
        assert report[kind]["image_to_speech"]["R@10"] == 1.0


def test_scenes_vary_in_count_size_place_and_background_and_are_deterministic():
    scenes = [random_object_scene(np.random.default_rng([11, i])) for i in range(60)]
    again = random_object_scene(np.random.default_rng([11, 0]))
    assert np.array_equal(np.asarray(again.image), np.asarray(scenes[0].image))
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {o.size for s in scenes for o in s.objects} == {"small", "medium", "big"}
    assert len({s.background for s in scenes}) >= 7 and {s.background for s in scenes} <= set(OBJECT_BACKGROUNDS)
    extents = [max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) / IMAGE_SIZE for s in scenes for o in s.objects]
    assert min(extents) >= 0.09 and max(extents) <= EXTENT[1] * 1.2
    assert len({o.category for s in scenes for o in s.objects}) > 100
    assert any(len({o.category for o in s.objects}) < len(s.objects) for s in scenes), "no scene counts a thing"
    # one-object scenes from a chosen vocabulary, for a curriculum
    dogs = [c for c in load_vocabulary() if c.name in ("dog", "car")]
    single = [random_object_scene(np.random.default_rng([12, i]), objects=(1, 1), vocabulary=dogs) for i in range(8)]
    assert all(len(s.objects) == 1 and s.objects[0].category in ("dog", "car") for s in single)


def test_plurals_for_counts():
    cases = {"dog": "dogs", "hot dog": "hot dogs", "sandwich": "sandwiches", "fox": "foxes", "mouse": "mice",
             "strawberry": "strawberries", "key": "keys", "knife": "knives", "bus": "buses", "glasses": None,
             "french fries": None, "abacus": "abacuses", "cactus": "cacti", "compass": "compasses",
             "nest with eggs": None}
    assert {name: plural(name) for name in cases} == cases


def test_captions_name_things_as_people_do():
    texts, counted = [], 0
    for i in range(80):
        rng = np.random.default_rng([13, i])
        scene = random_object_scene(rng)
        for _ in range(3):
            caption = describe_object_scene(scene, rng)
            words = [w for w, _ in caption_words(caption.text)]
            texts.append(caption.text)
            for obj, span in zip(scene.objects, caption.mentions, strict=True):
                if span is not None:
                    assert words[span[0]: span[1] + 1] == _name_words(obj), caption.text
                    # "an abacus", "a small dog", but "skis"
                    before = words[max(0, span[0] - 2): span[0]]
                    assert (plural(obj.category) is None and obj.category.endswith("s")) or \
                        any(w in ("a", "an") for w in before), caption.text
            kinds = Counter(o.category for o in scene.objects)
            for category, n in kinds.items():
                if n > 1 and plural(category) and category in caption.text:
                    assert {2: "two", 3: "three"}[n] + " " + plural(category) in caption.text
                    counted += 1
    joined = " | ".join(texts)
    assert counted >= 3
    for phrase in (" next to ", " above ", " on the left", " at the top", "there are ", " on the grass"):
        assert phrase in joined, phrase
    assert len(set(texts)) > 0.95 * len(texts)
