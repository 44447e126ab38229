"""Build objects.tsv, the object vocabulary, from Unicode's emoji-test.txt and curation.tsv.

    python -m training.vocabulary.build [--emoji-test PATH] [--font PATH] [--out PATH]

Run once by hand when the curation changes (objects.tsv is committed data; nothing reads
emoji-test.txt at run time). Keeps every fully-qualified emoji of the groups Animals & Nature,
Food & Drink, Travel & Places, Activities and Objects that is one code point (with or without the
emoji variation selector FE0F), drops clock faces, moon phases and the faces of sun, moon and
wind, applies curation.tsv (spoken names, twins and unnameable things dropped), checks that the
font draws every one, and appends today's eight geometric shapes (no code point).
Needs Debian's unicode-data and fonts-noto-color-emoji.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from training.vocabulary import GROUPS, NAME_PATTERN, SHAPE_GROUP, VOCABULARY_PATH

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CURATION = Path(__file__).with_name("curation.tsv")
# emoji-test.txt group -> the vocabulary's group
UNICODE_GROUPS = {"Animals & Nature": "animals", "Food & Drink": "food", "Travel & Places": "travel",
                  "Activities": "activities", "Objects": "objects"}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
# Not concrete things, or one drawing per clock time and moon phase: dropped by rule.
DROP_NAME = re.compile(r"o’clock|-thirty|\b(new|quarter|gibbous|waxing|waning)\b.* moon\b|\bface\b")
VARIATION_SELECTOR = "FE0F"


def read_emoji_test(path: Path) -> list[tuple[str, str, str]]:
    """(code point, vocabulary group, CLDR name) of every single-code-point emoji of the kept groups."""
    rows, group = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = UNICODE_GROUPS.get(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#") and group:
            points, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            points = [p for p in points.split() if p != VARIATION_SELECTOR]
            if status.strip() == "fully-qualified" and len(points) == 1:
                rows.append((points[0], group, re.sub(r"^\S+ E\d+\.\d+ ", "", comment.strip())))
    return rows


def spoken(name: str) -> str:
    """A CLDR name as a caption can say it: lowercase words of letters only."""
    name = name.lower().replace("’s", "s").replace("ñ", "n")
    return " ".join(re.sub(r"[^a-z]+", " ", name).split())


def read_curation(path: Path) -> dict[str, list[str] | None]:
    """code point -> its names (first = what a person says), or None: dropped."""
    curation = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            point, names = line.split("\t")[:2]
            curation[point] = None if names == "-" else names.split("|")
    return curation


def renders(points: list[str], font_path: Path) -> set[str]:
    """The code points that the font draws (any non-transparent pixel)."""
    from training.emoji import draws_glyph

    return {p for p in points if draws_glyph(p, font_path)}


def build(emoji_test: Path, curation_path: Path, font_path: Path) -> list[tuple[str | None, str, list[str]]]:
    curation = read_curation(curation_path)
    rows = read_emoji_test(emoji_test)
    unknown = sorted(set(curation) - {p for p, _, _ in rows})
    if unknown:
        raise SystemExit(f"curation.tsv names code points that are not candidates: {', '.join(unknown)}")
    kept = []
    for point, group, name in rows:
        names = curation.get(point, [spoken(name)])
        if names is None or (point not in curation and DROP_NAME.search(name)):
            continue
        kept.append((point, group, names))
    drawn = renders([p for p, _, _ in kept], font_path)
    missing = [p for p, _, _ in kept if p not in drawn]
    if missing:
        print(f"dropped, not drawn by {font_path}: {', '.join(missing)}", file=sys.stderr)
    vocabulary = [(p, g, n) for p, g, n in kept if p in drawn] + [(None, SHAPE_GROUP, [s]) for s in SHAPES]
    bad = [n for _, _, names in vocabulary for n in names if not NAME_PATTERN.fullmatch(n)]
    firsts = [names[0] for _, _, names in vocabulary]
    twins = sorted({n for n in firsts if firsts.count(n) > 1})
    if bad or twins:
        raise SystemExit(f"unspeakable names: {bad}; first names shared: {twins}")
    assert {g for _, g, _ in vocabulary} <= set(GROUPS)
    return vocabulary


def main() -> None:
    from training.emoji import EMOJI_FONT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emoji-test", type=Path, default=EMOJI_TEST)
    parser.add_argument("--font", type=Path, default=EMOJI_FONT)
    parser.add_argument("--out", type=Path, default=VOCABULARY_PATH)
    args = parser.parse_args()
    vocabulary = build(args.emoji_test, CURATION, args.font)
    lines = ["# The object vocabulary: code point (- for the geometric shapes), group, spoken names (first = what",
             "# a person says). Generated by `python -m training.vocabulary.build` from Unicode's emoji-test.txt",
             "# and curation.tsv: edit those, not this file.",
             "codepoint\tgroup\tnames"]
    lines += [f"{point or '-'}\t{group}\t{'|'.join(names)}" for point, group, names in vocabulary]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocabulary)} categories to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
