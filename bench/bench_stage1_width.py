"""Stage 1 alone on a large collection: for each K and widening factor, the time FAISS takes for K x widen
candidates, the time the centroid interaction takes to keep K of them (search.centroid_prune), and the share
of the exhaustive MISA top 10 the K kept hold (stage 2 ranks only what they hold: the two-stage ceiling).
Captions: the corpus's val captions (voices the model never heard), one query at a time, main thread.

    python bench/bench_stage1_width.py --library /work/exp/m1/library --collection bench --corpus /work/exp/c10 \\
        --exact-cache /work/exp/m1/exact40.npy
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import cached_exhaustive_top10, collection_arguments, corpus_inputs  # noqa: E402

from indexer import stage1_index  # noqa: E402
from search.centroid_prune import faiss_recall_k, prune_by_centroids  # noqa: E402
from search.engine import SearchEngine, SearchLimits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    collection_arguments(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--widens", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--probe-for", choices=["K / widen", "K", "K x widen"], nargs="+", default=["K / widen"],
                        help="what FAISS's probes are tuned for in a widened search: K / widen (as the engine "
                             "does: search.centroid_prune.faiss_recall_k), the K kept, or every candidate taken")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[0],
                        help="IVF lists probed per search (0: as the collection's tuned table says)")
    args = parser.parse_args()
    _, captions, _ = corpus_inputs(args.corpus)
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu", limits=SearchLimits(resident_maps_mb=0))
    prepared = [engine.prepare_audio(b) for b in captions[: args.queries]]
    audio, lengths = engine.encode([p.logmel for p in prepared])
    coll = engine.collection(args.collection)
    exact = cached_exhaustive_top10(engine, None, audio, lengths, args.exact_cache, args.collection)
    coll.held_region_centroid_ids()
    with torch.inference_mode():
        pooled = engine.model.stage1_audio_vectors(audio, lengths).cpu().numpy()
    print(f"{coll.size} images, {len(prepared)} captions:")
    tuned_setting = stage1_index.search_setting
    for k, nprobe in [(k, n) for k in args.ks for n in args.nprobes]:
        stage1_index.search_setting = tuned_setting if not nprobe else lambda *a, nprobe=nprobe, **kw: nprobe
        probes = f"{nprobe} lists" if nprobe else "tuned probes"
        for widen, probe_for in [(w, p) for w in args.widens for p in (args.probe_for if w > 1 else ["K"])]:
            recall_k = {"K / widen": faiss_recall_k(k, k * widen), "K": k, "K x widen": None}[probe_for]
            faiss_ms, prune_ms, held = [], [], []
            for i in range(len(prepared)):
                started = time.perf_counter()
                scores, ids = coll.search_stage1(np.ascontiguousarray(pooled[i : i + 1]), k * widen,
                                                 recall_k=recall_k)
                searched = time.perf_counter()
                if widen > 1:
                    length = int(lengths[i])
                    scores, ids = prune_by_centroids(coll, audio[i : i + 1, :length], lengths[i : i + 1], scores, ids, k)
                faiss_ms.append(1000 * (searched - started))
                prune_ms.append(1000 * (time.perf_counter() - searched))
                held.append(len(set(ids[0].tolist()) & set(exact[i].tolist())) / 10)
            print(f"  K={k:>5}, {probes}, widen {widen}{f', probes for {probe_for}' if widen > 1 else ''}: holds {np.mean(held):.3f} of the exhaustive top 10; FAISS "
                  f"{statistics.median(faiss_ms):.1f} ms, centroid interaction {statistics.median(prune_ms):.1f} ms",
                  flush=True)
    engine.close()
    print(f"reproduce: python bench/bench_stage1_width.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
