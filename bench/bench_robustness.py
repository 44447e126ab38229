"""Recall when the spoken queries are recorded badly: noise, babble, a telephone line, a reverberant
room, a quiet microphone with silence around the words. One or more checkpoints, side by side.

Every condition changes the recording, never the words or the images. Each caption's perturbation
is drawn from its own generator (seed, caption index), so every checkpoint hears exactly the same
degraded audio and reruns are exact. Babble (three other captions of the set, mixed) and reverb are
noise kinds no augmentation trains on; white noise is the kind the `noise` augmentation trains on.

    .venv/bin/python bench/bench_robustness.py corpus2/val.json                       # the shipped model
    .venv/bin/python bench/bench_robustness.py corpus2/val.json --checkpoint old.pt --checkpoint new.pt

Prints a table of MISA recall (speech -> image R@1 / R@10, image -> speech R@10) per condition and
checkpoint, and the achieved SNR of the noisy conditions; --json writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import create_model, trim_silence  # noqa: E402
from search.vad import keep_speech  # noqa: E402
from training.augment import mix_at_snr, snr_db, synthetic_reverb  # noqa: E402
from training.data import CaptionedImages  # noqa: E402
from training.evaluate import embed_pairs, evaluate_embeddings, manifest_images  # noqa: E402
from training.manifest import load_manifest  # noqa: E402

Perturb = Callable[[torch.Tensor, int, torch.Generator, "CaptionedImages", int], torch.Tensor]


def white_noise(snr: float) -> Perturb:
    def perturb(wave, sr, gen, data, index):
        return mix_at_snr(wave, torch.randn(wave.shape, generator=gen), snr)
    return perturb


def babble(snr: float, talkers: int = 3) -> Perturb:
    """Other captions of the same set, summed and looped to the query's length: competing speech."""
    def perturb(wave, sr, gen, data, index):
        noise = torch.zeros_like(wave)
        for _ in range(talkers):
            other = int(torch.randint(len(data), (), generator=gen))
            if other == index:
                other = (other + 1) % len(data)
            talker = torch.from_numpy(data.waveforms[other].astype(np.float32) / 32767.0)
            noise += talker.repeat(wave.shape[0] // talker.shape[0] + 1)[: wave.shape[0]]
        return mix_at_snr(wave, noise, snr)
    return perturb


def telephone(wave, sr, gen, data, index):
    """8 kHz sampling and a 300 Hz high-pass: the 300-3400 Hz band of a phone line."""
    narrow = AF.resample(wave, sr, 8000)
    narrow = AF.highpass_biquad(narrow, 8000, 300.0)
    return AF.resample(narrow, 8000, sr)


def reverb(rt60: float) -> Perturb:
    """A diffuse room tail (exponentially decaying noise reaching -60 dB at rt60) after the direct path."""
    def perturb(wave, sr, gen, data, index):
        return synthetic_reverb(wave, sr, rt60, tail_gain=0.5, generator=gen)
    return perturb


def quiet(gain_db: float) -> Perturb:
    """A distant, quiet microphone: gain_db, quantized to 16 bits."""
    def perturb(wave, sr, gen, data, index):
        return torch.round(wave * 10 ** (gain_db / 20) * 32767) / 32767
    return perturb


def noise_before(seconds: float, dbfs: float) -> Perturb:
    """White noise at ``dbfs`` (RMS) for ``seconds`` before the caption (a room before one speaks)."""
    def perturb(wave, sr, gen, data, index):
        noise = torch.randn(int(seconds * sr), generator=gen) * 10 ** (dbfs / 20)
        return torch.cat([noise, wave])
    return perturb


def speech_before(seconds: float) -> Perturb:
    """Other captions (a different speaker's unrelated sentence) for ``seconds`` before the caption."""
    def perturb(wave, sr, gen, data, index):
        others = []
        while sum(o.numel() for o in others) < seconds * sr:
            other = int(torch.randint(len(data), (1,), generator=gen))
            if other != index:
                others.append(torch.from_numpy(data.waveforms[other].astype(np.float32) / 32767.0))
        return torch.cat([torch.cat(others)[: int(seconds * sr)], wave])
    return perturb


def silence_around(seconds: float) -> Perturb:
    """Digital silence before and after the caption (a push-to-talk button pressed early, released late)."""
    def perturb(wave, sr, gen, data, index):
        pad = torch.zeros(int(seconds * sr))
        return torch.cat([pad, wave, pad])
    return perturb


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    perturb: Perturb | None  # None: the recording as synthesized
    noisy: bool = False  # report the achieved SNR


CONDITIONS = (
    Condition("clean", "as synthesized", None),
    Condition("white-20", "white noise, 20 dB SNR", white_noise(20.0), True),
    Condition("white-10", "white noise, 10 dB SNR", white_noise(10.0), True),
    Condition("white-5", "white noise, 5 dB SNR", white_noise(5.0), True),
    Condition("babble-10", "three other captions mixed in, 10 dB SNR", babble(10.0), True),
    Condition("babble-5", "three other captions mixed in, 5 dB SNR", babble(5.0), True),
    Condition("telephone", "8 kHz, 300-3400 Hz band", telephone),
    Condition("reverb-0.5", "room reverberation, RT60 0.5 s", reverb(0.5)),
    Condition("quiet", "-30 dB quieter, 16-bit", quiet(-30.0)),
    Condition("silence", "1 s of digital silence before and after", silence_around(1.0)),
    Condition("noise-before", "11 s of faint white noise (-40 dBFS) before", noise_before(11.0, -40.0)),
    Condition("speech-before", "6 s of another caption before (within the model's 10.24 s)", speech_before(6.0)),
)
# What is done to a query before the front end: nothing (as training and `matchmap eval`), the
# silence trim, or what `matchmap serve` does (search.vad.keep_speech: silence trim, then the VAD).
QUERY_PATHS = {"raw": None, "trim": trim_silence, "vad": keep_speech}


class DegradedCaptions(Dataset):
    """The pairs of a loaded ``CaptionedImages`` (eval front ends) with one condition applied to the audio."""

    def __init__(self, data: CaptionedImages, condition: Condition, seed: int, query_path: str = "raw") -> None:
        self.data, self.condition, self.seed, self.prepare = data, condition, seed, QUERY_PATHS[query_path]

    def __len__(self) -> int:
        return len(self.data)

    def waveform(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, degraded) waveforms of caption ``index``."""
        clean = torch.from_numpy(self.data.waveforms[index].astype(np.float32) / 32767.0)
        if self.condition.perturb is None:
            return clean, clean
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return clean, self.condition.perturb(clean, self.data.sample_rate, gen, self.data, index).clamp(-1, 1)

    def __getitem__(self, index: int):
        _, wave = self.waveform(index)
        if self.prepare is not None:
            wave = self.prepare(wave, self.data.sample_rate)
        logmel, length = self.data.audio_frontend(wave, self.data.sample_rate)
        return self.data.image_frontend(self.data.images[index]), logmel, length, index


def achieved_snr(dataset: DegradedCaptions, count: int = 50) -> float:
    """Median SNR (dB) of the degraded against the clean audio over the first ``count`` captions."""
    values = []
    for i in range(min(count, len(dataset))):
        clean, noisy = dataset.waveform(i)
        values.append(snr_db(clean, noisy))
    return float(np.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a val manifest (voices the models never heard)")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="a checkpoint to measure; repeat for side-by-side columns (default: the shipped model)")
    parser.add_argument("--conditions", default=",".join(c.name for c in CONDITIONS),
                        help="comma-separated subset of: " + ", ".join(c.name for c in CONDITIONS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("--query-path", choices=sorted(QUERY_PATHS), default="raw",
                        help="what is done to each degraded query before the front end: raw (as training and "
                             "`matchmap eval`), trim (leading and trailing silence), vad (as `matchmap serve`: "
                             "the silence trim, then cut to the speech the VAD hears)")
    parser.add_argument("--trim-silence", dest="query_path", action="store_const", const="trim",
                        help="the same as --query-path trim (kept for earlier commands)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    by_name = {c.name: c for c in CONDITIONS}
    unknown = [n for n in args.conditions.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    conditions = [by_name[n] for n in args.conditions.split(",")]
    checkpoints = args.checkpoint or [None]
    manifest = load_manifest(args.manifest)

    started = time.monotonic()
    results: dict = {"manifest": str(args.manifest), "pairs": len(manifest.entries), "seed": args.seed,
                     "query_path": args.query_path,
                     "conditions": {c.name: {"description": c.description} for c in conditions}, "models": []}
    for checkpoint in checkpoints:
        model = create_model(checkpoint)
        data = CaptionedImages(manifest, model, train=False, progress=False)
        model_result = {"checkpoint": checkpoint or "shipped", "version": model.version, "recall": {}}
        for condition in conditions:
            dataset = DegradedCaptions(data, condition, args.seed, query_path=args.query_path)
            if condition.noisy and "snr_db" not in results["conditions"][condition.name]:
                results["conditions"][condition.name]["snr_db"] = round(achieved_snr(dataset), 2)
            recall = evaluate_embeddings(embed_pairs(model, dataset, progress=False), images=manifest_images(manifest))
            model_result["recall"][condition.name] = {"MISA": recall["MISA"], "SISA": recall["SISA"]}
            misa = recall["MISA"]
            print(f"{model.version} {condition.name}: MISA s->i R@10 {misa['speech_to_image']['R@10']:.3f} "
                  f"i->s R@10 {misa['image_to_speech']['R@10']:.3f}", file=sys.stderr, flush=True)
        results["models"].append(model_result)
    results["seconds"] = round(time.monotonic() - started, 1)

    names = [m["version"] for m in results["models"]]
    print(f"MISA recall on {results['pairs']} pairs of {args.manifest} under degraded recordings "
          f"(speech -> image R@1 / R@10, image -> speech R@10; seed {args.seed}"
          + f"; query path: {args.query_path})")
    print(f"{'condition':<15} {'SNR dB':>6}  " + "  ".join(f"{n:>24}" for n in names))
    for condition in conditions:
        snr = results["conditions"][condition.name].get("snr_db")
        cells = []
        for m in results["models"]:
            misa = m["recall"][condition.name]["MISA"]
            cells.append(f"{misa['speech_to_image']['R@1']:.3f} / {misa['speech_to_image']['R@10']:.3f} / "
                         f"{misa['image_to_speech']['R@10']:.3f}")
        print(f"{condition.name:<15} {'' if snr is None else f'{snr:.1f}':>6}  " + "  ".join(f"{c:>24}" for c in cells))
    command = ([".venv/bin/python", "bench/bench_robustness.py", str(args.manifest)]
               + [f"--checkpoint {c}" for c in checkpoints if c] + [f"--seed {args.seed}"]
               + [f"--query-path {args.query_path}"] + [f"--conditions {args.conditions}"])
    print(f"({results['seconds']:.0f} s) reproduce: {' '.join(command)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
