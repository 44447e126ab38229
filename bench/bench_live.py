"""Queries while a collection grows: do they wait behind indexing?

A real `matchmap serve` answers spoken queries (concurrency 1, the default K) on a collection while a
`matchmap index` process adds images to it in batches of 32. Latency before, during and after the
indexing run, side by side, and the collection size the server reports at the end (the added images
are searchable without a restart). On 2 cores the indexer and the server share the CPU, so "during"
is slower for that reason alone: the question is whether any query stalls for a reopen (a tail in
the hundreds of milliseconds, or seconds) or the server stops seeing the growth.

    python bench/bench_live.py --library /work/exp/bench10k/library --collection bench-compare \
        --corpus /work/exp/c --add /work/exp/bench100k/scenes --add-count 2000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import ServeProcess, corpus_inputs  # noqa: E402

from search.client import SearchClient  # noqa: E402


def latencies(client: SearchClient, queries: list[bytes], collection: str, stop: threading.Event | None = None,
              count: int | None = None) -> tuple[list[float], int]:
    """Query round-robin, one at a time, ``count`` queries or until ``stop`` is set; (ms each, last size)."""
    out, size, i = [], 0, 0
    while (count is None or i < count) and not (stop is not None and stop.is_set()):
        started = time.perf_counter()
        hits = client.search(queries[i % len(queries)], collection, top_k=10)
        out.append(1000 * (time.perf_counter() - started))
        size, i = hits.collection_size, i + 1
    return out, size


def summary(name: str, ms: list[float]) -> str:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return f"{name:<7} {len(ms):>5} queries: p50 {p50:.1f} ms, p95 {p95:.1f}, p99 {p99:.1f}, max {max(ms):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="data dir (a folder named 'library')")
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--corpus", type=Path, required=True, help="`matchmap synth` corpus whose val captions query")
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--add", type=Path, required=True, help="folder of images not yet in the collection")
    parser.add_argument("--add-count", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100, help="queries before and after")
    args = parser.parse_args()
    command = "python bench/bench_live.py " + " ".join(sys.argv[1:])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    work = args.library.resolve().parent
    _, queries, _ = corpus_inputs(args.corpus)
    new = sorted(args.add.glob("*.png"))
    server = ServeProcess(work, args.checkpoint, "cpu", 8)
    try:
        with SearchClient(server.target, timeout=60) as client:
            latencies(client, queries, args.collection, count=5)  # warm-up
            before, size_before = latencies(client, queries, args.collection, count=args.queries)
            picked = new[-args.add_count :]  # the folder's last files: not in a collection grown from its first
            stop = threading.Event()
            during: list[float] = []

            def query_during() -> None:
                during.extend(latencies(client, queries, args.collection, stop=stop)[0])

            thread = threading.Thread(target=query_during)
            started = time.perf_counter()
            thread.start()
            indexer = subprocess.run(
                [sys.executable, "-m", "matchmap", "index", "--data-dir", str(args.library), "--collection",
                 args.collection, "--checkpoint", str(args.checkpoint), "-q", *map(str, picked)],
                capture_output=True, text=True)
            index_seconds = time.perf_counter() - started
            stop.set()
            thread.join()
            if indexer.returncode not in (0, 1):
                raise RuntimeError(f"matchmap index failed: {indexer.stderr[-2000:]}")
            time.sleep(3)  # the server notices the growth at its next check (every 2 s)
            after, size_after = latencies(client, queries, args.collection, count=args.queries)
    finally:
        server.stop()
    print(f"collection {args.collection}: {size_before} images before; {len(picked)} added by `matchmap index` in "
          f"{index_seconds:.1f} s ({len(picked) / index_seconds:.0f} images/s beside the queries)")
    for name, ms in (("before", before), ("during", during), ("after", after)):
        print("  " + summary(name, ms))
    print(f"  the server reports {size_after} images after (expected {size_before + len(picked)})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")


if __name__ == "__main__":
    main()
