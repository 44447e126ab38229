"""What the query path's voice activity step costs, per query, on one thread, over real spoken captions:
encoders.trim_silence alone; search.vad.keep_speech as it was (Silero's own frame-by-frame loop,
``get_speech_timestamps``); and keep_speech now (search.vad's one pass: the same probabilities, the
same spans). Each caption as it comes, and with 3 s of faint noise (-40 dBFS) before it, the case
the VAD is for.

    .venv/bin/python bench/bench_vad.py corpus2/val.json --queries 200

Prints the median and p95 milliseconds of each, per query and per second of audio, side by side, and
how many cuts the two VADs agree on. (Recall with and without it: bench/bench_robustness.py
--query-path raw|trim|vad.)
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
from search import vad  # noqa: E402
from training.manifest import load_manifest  # noqa: E402


def loop_spans(waveform: torch.Tensor, sample_rate: int) -> list[tuple[int, int]]:
    """search.vad.speech_spans as it was: the package's loop, one model call per 32 ms frame."""
    from silero_vad import get_speech_timestamps

    with torch.inference_mode():
        stamps = get_speech_timestamps(waveform.float(), vad._silero(), sampling_rate=sample_rate)
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def keep_speech_with_loop(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    one_pass = vad.speech_spans
    vad.speech_spans = loop_spans
    try:
        return vad.keep_speech(waveform, sample_rate)
    finally:
        vad.speech_spans = one_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a manifest of spoken captions")
    parser.add_argument("--queries", type=int, default=200, help="captions to time (the first N)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the server's decode threads' share of the cores
    manifest = load_manifest(args.manifest)
    clean = [load_audio(manifest.audio_path(e)) for e in manifest.entries[: args.queries]]
    rng = np.random.default_rng(0)
    noisy = [torch.cat([torch.from_numpy(rng.normal(0, 0.01, 3 * 16000).astype(np.float32)), w]) for w in clean]
    vad.keep_speech(clean[0], 16000)  # load the VAD model once
    steps = (("trim_silence", trim_silence), ("keep_speech, Silero's loop (before)", keep_speech_with_loop),
             ("keep_speech, one pass (now)", vad.keep_speech))
    print(f"{len(clean)} captions of {args.manifest}, median {np.median([w.numel() for w in clean]) / 16000:.2f} s "
          "long, one thread")
    for audio, waves in (("captions as they come", clean), ("3 s of faint noise, then the caption", noisy)):
        times, cuts = {}, {}
        for name, fn in steps:
            times[name], cuts[name] = [], []
            for wave in waves:
                started = time.perf_counter()
                cuts[name].append(fn(wave, 16000))
                times[name].append(1000 * (time.perf_counter() - started))
        seconds = np.array([w.numel() / 16000 for w in waves])
        print(f"\n{audio}:")
        print(f"{'step':<38} {'p50 ms':>8} {'p95 ms':>8} {'ms per s of audio':>18}")
        for name, t in times.items():
            t = np.array(t)
            print(f"{name:<38} {np.median(t):>8.2f} {np.percentile(t, 95):>8.2f} {np.median(t / seconds):>18.2f}")
        before, now = (np.median(times[name]) for name, _ in steps[1:])
        same = sum(torch.equal(a, b) for a, b in zip(cuts[steps[1][0]], cuts[steps[2][0]], strict=True))
        print(f"one pass against the loop: {before / now:.1f}x less time; the same cut for {same}/{len(waves)} queries")
    print(f"\nreproduce: .venv/bin/python bench/bench_vad.py {args.manifest} --queries {args.queries}")


if __name__ == "__main__":
    main()
