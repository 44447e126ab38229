"""Which words a model knows: recall and pointing per category of the objects world, and what it confuses.

On a manifest with word timings and object ground truth (`matchmap synth --world objects`):

- **recall per category**: each caption's own image is ranked among the manifest's unique images by
  MISA (the multi-caption protocol of `matchmap eval`); a caption's hit@10 counts for every category
  it names. Per category: the captions naming it and their speech->image R@10.
- **pointing per category**: the pointing game of `bench/bench_pointing.py` (each spoken mention's
  heatmap peak inside its object's box), with the uniform-random baseline.
- **confusions**: for every mention whose peak lands in another object's box (and not its own),
  the pair (named category -> category pointed at), most frequent first.
- **groups**: the same per vocabulary group (animals, food, travel, activities, objects, shapes).

Prints the tables and the command, writes the JSON to --out and, with --plot, a picture of per-group
recall and pointing beside their baselines and the best and worst known categories.

    .venv/bin/python bench/bench_categories.py --checkpoint run/best.pt --manifest objects/val.json \\
        --out bench/out/categories.json --plot docs/img/categories.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from encoders import create_model
from encoders.matchmap import score_matrix
from training.data import CaptionedImages, image_groups
from training.evaluate import embed_pairs, manifest_images
from training.grounding import point_in_box, pointing_game
from training.manifest import load_manifest
from training.vocabulary import by_name


def caption_hits(model, manifest, k: int = 10, batch_size: int = 64) -> list[bool]:
    """Whether each caption's own image is in its MISA top k among the manifest's unique images."""
    dataset = CaptionedImages(manifest, model, train=False, progress=False)
    emb = embed_pairs(model, dataset, batch_size=batch_size, progress=False)
    representatives, caption_image = image_groups(manifest_images(manifest))
    scores = score_matrix(emb.audio, emb.lengths, emb.image_maps[representatives], kinds=("misa",))["misa"]
    own = scores[torch.arange(len(caption_image)), caption_image]
    above = (scores >= own[:, None]).sum(dim=1) - 1  # imposters scoring at least as high (ties count against)
    return (above < k).tolist()


def named_categories(entry) -> list[str]:
    """Categories that the caption of ``entry`` names (objects with a spoken mention)."""
    return sorted({o.category for o in entry.objects or [] if o.category and o.mention is not None})


def per_category(manifest, hits: list[bool], trials) -> dict:
    """{category: {"captions", "r10", "mentions", "pointing", "random"}} and the confusion counts."""
    captions: dict[str, list[bool]] = defaultdict(list)
    for entry, hit in zip(manifest.entries, hits, strict=True):
        for category in named_categories(entry):
            captions[category].append(hit)
    by_uttid = {e.uttid: e for e in manifest.entries}
    pointing: dict[str, list] = defaultdict(list)
    confusions: Counter = Counter()
    for t in trials:
        pointing[t.shape].append(t)
        if not t.hit:
            landed = [o.category for o in by_uttid[t.uttid].objects or []
                      if o.category != t.shape and point_in_box(t.peak_x, t.peak_y, o.bbox)]
            for other in landed:
                confusions[(t.shape, other)] += 1
    rows = {}
    for category in sorted(set(captions) | set(pointing)):
        c, p = captions.get(category, []), pointing.get(category, [])
        rows[category] = {
            "captions": len(c), "r10": sum(c) / len(c) if c else None,
            "mentions": len(p), "pointing": sum(t.hit for t in p) / len(p) if p else None,
            "random": sum(t.random_hit_rate for t in p) / len(p) if p else None,
        }
    return {"categories": rows, "confusions": [{"named": a, "pointed_at": b, "count": n}
                                               for (a, b), n in confusions.most_common()]}


def per_group(rows: dict) -> dict:
    """Caption- and mention-weighted figures per vocabulary group."""
    names = by_name()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for category, row in rows.items():
        group = names[category].group if category in names else "unknown"
        s = sums[group]
        s["categories"] += 1
        if row["captions"]:
            s["captions"] += row["captions"]
            s["hits"] += row["r10"] * row["captions"]
        if row["mentions"]:
            s["mentions"] += row["mentions"]
            s["pointed"] += row["pointing"] * row["mentions"]
            s["random"] += row["random"] * row["mentions"]
    return {g: {"categories": int(s["categories"]), "captions": int(s["captions"]),
                "r10": s["hits"] / s["captions"] if s["captions"] else None, "mentions": int(s["mentions"]),
                "pointing": s["pointed"] / s["mentions"] if s["mentions"] else None,
                "random": s["random"] / s["mentions"] if s["mentions"] else None}
            for g, s in sorted(sums.items())}


def plot(summary: dict, out: Path, min_mentions: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    names = list(groups)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    x = range(len(names))
    left.bar([i - 0.3 for i in x], [groups[g]["r10"] or 0 for g in names], 0.3, label="speech->image R@10")
    left.bar(list(x), [groups[g]["pointing"] or 0 for g in names], 0.3, label="pointing")
    left.bar([i + 0.3 for i in x], [groups[g]["random"] or 0 for g in names], 0.3, label="pointing, random point")
    left.axhline(min(1.0, 10 / summary["images"]), color="grey", lw=0.8, ls="--", label="R@10 by chance")
    left.set_xticks(list(x), names, rotation=20)
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    left.set_title("per vocabulary group")
    ranked = sorted(((c, r) for c, r in summary["categories"].items() if r["mentions"] >= min_mentions),
                    key=lambda cr: cr[1]["pointing"])
    shown = ranked[:10] + ranked[-10:]
    right.barh(range(len(shown)), [r["pointing"] for _, r in shown],
               color=["tab:red"] * min(10, len(ranked[:10])) + ["tab:green"] * (len(shown) - min(10, len(ranked[:10]))))
    right.set_yticks(range(len(shown)), [f"{c} ({r['mentions']})" for c, r in shown], fontsize=7)
    right.set_xlim(0, 1)
    right.set_title(f"pointing: the 10 worst and 10 best categories (at least {min_mentions} mentions)")
    fig.suptitle(summary["title"], fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/out/categories.json"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--min-mentions", type=int, default=5, help="categories shown by name need this many")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model = create_model(args.checkpoint).eval() if args.checkpoint else create_model().eval()
    manifest = load_manifest(args.manifest)
    hits = caption_hits(model, manifest)
    report = pointing_game(model, manifest, progress=False)
    found = per_category(manifest, hits, report.trials)
    images = len(set(manifest_images(manifest)))
    summary = {"title": f"{args.checkpoint or 'shipped model'} on {args.manifest} ({len(hits)} captions, {images} images)",
               "captions": len(hits), "images": images, "r10": sum(hits) / len(hits),
               "pointing": report.summary["accuracy"], "groups": per_group(found["categories"]), **found}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))

    print(summary["title"])
    print(f"speech->image MISA R@10 {summary['r10']:.3f} (chance {min(1.0, 10 / images):.3f}); pointing "
          f"{summary['pointing']['model']:.3f} (random point {summary['pointing']['random']:.3f}, centre "
          f"{summary['pointing']['center']:.3f}; within 15 px as Zhang et al. count, "
          f"{summary['pointing']['model_within_15px']:.3f})")
    print(f"\n{'group':<11} {'categories':>10} {'captions':>8} {'R@10':>6} {'mentions':>8} {'pointing':>8} {'random':>7}")
    for group, g in summary["groups"].items():
        fmt = lambda v: f"{v:.3f}" if v is not None else "  -  "  # noqa: E731
        print(f"{group:<11} {g['categories']:>10} {g['captions']:>8} {fmt(g['r10']):>6} {g['mentions']:>8} "
              f"{fmt(g['pointing']):>8} {fmt(g['random']):>7}")
    known = [(c, r) for c, r in found["categories"].items() if r["mentions"] >= args.min_mentions]
    known.sort(key=lambda cr: (cr[1]["pointing"], cr[1]["r10"] or 0))
    for title, rows in (("best known", known[::-1][:15]), ("least known", known[:15])):
        print(f"\n{title} (at least {args.min_mentions} mentions): category  pointing (mentions)  R@10 (captions)")
        for category, r in rows:
            r10 = f"{r['r10']:.2f} ({r['captions']})" if r["r10"] is not None else "-"
            print(f"  {category:<22} {r['pointing']:.2f} ({r['mentions']})  {r10}")
    print("\nmost frequent confusions (named -> pointed at another object):")
    for c in found["confusions"][:15]:
        print(f"  {c['named']} -> {c['pointed_at']}: {c['count']}")
    if args.plot:
        plot(summary, args.plot, args.min_mentions)
        print(f"\npicture: {args.plot}")
    print(f"\n{time.perf_counter() - started:.0f} s; reproduce: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
