"""What a model gets wrong: for each caption whose image misses the MISA speech->image top 10, how the
best-ranked image differs from the true one (object count, colors, shapes, background).

Reads the ground truth (objects, background) that `matchmap synth` writes into every manifest entry.
A miss whose best-ranked image has the same colors and the same shapes as the true one is a
binding or size confusion ("red circle and blue square" vs "blue circle and red square").

    .venv/bin/python bench/recall_misses.py corpus2/val.json                       # the shipped model
    .venv/bin/python bench/recall_misses.py corpus2/val.json --checkpoint run/best.pt --examples 20
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import create_model, score_matrix  # noqa: E402
from training.data import CaptionedImages  # noqa: E402
from training.evaluate import embed_pairs  # noqa: E402
from training.manifest import load_manifest  # noqa: E402


def describe(entry) -> tuple[tuple, str]:
    objects = tuple(sorted((o.color, o.shape, o.size) for o in entry.objects))
    return objects, entry.background


def analyse(scores: torch.Tensor, entries, k: int = 10) -> tuple[dict, list[tuple[str, str]]]:
    """scores: (N, N) caption x image, truth on the diagonal -> (difference counts, example pairs)."""
    positive = scores.diagonal()
    counts: collections.Counter = collections.Counter()
    examples = []
    for a, entry in enumerate(entries):
        if int((scores[a] > positive[a]).sum()) < k:
            continue
        counts["misses"] += 1
        counts[f"engine {entry.engine}"] += 1
        best = entries[int(scores[a].argmax())]
        (truth, truth_bg), (other, other_bg) = describe(entry), describe(best)
        counts["object count differs"] += len(truth) != len(other)
        counts["background differs"] += truth_bg != other_bg
        same_colors = sorted(o[0] for o in truth) == sorted(o[0] for o in other)
        same_shapes = sorted(o[1] for o in truth) == sorted(o[1] for o in other)
        counts["colors differ"] += not same_colors
        counts["shapes differ"] += not same_shapes
        counts["same colors and shapes (binding or size)"] += same_colors and same_shapes
        examples.append((entry.asr_text, best.asr_text))
    return dict(counts), examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a `matchmap synth` manifest (ground truth inside)")
    parser.add_argument("--checkpoint", default=None, help="model (default: the shipped model)")
    parser.add_argument("--examples", type=int, default=10, help="misses to print as caption | best image's caption")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()

    model = create_model(args.checkpoint)
    manifest = load_manifest(args.manifest)
    lacking = [e.uttid for e in manifest.entries if e.objects is None or e.background is None]
    if lacking:
        raise SystemExit(f"{args.manifest}: {len(lacking)} entries (first {lacking[0]}) have no objects or "
                         "background; this needs a `matchmap synth` manifest")
    emb = embed_pairs(model, CaptionedImages(manifest, model, train=False, progress=False), progress=False)
    scores = score_matrix(emb.audio, emb.lengths, emb.image_maps, kinds=("misa",))["misa"]
    counts, examples = analyse(scores, manifest.entries)
    if args.json:
        print(json.dumps({"model": model.version, "pairs": len(manifest.entries), **counts}, indent=2))
        return
    print(f"model {model.version}, {len(manifest.entries)} pairs: {counts.get('misses', 0)} captions miss the top 10")
    for key, value in counts.items():
        if key != "misses":
            print(f"  {key}: {value}")
    for caption, other in examples[: args.examples]:
        print(f"  {caption!r} ranked first: {other!r}")
    print(f"\nreproduce: .venv/bin/python bench/recall_misses.py {args.manifest}"
          + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""))


if __name__ == "__main__":
    main()
