"""Pointing game on a manifest: does the heatmap of each spoken object mention peak inside its box?

For every object mention of the captions (color word start -> shape word end, from the word timings)
the whole image is encoded, the mention's heatmap computed (max over its frames of the matchmap),
and its peak cell centre tested against the object's box, with the service's heatmaps (the span
contrasted with the rest of the caption, the image's map averaged with its mirror's). Baselines: a
uniform random point (the exact expectation: box area / image area) and the image centre. Overall
and per shape, color, size; "<=15px" is the share within 15 pixels of the box, as the literature's
pointing game (Zhang et al., 2016) counts (the strict hit is the measure kept).

    .venv/bin/python bench/bench_pointing.py --checkpoint /work/data/runs/tiny-infonce/best.pt \\
        --manifest /work/data/corpus/val.json --examples docs/img/pointing_examples.png

Writes the JSON summary to --out (default bench/out/pointing.json) and prints tables.

``--scales 1.0 1.5`` first plays the game at each localization scale (the whole image resized to that
many times the model's resize_size; ``encoders.grounding.LOCALIZATION_SCALE`` is the service's), side by
side on the same mentions, overall and per object size; the full report then uses the service's scale.
``--contrasts 0 0.3`` and ``--mirrors off on`` do the same for the span contrast and the mirrored pass
(``SPAN_CONTRAST``, ``MIRROR_AVERAGE``), every combination of the three lists in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import encoders.grounding
from encoders import create_model, load_audio, load_image
from encoders.grounding import (
    MIRROR_AVERAGE,
    SPAN_CONTRAST,
    encode_audio_map,
    encode_whole_image,
    normalize_heatmap,
    span_frames,
    span_heatmap,
)
from search.localization import image_grid, overlay_heatmap, titled
from training.grounding import PointingTrial, point_in_box, pointing_game
from training.manifest import Manifest, load_manifest


def print_tables(summary: dict) -> None:
    a = summary["accuracy"]
    print(f"{summary['mentions']} mentions in {summary['pairs']} pairs ({summary['unmatched_objects']} objects unmatched)")
    print(f"{'':<12} {'n':>5} {'model':>7} {'<=15px':>7} {'random':>7} {'center':>7}")
    rows = [("overall", {**a, "mentions": summary["mentions"]})]
    rows += [(key, row) for group in ("by_shape", "by_color", "by_size") for key, row in summary[group].items()]
    for key, row in rows:
        print(f"{key:<12} {row['mentions']:>5} {row['model']:>7.3f} {row['model_within_15px']:>7.3f} "
              f"{row['random']:>7.3f} {row['center']:>7.3f}")


def miss_breakdown(manifest: Manifest, trials: list[PointingTrial]) -> dict[str, int]:
    """Where the misses peaked: in another object of the caption sharing the mention's color, its shape,
    neither, or on no object (the background)."""
    by_uttid = {e.uttid: e for e in manifest.entries}
    counts = {"same_color_object": 0, "same_shape_object": 0, "other_object": 0, "background": 0}
    for t in trials:
        if t.hit:
            continue
        others = [o for o in by_uttid[t.uttid].objects or [] if (o.color, o.shape) != (t.color, t.shape)
                  and point_in_box(t.peak_x, t.peak_y, o.bbox)]
        if any(o.color == t.color for o in others):
            counts["same_color_object"] += 1
        elif any(o.shape == t.shape for o in others):
            counts["same_shape_object"] += 1
        else:
            counts["other_object" if others else "background"] += 1
    return counts


def example_picture(model, manifest: Manifest, trials: list[PointingTrial], count: int, reduce: str) -> Image.Image:
    """A grid of ``count`` mentions, the first hits and (a third of the grid) the first misses:
    heatmap over the image, the object's box in white, the peak as a cross (green hit, red miss)."""
    by_uttid = {e.uttid: e for e in manifest.entries}
    misses = [t for t in trials if not t.hit][: count // 3]
    shown = [t for t in trials if t.hit][: count - len(misses)] + misses
    tiles = []
    for t in shown:
        entry = by_uttid[t.uttid]
        image = load_image(manifest.image_path(entry))
        audio = encode_audio_map(model, load_audio(manifest.audio_path(entry), model.config.audio.sample_rate))
        first, last = span_frames((t.start_seconds, t.end_seconds), audio.shape[0], model.audio_frame_seconds)
        heat, _, _ = normalize_heatmap(span_heatmap(encode_whole_image(model, image), audio, first, last, reduce))
        picture = overlay_heatmap(image, heat)
        draw = ImageDraw.Draw(picture)
        draw.rectangle([t.bbox[0], t.bbox[1], t.bbox[2] - 1, t.bbox[3] - 1], outline="white", width=2)
        colour = (0, 200, 0) if t.hit else (230, 0, 0)
        draw.line([t.peak_x - 8, t.peak_y, t.peak_x + 8, t.peak_y], fill=colour, width=3)
        draw.line([t.peak_x, t.peak_y - 8, t.peak_x, t.peak_y + 8], fill=colour, width=3)
        tiles.append(titled(picture.resize((128, 128)), f"{t.color} {t.shape}: {'hit' if t.hit else 'miss'}", font_size=11))
    return image_grid(tiles, columns=6)


def compare_settings(model, manifest: Manifest, args) -> None:
    """The pointing game under every combination of ``args.scales``, ``args.contrasts`` and ``args.mirrors``
    (each defaulting to the service's), one after another on the same mentions."""
    service = encoders.grounding.LOCALIZATION_SCALE
    scales = args.scales or [service]
    contrasts = args.contrasts if args.contrasts is not None else [SPAN_CONTRAST]
    mirrors = [m == "on" for m in args.mirrors] if args.mirrors else [MIRROR_AVERAGE]
    print(f"settings side by side (the service's: scale {service}, contrast {SPAN_CONTRAST}, "
          f"mirror {'on' if MIRROR_AVERAGE else 'off'}); reproduce: python bench/bench_pointing.py "
          + (f"--checkpoint {args.checkpoint} " if args.checkpoint else "") + f"--manifest {args.manifest} "
          + (f"--limit {args.limit} " if args.limit else "")
          + (f"--scales {' '.join(map(str, args.scales))} " if args.scales else "")
          + (f"--contrasts {' '.join(map(str, args.contrasts))} " if args.contrasts is not None else "")
          + (f"--mirrors {' '.join(args.mirrors)}" if args.mirrors else ""))
    if len(mirrors) > 1:
        image = load_image(manifest.image_path(manifest.entries[0]))
        times: dict[bool, list[float]] = {mirror: [] for mirror in mirrors}
        for mirror in mirrors:
            for _ in range(5):  # the shapes' first passes
                encoders.grounding.encode_whole_images(model, [image], mirror=mirror)
        for _ in range(30):  # interleaved, so that a busy moment hits both alike
            for mirror in mirrors:
                started = time.perf_counter()
                encoders.grounding.encode_whole_images(model, [image], mirror=mirror)
                times[mirror].append(time.perf_counter() - started)
        print("  encoding one whole image at the service's scale (median of 30): " + ", ".join(
            f"mirror {'on' if mirror else 'off'} {1000 * sorted(t)[len(t) // 2]:.1f} ms" for mirror, t in times.items()))
    try:
        for scale in scales:
            encoders.grounding.LOCALIZATION_SCALE = scale
            grid = tuple(encoders.grounding.encode_whole_image(model, Image.new("RGB", (64, 64))).shape[:2])
            for mirror in mirrors:
                for contrast in contrasts:
                    started = time.perf_counter()
                    summary = pointing_game(model, manifest, reduce=args.reduce, batch_size=args.batch_size,
                                            limit=args.limit, progress=False, contrast=contrast, mirror=mirror).summary
                    sizes = ", ".join(f"{k} {v['model']:.3f}" for k, v in summary["by_size"].items())
                    print(f"  scale {scale:<5} ({encoders.grounding.localization_side(model)} px, grid {grid[0]} x {grid[1]}), "
                          f"mirror {'on ' if mirror else 'off'}, contrast {contrast:<4}: model {summary['accuracy']['model']:.3f} "
                          f"over {summary['mentions']} mentions; by size: {sizes} ({time.perf_counter() - started:.0f} s)")
    finally:
        encoders.grounding.LOCALIZATION_SCALE = service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped model)")
    parser.add_argument("--manifest", default="/work/data/corpus/val.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--reduce", choices=["max", "mean"], default="max",
                        help="a region's heat over the mention's frames: max (the service's heatmap) or mean")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/out/pointing.json")
    parser.add_argument("--examples", default=None, help="PNG of example mentions to write")
    parser.add_argument("--example-count", type=int, default=12)
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="first compare these localization scales side by side (see the notes above)")
    parser.add_argument("--contrasts", type=float, nargs="+", default=None,
                        help="... and these span contrasts (encoders.grounding.SPAN_CONTRAST; 0 = the plain matchmap)")
    parser.add_argument("--mirrors", choices=["on", "off"], nargs="+", default=None,
                        help="... with and/or without the mirrored pass (encoders.grounding.MIRROR_AVERAGE)")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = create_model(args.checkpoint)
    manifest = load_manifest(args.manifest)
    if args.scales or args.contrasts is not None or args.mirrors:
        compare_settings(model, manifest, args)
    started = time.perf_counter()
    report = pointing_game(model, manifest, reduce=args.reduce, batch_size=args.batch_size, limit=args.limit)
    elapsed = time.perf_counter() - started
    summary = {
        **report.summary,
        "reduce": args.reduce,
        "checkpoint": args.checkpoint or "shipped default",
        "model_version": model.version,
        "manifest": args.manifest,
        "misses": miss_breakdown(manifest, report.trials),
        "seconds": elapsed,
        "load_average": os.getloadavg(),
    }
    print_tables(summary)
    print("misses peaked on:", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["misses"].items()))
    print(f"{elapsed:.1f} s; load average {summary['load_average'][0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.examples:
        Path(args.examples).parent.mkdir(parents=True, exist_ok=True)
        picture = example_picture(model, manifest, report.trials, args.example_count, args.reduce)
        picture.quantize(128).save(args.examples, optimize=True)  # a palette keeps the docs' pictures small
        print(f"wrote {args.examples}")


if __name__ == "__main__":
    main()
