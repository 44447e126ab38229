"""What region centroids (indexer/region_centroids.py) cost: at indexing time beside the transform codec
the code store already runs, and per candidate at query time beside stage 2's bfloat16 pass.

Reads real maps of a collection that ``bench/bench_search.py --work-dir W`` built (W/library) and real
spoken queries (a ``matchmap synth`` corpus's val captions), encoded by the shipped model:

    python bench/bench_centroids.py --library /work/exp/b10k/library --corpus /work/exp/c10

Indexing: training on 1,024 maps (k-means, 1,024 centroids) and assigning 4,096 maps, against the
transform codec's training and coding of the same maps. Query: the centroid interaction over K'
candidates for one query, against bfloat16 MISA over the same candidates (``ResidentMaps.paired_misa``,
stage 2's coarse pass), medians of 20 queries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import COLLECTION, corpus_inputs  # noqa: E402

from indexer.code_store import CODE_BYTES  # noqa: E402
from indexer.region_centroids import RegionCentroids  # noqa: E402
from indexer.region_codec import RegionCodec  # noqa: E402
from search.engine import SearchEngine  # noqa: E402
from search.resident import ResidentMaps  # noqa: E402


def seconds(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="its val captions are the queries")
    parser.add_argument("--collection", default=COLLECTION)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[400, 800, 1600, 4000])
    args = parser.parse_args()
    command = "python bench/bench_centroids.py " + " ".join(sys.argv[1:])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; torch threads "
          f"{torch.get_num_threads()}")
    engine = SearchEngine.open(None, args.library, device="cpu")
    coll = engine.collection(args.collection)
    ids = coll.ids()
    train_maps = coll.feature_maps(ids[np.linspace(0, len(ids) - 1, 1024).astype(int)].tolist()).astype(np.float32)
    batch_maps = coll.feature_maps(ids[:4096].tolist())
    t_codec, codec = seconds(lambda: RegionCodec.train(train_maps, CODE_BYTES))
    t_kmeans, centroids = seconds(lambda: RegionCentroids.train(train_maps))
    t_code, _ = seconds(lambda: codec.encode(batch_maps))
    t_assign, _ = seconds(lambda: centroids.assign(batch_maps))
    print(f"indexing, {coll.size} images of {coll.grid[0] * coll.grid[1]} regions:")
    print(f"  training on 1,024 maps: transform codec {t_codec:.1f} s, {centroids.count} centroids {t_kmeans:.1f} s")
    print(f"  coding 4,096 maps: transform codes {t_code:.2f} s ({4096 / t_code:.0f} maps/s), "
          f"centroid ids {t_assign:.2f} s ({4096 / t_assign:.0f} maps/s)")

    _, queries, _ = corpus_inputs(args.corpus)
    prepared = [engine.prepare_audio(q) for q in queries[: args.queries]]
    audio, lengths = engine.encode([p.logmel for p in prepared])
    region_ids = torch.from_numpy(centroids.assign(coll.feature_maps(ids.tolist())).astype(np.int64))
    resident = ResidentMaps.load(coll)
    rng = np.random.default_rng(0)
    print("query time, one query, median of", len(prepared), "queries:")
    for width in args.widths:
        width = min(width, coll.size)
        t_inter, t_coarse = [], []
        for b in range(len(prepared)):
            positions = rng.choice(coll.size, width, replace=False)[None]
            one, length, valid = audio[b : b + 1, : int(lengths[b])], lengths[b : b + 1], torch.ones(1, width, dtype=bool)
            gathered = region_ids[positions]
            t_inter.append(seconds(lambda one=one, length=length, g=gathered: centroids.interaction(one, length, g))[0])
            t_coarse.append(seconds(lambda one=one, length=length, p=positions, v=valid:
                                    resident.paired_misa(one, length, p, v))[0])
        inter, coarse = 1000 * statistics.median(t_inter), 1000 * statistics.median(t_coarse)
        print(f"  {width:>5} candidates: centroid interaction {inter:.2f} ms ({1000 * inter / width:.1f} us each), "
              f"bfloat16 MISA {coarse:.2f} ms: {coarse / inter:.1f}x the interaction")
    engine.close()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")


if __name__ == "__main__":
    main()
