"""Indexing throughput (images/s) and bytes on disk per image, end to end through ``Library.index``.

Indexes N images (default 10,000) into a fresh SQLite-backed library with the shipped default model
(or --checkpoint; ``--checkpoint tiny`` for a randomly initialized one) and reports:

  index      -- images/s of the whole pipeline: read + SHA-256, decode + crop, embed, fsync the
                feature maps, commit the catalog rows, build and save the stage-1 index
  model      -- images/s of ``encode_images`` alone on random pixels at the same batch size, the
                pipeline's ceiling on this machine
  re-run     -- files/s of running the same command again (everything skipped as already indexed)
  bytes      -- per image: catalog (SQLite file), stage-1 FAISS file, feature store (maps + pooled)

Images: ``--images-dir`` takes the first N images of a folder (e.g. ``matchmap synth`` output);
without it, N spoken-scenes corpus images (``training.scenes.random_scene``: 256x256, textured
background, 1-3 shapes; no speech) are rendered first as PNG (not timed).

    .venv/bin/python bench/bench_indexer.py [--images 10000] [--batch-size 32] [--images-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from encoders import create_model
from indexer import IMAGE_EXTENSIONS, Library
from training.scenes import random_scene


def prepare_images(folder: Path, count: int, source: Path | None) -> float:
    """Fill ``folder`` with ``count`` images; -> mean file size in bytes."""
    folder.mkdir(parents=True)
    if source is not None:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:count]
        if len(files) < count:
            sys.exit(f"{source} holds only {len(files)} images, {count} asked for")
        for i, path in enumerate(files):
            os.symlink(path.resolve(), folder / f"{i:07d}{path.suffix.lower()}")
    else:
        rng = np.random.default_rng(0)
        for i in range(count):
            random_scene(rng).image.save(folder / f"{i:07d}.png")
    return float(np.mean([p.stat().st_size for p in folder.iterdir()]))


def model_only_rate(model, batch_size: int, seconds: float = 10.0) -> float:
    """images/s of encode_images on random input at batch_size, after a warm-up batch."""
    size = model.config.image.input_size
    pixels = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model.encode_images(pixels)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.encode_images(pixels)
            done += batch_size
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="number of images to index")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default=None,
                        help="model checkpoint or registry name [default: the shipped default model]")
    parser.add_argument(
        "--images-dir", type=Path, default=None, help="take images from here instead of drawing them"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where images and the library go [a temp dir]"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-indexer-", dir=args.work_dir))
    try:
        images = work / "images"
        mean_file = prepare_images(images, args.images, args.images_dir)
        torch.manual_seed(0)
        model = create_model(args.checkpoint).eval()

        with Library.open(work / "data", create=True) as library:
            started = time.perf_counter()
            report = library.index("bench", [str(images)], model, batch_size=args.batch_size, progress=True)
            index_seconds = time.perf_counter() - started
            started = time.perf_counter()
            again = library.index("bench", [str(images)], model, batch_size=args.batch_size, progress=False)
            rerun_seconds = time.perf_counter() - started
            [info] = library.list_collections()
            collection = library.collection("bench")
            store_bytes = collection.store.bytes_on_disk()
            stage1_bytes = sum(p.stat().st_size for p in collection.folder.glob("stage1-*.faiss"))
        catalog_bytes = sum(p.stat().st_size for p in (work / "data").glob("catalog.sqlite*"))
        model_rate = model_only_rate(model, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    assert report.added == args.images and not report.failed, report
    assert again.skipped_duplicates == args.images
    n = args.images
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); model {model.version}, "
        f"{model.config.image.input_size} px input, grid {model.image_grid}, D={model.config.embed_dim}; "
        f"load average {os.getloadavg()[0]:.1f} (the CPUs are shared: figures vary with it)"
    )
    print(
        f"# command: {sys.executable} bench/bench_indexer.py --images {n} --batch-size {args.batch_size}"
        + (f" --images-dir {args.images_dir}" if args.images_dir else "")
        + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
    )
    print(
        f"images           {n} ({'from ' + str(args.images_dir) if args.images_dir else 'rendered spoken-scenes PNGs'}, "
        f"mean file {mean_file / 1024:.1f} KiB)"
    )
    print(
        f"index            {n / index_seconds:8.1f} images/s  ({index_seconds:.1f} s, batch {args.batch_size})"
    )
    print(f"model only       {model_rate:8.1f} images/s  (encode_images on random pixels)")
    print(f"re-run           {n / rerun_seconds:8.1f} files/s   (all {n} skipped as already indexed)")
    print(
        f"bytes per image  {info.bytes / n:8.0f} total = catalog {catalog_bytes / n:.0f} + stage-1 "
        f"{stage1_bytes / n:.0f} + feature store {store_bytes / n:.0f}"
    )
    print(f"index type       {info.index_type} {info.index_params}")


if __name__ == "__main__":
    main()
