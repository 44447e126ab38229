"""Corpus generation speed (pairs/s) and size on disk, through ``synthesize_corpus`` end to end.

Generates N pairs (default 400: 320 train + 80 val) into a temporary directory and reports:

  pairs/s     -- whole run with the given workers (default: all cores), pool start-up included
  stages      -- ms per pair of each stage in one process (scene render, caption, speech incl.
                 espeak + resampling + word timing, PNG write, WAV write), averaged over 50 pairs
  bytes       -- on disk per 1,000 pairs: PNGs, WAVs, manifests, total
  load        -- ms per 1,000 entries to load the manifests: default checks (exists, size, headers)
                 and --deep-check (decodes everything)

    .venv/bin/python bench/bench_synth.py [--pairs 400] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from training.manifest import load_manifest
from training.scenes import describe_scene, random_scene
from training.speech import SAMPLE_RATE, finish_utterance, get_engine, train_val_voices
from training.synth import PNG_COMPRESS_LEVEL, default_workers, pair_rng, synthesize_corpus


def stage_times(count: int = 50) -> dict[str, float]:
    """ms per pair of each stage, in this process."""
    engine = get_engine("espeak")
    voices, _ = train_val_voices(engine)
    totals = dict.fromkeys(("scene", "caption", "speech", "png", "wav"), 0.0)
    for index in range(count):
        rng = pair_rng(99, "train", index)
        t0 = time.perf_counter()
        scene = random_scene(rng)
        t1 = time.perf_counter()
        text = describe_scene(scene, rng)
        t2 = time.perf_counter()
        utterance = finish_utterance(engine.synthesize(text, voices[index % len(voices)], 170, 50),
                                     lead_seconds=0.2, trail_seconds=0.2, level_dbfs=-20.0)
        t3 = time.perf_counter()
        scene.image.save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        t4 = time.perf_counter()
        pcm = np.clip(np.rint(utterance.waveform * 32767), -32768, 32767).astype(np.int16)
        soundfile.write(io.BytesIO(), pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        t5 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            totals[key] += seconds
    return {key: 1000 * value / count for key, value in totals.items()}


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400, help="pairs in all (80%% train, 20%% val)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    val_pairs = args.pairs // 5
    train_pairs = args.pairs - val_pairs

    load_before = os.getloadavg()[0]  # other work on the machine slows every figure below
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        synthesize_corpus(out, pairs=train_pairs, val_pairs=val_pairs, seed=0, workers=workers, progress=False)
        elapsed = time.perf_counter() - start

        per_1000 = 1000 / args.pairs
        png, wav, json_bytes = folder_bytes(out, "*.png"), folder_bytes(out, "*.wav"), folder_bytes(out, "*.json")
        seconds_of_speech = sum(soundfile.info(p).duration for p in out.rglob("*.wav"))

        load_ms = {}
        for label, deep in (("default checks", False), ("deep check", True)):
            t = time.perf_counter()
            for split in ("train", "val"):
                load_manifest(out / f"{split}.json", deep_check=deep)
            load_ms[label] = 1000 * (time.perf_counter() - t) * per_1000

    stages = stage_times()
    print(f"machine: {platform.processor() or platform.machine()}, {default_workers()} usable cores, "
          f"load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"generate: {args.pairs} pairs ({train_pairs} train + {val_pairs} val) with {workers} worker(s) "
          f"in {elapsed:.1f} s = {args.pairs / elapsed:.1f} pairs/s")
    print("stages, ms per pair in one process: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f" (sum {sum(stages.values()):.1f})")
    print(f"bytes per 1,000 pairs: png {png * per_1000 / 1e6:.1f} MB, wav {wav * per_1000 / 1e6:.1f} MB, "
          f"manifests {json_bytes * per_1000 / 1e6:.2f} MB, total {(png + wav + json_bytes) * per_1000 / 1e6:.1f} MB "
          f"(mean caption {seconds_of_speech / args.pairs:.2f} s)")
    print("load_manifest per 1,000 entries: " + ", ".join(f"{k} {v:.0f} ms" for k, v in load_ms.items()))
    command = "  .venv/bin/python bench/bench_synth.py" + f" --pairs {args.pairs}" + (
        f" --workers {args.workers}" if args.workers else "")
    print(f"reproduce:\n{command}")


if __name__ == "__main__":
    main()
