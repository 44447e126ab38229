"""Soak benchmark of the search service: sustained concurrent load, errors, latency and the server's memory.

A real `matchmap serve` process (so the resident set measured is the server's alone, via psutil) on a
collection of --images real scene images (`matchmap synth` corpus, indexed with the checkpoint), driven
for --seconds by --concurrency clients, each with its own channel, sending the corpus's spoken val
captions back to back. After --warmup-seconds of load the server's RSS is the baseline; it is sampled
every --sample-seconds; the verdict is the end RSS within --tolerance (10 %) of the baseline, with
0 errors. The fitted growth (MB per minute after warm-up) shows a leak even in a short run.

    PYTHONPATH=. .venv/bin/python bench/bench_soak.py                                  # the issue's soak: 32 x 10 min
    PYTHONPATH=. .venv/bin/python bench/bench_soak.py --concurrency 16 --seconds 120   # a short run
    PYTHONPATH=. .venv/bin/python bench/bench_soak.py --serve-arg=--heap-trim-interval=0  # without heap trimming

--server-env NAME=VALUE sets the server's environment (e.g. MALLOC_ARENA_MAX=2, to compare allocator
settings side by side), --serve-arg passes an argument to `matchmap serve`;
--mix all adds Localize (of a hit), Highlight (a short stream) and ListCollections calls to the Searches.
Exit status 0 when the verdict is a pass.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import soundfile

# The benchmarks' shared inputs and server process (bench/ is on sys.path when this file runs as a script).
from bench_search import COLLECTION, ServeProcess, build_collection, corpus_inputs

from search.client import SearchClient, SearchServiceError

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "encoders" / "default_model" / "tiny.pt"


def ensure_corpus(folder: Path, images: int, seed: int) -> Path:
    """A `matchmap synth` corpus of ``images`` scene images (a fifth of them, at most 200, val pairs whose
    captions are the queries); reused when ``folder`` already holds one."""
    from training.synth import synthesize_corpus

    if not (folder / "val.json").exists():
        val = max(1, min(200, images // 5))
        synthesize_corpus(folder, pairs=max(1, images - val), val_pairs=val, seed=seed, progress=False)
    return folder


def pcm_of(wav: bytes) -> tuple[bytes, int]:
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    return samples.tobytes(), rate


class Load:
    """``concurrency`` client threads calling the server until ``stop`` is set; answers, errors, latencies."""

    def __init__(self, target: str, queries: list[bytes], concurrency: int, mix: str):
        self.target, self.queries, self.concurrency, self.mix = target, queries, concurrency, mix
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []
        self.latencies_ms: list[float] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _one(self, client: SearchClient, i: int, call: int) -> str:
        query = self.queries[(i * 7919 + call) % len(self.queries)]
        kind = "search"
        if self.mix == "all":
            kind = ("search",) * 16 + ("localize", "localize", "highlight", "list")
            kind = kind[call % len(kind)]
        if kind == "search":
            client.search(query, COLLECTION, top_k=10)
        elif kind == "localize":
            image_id = client.search(query, COLLECTION, top_k=1)[0].image_id
            client.localize(query, image_id=image_id, collection=COLLECTION)
        elif kind == "highlight":
            samples, rate = pcm_of(query)
            step = 2 * rate // 4  # 0.25 s chunks, sent as fast as the server takes them
            chunks = [samples[k : k + step] for k in range(0, len(samples), step)]
            list(client.highlight(iter(chunks), rate, image_id=1, collection=COLLECTION))
        else:
            client.list_collections()
        return kind

    def _client(self, i: int) -> None:
        with SearchClient(self.target, timeout=60) as client:
            call = 0
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    kind = self._one(client, i, call)
                except SearchServiceError as error:
                    with self.lock:
                        self.errors[error.code.name] += 1
                        if len(self.first_errors) < 5:
                            self.first_errors.append(f"{error.code.name}: {error.details}")
                else:
                    with self.lock:
                        self.answers[kind] += 1
                        self.latencies_ms.append(1000 * (time.perf_counter() - started))
                call += 1


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="clients calling at once")
    parser.add_argument("--seconds", type=float, default=600, help="duration of the load (warm-up included)")
    parser.add_argument("--images", type=int, default=500, help="collection size (scene images of a synth corpus)")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="load before the baseline RSS is taken [default: 10%% of --seconds, 10..60 s]")
    parser.add_argument("--sample-seconds", type=float, default=None,
                        help="RSS sampling interval [default: --seconds / 20, at least 2 s]")
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest allowed RSS growth after warm-up")
    parser.add_argument("--mix", choices=["search", "all"], default="search",
                        help="search: Search calls only; all: also Localize, Highlight and ListCollections")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT, help="model [default: the shipped one]")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the server process (repeatable)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra `matchmap serve` argument, e.g. --serve-arg=--heap-trim-interval=0 (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/matchmap-soak"),
                        help="corpus and library (reused by reruns)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    command = "PYTHONPATH=. python bench/bench_soak.py " + " ".join(sys.argv[1:])
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60.0, max(10.0, args.seconds / 10))
    interval = args.sample_seconds or max(2.0, args.seconds / 20)
    server_env = dict(item.split("=", 1) for item in args.server_env)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images, queries = corpus_inputs(ensure_corpus(work / f"corpus-{args.images}", args.images, args.seed))
    index_seconds, size = build_collection(work / f"library-{args.images}", args.checkpoint, images[: args.images])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"collection: {size} images ({index_seconds:.1f} s to index or check); {len(queries)} spoken captions as queries")

    server = ServeProcess(work / f"library-{args.images}", args.checkpoint, "cpu", args.max_batch,
                          extra_args=tuple(args.serve_arg), env=server_env)
    proc = psutil.Process(server.process.pid)
    samples: list[tuple[float, float, int]] = []  # (seconds since the load started, RSS MB, threads)
    load = Load(server.target, queries, args.concurrency, args.mix)
    print(f"server pid {proc.pid} at {server.target}, env {server_env or 'inherited'}, extra args {args.serve_arg}; "
          f"RSS idle {rss_mb(proc):.0f} MB")
    try:
        started = time.monotonic()
        load.start()
        baseline = cpu_at_warmup = None
        answers_at_warmup = 0
        next_sample = started
        while (now := time.monotonic()) - started < args.seconds:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.process.returncode}")
            if now >= next_sample:
                t, mb = now - started, rss_mb(proc)
                samples.append((t, mb, proc.num_threads()))
                with load.lock:
                    answered = sum(load.answers.values())
                print(f"  t={t:6.0f} s  RSS {mb:7.1f} MB  threads {samples[-1][2]:3d}  answers {answered}", flush=True)
                if baseline is None and t >= warmup:
                    baseline, cpu_at_warmup, answers_at_warmup = mb, proc.cpu_times(), answered
                next_sample += interval
            time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        end_mb, cpu_at_end = rss_mb(proc), proc.cpu_times()
        with load.lock:
            answers_at_end = sum(load.answers.values())
        samples.append((time.monotonic() - started, end_mb, proc.num_threads()))
        load.join()
        wall = time.monotonic() - started
    finally:
        load.stop.set()
        server.stop()

    baseline = baseline if baseline is not None else samples[0][1]
    # The server's own CPU per answer after warm-up: unlike answers/s, barely moved by other work on the machine.
    cpu_ms = (1000 * (sum(cpu_at_end[:2]) - sum(cpu_at_warmup[:2])) / max(1, answers_at_end - answers_at_warmup)
              if cpu_at_warmup is not None else float("nan"))
    after = [(t, mb) for t, mb, _ in samples if t >= warmup]
    slope = float(np.polyfit([t for t, _ in after], [mb for _, mb in after], 1)[0]) * 60 if len(after) >= 3 else 0.0
    growth = end_mb / baseline - 1
    answers = sum(load.answers.values())
    errors = sum(load.errors.values())
    lat = load.latencies_ms or [0.0]
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    passed = errors == 0 and growth <= args.tolerance
    figures = {
        "command": command,
        "images": size,
        "concurrency": args.concurrency,
        "seconds": wall,
        "server_env": server_env,
        "serve_args": args.serve_arg,
        "answers": dict(load.answers),
        "errors": dict(load.errors),
        "throughput_qps": answers / wall,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
        "server_cpu_ms_per_answer": cpu_ms,
        "rss_mb": [[round(t, 1), round(mb, 1), n] for t, mb, n in samples],
        "rss_after_warmup_mb": baseline,
        "rss_end_mb": end_mb,
        "growth": growth,
        "growth_mb_per_min": slope,
        "passed": passed,
    }
    print(f"answers: {answers} ({', '.join(f'{k} {v}' for k, v in load.answers.items())}) in {wall:.0f} s, "
          f"{answers / wall:.1f}/s; latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms; "
          f"server CPU {cpu_ms:.1f} ms per answer after warm-up")
    print(f"errors: {errors}" + (f" by status: {dict(load.errors)}; first: {load.first_errors}" if errors else ""))
    print("RSS MB: " + " ".join(f"{mb:.0f}" for _, mb, _ in samples))
    print(f"RSS after {warmup:.0f} s warm-up {baseline:.1f} MB, at the end {end_mb:.1f} MB: {100 * growth:+.1f} % "
          f"(fitted {slope:+.2f} MB/min after warm-up); median threads {statistics.median(n for *_, n in samples):.0f}")
    print(f"verdict: {'PASS' if passed else 'FAIL'} (0 errors and RSS growth within {100 * args.tolerance:.0f} %)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"reproduce: {command}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
