"""Does stage 2's rough pass run faster on both cores than on one? In process, from a worker thread.

Stage 2 scores a query's K candidates from the held maps (``search.resident.ResidentMaps.paired_misa``:
one caption at a time against 128 gathered maps per product) before re-scoring its best 32 exactly.
At a million images the maps are held as 64 int8 dims. This holds that many such maps (random int8
values: the arithmetic and the gathers do not depend on them) and times the rough pass over K random
candidates for captions of 15-45 frames, alternating a team of one and of two cores caption by caption
(``search.threads.team``), in one worker thread as the server's model thread runs it; and, third,
the candidates split in halves between that thread and a second single-core thread ("two threads").

    python bench/bench_rough_team.py --images 1000000 --ks 4000 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch

from search.resident import ResidentMaps
from search.threads import team, thread_team

REGIONS, HELD_DIMS, EMBED_DIM = 64, 64, 256


def timed(held: ResidentMaps, k: int, captions: int) -> dict[int, list[float]]:
    rng = np.random.default_rng(0)
    times: dict[int | str, list[float]] = {1: [], 2: [], "threads": []}
    helper = ThreadPoolExecutor(1, initializer=partial(thread_team, 1))

    def run() -> None:
        thread_team(1)
        for i in range(captions + 6):  # the first 6 warm both teams
            frames = int(rng.integers(15, 46))
            audio, lengths = torch.randn(1, frames, EMBED_DIM), torch.tensor([frames])
            positions = rng.integers(0, len(held.maps), (1, k))
            valid = torch.ones(1, k, dtype=torch.bool)
            for size in (1, 2, "threads") if i % 2 else ("threads", 2, 1):
                started = time.perf_counter()
                if size == "threads":
                    half = k // 2
                    other = helper.submit(held.paired_misa, audio, lengths, positions[:, half:], valid[:, half:])
                    held.paired_misa(audio, lengths, positions[:, :half], valid[:, :half])
                    other.result()
                else:
                    with team(size):
                        held.paired_misa(audio, lengths, positions, valid)
                if i >= 6:
                    times[size].append(1000 * (time.perf_counter() - started))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    helper.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[4000, 500])
    parser.add_argument("--captions", type=int, default=60)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(-60, 61, (args.images, REGIONS, HELD_DIMS), dtype=torch.int8, generator=generator)
    basis = torch.linalg.qr(torch.randn(EMBED_DIM, HELD_DIMS, generator=generator))[0]
    held = ResidentMaps("bench", 0, maps, basis=basis, scale=torch.full((HELD_DIMS,), 0.01))
    print(f"{args.images} held maps, {REGIONS} regions x {HELD_DIMS} int8 dims ({maps.numel() / 2**30:.1f} GiB)")
    for k in args.ks:
        times = timed(held, k, args.captions)
        one, two, threads = (statistics.median(times[key]) for key in (1, 2, "threads"))
        print(f"K={k}: rough pass, median of {args.captions} captions: one core {one:.2f} ms, "
              f"two cores {two:.2f} ms ({one / two:.2f}x), two threads of one core {threads:.2f} ms ({one / threads:.2f}x)")
    print(f"reproduce: python bench/bench_rough_team.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
