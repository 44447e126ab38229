"""Stage-1 search time per query vs collection size: exact flat vs the index the rule picks.

For each size N (default 10k, 100k, 1M) it makes N synthetic pooled image vectors at the tiny
model's dimension, builds

  flat  -- IndexIDMap2(IndexFlatIP), exact SISA
  rule  -- what ``indexer.stage1_index.decide_index_type`` picks for N (flat below 50k, IVF-Flat
           above, with nlist ~ 4 sqrt(N) and nprobe tuned for recall@100 >= 0.95), built exactly
           as a collection's index is

and times one query at a time (the server's latency case) and batches of 32 (its micro-batched
case), in milliseconds per query, medians over repeated runs. Recall@10 and @100 of the rule's index
are measured against the flat index on held-out queries (never used for tuning).

The vectors are a mixture of Gaussians (1,000 clusters, noise half the spread of the cluster centres):
pooled image embeddings cluster by content; uniform random vectors would make IVF look worse
than it is, identical ones better.

    .venv/bin/python bench/bench_stage1.py [--sizes 10000,100000,1000000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import faiss
import numpy as np

from encoders import get_config
from indexer import stage1_index

QUERIES = 200
BATCH = 32
CLUSTERS = 1000


def synthetic_vectors(n: int, dim: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """n vectors around the given cluster centres, float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks, to keep peak memory near the output's
        count = min(100_000, n - start)
        owners = rng.integers(0, len(centers), count)
        out[start : start + count] = centers[owners] + 0.5 * rng.standard_normal(
            (count, dim), dtype=np.float32
        )
    return out


def ms_per_query(index: faiss.Index, queries: np.ndarray, batch: int, k: int, repeats: int = 3) -> float:
    """Median over repeats of the wall time per query, searching ``batch`` queries per call."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(queries), batch):
            index.search(queries[i : i + batch], k)
        runs.append((time.perf_counter() - started) * 1000 / len(queries))
    return statistics.median(runs)


def bench_size(n: int, dim: int, centers: np.ndarray) -> dict:
    vectors = synthetic_vectors(n, dim, seed=n, centers=centers)
    ids = np.arange(n, dtype=np.int64)
    queries = synthetic_vectors(QUERIES, dim, seed=n + 1, centers=centers)  # held out: not database points
    row: dict = {"n": n, "dim": dim}

    started = time.perf_counter()
    flat, _ = stage1_index.build_index(vectors, ids, "flat")
    row["flat_build_s"] = round(time.perf_counter() - started, 2)
    row["flat_ms_per_query_b1"] = round(ms_per_query(flat, queries[:50], 1, 100), 3)
    row["flat_ms_per_query_b32"] = round(ms_per_query(flat, queries, BATCH, 100), 3)

    rule_type = stage1_index.decide_index_type(n, "auto")
    row["rule_type"] = rule_type
    if rule_type == "flat":
        row.update(rule_build_s=row["flat_build_s"], rule_params={}, recall_at_10=1.0, recall_at_100=1.0)
        row["rule_ms_per_query_b1"] = row["flat_ms_per_query_b1"]
        row["rule_ms_per_query_b32"] = row["flat_ms_per_query_b32"]
        return row
    started = time.perf_counter()
    rule, params = stage1_index.build_index(vectors, ids, rule_type)
    row["rule_build_s"] = round(time.perf_counter() - started, 2)
    row["rule_params"] = params
    row["rule_ms_per_query_b1"] = round(ms_per_query(rule, queries[:50], 1, 100), 3)
    row["rule_ms_per_query_b32"] = round(ms_per_query(rule, queries, BATCH, 100), 3)
    for k in (10, 100):
        _, truth = flat.search(queries, k)
        _, found = rule.search(queries, k)
        row[f"recall_at_{k}"] = round(stage1_index.recall_at_k(found, truth, k), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--json", dest="json_out", help="also write the rows as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dim = get_config("tiny").embed_dim
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)

    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"# command: {sys.executable} bench/bench_stage1.py --sizes {args.sizes}")
    header = (
        f"{'N':>9} {'flat ms/q b1':>12} {'flat ms/q b32':>13} {'rule':>5} {'build s':>8} "
        f"{'rule ms/q b1':>12} {'rule ms/q b32':>13} {'R@10':>6} {'R@100':>6}  params"
    )
    print(header)
    rows = []
    for n in sizes:
        row = bench_size(n, dim, centers)
        rows.append(row)
        params = ", ".join(
            f"{k}={v}" for k, v in row["rule_params"].items() if k in ("nlist", "nprobe", "efSearch")
        )
        print(
            f"{n:>9} {row['flat_ms_per_query_b1']:>12.3f} {row['flat_ms_per_query_b32']:>13.3f} {row['rule_type']:>5} "
            f"{row['rule_build_s']:>8.1f} {row['rule_ms_per_query_b1']:>12.3f} {row['rule_ms_per_query_b32']:>13.3f} "
            f"{row['recall_at_10']:>6.3f} {row['recall_at_100']:>6.3f}  {params}",
            flush=True,
        )
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
