"""Benchmark of the search service: latency, throughput, two-stage agreement, stage-2 arithmetic.

On an N-image collection indexed with the given checkpoint:
  1. latency (p50/p95/p99) at concurrency 1 and throughput at concurrency 8, over loopback through
     the real client against a real `matchmap serve` process, with error counts; throughput again
     with micro-batching off (--max-batch 1) to show what batching buys, and the same comparison
     in-process (search_batch of 8 vs one at a time), free of gRPC and client threads;
  2. agreement of the two-stage top-10 (stage-1 SISA candidates, MISA re-rank) with the exhaustive
     MISA top-10 over the whole collection, at the server's default K and as a curve over K, plus
     stage-1 recall (share of the exhaustive top-10 inside the K candidates) and stage 2's median
     milliseconds at each K (the engine as `matchmap serve` runs it: resident bfloat16 maps, exact
     float32 re-scoring of the best few);
  3. stage-2 arithmetic: score_matrix over K candidate maps vs a plain matmul with the same
     multiply-adds, side by side in GFLOP/s, for one query and for a batch of 8, in float32 and in
     bfloat16;
  4. compressed feature maps (`--only codec` runs this section alone): for today's float16 maps,
     product quantization (64 sub-quantizers x 8 bits, faiss) and the transform codec of
     ``indexer.region_codec`` at several byte budgets, each trained on the collection's first
     maps: bytes per image, MISA top-10 agreement with exact MISA over the whole collection, and
     the two-stage top-10 (today's stage 1, MISA over the decoded maps of the K candidates) at
     several K, against the same two-stage top-10 from the float16 maps.

Images: those of --corpus (a `matchmap synth` output; its val captions are the queries), topped
up to --images with scene images drawn as `matchmap synth` draws them (`--fill scenes`, the default
with --corpus; no speech) or random blocky images (`--fill blocks`); without --corpus,
amplitude-modulated noise queries (timing-only: with random weights nothing is semantically right
anyway).

--compare-checkpoint adds a second model (e.g. the same encoders with stage-1 heads from
`matchmap distill-stage1`): its own collection of the same images, and its agreement curve and
stage-1 recall@1/5/10 (each caption's own image) printed beside the first model's, from the same
run. --agreement-only skips the load, batching and arithmetic parts; --plot draws the curves.

    .venv/bin/python bench/bench_search.py --images 10000 --corpus corpus10k --checkpoint tiny.pt  # full run
    .venv/bin/python bench/bench_search.py --images 1000                                            # smoke size
    .venv/bin/python bench/bench_search.py --images 10000 --corpus c --checkpoint mean.pt \
        --compare-checkpoint distilled.pt --agreement-only --k-curve 25 50 100 200 400 1000 4000 --plot curve.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from encoders import create_model, save_checkpoint, score_matrix
from indexer import Library
from search.client import SearchClient, SearchServiceError
from search.engine import SearchEngine, SearchLimits, SearchQuery

COLLECTION = "bench"
REPO = Path(__file__).resolve().parent.parent  # this checkout
# Stage 2 re-scores exactly the best max(exact_rescore_at_least, 3 x top_k) = 32 of its coarse pass (search.engine).
REFINE = SearchLimits().exact_rescore_at_least


# ---- data ----------------------------------------------------------------------------------------


def distractor_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` random blocky 128 x 128 PNG images (8 x 8 blocks of random colours)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"distractor-{i:06d}.png"
        if not path.exists():
            blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(blocks.repeat(16, 0).repeat(16, 1)).save(path)
        paths.append(path)
    return paths


def _draw_scene(job: tuple[Path, int, int]) -> None:
    from training.scenes import random_scene

    path, seed, i = job
    partial = path.with_name(path.stem + ".partial.png")  # a killed run leaves no half-written scene
    random_scene(np.random.default_rng([seed, i])).image.save(partial)
    partial.rename(path)


def scene_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` 256 x 256 PNG scenes drawn as `matchmap synth` draws its images (no captions), on every
    core (each scene depends only on (seed, i); about 50 per second per core)."""
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"scene-{seed}-{i:06d}.png" for i in range(count)]
    missing = [(path, seed, i) for i, path in enumerate(paths) if not path.exists()]
    if missing:
        with Pool(os.cpu_count()) as pool:
            for done, _ in enumerate(pool.imap_unordered(_draw_scene, missing, chunksize=64), 1):
                if done % 10_000 == 0:
                    print(f"  drew {done}/{len(missing)} scenes", flush=True)
    return paths


def noise_wav(rng: np.random.Generator, seconds: float) -> bytes:
    n = int(16000 * seconds)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi * seconds, n))
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.2 * rng.standard_normal(n) * envelope).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def corpus_inputs(corpus: Path) -> tuple[list[Path], list[bytes], list[Path]]:
    """(every image of the corpus's manifests, the val captions' audio bytes, each val caption's image)."""
    from training.manifest import load_manifest

    images: dict[Path, None] = {}
    for name in ("train.json", "val.json"):
        if (corpus / name).exists():
            manifest = load_manifest(corpus / name)
            images.update({manifest.image_path(e).resolve(): None for e in manifest.entries})
    val = load_manifest(corpus / "val.json")
    return (list(images), [val.audio_path(e).read_bytes() for e in val.entries],
            [val.image_path(e).resolve() for e in val.entries])


def build_collection(work: Path, checkpoint: Path, images: list[Path], collection: str = COLLECTION) -> tuple[float, int]:
    """Index ``images`` into ``collection`` (incremental: reruns reuse it); (seconds, size)."""
    model = create_model(str(checkpoint))
    started = time.perf_counter()
    with Library.open(work / "library", create=True) as library:
        library.index(collection, [str(p) for p in images], model, progress=True)
        size = library.collection(collection).size
    return time.perf_counter() - started, size


# ---- the live server ------------------------------------------------------------------------------


class ServeProcess:
    """`matchmap serve` in a subprocess on a free loopback port."""

    def __init__(self, work: Path, checkpoint: Path, device: str, max_batch: int,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, tree: Path | None = None):
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(work / "library"), "--checkpoint",
             str(checkpoint), "--host", "127.0.0.1", "--port", "0", "--device", device, "--max-batch",
             str(max_batch), "--log-level", "warning", *extra_args],
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
            cwd=tree,  # another checkout's code (python -m puts the working folder first on sys.path)
        )
        line = ""
        while "listening on" not in line:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("matchmap serve exited before listening")
        self.target = "127.0.0.1:" + re.search(r"127\.0\.0\.1:(\d+)", line).group(1)
        self.start_seconds = time.perf_counter() - started  # process start, model load, collections opened
        # A server that holds maps in the background (session 13 on) says when they are held; load runs
        # start after that, so they measure the held engine. Older ones held them before listening.
        self.held_seconds = self.start_seconds
        if '"held"' in (Path(tree or REPO) / "search" / "cli.py").read_text():
            while "feature maps held in memory" not in line:
                line = self.process.stderr.readline()
                if not line and self.process.poll() is not None:
                    raise RuntimeError("matchmap serve exited before its maps were held")
            self.held_seconds = time.perf_counter() - started
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def rss_mb(self) -> float:
        """The server's resident set (psutil), in MB: its own memory plus the pages of memory-mapped files
        (the feature store) it has touched, which the kernel may drop at will."""
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def anon_mb(self) -> float:
        """The server's own memory (RssAnon: the resident set without file pages), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def run_load(target: str, queries: list[bytes], concurrency: int, candidates: int,
             collection: str = COLLECTION) -> dict:
    """Send every query (round-robin over ``queries``) with ``concurrency`` in flight; latency stats, and
    the medians of the stage timings the server reports with each answer (``stages_p50_ms``)."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    stages: list[dict[str, float]] = []
    errors = 0
    lock = threading.Lock()
    with SearchClient(target, timeout=60) as client:
        for q in queries[: min(5, len(queries))]:  # warm-up: first-call allocations, caches
            client.search(q, collection, top_k=10, candidates=candidates)

        def one(query: bytes) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                hits = client.search(query, collection, top_k=10, candidates=candidates)
            except SearchServiceError:
                with lock:
                    errors += 1
                return
            with lock:
                latencies.append(1000 * (time.perf_counter() - started))
                batch_sizes.append(hits.batch_size)
                stages.append(hits.timings_ms)

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, queries))
        wall = time.perf_counter() - started
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99)) if latencies else (0, 0, 0)
    return {
        "concurrency": concurrency,
        "queries": len(queries),
        "errors": errors,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "throughput_qps": len(latencies) / wall,
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 0.0,
        "stages_p50_ms": {k: statistics.median(t[k] for t in stages) for k in stages[0]} if stages else {},
    }


def collection_disk_bytes(work: Path, collection: str) -> int:
    """Bytes on disk of one collection (its folder: stage-1 index, feature store), catalog not included."""
    with Library.open(work / "library") as library:
        folder = library.collection(collection).folder
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def serve_side_by_side(work: Path, device: str, queries: list[bytes], setups: list[dict]) -> list[dict]:
    """For each setup ({label, checkpoint, collection, candidates, optional serve_args and tree: another
    checkout whose code serves}): a fresh `matchmap serve` (micro-batching on), its start-up seconds, latency at concurrency 1 and throughput at concurrency 8, its resident set
    after the load, and the collection's bytes on disk. The setups run one after another in this run."""
    rows = []
    for setup in setups:
        server = ServeProcess(work, Path(setup["checkpoint"]).resolve(), device, 8, tuple(setup.get("serve_args", ())),
                              tree=setup.get("tree"))
        try:
            runs = [run_load(server.target, queries, c, setup["candidates"], setup["collection"]) for c in (1, 8)]
            rss, anon = server.rss_mb(), server.anon_mb()
        finally:
            server.stop()
        rows.append({**{k: str(v) for k, v in setup.items()}, "start_seconds": server.start_seconds, "held_seconds": server.held_seconds, "rss_mb": rss,
                     "anon_mb": anon,
                     "disk_bytes": collection_disk_bytes(work, setup["collection"]), "runs": runs})
    return rows


def print_side_by_side(rows: list[dict], size: int) -> None:
    print(f"serving side by side ({size} images; the first row is the reference of the ratios):")
    first = rows[0]
    for r in rows:
        c1, c8 = r["runs"]
        f1, f8 = first["runs"]
        print(f"  {r['label']:<44} K={r['candidates']:>5}: p50 {c1['p50_ms']:.1f} ms (p95 {c1['p95_ms']:.1f}), "
              f"{c8['throughput_qps']:.1f} q/s at concurrency 8 (p50 {c8['p50_ms']:.1f} ms); "
              f"x{f1['p50_ms'] / c1['p50_ms']:.2f} faster p50, x{c8['throughput_qps'] / f8['throughput_qps']:.2f} q/s; "
              f"start {r['start_seconds']:.1f} s (held {r['held_seconds']:.1f} s), RSS {r['rss_mb']:.0f} MB (own {r['anon_mb']:.0f} MB), disk {r['disk_bytes'] / size / 1024:.1f} KiB/image; "
              f"errors {c1['errors'] + c8['errors']}")


def batching_gain(engine: SearchEngine, audio_bytes: list[bytes], batch: int = 8, rounds: int = 3) -> dict:
    """In-process, without gRPC: queries/s of search_batch on groups of ``batch`` vs one at a time.

    The two modes alternate for ``rounds`` rounds and each keeps its best round, so a burst of other
    work on the machine does not decide the comparison.
    """
    prepared = [engine.prepare_audio(b) for b in audio_bytes]
    queries = [SearchQuery(p, COLLECTION, 10, SearchLimits().default_candidates) for p in prepared]
    groups = {"alone": [[q] for q in queries], "batched": [queries[i : i + batch] for i in range(0, len(queries), batch)]}
    best = {mode: 0.0 for mode in groups}
    for _ in range(rounds):
        for mode, calls in groups.items():
            started = time.perf_counter()
            for call in calls:
                engine.search_batch(call)
            best[mode] = max(best[mode], len(queries) / (time.perf_counter() - started))
    return {"batch": batch, "alone_qps": best["alone"], "batched_qps": best["batched"], "gain": best["batched"] / best["alone"]}


# ---- two-stage vs exhaustive ----------------------------------------------------------------------


def exhaustive_top10(
    engine: SearchEngine, images: list[Path] | None, audio: torch.Tensor, lengths: torch.Tensor, chunk: int = 2000,
    collection: str = COLLECTION,
) -> np.ndarray:
    """(B, 10) image ids of the exhaustive MISA top-10 over every image of the collection (``images``: its
    files, checked to be all of it; None: whatever it holds), read in chunks."""
    coll = engine.collection(collection)
    if images is None:
        all_ids = coll.ids()
    else:
        found = coll.ids_for_uris([str(p) for p in images])
        all_ids = np.array(sorted({i for ids in found.values() for i in ids}))
    if len(all_ids) != coll.size:
        raise RuntimeError(f"found {len(all_ids)} of the collection's {coll.size} images by uri")
    best_scores = np.full((audio.shape[0], 0), -np.inf, np.float32)
    best_ids = np.zeros((audio.shape[0], 0), np.int64)
    for start in range(0, len(all_ids), chunk):
        ids = all_ids[start : start + chunk]
        maps = torch.from_numpy(coll.feature_maps(ids).astype(np.float32))
        misa = score_matrix(audio, lengths, maps)["misa"].numpy()
        scores = np.concatenate([best_scores, misa], axis=1)
        candidates = np.concatenate([best_ids, np.broadcast_to(ids, misa.shape)], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_ids = np.take_along_axis(candidates, keep, 1)
    return best_ids


def collection_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a bench over an indexed collection and a corpus's val captions."""
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--corpus", type=Path, required=True, help="a matchmap synth corpus: its val captions")
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--exact-cache", type=Path, default=None,
                        help=".npy of the exhaustive top 10, read when it fits, else written (cached_exhaustive_top10)")


def cached_exhaustive_top10(engine: SearchEngine, images: list[Path] | None, audio: torch.Tensor,
                            lengths: torch.Tensor, cache: Path | None, collection: str = COLLECTION) -> np.ndarray:
    """:func:`exhaustive_top10`, read from ``cache`` (an .npy of the (B, 10) ids and a last row recording the
    collection size) when it holds these B captions' rows for this collection's size, else computed and
    written there (an exhaustive pass over a million maps takes minutes)."""
    size = engine.collection(collection).size
    cached = np.load(cache, allow_pickle=False) if cache is not None and cache.exists() else None
    if cached is not None and cached.shape == (len(audio) + 1, 10) and cached[-1, 0] == size:
        return cached[:-1]
    started = time.perf_counter()
    exact = exhaustive_top10(engine, images, audio, lengths, collection=collection)
    print(f"exhaustive MISA over {size} images: {time.perf_counter() - started:.0f} s", flush=True)
    if cache is not None:
        np.save(cache, np.concatenate([exact, np.full((1, 10), size, exact.dtype)]))
    return exact


def own_image_recall(ranked_ids: np.ndarray, own_ids: list[int]) -> dict[str, float]:
    """ranked_ids (B, >=10) -> R@1/5/10: share of queries whose own image is among the first k."""
    return {f"R@{k}": float(np.mean([own in row[:k] for row, own in zip(ranked_ids.tolist(), own_ids, strict=True)]))
            for k in (1, 5, 10)}


def agreement_curve(engine: SearchEngine, images: list[Path] | None, audio_bytes: list[bytes], ks: list[int],
                    collection: str = COLLECTION, own_images: list[Path] | None = None,
                    exact_cache: Path | None = None) -> tuple[list[dict], dict]:
    """(one row per K: two-stage top-10 vs the exhaustive MISA top-10, recall of each caption's own image:
    {"stage1": R@k of stage 1 alone, "misa": R@k of exhaustive MISA}, or {} without ``own_images``).
    ``exact_cache``: an .npy file of the exhaustive top 10 (B, 10), read when it holds these B captions'
    rows for this collection's size, else written (an exhaustive pass over a million maps takes minutes)."""
    prepared = [engine.prepare_audio(b) for b in audio_bytes]
    audio, lengths = engine.encode([p.logmel for p in prepared])
    exact = cached_exhaustive_top10(engine, images, audio.cpu(), lengths.cpu(), exact_cache, collection)
    coll = engine.collection(collection)
    with torch.inference_mode():  # encode() returns inference tensors; heads have trainable parameters
        pooled = engine.model.stage1_audio_vectors(audio, lengths).cpu().numpy()
    recall = {}
    if own_images is not None:
        by_uri = coll.ids_for_uris([str(p) for p in own_images[: len(prepared)]])
        own = [by_uri[str(p)][0] for p in own_images[: len(prepared)]]
        recall = {"stage1": own_image_recall(coll.search_stage1(pooled, 10)[1], own),
                  "misa": own_image_recall(exact, own)}
    rows = []
    for k in ks:
        k = min(k, coll.size)
        engine.search_batch([SearchQuery(prepared[0], collection, 10, k)])  # warm-up at this K
        results = [engine.search_batch([SearchQuery(p, collection, 10, k)])[0] for p in prepared]
        overlap = identical = top1 = 0
        for i, r in enumerate(results):
            got = [h.image_id for h in r.hits]
            overlap += len(set(got) & set(exact[i].tolist()))
            identical += got == exact[i].tolist()
            top1 += bool(got) and got[0] == exact[i][0]
        _, stage1_ids = coll.search_stage1(pooled, k)
        stage1_recall = np.mean([len(set(stage1_ids[i]) & set(exact[i].tolist())) / 10 for i in range(len(prepared))])
        rows.append({
            "K": k,
            "top10_overlap": overlap / (10 * len(prepared)),
            "identical_top10": identical / len(prepared),
            "top1_agreement": top1 / len(prepared),
            "stage1_recall_of_exact_top10": float(stage1_recall),
            "stage1_p50_ms": statistics.median(r.timings_ms["stage1"] for r in results),
            "stage2_p50_ms": statistics.median(r.timings_ms["stage2"] for r in results),
        })
    return rows, recall


# ---- stage-2 arithmetic -----------------------------------------------------------------------------


def time_it(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (robust to bursts of other work)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def stage2_row(batch: int, k: int, frames: int, regions: int, dim: int, device: str,
               dtype: torch.dtype = torch.float32) -> dict:
    """score_matrix (MISA) of ``batch`` queries over k maps vs a plain matmul of the same multiply-adds,
    both in ``dtype`` (bfloat16: the resident-maps pass of stage 2)."""
    audio = torch.randn(batch, frames, dim, device=device)
    lengths = torch.full((batch,), frames, device=device)
    maps = torch.randn(k, regions, dim, device=device).to(dtype)
    flat_audio, flat_maps = audio.reshape(batch * frames, dim).to(dtype), maps.reshape(k * regions, dim)
    flops = 2 * batch * frames * k * regions * dim
    compute = None if dtype == torch.float32 else dtype
    t_score = time_it(lambda: score_matrix(audio, lengths, maps, compute_dtype=compute)["misa"].cpu(), 21)
    t_matmul = time_it(lambda: (flat_audio @ flat_maps.T).sum().cpu(), 21)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"({batch}x{frames}, {dim}) @ ({dim}, {k}x{regions})",
        "score_matrix_ms": 1000 * t_score,
        "score_matrix_gflops": flops / t_score / 1e9,
        "matmul_ms": 1000 * t_matmul,
        "matmul_gflops": flops / t_matmul / 1e9,
        "ratio": t_matmul / t_score,
    }


# ---- compressed feature maps ----------------------------------------------------------------------------


def misa_all(audio: torch.Tensor, lengths: torch.Tensor, maps: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """(B, N) float32 MISA of every caption against every map, ``chunk`` maps at a time."""
    return np.concatenate([score_matrix(audio, lengths, torch.from_numpy(maps[i : i + chunk].astype(np.float32)))
                           ["misa"].numpy() for i in range(0, len(maps), chunk)], axis=1)


def top10_overlap(scores: np.ndarray, exact: np.ndarray, allowed: np.ndarray | None = None) -> float:
    """Mean share of ``exact`` (B, 10) column indices among each row's 10 best ``scores`` (B, N),
    counting only columns ``allowed`` (B, N) bool when given (a two-stage search's candidates)."""
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    return float(np.mean([len(set(b) & set(e)) / 10 for b, e in zip(best.tolist(), exact.tolist(), strict=True)]))


def refined_overlap(scores: np.ndarray, exact_scores: np.ndarray, exact: np.ndarray, allowed: np.ndarray,
                    refine: int) -> float:
    """top10_overlap when the codec only picks each row's ``refine`` best ``allowed`` columns and exact
    float16 MISA ranks those: the engine's bfloat16-then-exact stage 2 with codes in place of bfloat16."""
    picked = np.argsort(-np.where(allowed, scores, -np.inf), axis=1, kind="stable")[:, :refine]
    keep = np.zeros_like(allowed)
    np.put_along_axis(keep, picked, True, axis=1)
    return top10_overlap(exact_scores, exact, keep & allowed)


def coarse_pass_ms(audio: torch.Tensor, lengths: torch.Tensor, maps: np.ndarray, codec=None, codes=None,
                   k: int = 400, queries: int = 20) -> float:
    """Median ms of stage 2's coarse pass for one query over ``k`` random candidates held in memory:
    bfloat16 maps caption by caption as the engine runs it (``codec`` None), or the codec's codes
    scored in its basis (``RegionCodec.paired_misa``)."""
    from search.resident import misa_caption_by_caption

    rng = np.random.default_rng(0)
    held = torch.from_numpy(maps.astype(np.float32)).to(torch.bfloat16) if codec is None else torch.from_numpy(codes)
    times = []
    with torch.inference_mode():
        for q in range(min(queries, len(audio))):
            rows = torch.from_numpy(rng.choice(len(maps), size=min(k, len(maps)), replace=False))
            one, length = audio[q : q + 1, : int(lengths[q])], lengths[q : q + 1]
            started = time.perf_counter()
            if codec is None:
                misa_caption_by_caption(one, length, lambda b, cols, rows=rows: held.index_select(0, rows[cols]),
                                        np.ones((1, len(rows)), bool))
            else:
                codec.paired_misa(one, length, held.index_select(0, rows)[None])
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def codec_rows(engine: SearchEngine, audio_bytes: list[bytes], budgets: list[int], ks: list[int],
               train_images: int, keeps: tuple[int, ...] = (REFINE,)) -> dict:
    """Each codec's bytes per image and top-10 agreement with exact MISA (module docstring, section 4)."""
    import faiss

    from indexer.region_codec import RegionCodec

    coll = engine.collection(COLLECTION)
    ids, maps = zip(*coll.iter_feature_maps(), strict=True)
    ids, maps = np.concatenate(ids), np.concatenate(maps)  # id order; float16 (N, R, D)
    prepared = [engine.prepare_audio(b) for b in audio_bytes]
    audio, lengths = engine.encode([p.logmel for p in prepared])
    audio, lengths = audio.cpu(), lengths.cpu()
    exact_scores = misa_all(audio, lengths, maps)
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :10]
    with torch.inference_mode():
        _, stage1 = coll.search_stage1(engine.model.stage1_audio_vectors(audio, lengths).cpu().numpy(), max(ks))
    position = {int(i): p for p, i in enumerate(ids)}
    allowed = {}
    for k in ks:
        allowed[k] = np.zeros_like(exact_scores, dtype=bool)
        for q, row in enumerate(stage1[:, :k]):
            allowed[k][q, [position[int(i)] for i in row if i >= 0]] = True
    train = maps[:train_images].astype(np.float32)
    r, d = maps.shape[1:]
    codecs: dict[str, tuple[int, np.ndarray, float, float]] = {"float16 (today)": (r * d * 2, maps, 0.0, 0.0)}
    coarse_ms = {"float16 (today)": coarse_pass_ms(audio, lengths, maps)}  # held as bfloat16, as the engine does
    started = time.perf_counter()
    pq = faiss.ProductQuantizer(d, 64, 8)
    pq.train(np.ascontiguousarray(train.reshape(-1, d)))
    trained = time.perf_counter() - started
    codes = pq.compute_codes(np.ascontiguousarray(maps.reshape(-1, d).astype(np.float32)))
    started = time.perf_counter()
    decoded = pq.decode(codes).reshape(maps.shape)
    codecs["pq 64x8"] = (r * pq.code_size, decoded, trained, 1000 * (time.perf_counter() - started) / len(maps))
    for budget in budgets:
        started = time.perf_counter()
        codec = RegionCodec.train(train, budget)
        trained = time.perf_counter() - started
        codes = torch.from_numpy(codec.encode(maps))
        started = time.perf_counter()
        decoded = torch.cat([codec.decode(codes[i : i + 256]) for i in range(0, len(codes), 256)]).numpy()
        codecs[f"transform {budget} B"] = (codec.bytes_per_image, decoded,
                                           trained, 1000 * (time.perf_counter() - started) / len(maps))
        coarse_ms[f"transform {budget} B"] = coarse_pass_ms(audio, lengths, maps, codec, codes.numpy())
    rows = {}
    for name, (nbytes, decoded, train_s, decode_ms) in codecs.items():
        scores = exact_scores if decoded is maps else misa_all(audio, lengths, decoded)
        rows[name] = {
            "bytes_per_image": nbytes,
            "relative_squared_error": float(((decoded.astype(np.float32) - maps.astype(np.float32)) ** 2).sum()
                                            / (maps.astype(np.float32) ** 2).sum()),
            "exhaustive_top10_overlap": top10_overlap(scores, exact),
            "two_stage_top10_overlap": {k: top10_overlap(scores, exact, allowed[k]) for k in ks},
            # the codec as stage 2's coarse pass: it keeps the best REFINE of the K, exact maps rank them
            "coarse_then_exact_top10_overlap": {k: refined_overlap(scores, exact_scores, exact, allowed[k], REFINE)
                                                for k in ks},
            # the same, keeping fewer (or more) than the engine's REFINE: {keep: {k: overlap}}
            "coarse_keeps_then_exact_top10_overlap": {
                keep: {k: refined_overlap(scores, exact_scores, exact, allowed[k], keep) for k in ks} for keep in keeps},
            "train_s": train_s,
            "decode_ms_per_image": decode_ms,
            "coarse_pass_ms_k400": coarse_ms.get(name),
        }
    return {"images": len(maps), "queries": len(prepared), "train_images": min(train_images, len(maps)), "codecs": rows}


def print_codec_rows(figures: dict, ks: list[int]) -> None:
    print(f"compressed maps: {figures['images']} images, {figures['queries']} queries, codecs trained on the "
          f"first {figures['train_images']} images' maps; top-10 overlap with exact MISA over all images")
    print(f"{'codec':<18} {'B/image':>8} {'rel. sq. err':>12} {'exhaustive':>10} "
          + " ".join(f"{'K=' + str(k):>8}" for k in ks) + f" {'train s':>8} {'decode ms/img':>13}")
    for name, row in figures["codecs"].items():
        print(f"{name:<18} {row['bytes_per_image']:>8} {row['relative_squared_error']:>12.5f} "
              f"{row['exhaustive_top10_overlap']:>10.3f} "
              + " ".join(f"{row['two_stage_top10_overlap'][k]:>8.3f}" for k in ks)
              + f" {row['train_s']:>8.1f} {row['decode_ms_per_image']:>13.3f}")
    print(f"the same codecs as stage 2's coarse pass only (the best {REFINE} of K by the codec, then exact "
          "float16 MISA over those): top-10 overlap with exact MISA, and the coarse pass's median ms for one "
          "query over 400 candidates held in memory (float16: as bfloat16 maps; codecs: scored in their basis)")
    for name, row in figures["codecs"].items():
        ms = row.get("coarse_pass_ms_k400")
        print(f"{name:<18} {row['bytes_per_image']:>8} "
              + " ".join(f"{row['coarse_then_exact_top10_overlap'][k]:>8.3f}" for k in ks)
              + (f" {ms:>8.2f} ms" if ms is not None else "        -"))
    keeps = sorted(next(iter(figures["codecs"].values()))["coarse_keeps_then_exact_top10_overlap"])
    print("the codec keeps M of K, exact maps rank those: top-10 overlap at K=" + "/".join(map(str, ks)))
    print(f"{'codec':<18} " + " ".join(f"{'M=' + str(m):>20}" for m in keeps))
    for name, row in figures["codecs"].items():
        by_keep = row["coarse_keeps_then_exact_top10_overlap"]
        print(f"{name:<18} " + " ".join(f"{' / '.join(f'{by_keep[m][k]:.3f}' for k in ks):>20}" for m in keeps))


# ---- main ----------------------------------------------------------------------------------------------


def print_agreement(label: str, rows: list[dict], default_k: int, size: int) -> None:
    print(f"{label}:")
    print(f"{'K':>6}  {'overlap@10':>10}  {'identical':>9}  {'top-1':>6}  {'FAISS top-K recall':>18}  "
          f"{'stage-1 p50 ms':>14}  {'stage-2 p50 ms':>14}")
    for row in rows:
        mark = "  <- default" if row["K"] == min(default_k, size) else ""
        print(
            f"{row['K']:>6}  {row['top10_overlap']:>10.3f}  {row['identical_top10']:>9.3f}  "
            f"{row['top1_agreement']:>6.3f}  {row['stage1_recall_of_exact_top10']:>18.3f}  "
            f"{row.get('stage1_p50_ms', float('nan')):>14.2f}  {row['stage2_p50_ms']:>14.2f}{mark}"
        )


def plot_curves(curves: dict[str, list[dict]], out: Path, title: str) -> None:
    """Top-10 overlap and identical-list share against K (log scale), one line pair per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for (label, rows), color in zip(curves.items(), ("tab:gray", "tab:blue", "tab:orange"), strict=False):
        ks = [r["K"] for r in rows]
        ax.plot(ks, [r["top10_overlap"] for r in rows], "o-", color=color, label=f"{label}: top-10 overlap")
        ax.plot(ks, [r["identical_top10"] for r in rows], "s--", color=color, alpha=0.6,
                label=f"{label}: identical top-10")
    ax.axhline(0.95, color="tab:red", lw=0.8, ls=":", label="0.95")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (stage-1 candidates re-ranked by MISA)")
    ax.set_ylabel("agreement with exhaustive MISA")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="collection size (corpus images + distractors)")
    parser.add_argument("--corpus", type=Path, default=None, help="a `matchmap synth` output: its images and val captions")
    parser.add_argument("--extra-corpus", type=Path, nargs="*", default=[],
                        help="more `matchmap synth` outputs whose images join the collection (realistic distractors)")
    parser.add_argument("--fill", choices=["scenes", "blocks"], default=None,
                        help="what tops the collection up to --images: synth-style scenes (default with --corpus) "
                             "or random blocky images (default without)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model (default: a RANDOM tiny model)")
    parser.add_argument("--compare-checkpoint", type=Path, default=None,
                        help="a second model (e.g. with distilled stage-1 heads): agreement side by side")
    parser.add_argument("--serve-side-by-side", action="store_true",
                        help="load runs through `matchmap serve` for both models in this run (needs --compare-checkpoint): "
                             "the first at --candidates, the second at --compare-candidates")
    parser.add_argument("--candidates", type=int, default=0, help="K of the first model's side-by-side run (0: the server's default)")
    parser.add_argument("--compare-candidates", type=int, default=0, help="K of the second model's side-by-side run")
    parser.add_argument("--previous-tree", type=Path, default=None,
                        help="side by side: the first model is served by this checkout's code (e.g. a git worktree "
                             "of the previous commit), the second by this one's, and again with serve --no-vad")
    parser.add_argument("--skip-agreement", action="store_true", help="no agreement curves")
    parser.add_argument("--widen-side-by-side", action="store_true",
                        help="agreement curves of the model with stage 1 as before (--stage1-widen 1: FAISS's top K) "
                             "and widened (the default: the centroid interaction keeps K of more), in this run")
    parser.add_argument("--agreement-only", action="store_true",
                        help="only the agreement curves (no load runs, batching or arithmetic)")
    parser.add_argument("--plot", type=Path, default=None, help="draw the agreement curves into this PNG")
    parser.add_argument("--queries", type=int, default=200, help="queries per load run")
    parser.add_argument("--agreement-queries", type=int, default=100)
    parser.add_argument("--k-curve", type=int, nargs="+", default=[10, 50, 100, 250, 500, 1000, 2000, 4000, 10000])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the library here (reused by reruns)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["all", "codec"], default="all",
                        help="codec: only section 4 (compressed maps), no server")
    parser.add_argument("--codec-bytes", type=int, nargs="+", default=[2048, 4096, 6144, 8192],
                        help="byte budgets per image of the transform codec")
    parser.add_argument("--codec-k", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--codec-train-images", type=int, default=1024)
    parser.add_argument("--codec-keeps", type=int, nargs="+", default=[REFINE],
                        help="how many of K the codec keeps for exact ranking (its last table)")
    args = parser.parse_args()
    command = "python bench/bench_search.py " + " ".join(sys.argv[1:])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; torch threads {torch.get_num_threads()}")
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(args.seed)
            checkpoint = work / "random-tiny.pt"
            if not checkpoint.exists():
                save_checkpoint(checkpoint, create_model("tiny"))
            print("model: a RANDOMLY INITIALIZED tiny model (timing figures only; agreement is of random scores)")
        own_images = None
        if args.corpus is not None:
            images, queries, own_images = corpus_inputs(args.corpus)
            for extra in args.extra_corpus:  # more corpus images (as distractors), no queries
                images += corpus_inputs(extra)[0]
        else:
            images, queries = [], [noise_wav(rng, float(rng.uniform(1.5, 5.0))) for _ in range(64)]
        fill = args.fill or ("scenes" if args.corpus is not None else "blocks")
        missing = max(0, args.images - len(images))
        images += (scene_images(work / "scenes", missing, args.seed + 1000) if fill == "scenes"
                   else distractor_images(work / "distractors", missing, args.seed))
        index_seconds, size = build_collection(work, checkpoint, images[: args.images])
        print(f"collection: {size} images ({fill} fill) indexed in {index_seconds:.1f} s; {len(queries)} distinct queries")

        engine = SearchEngine.open(checkpoint, work / "library", device=args.device)
        if args.only == "codec":
            ks = [min(k, size) for k in args.codec_k]
            codec = codec_rows(engine, queries[: args.agreement_queries], args.codec_bytes, ks, args.codec_train_images,
                                tuple(args.codec_keeps))
            print_codec_rows(codec, ks)
            if args.json is not None:
                args.json.write_text(json.dumps({"command": command, "codec": codec}, indent=2))
            print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")
            engine.close()
            return
        default_k = SearchLimits().default_candidates
        load_queries = [queries[i % len(queries)] for i in range(args.queries)]
        figures: dict = {"command": command, "images": size, "device": str(engine.device), "default_K": default_k,
                         "fill": fill}

        full = not args.agreement_only and not args.serve_side_by_side  # side by side: no single-model runs
        for max_batch in (8, 1) if full else ():
            server = ServeProcess(work, checkpoint, args.device, max_batch)
            try:
                runs = [run_load(server.target, load_queries, c, 0) for c in ((1, 8) if max_batch == 8 else (8,))]
            finally:
                server.stop()
            figures[f"max_batch_{max_batch}"] = runs
            for r in runs:
                print(
                    f"serve --max-batch {max_batch}, concurrency {r['concurrency']}: p50 {r['p50_ms']:.1f} ms, "
                    f"p95 {r['p95_ms']:.1f}, p99 {r['p99_ms']:.1f}; {r['throughput_qps']:.1f} queries/s; "
                    f"mean batch {r['mean_batch']:.2f}; errors {r['errors']}/{r['queries']}"
                )

        if full:
            gain = batching_gain(engine, queries[:64])
            figures["batching_in_process"] = gain
            print(
                f"in-process search_batch, {len(queries[:64])} queries, best of 3 rounds: one at a time "
                f"{gain['alone_qps']:.1f} queries/s, in batches of {gain['batch']} {gain['batched_qps']:.1f} queries/s "
                f"({gain['gain']:.2f}x)"
            )

        if args.serve_side_by_side:
            if args.compare_checkpoint is None:
                parser.error("--serve-side-by-side needs --compare-checkpoint")
            seconds, _ = build_collection(work, args.compare_checkpoint, images[: args.images], COLLECTION + "-compare")
            setups = [
                {"label": f"{args.checkpoint.name if args.checkpoint else 'random'}", "checkpoint": checkpoint,
                 "collection": COLLECTION, "candidates": args.candidates, "tree": args.previous_tree},
                {"label": args.compare_checkpoint.name, "checkpoint": args.compare_checkpoint,
                 "collection": COLLECTION + "-compare", "candidates": args.compare_candidates},
            ]
            if args.previous_tree is not None:
                setups[0]["label"] += " (previous code)"
                setups.append({**setups[1], "label": args.compare_checkpoint.name + " --no-vad",
                               "serve_args": ("--no-vad",)})
            side = serve_side_by_side(work, args.device, load_queries, setups)
            figures["serve_side_by_side"] = side
            print_side_by_side(side, size)

        if args.skip_agreement:
            engine.close()
            if args.json is not None:
                args.json.write_text(json.dumps(figures, indent=2, default=str))
            print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")
            return
        ks = sorted(set(args.k_curve + [default_k]))
        n_agree = min(len(queries), args.agreement_queries)
        models = [(engine.model_version, engine, COLLECTION)]
        if args.widen_side_by_side:
            plain = SearchEngine.open(checkpoint, work / "library", device=args.device, limits=SearchLimits(stage1_widen=1))
            models.insert(0, (plain.model_version, plain, COLLECTION))
        if args.compare_checkpoint is not None:
            seconds, _ = build_collection(work, args.compare_checkpoint, images[: args.images], COLLECTION + "-compare")
            print(f"compare collection indexed in {seconds:.1f} s")
            other = SearchEngine.open(args.compare_checkpoint, work / "library", device=args.device)
            models.append((other.model_version, other, COLLECTION + "-compare"))
        curves, recalls = {}, {}
        for version, model_engine, name in models:
            label = f"{version} (stage 1: {model_engine.model.stage1_pooling}, widen {model_engine.limits.stage1_widen})"
            rows, recall = agreement_curve(model_engine, images[: args.images], queries[: args.agreement_queries], ks,
                                           collection=name, own_images=own_images)
            curves[label], recalls[label] = rows, recall
            print_agreement(f"two-stage top-10 vs exhaustive MISA top-10, {label}, {n_agree} queries", rows,
                            default_k, size)
        figures["agreement"] = curves[next(iter(curves))]
        figures["agreement_by_model"] = curves
        if own_images is not None:
            figures["own_image_recall"] = recalls
            print(f"recall of each caption's own image among {size} ({n_agree} queries): R@1 / R@5 / R@10")
            for label, recall in recalls.items():
                for kind in ("stage1", "misa"):
                    r = recall[kind]
                    print(f"  {label:<48} {kind:<7} {r['R@1']:.3f} / {r['R@5']:.3f} / {r['R@10']:.3f}")
        if len(curves) > 1:
            (_, first), (_, second) = list(curves.items())[:2]
            print("side by side (overlap@10, identical): " + "; ".join(
                f"K={a['K']}: {a['top10_overlap']:.3f} / {a['identical_top10']:.3f} -> "
                f"{b['top10_overlap']:.3f} / {b['identical_top10']:.3f}" for a, b in zip(first, second, strict=True)))
        if args.plot is not None:
            plot_curves(curves, args.plot, f"{size} scene images, {n_agree} spoken queries (unheard voices)")
            print(f"plot: {args.plot}")

        if full:
            frames = int(statistics.median(
                engine.encode([engine.prepare_audio(q).logmel])[0].shape[1] for q in queries[:32]))
            rows, cols = engine.model.image_grid
            arithmetic = {
                f"batch_{b}_{str(dtype).removeprefix('torch.')}": stage2_row(
                    b, min(default_k, size), frames, rows * cols, engine.model.embed_dim, str(engine.device), dtype)
                for b in (1, 8) for dtype in (torch.float32, torch.bfloat16)
            }
            figures["stage2_arithmetic"] = arithmetic
            for name, a in arithmetic.items():
                print(
                    f"stage 2 {name} {a['shape']}: score_matrix {a['score_matrix_ms']:.2f} ms "
                    f"({a['score_matrix_gflops']:.1f} GFLOP/s) vs plain matmul {a['matmul_ms']:.2f} ms "
                    f"({a['matmul_gflops']:.1f} GFLOP/s): {a['ratio']:.2f} of matmul speed"
                )
        for _, model_engine, _ in models:
            model_engine.close()
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine skews every timing)")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
