"""The objects world's vocabulary: `matchmap vocabulary --json`, its data file, and the emoji font."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np

from training.emoji import EMOJI_FONT, glyph
from training.vocabulary import NAME_PATTERN, load_vocabulary
from training.vocabulary.build import CURATION, EMOJI_TEST, build


def _vocabulary_json() -> list[dict]:
    code = ("import sys; from matchmap.cli import main\n"
            "try:\n    main(['vocabulary', '--json'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'matchmap vocabulary imported torch'")
    return json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def test_vocabulary_json_lists_hundreds_of_named_categories_without_importing_torch():
    categories = _vocabulary_json()
    assert all(set(c) == {"codepoint", "names", "group"} for c in categories)
    groups = Counter(c["group"] for c in categories)
    assert sum(groups.values()) >= 300
    assert set(groups) == {"animals", "food", "travel", "activities", "objects", "shapes"}
    assert min(groups.values()) >= 8
    by_point = {c["codepoint"]: c for c in categories}
    # first names are what a person says, not CLDR's
    assert by_point["1F415"] == {"codepoint": "1F415", "names": ["dog"], "group": "animals"}
    assert by_point["1F697"]["names"][0] == "car" and by_point["2615"]["names"][0] == "coffee"
    # no faces, clocks, moon phases, flags or symbols; twins dropped
    for gone in ("1F436", "1F600", "1F550", "1F311", "1F1EB", "2660", "1F698", "1F6A1"):
        assert gone not in by_point, gone
    shapes = [c for c in categories if c["group"] == "shapes"]
    assert {c["names"][0] for c in shapes} == {"circle", "square", "triangle", "star", "heart", "cross", "diamond",
                                               "hexagon"}
    assert all(c["codepoint"] is None for c in shapes)
    firsts = [c["names"][0] for c in categories]
    assert len(firsts) == len(set(firsts)), "two categories share what a person calls them"
    assert all(NAME_PATTERN.fullmatch(n) for c in categories for n in c["names"])


def test_every_emoji_of_the_vocabulary_is_drawn_by_the_font():
    for category in load_vocabulary():
        if category.codepoint is not None:
            image = glyph(category.codepoint)
            alpha = np.asarray(image.getchannel("A"))
            assert image.width >= 40 and image.height >= 40, category
            assert (alpha > 128).mean() > 0.15, category
            # in color, as drawn (a font drawn without its color tables gives one flat silhouette)
            visible = np.asarray(image)[alpha > 128][:, :3]
            assert len(np.unique(visible, axis=0)) >= 3, category


def test_the_vocabulary_file_is_what_the_build_script_makes_of_the_curation():
    built = build(EMOJI_TEST, CURATION, EMOJI_FONT)
    assert [(c.codepoint, c.group, list(c.names)) for c in load_vocabulary()] == \
        [(point, group, names) for point, group, names in built]
