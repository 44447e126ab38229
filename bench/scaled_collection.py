"""Grow a collection of real encoded scenes to a million images, by augmenting their feature maps.

Drawing and encoding a million scenes costs hours on 2 cores (about 100 scenes/s drawn, 420 images/s
encoded); the engine only ever sees feature maps and stage-1 vectors. So a scaled collection is made
of (1) every real image already indexed in it (scene images encoded by the model, whose val captions
are the queries) and (2) augmented copies of their maps, added through ``Library.add_embedded``:
each copy takes a random real image's 8 x 8 x D map, mirrors it left-right half of the time, shifts it
by -1..1 regions along each axis (edge regions repeated), and adds Gaussian noise of ``noise`` times
each dimension's spread over the real maps; its stage-1 vector comes from the model's own pooling
(``stage1_image_vectors``) of the float16 map, as the indexer makes it. The copies are plausible
maps of scenes like the real ones (the same objects elsewhere in the frame), neither exact duplicates
nor random blocks, so they compete with the real images for each query as similar scenes would.

    python bench/scaled_collection.py --library /work/exp/bench100k/library --collection bench \
        --checkpoint encoders/default_model/tiny.pt --to 1000000

With ``--corpus DIR --drawn N`` it first indexes the real part itself: the corpus's images and N
scenes drawn as `matchmap synth` draws them (``bench_search.scene_images``, into DIR/../drawn-scenes).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from encoders import create_model
from indexer import Library


def real_maps(library: Library, collection: str, limit: int) -> np.ndarray:
    """The maps (M, R, D) float16 of the collection's first ``limit`` images (the real ones)."""
    coll = library.collection(collection)
    parts, held = [], 0
    for _, maps in coll.iter_feature_maps():
        parts.append(maps[: limit - held])
        held += len(parts[-1])
        if held >= limit:
            break
    return np.concatenate(parts)


def augmented_batches(model, sources: np.ndarray, count: int, seed: int, first: int,
                      batch: int = 4096, noise: float = 0.1) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    """``count`` augmented maps of ``sources`` (M, R, D), numbered from ``first``, as add_embedded batches."""
    rows, cols = model.image_grid
    dim = sources.shape[-1]
    spread = sources[: min(len(sources), 4096)].astype(np.float32).reshape(-1, dim).std(axis=0)
    for b0 in range(0, count, batch):
        rng = np.random.default_rng([seed, first + b0])
        n = min(batch, count - b0)
        maps = sources[rng.integers(0, len(sources), n)].astype(np.float32).reshape(n, rows, cols, dim)
        mirror = rng.random(n) < 0.5
        maps[mirror] = maps[mirror][:, :, ::-1]
        for axis, size in ((1, rows), (2, cols)):
            shifts = rng.integers(-1, 2, n)
            for shift in (-1, 1):
                picked = shifts == shift
                index = np.clip(np.arange(size) + shift, 0, size - 1)
                maps[picked] = np.take(maps[picked], index, axis=axis)
        maps += rng.standard_normal(maps.shape, dtype=np.float32) * (noise * spread)
        maps16 = maps.reshape(n, rows * cols, dim).astype(np.float16)
        with torch.inference_mode():
            pooled = model.stage1_image_vectors(torch.from_numpy(maps16)).numpy().astype(np.float32)
        names = [f"augmented://{seed}/{first + b0 + i}" for i in range(n)]
        images = [(uri, hashlib.sha256(uri.encode()).hexdigest(), 256, 256) for uri in names]
        yield images, maps16, pooled


def grow(library_dir: Path, collection: str, checkpoint: str, to: int, seed: int = 7, noise: float = 0.1,
         sources_limit: int = 100_000) -> dict:
    """Add augmented maps until ``collection`` holds ``to`` images; returns what was done."""
    model = create_model(checkpoint).eval()
    with Library.open(library_dir) as library:
        size = library.collection(collection).size
        if size >= to:
            return {"added": 0, "size": size, "seconds": 0.0}
        sources = real_maps(library, collection, min(size, sources_limit))
        started = time.perf_counter()
        report = library.add_embedded(collection, model, augmented_batches(model, sources, to - size, seed, size,
                                                                           noise=noise), total=to - size)
        return {"added": report.added, "size": library.collection(collection).size, "real": len(sources),
                "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="the library's data dir")
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--checkpoint", default="encoders/default_model/tiny.pt")
    parser.add_argument("--to", type=int, default=1_000_000, help="images the collection should hold")
    parser.add_argument("--noise", type=float, default=0.1, help="noise, in units of each dimension's spread")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--corpus", type=Path, default=None,
                        help="first index this `matchmap synth` corpus's images (and --drawn scenes) as the real part")
    parser.add_argument("--drawn", type=int, default=0, help="with --corpus: scenes drawn and indexed beside it")
    args = parser.parse_args()
    if args.corpus is not None:
        import sys

        if args.library.name != "library":
            parser.error("with --corpus, --library must be a folder named library (bench_search's layout)")

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_search import build_collection, corpus_inputs, scene_images

        images = corpus_inputs(args.corpus)[0] + scene_images(args.corpus.parent / "drawn-scenes", args.drawn, args.seed)
        seconds, size = build_collection(args.library.parent, Path(args.checkpoint), images, args.collection)
        print(f"{args.collection}: {size} real images indexed in {seconds:.1f} s")
    done = grow(args.library, args.collection, args.checkpoint, args.to, args.seed, args.noise)
    print(f"{args.collection}: added {done['added']} augmented images in {done['seconds']:.1f} s; now {done['size']}")


if __name__ == "__main__":
    main()
