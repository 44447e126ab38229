"""What the query path's voice activity step costs: search.vad.keep_speech (silence trim, then Silero
VAD) against encoders.trim_silence alone, per query, on one thread, over real spoken captions.

    .venv/bin/python bench/bench_vad.py corpus2/val.json --queries 200

Prints the median and p95 milliseconds of each, per query and per second of audio, side by side.
(Recall with and without it: bench/bench_robustness.py --query-path raw|trim|vad.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import load_audio, trim_silence  # noqa: E402
from search.vad import keep_speech  # noqa: E402
from training.manifest import load_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a manifest of spoken captions")
    parser.add_argument("--queries", type=int, default=200, help="captions to time (the first N)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the server's decode threads' share of the cores
    manifest = load_manifest(args.manifest)
    waves = [load_audio(manifest.audio_path(e)) for e in manifest.entries[: args.queries]]
    keep_speech(waves[0], 16000)  # load the VAD model once
    rows = {}
    for name, fn in (("trim_silence", trim_silence), ("keep_speech (VAD)", keep_speech)):
        times = []
        for wave in waves:
            started = time.perf_counter()
            fn(wave, 16000)
            times.append(1000 * (time.perf_counter() - started))
        rows[name] = np.array(times)
    seconds = np.array([w.numel() / 16000 for w in waves])
    print(f"{len(waves)} captions of {args.manifest}, median {np.median(seconds):.2f} s long, one thread")
    print(f"{'step':<20} {'p50 ms':>8} {'p95 ms':>8} {'ms per s of audio':>18}")
    for name, t in rows.items():
        print(f"{name:<20} {np.median(t):>8.2f} {np.percentile(t, 95):>8.2f} {np.median(t / seconds):>18.2f}")
    print(f"reproduce: .venv/bin/python bench/bench_vad.py {args.manifest} --queries {args.queries}")


if __name__ == "__main__":
    main()
