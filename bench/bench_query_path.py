"""Where a query's milliseconds go before and inside the search, one query at a time, in process.

Two parts, on real spoken captions (a `matchmap synth` corpus's val captions) and a built library
(``bench/bench_search.py --work-dir W`` leaves one in W/library):

1. Shapes. oneDNN makes a primitive for every new input shape, and every query has its own length. The
   audio branch and Silero's network run over the same captions twice in one process, with padding to a
   frame multiple and without: the first pass meets each length for the first time (as a server does),
   the second has seen them all.
2. The engine's own stage timings (decoding + VAD + log-mel, encoding, stage 1, stage 2), medians over
   the captions, as the server reports them per query.
3. A fresh server's first queries: in two new processes, one per arm, the captions' decoding + VAD +
   log-mel + encoding, each the first of its length, without and with ``warm_query_shapes`` at start
   (which ``warm_up`` runs); and what the warm-up costs.

    python bench/bench_query_path.py --library /work/exp/b10k/library --corpus /work/exp/c10
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import COLLECTION, corpus_inputs  # noqa: E402

from encoders.models import QUERY_FRAME_MULTIPLE  # noqa: E402
from search import vad  # noqa: E402
from search.engine import SearchEngine, SearchQuery  # noqa: E402


def median_ms(fn, items) -> float:
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def shapes_part(engine: SearchEngine, queries: list[bytes]) -> None:
    model = engine.model
    waves = [engine.decode(q) for q in queries]
    logmels = [model.audio_frontend.logmel(w) for w in waves]

    @torch.inference_mode()
    def encode(logmel: torch.Tensor, multiple: int) -> None:
        model.encode_audio(logmel[None], torch.tensor([logmel.shape[1]]), frame_multiple=multiple)

    frames = sorted(m.shape[1] for m in logmels)
    print(f"{len(queries)} captions, {frames[0]}..{frames[-1]} log-mel frames, {len(set(frames))} distinct lengths")
    # Unpadded first: the padded pass then meets its few shapes for the first time too.
    for label, multiple in (("exact length", 1), (f"padded to {QUERY_FRAME_MULTIPLE}", QUERY_FRAME_MULTIPLE)):
        first = median_ms(functools.partial(encode, multiple=multiple), logmels)
        again = median_ms(functools.partial(encode, multiple=multiple), logmels)
        print(f"  audio branch, {label:<14}: first pass {first:5.2f} ms, again {again:5.2f} ms")
    saved = vad.FRAME_MULTIPLE
    for label, multiple in (("exact length", 1), (f"padded to {saved}", saved)):
        vad.FRAME_MULTIPLE = multiple
        try:
            first = median_ms(lambda w: vad.speech_probabilities(w, engine.sample_rate), waves)
            again = median_ms(lambda w: vad.speech_probabilities(w, engine.sample_rate), waves)
        finally:
            vad.FRAME_MULTIPLE = saved
        print(f"  Silero VAD,   {label:<14}: first pass {first:5.2f} ms, again {again:5.2f} ms")


def stages_part(engine: SearchEngine, queries: list[bytes], collection: str) -> None:
    size = engine.collection(collection).size
    top_k, candidates = engine.resolve_counts(10, 0, size)
    rows = []
    for query in queries:
        started = time.perf_counter()
        audio = engine.prepare_audio(query)
        result = engine.search_batch([SearchQuery(audio, collection, top_k, candidates)])[0]
        rows.append({**result.timings_ms, "total": 1000 * (time.perf_counter() - started)})
    medians = {k: statistics.median(r[k] for r in rows) for k in ("decode", "encode", "stage1", "stage2", "total")}
    print(f"engine stages, {size} images, K={candidates}, medians of {len(rows)} other captions: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in medians.items()))


def first_queries_part() -> None:
    for arm in ("cold", "warm"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--first-queries", arm],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip())


def first_queries(args: argparse.Namespace) -> None:
    """One arm of part 3, in its own process (oneDNN's primitives are made once per process)."""
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
    try:
        warm_s = None
        if args.first_queries == "warm":
            started = time.perf_counter()
            audio_shapes, vad_shapes = engine.warm_query_shapes()
            warm_s = time.perf_counter() - started
        _, queries, _ = corpus_inputs(args.corpus)
        times = []
        for query in queries[: args.queries]:
            started = time.perf_counter()
            engine.encode([engine.prepare_audio(query).logmel])
            times.append(1000 * (time.perf_counter() - started))
        times.sort()
        line = (f"  fresh server, {args.first_queries}: first {len(times)} queries' decode+VAD+encode: mean "
                f"{statistics.fmean(times):5.2f} ms, median {statistics.median(times):5.2f}, "
                f"p95 {times[int(0.95 * (len(times) - 1))]:5.2f}, max {times[-1]:5.2f}")
        if warm_s is not None:
            line += f" (warm-up {warm_s:.2f} s: {audio_shapes} audio-branch and {vad_shapes} VAD shapes)"
        print(line)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="a library bench_search.py built")
    parser.add_argument("--corpus", type=Path, required=True, help="the `matchmap synth` corpus whose val captions query")
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--collection", default=COLLECTION)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--first-queries", choices=("cold", "warm"), help=argparse.SUPPRESS)  # part 3's arms
    args = parser.parse_args()
    if args.first_queries:
        return first_queries(args)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}; reproduce: python bench/bench_query_path.py {' '.join(sys.argv[1:])}")
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
    try:
        _, queries, _ = corpus_inputs(args.corpus)
        shapes_part(engine, queries[: args.queries])  # before warm_up, which meets the padded shapes
        engine.warm_up()
        engine.wait_held()
        stages_part(engine, queries[args.queries : 2 * args.queries], args.collection)
    finally:
        engine.close()
    first_queries_part()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
