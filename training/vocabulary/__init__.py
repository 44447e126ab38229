"""The object vocabulary of the objects world: every category a scene can hold and its spoken names.

``objects.tsv`` (data, committed; built by ``build.py`` from Unicode's emoji-test.txt and the hand
curation in ``curation.tsv``) lists one category per line: its emoji code point (``-`` for today's
geometric shapes, which stay objects too), its group and its spoken names, the first being what a
person says ("car", not "automobile"). ``matchmap vocabulary --json`` prints it. Imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VOCABULARY_PATH = Path(__file__).with_name("objects.tsv")
SHAPE_GROUP = "shapes"
GROUPS = ("animals", "food", "travel", "activities", "objects", SHAPE_GROUP)
NAME_PATTERN = re.compile(r"[a-z]+( [a-z]+)*")


@dataclass(frozen=True)
class Category:
    """One kind of object: ``codepoint`` (hex, e.g. "1F415"; None for a geometric shape), ``group``,
    ``names`` (the first is what a person says)."""

    codepoint: str | None
    group: str
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def char(self) -> str | None:
        """The emoji itself (with the emoji variation selector where the font needs it)."""
        return None if self.codepoint is None else chr(int(self.codepoint, 16)) + "\ufe0f"

    def to_json(self) -> dict:
        return {"codepoint": self.codepoint, "names": list(self.names), "group": self.group}


@cache
def load_vocabulary(path: Path = VOCABULARY_PATH) -> tuple[Category, ...]:
    """The categories of ``objects.tsv``, in file order."""
    categories = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or line.startswith("codepoint\t"):
            continue
        point, group, names = line.split("\t")
        categories.append(Category(None if point == "-" else point, group, tuple(names.split("|"))))
    return tuple(categories)


def by_name() -> dict[str, Category]:
    """Category by its first (spoken) name."""
    return {c.name: c for c in load_vocabulary()}
