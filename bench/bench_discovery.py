"""Concept discovery on a manifest, over a few settings: how pure are the clusters of grounded speech
segments, and how many of the 8 shapes and 8 colors name a cluster?

The segments (every grounding peak, its audio frames pooled with the image region it grounds in)
are collected once per --half-width; then, for each (--clusters, --keep, --image-weight) setting,
the strongest ``keep`` share is clustered with faiss k-means and summarized. --report writes the full HTML report of the first
setting (what `matchmap discover` writes).

    .venv/bin/python bench/bench_discovery.py --checkpoint /work/data/runs/tiny-infonce/best.pt \\
        --manifest /work/data/corpus/val.json --clusters 32,64 --keep 0.3,0.5,1.0 --report /tmp/discovery
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from encoders import create_model
from training.grounding import cluster_segments, collect_segments, write_report
from training.manifest import load_manifest


def _numbers(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped model)")
    parser.add_argument("--manifest", default="/work/data/corpus/val.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--clusters", default="32,64,100", help="comma-separated k values")
    parser.add_argument("--keep", default="0.5,1.0", help="comma-separated shares of peaks kept")
    parser.add_argument("--half-width", default="0,1", help="comma-separated frames either side of a peak")
    parser.add_argument("--image-weight", default="0,1", help="comma-separated weights of the image region feature")
    parser.add_argument("--seeds", default="0", help="comma-separated k-means seeds")
    parser.add_argument("--out", default="bench/out/discovery.json")
    parser.add_argument("--report", default=None, help="write the first setting's HTML report here")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = create_model(args.checkpoint)
    manifest = load_manifest(args.manifest)
    print(f"{'half':>4} {'k':>4} {'keep':>5} {'img':>4} {'seed':>4} {'segments':>8} {'purity':>7} {'weighted':>8} "
          f"{'shapes':>6} {'colors':>6}  named")
    runs, pools = [], []
    for half_width in _numbers(args.half_width, int):
        started = time.perf_counter()
        pool = collect_segments(model, manifest, half_width=half_width, limit=args.limit, progress=False)
        pools.append({"half_width": half_width, "peaks": len(pool.segments), "pairs": pool.pairs,
                      "collect_seconds": time.perf_counter() - started})
        for k in _numbers(args.clusters, int):
            for keep in _numbers(args.keep, float):
                for weight, seed in itertools.product(_numbers(args.image_weight, float), _numbers(args.seeds, int)):
                    t0 = time.perf_counter()
                    discovery = cluster_segments(pool, k, keep=keep, image_weight=weight, seed=seed)
                    s = {**discovery.summary, "cluster_seconds": time.perf_counter() - t0}
                    runs.append(s)
                    print(f"{half_width:>4} {k:>4} {keep:>5.2f} {weight:>4.1f} {seed:>4} {s['segments']:>8} {s['mean_purity']:>7.3f} "
                          f"{s['weighted_purity']:>8.3f} {s['shapes_found']:>5}/8 {s['colors_found']:>5}/8  "
                          f"{' '.join(s['shapes'] + s['colors'])}")
                    if args.report and len(runs) == 1:
                        print(f"report: {write_report(discovery, manifest, args.report)}")
    result = {
        "checkpoint": args.checkpoint or "shipped default",
        "model_version": model.version,
        "manifest": args.manifest,
        "pools": pools,
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
