"""Stage 2 for a batch of queries in one call, against one query at a time and against another version.

On a collection of --images scene images (the corpus's images, topped up with scenes drawn as
`matchmap synth` draws them) indexed with the model, the corpus's val captions (real spoken
captions) are searched in-process, without gRPC: one query per `search_batch` call, and --batch per
call (what the server's micro-batcher hands the engine under concurrent load), at each K of --k.

Each --tree (a checkout of this repository; default: this one) runs in its own process and imports
its own engine, so a previous version runs side by side with this one on the same collection and
queries. Trees and modes alternate for --rounds rounds and each keeps its best round, so a burst of
other work on the machine does not decide a comparison. Stage-2 milliseconds are the engine's own
`timings_ms["stage2"]`: per query alone, and the whole batch's stage 2 (which its queries share)
when batched.

    git worktree add ../previous HEAD~1
    python bench/bench_stage2_batch.py --corpus corpus --images 10000 --tree . --tree ../previous
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def worker(tree: Path, work: Path, checkpoint: str, corpus: Path, queries: int, batch: int, ks: list[int],
           resident_mb: float) -> None:
    """Runs inside ``tree``: prints one JSON line per (K, mode) with queries/s and stage-2 ms."""
    sys.path.insert(0, str(tree))
    import torch

    from search.engine import SearchEngine, SearchLimits, SearchQuery
    from training.manifest import load_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    val = load_manifest(corpus / "val.json")
    audio = [val.audio_path(e).read_bytes() for e in val.entries[:queries]]
    engine = SearchEngine.open(checkpoint, work / "library", device="cpu",
                               limits=SearchLimits(resident_maps_mb=resident_mb))
    try:
        engine.warm_up()
        prepared = [engine.prepare_audio(a) for a in audio]
        for k in ks:
            qs = [SearchQuery(p, "bench", 10, k) for p in prepared]
            engine.search_batch(qs[:batch])  # warm-up at this K
            for mode, calls in (("alone", [[q] for q in qs]),
                                ("batched", [qs[i : i + batch] for i in range(0, len(qs), batch)])):
                started, stage2 = time.perf_counter(), []
                for call in calls:
                    stage2 += [r.timings_ms["stage2"] for r in engine.search_batch(call)]
                wall = time.perf_counter() - started
                print(json.dumps({"k": k, "mode": mode, "qps": len(qs) / wall,
                                  "stage2_ms": statistics.median(stage2)}), flush=True)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a `matchmap synth` output; its val captions are the queries")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    parser.add_argument("--tree", type=Path, action="append", default=None, help="checkouts to compare (default: this one)")
    parser.add_argument("--k", type=int, nargs="+", default=[4000, 400])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resident-mb", type=float, default=4096.0,
                        help="the engine's memory for resident maps; 0: every map comes from the store")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_stage2_batch"))
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(REPO / "encoders" / "default_model" / "tiny.pt")
    if args.worker is not None:
        worker(args.worker, args.work_dir, checkpoint, args.corpus, args.queries, args.batch, args.k, args.resident_mb)
        return

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    from bench_search import build_collection, corpus_inputs, scene_images

    images, _, _ = corpus_inputs(args.corpus)
    if len(images) < args.images:
        images += scene_images(args.work_dir / "scenes", args.images - len(images), seed=7)
    seconds, size = build_collection(args.work_dir, Path(checkpoint), images[: args.images])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; collection of {size} images "
          f"(indexed in {seconds:.0f} s); {args.queries} spoken val captions of {args.corpus}; resident maps "
          f"{'up to ' + str(args.resident_mb) + ' MB' if args.resident_mb else 'none (every map from the store)'}")
    trees = [t.resolve() for t in (args.tree or [REPO])]
    best: dict[tuple[str, int, str], dict] = {}
    for _ in range(args.rounds):
        for tree in trees:
            out = subprocess.run([sys.executable, __file__, "--worker", str(tree), "--corpus", str(args.corpus),
                                  "--checkpoint", checkpoint, "--work-dir", str(args.work_dir), "--queries",
                                  str(args.queries), "--batch", str(args.batch), "--resident-mb", str(args.resident_mb),
                                  "--k", *map(str, args.k)],
                                 capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                row = json.loads(line)
                key = (str(tree), row["k"], row["mode"])
                if key not in best or row["qps"] > best[key]["qps"]:
                    best[key] = row
    print(f"\nqueries/s in-process (best of {args.rounds} rounds), batches of {args.batch}; stage-2 median ms "
          "(per query alone, per batch batched)")
    print(f"{'tree':40s} {'K':>5s} {'alone q/s':>10s} {'batched q/s':>12s} {'gain':>6s} {'stage2 ms alone':>16s} {'batched':>8s}")
    for tree in trees:
        for k in args.k:
            alone, batched = best[(str(tree), k, "alone")], best[(str(tree), k, "batched")]
            print(f"{str(tree)[-40:]:40s} {k:5d} {alone['qps']:10.1f} {batched['qps']:12.1f} "
                  f"{batched['qps'] / alone['qps']:5.2f}x {alone['stage2_ms']:16.1f} {batched['stage2_ms']:8.1f}")
    if len(trees) > 1:
        first, other = (str(t) for t in trees[:2])
        for k in args.k:
            ratios = {mode: best[(first, k, mode)]["qps"] / best[(other, k, mode)]["qps"] for mode in ("alone", "batched")}
            print(f"K={k}: first tree / second tree queries/s: alone {ratios['alone']:.2f}x, batched {ratios['batched']:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
