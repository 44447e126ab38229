"""What a caption's in-batch negatives look like: length-bucketed batches against random ones.

The in-batch loss teaches a caption to rank its image above the batch's other images. A caption that
names one object only learns that a scene holding that object *and more* is wrong when such scenes
are among its negatives. Caption length follows how much a caption says, so length-bucketed batches
(``LengthBucketBatchSampler``, ``matchmap train --bucket-by-length``) hold few of them.

For each object count n of a caption, this prints how many of its batch's other images hold more
objects than n, and how many hold a different number, averaged over an epoch's batches, once with
the length-bucketed sampler and once with random batches of the same size. Reads caption lengths
from the wav headers and object lists from a `matchmap synth` manifest; trains nothing.

    .venv/bin/python bench/batch_negatives.py corpus2/train.json [--batch-size 64] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import soundfile
import torch
from torch.utils.data import BatchSampler, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import LengthBucketBatchSampler  # noqa: E402
from training.manifest import load_manifest  # noqa: E402


def negatives_by_count(batches: list[list[int]], counts: list[int]) -> dict[int, dict[str, float]]:
    """{object count n: mean number of a caption's batch negatives with more / a different count}."""
    more: collections.Counter = collections.Counter()
    other: collections.Counter = collections.Counter()
    captions: collections.Counter = collections.Counter()
    for batch in batches:
        for i in batch:
            n = counts[i]
            captions[n] += 1
            more[n] += sum(counts[j] > n for j in batch if j != i)
            other[n] += sum(counts[j] != n for j in batch if j != i)
    return {n: {"captions": captions[n], "more_objects": more[n] / captions[n], "other_count": other[n] / captions[n]}
            for n in sorted(captions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a `matchmap synth` manifest (object lists inside)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of both samplers' epoch-0 order")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    manifest = load_manifest(args.manifest)
    entries = manifest.entries
    lacking = [e.uttid for e in entries if e.objects is None]
    if lacking:
        raise SystemExit(f"{args.manifest}: {len(lacking)} entries (first {lacking[0]}) have no object list; "
                         "this needs a `matchmap synth` manifest")
    if len(entries) < args.batch_size:
        raise SystemExit(f"{args.manifest}: {len(entries)} pairs, fewer than one batch of {args.batch_size}")
    counts = [len(e.objects) for e in entries]
    # The samplers only compare lengths, so the file's own sample count stands in for the resampled one.
    lengths = [soundfile.info(str(manifest.audio_path(e))).frames for e in entries]

    bucketed = list(LengthBucketBatchSampler(lengths, args.batch_size, seed=args.seed))
    # what the trainer's DataLoader draws without buckets: a RandomSampler cut into full batches
    random_batches = list(BatchSampler(RandomSampler(range(len(entries)), generator=torch.Generator().manual_seed(
        args.seed)), args.batch_size, drop_last=True))
    result = {"manifest": str(args.manifest), "pairs": len(entries), "batch_size": args.batch_size,
              "length_buckets": negatives_by_count(bucketed, counts),
              "random_batches": negatives_by_count(random_batches, counts)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.manifest}: {len(entries)} pairs, batches of {args.batch_size} "
          f"({args.batch_size - 1} negatives per caption)\n")
    print("| caption's objects | captions | negatives with more objects: buckets / random "
          "| negatives with another count: buckets / random |")
    print("|---|---|---|---|")
    for n, row in result["random_batches"].items():
        b = result["length_buckets"].get(n, {"more_objects": 0.0, "other_count": 0.0})
        print(f"| {n} | {row['captions']} | {b['more_objects']:.1f} / {row['more_objects']:.1f} "
              f"| {b['other_count']:.1f} / {row['other_count']:.1f} |")
    print(f"\nreproduce: .venv/bin/python bench/batch_negatives.py {args.manifest} --batch-size {args.batch_size}")


if __name__ == "__main__":
    main()
