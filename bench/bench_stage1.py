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

**Recall@K against flat, at every K** (``--corpus``): real pooled vectors of encoded scenes and real
spoken captions as queries. The corpus's images are indexed with ``--checkpoint`` into a collection
under ``--work-dir`` (reused by reruns) and their pooled vectors read back from its store; the
collection is grown to each size by augmentation in the embedding space: each extra vector is a
real one moved a random fraction (0 to 0.5) of the way towards another real one, plus Gaussian
noise of 0.1 of the real vectors' per-dimension spread (encoding a million scenes on 2 cores would
take hours). The queries are the pooled audio vectors of the corpus's val captions. For each size
and K it compares, in the same run, the index as it searched before (IVF with the one nprobe tuned
for recall@100, whatever K) with ``stage1_index.search`` now (settings from K and the size): real
candidates returned (mean and least), recall@K against the exact flat index, and milliseconds per
query (one query per call, the server's case), beside flat's.

    .venv/bin/python bench/bench_stage1.py [--sizes 10000,100000,1000000] [--json OUT.json]
    .venv/bin/python bench/bench_stage1.py --corpus CORPUS --checkpoint CKPT --work-dir DIR \
        --sizes 100000,1000000 --ks 100,400,1000,4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

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


# ---- recall@K against flat on encoded scenes ---------------------------------------------------------


def encoded_corpus(corpus: Path, checkpoint: Path, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pooled image vectors (N, D) of every image of ``corpus``, pooled audio vectors (Q, D) of its val
    captions), both as the service computes them (indexing; query decoding with the VAD)."""
    import torch

    from encoders import create_model, pool_audio
    from indexer import Library
    from search.engine import SearchEngine
    from training.manifest import load_manifest

    model = create_model(str(checkpoint))
    images = set()
    for name in ("train.json", "val.json"):
        manifest = load_manifest(corpus / name)
        images.update(str(manifest.image_path(e).resolve()) for e in manifest.entries)
    with Library.open(work / "library", create=True) as library:
        library.index("scenes", sorted(images), model, progress=False)
        coll = library.collection("scenes")
        vectors = coll.store.read_pooled(coll._table.arrays()[1])
        engine = SearchEngine(model, library, device="cpu")
        val = load_manifest(corpus / "val.json")
        with torch.inference_mode():
            logmels = [engine.prepare_audio(val.audio_path(e).read_bytes()).logmel for e in val.entries]
            pooled = [pool_audio(*engine.encode(logmels[i : i + 32])) for i in range(0, len(logmels), 32)]
        queries = torch.cat(pooled).float().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)


def augmented(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``real`` topped up to ``n`` vectors: each extra one a real vector moved a random fraction (0..0.5)
    towards another, plus noise of 0.1 of the real vectors' per-dimension spread."""
    if n <= len(real):
        return real[:n].copy()
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    out[: len(real)] = real
    spread = real.std(axis=0, keepdims=True)
    for start in range(len(real), n, 100_000):
        count = min(100_000, n - start)
        a, b = rng.integers(0, len(real), count), rng.integers(0, len(real), count)
        towards = rng.uniform(0, 0.5, (count, 1)).astype(np.float32)
        noise = 0.1 * spread * rng.standard_normal((count, real.shape[1]), dtype=np.float32)
        out[start : start + count] = real[a] + towards * (real[b] - real[a]) + noise
    return out


def ms_per_call(fn, queries: np.ndarray, repeats: int = 3) -> float:
    """Median over repeats of the wall time per query, one query per call."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(len(queries)):
            fn(queries[i : i + 1])
        runs.append((time.perf_counter() - started) * 1000 / len(queries))
    return statistics.median(runs)


def bench_recall_at_k(vectors: np.ndarray, queries: np.ndarray, ks: list[int], timed: int) -> list[dict]:
    """Rows per K: the index the rule builds for len(vectors), searched as before and as now, vs flat."""
    n = len(vectors)
    ids = np.arange(n, dtype=np.int64)
    flat, _ = stage1_index.build_index(vectors, ids, "flat")
    rule_type = stage1_index.decide_index_type(n, "auto")
    started = time.perf_counter()
    index, params = stage1_index.build_index(vectors, ids, rule_type)
    build_s = time.perf_counter() - started
    rows = []
    for k in ks:
        _, truth = flat.search(queries, k)
        stage1_index.apply_search_params(index, rule_type, params)  # the recorded setting, as before

        def before(q: np.ndarray, k: int = k) -> np.ndarray:
            return index.search(q, k)[1]

        def now(q: np.ndarray, k: int = k) -> np.ndarray:
            return stage1_index.search(index, q, k, params)[1]

        row = {"n": n, "k": k, "index": rule_type, "build_s": round(build_s, 1),
               "params": {key: params[key] for key in ("nlist", "nprobe", "efSearch") if key in params}}
        for name, fn in (("before", before), ("now", now)):
            found = np.concatenate([fn(queries[i : i + 64]) for i in range(0, len(queries), 64)])
            real = (found >= 0).sum(axis=1)
            row[f"{name}_real_mean"] = float(real.mean())
            row[f"{name}_real_min"] = int(real.min())
            row[f"{name}_recall"] = round(stage1_index.recall_at_k(found, truth, k), 4)
            row[f"{name}_ms"] = round(ms_per_call(fn, queries[:timed]), 2)
        if rule_type == "ivf":
            row["nprobe_now"] = stage1_index.search_setting(
                "ivf", params, k, n, faiss.extract_index_ivf(index).nlist)
        row["flat_ms"] = round(ms_per_call(lambda q, k=k: flat.search(q, k), queries[:timed]), 2)
        rows.append(row)
    return rows


def main_recall(args: argparse.Namespace, dim: int, centers: np.ndarray) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in (args.ks or "100,400,1000,4000").split(",")]
    started = time.perf_counter()
    if args.corpus:
        real, queries = encoded_corpus(Path(args.corpus), Path(args.checkpoint), Path(args.work_dir))
        print(f"# {len(real)} real scene vectors and {len(queries)} spoken-caption queries, encoded in "
              f"{time.perf_counter() - started:.0f} s; extra vectors by augmentation (see the docstring)")
    else:
        print(f"# synthetic: a mixture of {CLUSTERS} Gaussians, {QUERIES} held-out queries from it")
        queries = synthetic_vectors(QUERIES, dim, seed=1, centers=centers)
    print(f"{'N':>8} {'K':>5} {'index':>5} {'build s':>7} | {'before: real':>12} {'R@K':>6} {'ms/q':>7} | "
          f"{'now: real':>9} {'R@K':>6} {'ms/q':>7} {'nprobe':>6} | {'flat ms/q':>9} {'now/before ms':>13}")
    rows = []
    for n in sizes:
        vectors = augmented(real, n, seed=n) if args.corpus else synthetic_vectors(n, dim, seed=n, centers=centers)
        for row in bench_recall_at_k(vectors, queries, ks, args.timed_queries):
            rows.append(row)
            print(f"{row['n']:>8} {row['k']:>5} {row['index']:>5} {row['build_s']:>7.1f} | "
                  f"{row['before_real_mean']:>7.0f} ({row['before_real_min']:>4}) {row['before_recall']:>5.3f} "
                  f"{row['before_ms']:>7.2f} | {row['now_real_mean']:>4.0f} ({row['now_real_min']:>4}) "
                  f"{row['now_recall']:>5.3f} {row['now_ms']:>7.2f} {row.get('nprobe_now', '-'):>6} | "
                  f"{row['flat_ms']:>9.2f} {row['now_ms'] / max(row['before_ms'], 1e-9):>13.2f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(rows, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--json", dest="json_out", help="also write the rows as JSON here")
    parser.add_argument("--corpus", help="a `matchmap synth` output: measure recall@K on its encoded scenes")
    parser.add_argument("--checkpoint", default="encoders/default_model/tiny.pt", help="model (with --corpus)")
    parser.add_argument("--work-dir", default="bench-stage1", help="where --corpus's collection is indexed")
    parser.add_argument("--ks", help="recall@K against flat at these K, as searched before and now "
                        "(default with --corpus: 100,400,1000,4000)")
    parser.add_argument("--timed-queries", type=int, default=50, help="queries timed one by one (with --ks)")
    args = parser.parse_args()
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"# command: {sys.executable} {' '.join(sys.argv)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    dim = get_config("tiny").embed_dim
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)
    if args.corpus or args.ks:
        main_recall(args, dim, centers)
        return
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
