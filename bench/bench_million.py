"""A collection of a million images on this machine: serving figures and agreement with exhaustive MISA.

The collection is made by ``bench/scaled_collection.py`` (real encoded scenes of a `matchmap synth`
corpus and drawn scenes, grown to a million with augmented copies of their maps; see there). This bench
serves it through a real `matchmap serve` process at each K of --ks in one run (0: the server's default),
after, with --previous-tree, another checkout's server of the same images (the engine an issue measured,
as the reference of the ratios), reporting for each: start-up seconds (process start to listening, the
collection opened), p50/p95 at concurrency 1, queries/s at concurrency 8, the server's resident set
after the load, and the collection's bytes on disk per image (catalog included). Then, in process, the
two-stage top-10 against the exhaustive MISA top-10 over every image (float32, every map read), for the
corpus's val captions (voices the model never heard), at each K of --agreement-ks.

    python bench/bench_million.py --library /work/exp/bench100k/library --collection bench-compare \
        --corpus /work/exp/c --checkpoint encoders/default_model/tiny.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import agreement_curve, corpus_inputs, print_agreement, serve_side_by_side  # noqa: E402

from search.engine import SearchEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="data dir holding the scaled collection")
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--corpus", type=Path, required=True, help="the `matchmap synth` corpus whose val captions query")
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--ks", type=int, nargs="+", default=[4000, 400], help="K of the serving runs (first = reference)")
    parser.add_argument("--queries", type=int, default=200, help="queries per load run")
    parser.add_argument("--agreement-queries", type=int, default=60)
    parser.add_argument("--agreement-ks", type=int, nargs="+", default=[100, 400, 1000, 4000])
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--store-reads-at", type=int, nargs="*", default=[],
                        help="also serve at these K with --resident-maps-mb 0 (nothing held in memory: stage 2 "
                             "reads every candidate's map from the store, the engine before region codes)")
    parser.add_argument("--no-vad-at", type=int, nargs="*", default=[], help="also serve at these K with --no-vad")
    parser.add_argument("--model-threads", type=int, nargs="*", default=[],
                        help="also serve at the first K of --ks with each of these --model-threads (the model "
                             "thread's cores)")
    parser.add_argument("--previous-tree", type=Path, default=None,
                        help="first, as the reference of the ratios: this checkout's code (e.g. a git worktree of "
                             "the engine an issue measured) serving --previous-collection with --previous-checkpoint")
    parser.add_argument("--previous-checkpoint", type=Path, default=None, help="with --previous-tree: its model")
    parser.add_argument("--previous-collection", default=None,
                        help="with --previous-tree: the collection that model indexed (the same images)")
    parser.add_argument("--previous-k", type=int, default=0, help="with --previous-tree: its K (0: its default)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--exact-cache", type=Path, default=None,
                        help="an .npy file keeping the exhaustive MISA top 10 of the agreement captions between runs "
                             "(read when it matches their number and the collection's size, else written)")
    args = parser.parse_args()
    command = "python bench/bench_million.py " + " ".join(sys.argv[1:])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; torch threads "
          f"{torch.get_num_threads()}")
    _, queries, own_images = corpus_inputs(args.corpus)
    load_queries = [queries[i % len(queries)] for i in range(args.queries)]
    work = args.library.resolve().parent
    if args.library.resolve() != work / "library":
        parser.error("--library must be a folder named 'library' (matchmap serve is started on <its parent>/library)")

    started = time.perf_counter()
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
    size = engine.collection(args.collection).size
    open_seconds = time.perf_counter() - started
    engine.close()
    catalog = args.library / "catalog.sqlite"
    print(f"collection {args.collection}: {size} images; opened in process in {open_seconds:.1f} s; "
          f"catalog {catalog.stat().st_size / size:.0f} bytes/image" if catalog.exists() else "")
    figures = {"command": command, "images": size, "open_seconds_in_process": open_seconds}

    setups = [{"label": f"K={k}", "checkpoint": args.checkpoint, "collection": args.collection, "candidates": k}
              for k in args.ks]
    if args.previous_tree is not None:
        if args.previous_checkpoint is None or args.previous_collection is None:
            parser.error("--previous-tree needs --previous-checkpoint and --previous-collection")
        setups.insert(0, {"label": f"previous code, K={args.previous_k or 'its default'}",
                          "checkpoint": args.previous_checkpoint.resolve(), "collection": args.previous_collection,
                          "candidates": args.previous_k, "tree": args.previous_tree.resolve()})
    setups += [{"label": f"K={k}, store reads", "checkpoint": args.checkpoint, "collection": args.collection,
                "candidates": k, "serve_args": ("--resident-maps-mb", "0")} for k in args.store_reads_at]
    setups += [{"label": f"K={k}, no VAD", "checkpoint": args.checkpoint, "collection": args.collection,
                "candidates": k, "serve_args": ("--no-vad",)} for k in args.no_vad_at]
    setups += [{"label": f"K={args.ks[0]}, model thread on {n} cores", "checkpoint": args.checkpoint,
                "collection": args.collection, "candidates": args.ks[0], "serve_args": ("--model-threads", str(n))}
               for n in args.model_threads]
    side = serve_side_by_side(work, "cpu", load_queries, setups)
    figures["serve"] = side
    first = side[0]["runs"]
    for row in side:
        c1, c8 = row["runs"]
        print(f"  {row.get('label', 'K=' + str(row['candidates'])):>20}: p50 {c1['p50_ms']:.1f} ms (p95 {c1['p95_ms']:.1f}); "
              f"{c8['throughput_qps']:.1f} q/s at concurrency 8 (p50 {c8['p50_ms']:.1f}, p95 {c8['p95_ms']:.1f}); "
              f"x{first[0]['p50_ms'] / c1['p50_ms']:.2f} p50, x{c8['throughput_qps'] / first[1]['throughput_qps']:.2f} q/s; "
              f"start-up {row['start_seconds']:.1f} s (held {row['held_seconds']:.1f} s), server RSS {row['rss_mb']:.0f} MB (own memory {row['anon_mb']:.0f} MB, the rest store pages); "
              f"disk {(row['disk_bytes'] + (catalog.stat().st_size if catalog.exists() else 0)) / size / 1024:.1f} KiB/image "
              f"(catalog included); errors {c1['errors'] + c8['errors']}")
        if c1.get("stages_p50_ms"):  # as the server timed them (not the previous tree's, if it times fewer)
            print(" " * 24 + "server's own medians at concurrency 1: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in c1["stages_p50_ms"].items()))

    if not args.skip_agreement:
        engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
        n = min(args.agreement_queries, len(queries))
        started = time.perf_counter()
        rows, recall = agreement_curve(engine, None, queries[:n], args.agreement_ks, collection=args.collection,
                                       own_images=own_images, exact_cache=args.exact_cache)
        engine.close()
        figures["agreement"], figures["own_image_recall"] = rows, recall
        print_agreement(f"two-stage top-10 vs exhaustive MISA top-10 over {size} images, {n} queries "
                        f"({time.perf_counter() - started:.0f} s)", rows, 400, size)
        for kind in ("stage1", "misa"):
            r = recall[kind]
            print(f"  own image among {size}, {kind}: R@1 {r['R@1']:.3f}, R@5 {r['R@5']:.3f}, R@10 {r['R@10']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")


if __name__ == "__main__":
    main()
