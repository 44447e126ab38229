"""How far caption ambiguity caps recall on a spoken-scenes val set: the oracle's R@1/5/10.

A caption names the scene's objects (colour + shape, sometimes size) and sometimes its background,
so several images of a val set can fit one caption equally well. The oracle ranks the images that
are consistent with a caption first (same objects, sizes and background where the caption states
them; in random order among themselves) and everything else after; its expected R@k for a caption
with m consistent images is min(1, k / m). No model can beat these figures on average.

    .venv/bin/python bench/caption_ambiguity.py corpus2/val.json [--pairs 500 1000]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys


def mentions(text: str, colors: set, shapes: set, sizes: set, backgrounds: set) -> tuple[list, str | None]:
    words = re.findall(r"[a-z]+", text.lower())
    objects, background = [], None
    for i, word in enumerate(words):
        if word in shapes and i > 0 and words[i - 1] in colors:
            size = words[i - 2] if i > 1 and words[i - 2] in sizes else None
            objects.append((words[i - 1], word, size))
        if word in backgrounds:
            background = word
    return objects, background


def consistent(caption: tuple[list, str | None], entry: dict) -> bool:
    objects, background = caption
    if background and entry["background"] != background:
        return False
    have = [(o["color"], o["shape"], o["size"]) for o in entry["objects"]]
    if len(have) != len(objects):
        return False
    for color, shape, size in objects:
        match = next((h for h in have if h[0] == color and h[1] == shape and (size is None or h[2] == size)), None)
        if match is None:
            return False
        have.remove(match)
    return True


def oracle(entries: list[dict]) -> tuple[dict[int, float], collections.Counter]:
    vocab = [{o[key] for e in entries for o in e["objects"]} for key in ("color", "shape", "size")]
    backgrounds = {e["background"] for e in entries}
    recall = dict.fromkeys((1, 5, 10), 0.0)
    fits = collections.Counter()
    for entry in entries:
        caption = mentions(entry["asr_text"], *vocab, backgrounds)
        m = sum(consistent(caption, other) for other in entries)
        fits[min(m, 10)] += 1
        for k in recall:
            recall[k] += min(1.0, k / m)
    return {k: v / len(entries) for k, v in recall.items()}, fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="a val.json written by `matchmap synth` (with objects and background)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[500, 1000], help="the first N pairs, as eval uses")
    args = parser.parse_args()
    entries = json.load(open(args.manifest))["data"]
    for n in args.pairs:
        recall, fits = oracle(entries[:n])
        shares = ", ".join(f"{m}{'+' if m == 10 else ''}: {c}" for m, c in sorted(fits.items()))
        print(f"{min(n, len(entries))} pairs: oracle R@1 {recall[1]:.3f}, R@5 {recall[5]:.3f}, R@10 {recall[10]:.3f}; "
              f"captions by number of fitting images ({shares})")
    print(f"reproduce: .venv/bin/python bench/caption_ambiguity.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
