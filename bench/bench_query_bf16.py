"""Would encoding a spoken query under bfloat16 autocast pay? Its time and what it does to the ranking.

Times the audio branch on each val caption of a `matchmap synth` corpus in float32 and under bfloat16
autocast, alternating, from a worker thread on one core (as the server's model thread runs it). Then
ranks the first 10,000 images of a library's collection by exact MISA (float32 over the stored maps) for
both encodings of each caption, and reports how much of the float32 top 10 the bfloat16 one keeps.

    python bench/bench_query_bf16.py /work/exp/c10 /work/exp/s100k/library bench 120
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_search import corpus_inputs  # noqa: E402

from search.engine import SearchEngine  # noqa: E402
from search.threads import thread_team  # noqa: E402

MODES = ("float32", "bfloat16")


def encoded_both_ways(engine: SearchEngine, logmels: list) -> tuple[dict, dict]:
    """Each caption's audio map in both modes, and the encoding times (ms), from one single-core thread."""
    times: dict = {mode: [] for mode in MODES}
    maps: dict = {mode: [] for mode in MODES}

    def run() -> None:
        thread_team(1)
        for lm in logmels[:10] * 2:  # warm both modes' shapes
            for mode in MODES:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
                    engine.encode([lm])
        for lm in logmels:
            for mode in MODES:
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
                    audio, lengths = engine.encode([lm])
                times[mode].append(1000 * (time.perf_counter() - started))
                maps[mode].append(audio[0, : int(lengths[0])].float())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return maps, times


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] in ("-h", "--help"):  # three positional arguments, a fourth optional
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    corpus, library, collection = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 120
    torch.set_grad_enabled(False)
    engine = SearchEngine.open("encoders/default_model/tiny.pt", library, device="cpu")
    _, queries, _ = corpus_inputs(corpus)
    maps, times = encoded_both_ways(engine, [engine.prepare_audio(q).logmel for q in queries[:count]])
    for mode in MODES:
        print(f"{mode}: encoding, median of {count}: {statistics.median(times[mode]):.2f} ms")
    coll = engine.collection(collection)
    ids = coll.ids()[:10000]
    stored = torch.from_numpy(np.asarray(coll.feature_maps(list(ids)))).float()  # (N, R, D)
    n, r, d = stored.shape
    regions = stored.reshape(-1, d).T.contiguous()
    overlap, identical, top1 = [], [], []
    for exact_frames, bf16_frames in zip(maps["float32"], maps["bfloat16"], strict=True):
        tops = [torch.topk((f @ regions).view(len(f), n, r).amax(2).mean(0), 10).indices
                for f in (exact_frames, bf16_frames)]
        overlap.append(len(set(tops[0].tolist()) & set(tops[1].tolist())) / 10)
        identical.append(torch.equal(tops[0], tops[1]))
        top1.append(int(tops[0][0]) == int(tops[1][0]))
    print(f"{count} captions over {n} images: the bfloat16 query's top 10 holds {np.mean(overlap):.3f} of the "
          f"float32 one's; identical lists {np.mean(identical):.3f}; the same top 1 {np.mean(top1):.3f}")
    print(f"reproduce: python bench/bench_query_bf16.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
