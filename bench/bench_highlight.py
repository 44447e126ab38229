"""Latency of live highlighting: a real server on loopback, captions streamed at the pace of speech.

Starts a search server (the model given, an empty library: the image is sent with each call) on
127.0.0.1, streams --captions val captions through the real client in --chunk-ms chunks at real-time
pace, and measures each chunk's latency: from sending it to receiving the first heatmap that covers
it (chunks that arrive while the server computes are folded into its next heatmap and wait for it).
Reports p50 / p95 / max over all chunks, and heatmaps per chunk.

    .venv/bin/python bench/bench_highlight.py --checkpoint /work/data/runs/tiny-infonce/best.pt --captions 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from encoders import create_model, load_audio
from indexer import Library
from search.cli import latency_summary, stream_highlights
from search.client import SearchClient
from search.engine import SearchEngine
from search.server import ServerThread
from training.manifest import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped model)")
    parser.add_argument("--manifest", default="/work/data/corpus/val.json")
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--chunk-ms", type=float, default=100.0)
    parser.add_argument("--window", type=float, default=1.0, help="seconds of speech each heatmap covers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    parser.add_argument("--out", default="bench/out/highlight.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = load_manifest(args.manifest)
    entries = manifest.entries[: args.captions]
    model = create_model(args.checkpoint)
    latencies: list[float] = []
    per_caption = []
    with tempfile.TemporaryDirectory() as library_dir:
        engine = SearchEngine(model, Library.open(library_dir), device="cpu")
        with ServerThread(engine) as server, SearchClient(server.target) as client:
            for entry in entries:
                wave = load_audio(manifest.audio_path(entry), 16000)
                pcm = np.clip(np.rint(wave.numpy() * 32767), -32768, 32767).astype("<i2").tobytes()
                stream = stream_highlights(client, pcm, 16000, chunk_ms=args.chunk_ms,
                                           image=manifest.image_path(entry).read_bytes(), window_seconds=args.window)
                latencies += stream.chunk_latencies_ms
                row = {"uttid": entry.uttid, "audio_seconds": stream.audio_seconds, "chunks": stream.chunks,
                       "heatmaps": len(stream.frames), **latency_summary(stream.chunk_latencies_ms)}
                per_caption.append(row)
                print(f"{entry.uttid}: {row['audio_seconds']:.2f} s, {row['chunks']} chunks -> {row['heatmaps']} heatmaps; "
                      f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms")
        engine.close()
    overall = latency_summary(latencies)
    result = {
        "checkpoint": args.checkpoint or "shipped default",
        "model_version": model.version,
        "chunk_ms": args.chunk_ms,
        "window_seconds": args.window,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "latency": overall,
        "heatmaps_per_chunk": sum(r["heatmaps"] for r in per_caption) / sum(r["chunks"] for r in per_caption),
        "captions": per_caption,
    }
    print(f"all {overall['chunks']} chunks: p50 {overall['p50_ms']:.1f} ms, p95 {overall['p95_ms']:.1f} ms, "
          f"max {overall['max_ms']:.1f} ms; {result['heatmaps_per_chunk']:.2f} heatmaps per chunk; "
          f"load average {result['load_average'][0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
