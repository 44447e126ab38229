"""What HTTP adds over gRPC: the same queries, the same in-process server, both transports.

Starts one server on 127.0.0.1 (gRPC and HTTP from the same servicer, engine, model thread and
micro-batcher) over a collection indexed with the shipped model (or --checkpoint), then sends
--queries spoken captions one at a time, each over gRPC (a SearchStub on one channel) and over HTTP
(POST /api/search on one keep-alive connection, the answer parsed from JSON), alternating which goes
first. Reports p50 / p95 of the client-side latency of each transport and the p50 of the per-query
difference HTTP - gRPC. Without --manifest a small corpus is generated first (espeak-ng, festival).

    .venv/bin/python bench/bench_http.py --queries 200
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from encoders import create_model
from indexer import Library
from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.engine import SearchEngine
from search.server import ServerOptions, ServerThread
from training.manifest import load_manifest
from training.synth import synthesize_corpus

COLLECTION = "bench"


def percentiles(values_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(values_ms, 50)), "p95_ms": float(np.percentile(values_ms, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped model)")
    parser.add_argument("--manifest", default=None, help="Places-format manifest to index and query (default: generate)")
    parser.add_argument("--images", type=int, default=48, help="pairs to generate without --manifest")
    parser.add_argument("--queries", type=int, default=200, help="queries per transport (after 10 warm-up each)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    parser.add_argument("--out", default="bench/out/http.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        if args.manifest is None:
            synthesize_corpus(Path(work) / "corpus", pairs=1, val_pairs=args.images, seed=7,
                              engines=("espeak", "festival"), workers=1, progress=False)
            manifest = load_manifest(Path(work) / "corpus" / "val.json")
        else:
            manifest = load_manifest(args.manifest)
        model = create_model(args.checkpoint)
        library = Library.open(Path(work) / "library", create=True)
        library.index(COLLECTION, [str(manifest.image_path(e).resolve()) for e in manifest.entries], model, progress=False)
        captions = [manifest.audio_path(e).read_bytes() for e in manifest.entries]
        engine = SearchEngine(model, library, device="cpu")
        engine.warm_up()
        options = ServerOptions(host="127.0.0.1", port=0, http_port=0)
        with ServerThread(engine, options) as server, grpc.insecure_channel(server.target) as channel:
            stub = search_pb2_grpc.SpokenImageSearchStub(channel)
            conn = http.client.HTTPConnection("127.0.0.1", server.server.http.port, timeout=60)
            path = f"/api/search?collection={COLLECTION}&top_k={args.top_k}"

            def over_grpc(audio: bytes) -> list[str]:
                request = search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=audio), collection=COLLECTION,
                                                   top_k=args.top_k)
                return [h.image_id for h in stub.Search(request, timeout=60).hits]

            def over_http(audio: bytes) -> list[str]:
                conn.request("POST", path, body=audio, headers={"Content-Type": "audio/wav"})
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200, body
                return [h["image_id"] for h in json.loads(body)["hits"]]

            timings: dict[str, list[float]] = {"grpc": [], "http": []}
            calls = {"grpc": over_grpc, "http": over_http}
            for i in range(args.queries + 10):
                audio = captions[i % len(captions)]
                order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
                answers = {}
                for transport in order:
                    started = time.perf_counter()
                    answers[transport] = calls[transport](audio)
                    if i >= 10:
                        timings[transport].append(1000 * (time.perf_counter() - started))
                assert answers["grpc"] == answers["http"], "the transports disagree"
            conn.close()
        engine.close()

    difference = np.array(timings["http"]) - np.array(timings["grpc"])
    result = {
        "queries": args.queries, "collection_size": len(captions), "top_k": args.top_k,
        "threads": torch.get_num_threads(),
        "grpc": percentiles(timings["grpc"]), "http": percentiles(timings["http"]),
        "difference_p50_ms": float(np.percentile(difference, 50)),
        "p50_difference_ms": float(np.percentile(timings["http"], 50) - np.percentile(timings["grpc"], 50)),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
    }
    print(f"{args.queries} queries per transport, {len(captions)} images, top_k {args.top_k}, "
          f"{result['threads']} torch threads")
    for transport in ("grpc", "http"):
        print(f"  {transport:4}: p50 {result[transport]['p50_ms']:.2f} ms, p95 {result[transport]['p95_ms']:.2f} ms")
    print(f"  HTTP - gRPC: p50 of the per-query difference {result['difference_p50_ms']:+.2f} ms; "
          f"difference of the p50s {result['p50_difference_ms']:+.2f} ms")
    print(f"reproduce: {result['command']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
