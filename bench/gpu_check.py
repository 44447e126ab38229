"""GPU check for stage 2: does CUDA re-ranking give the CPU's ranking, and how fast is each?

One short, self-contained script for a machine with a GPU (a few minutes at the defaults):
a random ``tiny`` model, N random blocky images indexed into a temporary library, Q noise queries.
For each query the same two-stage search runs on a CPU engine and a CUDA engine; it reports
top-10 agreement (identical lists, and set overlap), the largest score difference, and stage-2
latency (feature-map read + MISA on the candidates) per device, plus the bare score_matrix time.

    .venv/bin/python bench/gpu_check.py [--images 2000] [--queries 50] [--candidates 100 1000]

Exits 1 if any top-10 differs beyond near-ties (score gaps < 1e-4), so it can gate a release.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# The benchmarks' shared inputs (bench/ is on sys.path when this file runs as a script).
from bench_search import distractor_images, noise_wav

from encoders import create_model, save_checkpoint, score_matrix
from indexer import Library
from search.engine import SearchEngine, SearchQuery


def build_library(folder: Path, images: int, model, seed: int) -> None:
    image_paths = distractor_images(folder / "images", images, seed)
    with Library.open(folder / "library") as library:
        library.index("gpu-check", [str(p) for p in image_paths], model, progress=False)


def stage2_ms(engine: SearchEngine, queries: list[SearchQuery]) -> list[float]:
    return [r.timings_ms["stage2"] for r in (engine.search_batch([q])[0] for q in queries)]


def bare_score_matrix_ms(device: str, candidates: int, frames: int, grid: int, dim: int, repeats: int = 20) -> float:
    audio = torch.randn(1, frames, dim, device=device)
    maps = torch.randn(candidates, grid, dim, device=device)
    lengths = torch.tensor([frames], device=device)
    for _ in range(3):
        score_matrix(audio, lengths, maps)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        score_matrix(audio, lengths, maps)["misa"].cpu()
    return 1000 * (time.perf_counter() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing to compare", file=sys.stderr)
        return 2
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = create_model("tiny")
        save_checkpoint(folder / "tiny.pt", model)
        started = time.perf_counter()
        build_library(folder, args.images, model, args.seed)
        print(f"indexed {args.images} random images in {time.perf_counter() - started:.1f} s")
        cpu = SearchEngine.open(folder / "tiny.pt", folder / "library", device="cpu")
        gpu = SearchEngine.open(folder / "tiny.pt", folder / "library", device="cuda")
        wavs = [noise_wav(rng, float(rng.uniform(1.5, 6.0))) for _ in range(args.queries)]
        audio = [cpu.prepare_audio(w) for w in wavs]
        failures = 0
        for candidates in args.candidates:
            queries = [SearchQuery(a, "gpu-check", 10, candidates) for a in audio]
            same = overlap = 0
            worst = 0.0
            for q in queries:
                on_cpu, on_gpu = cpu.search_batch([q])[0], gpu.search_batch([q])[0]
                cpu_ids, gpu_ids = [h.image_id for h in on_cpu.hits], [h.image_id for h in on_gpu.hits]
                same += cpu_ids == gpu_ids
                overlap += len(set(cpu_ids) & set(gpu_ids))
                cpu_scores = np.array([h.score for h in on_cpu.hits])
                worst = max(worst, float(np.abs(cpu_scores - [h.score for h in on_gpu.hits]).max()))
                if cpu_ids != gpu_ids and np.abs(np.diff(cpu_scores)).min() >= 1e-4:
                    failures += 1
            stage2_ms(gpu, queries[:3])  # warm-up (CUDA context, kernels)
            cpu_ms, gpu_ms = stage2_ms(cpu, queries), stage2_ms(gpu, queries)
            frames = int(statistics.median(cpu.encode([a.logmel])[0].shape[1] for a in audio))
            grid = cpu.model.image_grid[0] * cpu.model.image_grid[1]
            k = min(candidates, args.images)
            print(
                f"K={candidates}: identical top-10 {same}/{len(queries)}, overlap {overlap / len(queries):.2f}/10, "
                f"max |score cpu - cuda| {worst:.2e}; stage 2 (read + MISA) median "
                f"cpu {statistics.median(cpu_ms):.2f} ms, cuda {statistics.median(gpu_ms):.2f} ms; "
                f"bare score_matrix ({k} x {grid} regions x {frames} frames x {cpu.model.embed_dim}) "
                f"cpu {bare_score_matrix_ms('cpu', k, frames, grid, cpu.model.embed_dim):.2f} ms, "
                f"cuda {bare_score_matrix_ms('cuda', k, frames, grid, cpu.model.embed_dim):.2f} ms"
            )
        cpu.close()
        gpu.close()
    print(f"{'FAIL' if failures else 'OK'}: {failures} rankings differ beyond near-ties")
    print(f"reproduce: {command}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
