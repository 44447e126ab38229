"""Serving on Ray against serving in one process: the same collection and queries, side by side in one run.

Three services answer the same real spoken captions on the same collection of scene images, one
after the other, each a real `matchmap serve` process reached over gRPC on loopback:

- **one process**: plain `matchmap serve` (maps resident, as by default);
- **Ray, 1 node, 1 shard**: `serve --ray ADDRESS --shards 1` on a one-node cluster with all the CPUs;
- **Ray, 2 nodes, 2 shards**: `ray.cluster_utils.Cluster` with two nodes splitting the CPUs, one shard each.

For each: p50 / p95 latency of sequential queries, queries/s at concurrency 8, the stage timings the
service reports (encode on the front; stage 1 and stage 2 across the shards, both rounds including
their Ray round trips), and whether every answer equals the one-process service's. On a 2-core
machine the "nodes" share the same cores: this measures Ray's overhead and checks the results, not a
speed-up; docs/scale-out.md models N shards on N machines from these per-stage figures.

    python bench/bench_ray_serve.py --images /work/exp/shapes6k/images/train --count 6000 \
        --captions /work/exp/shapes-val/val.json --queries 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from encoders import create_model
from indexer import Library
from search.client import SearchClient
from training.manifest import load_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
COLLECTION = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(data: Path, checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(data), "--checkpoint", str(checkpoint),
               "--host", "127.0.0.1", "--port", str(port), "--no-http", "--device", "cpu", "--json",
               "--log-level", "warning", *extra]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "MATCHMAP_TOKEN": ""})
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"serve {' '.join(extra)} exited with {process.wait()}")
    return process, f"127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(target: str, queries: list[bytes]) -> dict:
    with SearchClient(target, timeout=120) as client:
        for audio in queries[:3]:  # warm-up
            client.search(audio, COLLECTION)
        latencies, stages, answers = [], {"encode": [], "stage1": [], "stage2": []}, []
        for audio in queries:
            started = time.perf_counter()
            hits = client.search(audio, COLLECTION)
            latencies.append(1000 * (time.perf_counter() - started))
            for stage in stages:
                stages[stage].append(hits.timings_ms[stage])
            answers.append([h.image_id for h in hits])
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda audio: client.search(audio, COLLECTION), queries))
        rate = len(queries) / (time.perf_counter() - started)
    ordered = sorted(latencies)
    return {"p50": statistics.median(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))], "qps8": rate,
            **{stage: statistics.median(v) for stage, v in stages.items()}, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of scene images (PNG)")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--captions", type=Path, required=True, help="manifest whose wavs are the spoken queries")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    args = parser.parse_args()
    command = "python bench/bench_ray_serve.py " + " ".join(sys.argv[1:])
    cpus = os.cpu_count() or 2
    print(f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    files = sorted(args.images.glob("*.png"))[: args.count]
    manifest = load_manifest(args.captions)
    queries = [manifest.audio_path(e).read_bytes() for e in manifest.entries[: args.queries]]
    checkpoint = args.checkpoint.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-serve-"))
    try:
        started = time.perf_counter()
        with Library.open(work, create=True) as library:
            library.index(COLLECTION, [str(f) for f in files], create_model(checkpoint), progress=False)
        print(f"collection: {len(files)} scene images from {args.images}, indexed in "
              f"{time.perf_counter() - started:.0f} s; {len(queries)} spoken captions from {args.captions}")
        rows = {}
        process, target = start_serve(work, checkpoint)
        try:
            rows["one process"] = measure(target, queries)
        finally:
            stop(process)
        for nodes in (1, 2):
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": cpus // nodes, "object_store_memory": 300 * 2**20, "include_dashboard": False})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=cpus // nodes, object_store_memory=300 * 2**20)
            cluster.wait_for_nodes()
            try:
                started = time.perf_counter()
                process, target = start_serve(work, checkpoint, "--ray", cluster.address, "--shards", str(nodes),
                                              "--shard-cpus", str(cpus // nodes))
                ready = time.perf_counter() - started
                try:
                    name = f"Ray, {nodes} node{'s' if nodes > 1 else ''}, {nodes} shard{'s' if nodes > 1 else ''}"
                    rows[name] = measure(target, queries) | {"ready": ready}
                finally:
                    stop(process)
            finally:
                if ray.is_initialized():
                    ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows["one process"]
    print("\n| service | p50 ms | p95 ms | queries/s at 8 | vs one process | encode | stage 1 | stage 2 "
          "| same top-10 | start s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = sum(a == b for a, b in zip(row["answers"], base["answers"], strict=True)) / len(queries)
        print(f"| {name} | {row['p50']:.1f} | {row['p95']:.1f} | {row['qps8']:.1f} | {row['qps8'] / base['qps8']:.2f}x "
              f"| {row['encode']:.1f} | {row['stage1']:.1f} | {row['stage2']:.1f} | {same:.3f} "
              f"| {row.get('ready', 0):.0f} |")
    print("\n" + json.dumps({name: {k: v for k, v in row.items() if k != "answers"} for name, row in rows.items()}))
    print(f"\nreproduce: {command}")


if __name__ == "__main__":
    main()
