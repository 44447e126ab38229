"""The shipped default model: it loads without arguments and finds images for unheard voices, in both
worlds: the colours and shapes, and the everyday things of the objects world (issue 19)."""

from __future__ import annotations

import pytest

from encoders import create_model, default_checkpoint_path
from training.evaluate import evaluate
from training.manifest import load_manifest
from training.synth import synthesize_corpus

FRESH_VAL_PAIRS = 60
ENGINES = ("espeak", "festival")  # the engines the shipped model was trained on (docs/model.md)
# Floors measured on this freshly generated set (seed 4242: 23 espeak + 37 festival pairs, voices
# never heard in training) with the model of docs/model.md, minus a margin; a retrained model that
# falls below them has regressed. Measured (tiny-91342ad9b37e): MISA R@10 1.000 both ways, R@1 0.900
# (speech_to_image) and 0.867 (image_to_speech); SISA (stage 1) R@10 1.000 both ways. tiny-0b6ddfff39d0
# (both worlds, session 20) passes them too. Its
# predecessors: tiny-ffff7c022512 R@1 0.933 / 0.917, tiny-68ef1f39e4d2 0.933 / 0.883,
# tiny-3318f9ce4cc6 0.917 / 0.867, tiny-b827edac1c25 0.767 / 0.833, the espeak-only
# tiny-7d2489055c7b MISA R@10 0.883 / 0.867.
FLOORS = {("MISA", "speech_to_image", "R@10"): 0.9, ("MISA", "image_to_speech", "R@10"): 0.9,
          ("MISA", "speech_to_image", "R@1"): 0.6, ("MISA", "image_to_speech", "R@1"): 0.65,
          ("SISA", "speech_to_image", "R@10"): 0.85}


OBJECT_IMAGES = 40  # objects-world scenes, each with 2-5 captions by voices never heard in training
# Floors for them (seed 4243: 40 images, 136 captions; chance R@10 is 0.25). Measured with
# tiny-0b6ddfff39d0: MISA R@10 0.963 / 0.950, R@1 0.699 / 0.700 (speech->image / image->speech);
# the shapes-only tiny-b9792a4f6ced before it knew none of these things.
OBJECT_FLOORS = {("MISA", "speech_to_image", "R@10"): 0.85, ("MISA", "image_to_speech", "R@10"): 0.85,
                 ("MISA", "speech_to_image", "R@1"): 0.5, ("MISA", "image_to_speech", "R@1"): 0.5}


@pytest.fixture(scope="module")
def fresh_objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh_objects")
    synthesize_corpus(out, pairs=1, val_pairs=OBJECT_IMAGES, seed=4243, engines=ENGINES, workers=1, progress=False,
                      world="objects")
    return load_manifest(out / "val.json")


@pytest.fixture(scope="module")
def fresh_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh_val")
    synthesize_corpus(out, pairs=1, val_pairs=FRESH_VAL_PAIRS, seed=4242, engines=ENGINES, workers=1, progress=False)
    return load_manifest(out / "val.json")


def test_the_default_model_is_shipped_small_and_loads_without_arguments():
    path = default_checkpoint_path()
    assert path.is_file(), "encoders/default_model/tiny.pt is missing"
    assert path.stat().st_size < 20 * 2**20
    model = create_model()
    assert model.config.name == "tiny"
    assert model.version.startswith("tiny-")


def test_the_default_model_recalls_images_for_voices_it_never_heard(fresh_val):
    result = evaluate(create_model(), fresh_val, progress=False)
    assert result["pairs"] == FRESH_VAL_PAIRS
    for (kind, direction, k), floor in FLOORS.items():
        assert result[kind][direction][k] >= floor, (kind, direction, k, result[kind][direction])
    assert result["MISA"]["speech_to_image"]["R@10"] >= result["SISA"]["speech_to_image"]["R@10"]


def test_the_default_model_finds_everyday_things_for_voices_it_never_heard(fresh_objects):
    result = evaluate(create_model(), fresh_objects, progress=False)
    assert result["images"] == OBJECT_IMAGES and result["pairs"] > 2 * OBJECT_IMAGES
    print({kind: result[kind] for kind in ("MISA", "SISA")})
    for (kind, direction, k), floor in OBJECT_FLOORS.items():
        assert result[kind][direction][k] >= floor, (kind, direction, k, result[kind][direction])
