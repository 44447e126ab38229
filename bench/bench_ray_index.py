"""Indexing on Ray against indexing in process: the same images, side by side in one run.

Three ways of indexing the same scene images into fresh collections, one after the other:

- **in process**: `Library.index` as `matchmap index` runs it (a thread decodes, the main thread
  embeds with all of torch's threads);
- **Ray, 1 node**: a local cluster of one node with all the CPUs, one encoding actor per CPU;
- **Ray, 2 nodes**: `ray.cluster_utils.Cluster` with two nodes splitting the CPUs, one actor per CPU.

For each: wall seconds, images/s, seconds until the first encoded batch (cluster joined, actors
started, models loaded), and how many images each node encoded. On a 2-core machine the two
"nodes" share the same cores, so this measures Ray's overhead and that the work spreads, not a
speed-up; the scale-out model (docs/scale-out.md) takes the per-actor rate from here.

    python bench/bench_ray_index.py --images /work/exp/obj6k/images/train --count 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from encoders import create_model
from indexer import Library
from indexer.ray_encode import RayEncoder


def index_once(files: list[Path], checkpoint: Path, work: Path, encoder=None, batch_size: int = 32) -> dict:
    model = create_model(checkpoint)
    started = time.perf_counter()
    with Library.open(work, create=True) as library:
        report = library.index("bench", [str(f) for f in files], model, batch_size=batch_size, progress=False,
                               encoder=encoder)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "rate": report.added / seconds, "added": report.added}
    if encoder is not None:
        out["first_batch"] = encoder.run.connect_seconds + encoder.run.first_batch_seconds
        out["nodes"] = sorted(encoder.run.nodes.values(), reverse=True)
        out["workers"] = encoder.run.workers
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of scene images (PNG)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    command = "python bench/bench_ray_index.py " + " ".join(sys.argv[1:])
    cpus = os.cpu_count() or 2
    print(f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    files = sorted(args.images.glob("*.png"))[: args.count]
    checkpoint = args.checkpoint.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-index-"))
    rows = []
    try:
        rows.append(("in process", index_once(files, checkpoint, work / "local", batch_size=args.batch_size)))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        encoder = RayEncoder("auto", checkpoint, device="cpu")
        rows.append(("Ray, 1 node", index_once(files, checkpoint, work / "one", encoder, args.batch_size)))
        ray.shutdown()
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus // 2, "include_dashboard": False})
        nodes.add_node(num_cpus=cpus - cpus // 2)
        nodes.wait_for_nodes()
        try:
            encoder = RayEncoder(nodes.address, checkpoint, device="cpu")
            rows.append(("Ray, 2 nodes", index_once(files, checkpoint, work / "two", encoder, args.batch_size)))
        finally:
            ray.shutdown()
            nodes.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][1]["rate"]
    print(f"\n{len(files)} images of {args.images}, batch {args.batch_size}, model {checkpoint.name}")
    print("| run | seconds | images/s | vs in process | first batch after | actors | images per node |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['seconds']:.1f} | {row['rate']:.0f} | {row['rate'] / base:.2f}x | "
              f"{row.get('first_batch', 0):.1f} s | {row.get('workers', '-')} | {row.get('nodes', '-')} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")


if __name__ == "__main__":
    main()
