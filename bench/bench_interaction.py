"""The centroid interaction (indexer.region_centroids) over region ids as assigned and as a snapshot holds them
(RegionCentroids.distinct_first: each image's distinct ids first, only the first NARROW_REGIONS read where the rest are pads),
alternating, on one core as the server's model thread runs it. Candidates: stage 1's widened FAISS list for
each of a corpus's val captions (voices the model never heard), at the collection's default K.

    python bench/bench_interaction.py --library /work/exp/m1/library --corpus /work/exp/c10 --narrow 32 40 48
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import collection_arguments, corpus_inputs  # noqa: E402

from indexer import region_centroids  # noqa: E402
from search.centroid_prune import faiss_recall_k  # noqa: E402
from search.engine import SearchEngine, SearchLimits  # noqa: E402
from search.threads import thread_team  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    collection_arguments(parser)
    parser.add_argument("--narrow", type=int, nargs="+", default=[region_centroids.NARROW_REGIONS],
                        help="NARROW_REGIONS values to time the held form at")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu", limits=SearchLimits(resident_maps_mb=0))
    coll = engine.collection(args.collection)
    centroids, held = coll.held_region_centroid_ids()
    assigned = coll.region_centroid_ids()[1]
    _, k = engine.resolve_counts(10, 0, coll.size)
    wide = min(coll.size, engine.limits.stage1_widen * k)
    _, captions, _ = corpus_inputs(args.corpus)
    prepared = [engine.prepare_audio(b) for b in captions[: args.queries]]
    thread_team(1)
    forms = [("as assigned", assigned, None)] + [(f"distinct first, {n} read", held, n) for n in args.narrow]
    times: dict[str, list[float]] = {name: [] for name, _, _ in forms}
    for prepared_query in prepared:
        audio, lengths = engine.encode([prepared_query.logmel])
        audio = audio[:, : int(lengths[0])]
        pooled = engine.model.stage1_audio_vectors(audio, lengths).numpy()
        _, ids = coll.search_stage1(pooled, wide, recall_k=faiss_recall_k(k, wide))
        positions = coll.positions_of(ids[0][ids[0] >= 0])
        scores = {}
        for _ in range(2):  # the second round is timed
            for name, table, narrow in forms:
                region_centroids.NARROW_REGIONS = narrow or region_centroids.NARROW_REGIONS
                started = time.perf_counter()
                gathered = torch.from_numpy(table[positions].astype(np.int64))[None]
                scores[name] = centroids.interaction(audio, lengths, gathered)
                times[name].append(time.perf_counter() - started)
        for got in scores.values():  # the same numbers, up to the order of the mean's sum
            torch.testing.assert_close(got, scores["as assigned"], rtol=1e-5, atol=1e-4)
    narrow_share = {n: float((held[:, n] == centroids.count).mean()) for n in args.narrow if n < held.shape[1]}
    print(f"{coll.size} images, {len(prepared)} captions, {wide} candidates each (K={k}); images with at most "
          + ", ".join(f"{n}: {share:.3f}" for n, share in narrow_share.items()) + " distinct centroids")
    reference = statistics.median(times["as assigned"][1::2])
    for name, values in times.items():
        median = statistics.median(values[1::2])
        print(f"  {name}: {1000 * median:.2f} ms ({reference / median:.2f}x)")
    print(f"reproduce: python bench/bench_interaction.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
