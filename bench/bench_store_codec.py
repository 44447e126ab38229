"""What could the feature store hold instead of float16 maps, and what would search lose?

Stage 2 re-scores its best 32 candidates exactly from the store's float16 maps (32 KB per image for
`tiny`). This bench serves queries through the engine as the server runs them (stage 1 at the default K,
the rough pass over the held maps, the exact pass), but hands the exact pass each map as a store codec
would give it back: in the principal basis of the region vectors (``search.resident.region_basis`` over
every dimension, so an orthogonal turn: scores are unchanged by it), each coefficient rounded to a step,
then turned back, in float32. Two kinds of step:

- ``i8``: a step per dimension, so that the largest magnitude on the sample is 127 (int8; 16 KB);
- ``u<f>``: one step for every dimension, ``f`` times the root mean square of a coefficient. The squared
  error is then the same in every direction (what a score's error depends on), and the low-variance
  directions, mostly 0 and +-1, cost few bits once entropy-coded.

For each codec: the bytes per image of its records compressed one image at a time (coefficients
dimension-major, int8 or int16 as their range needs, by zlib level 9 and by lzma; and the empirical
entropy of each dimension's values, the bound of a per-dimension entropy coder), and the share of the
exhaustive float16 MISA top 10 that the served top 10 holds: with the exact pass over the rough pass's
best 32 (the served pipeline) and with the codec ranking every one of the K candidates (no rough pass).
Captions: a `matchmap synth` corpus's val captions, voices the model never heard.

    python bench/bench_store_codec.py --library /work/exp/s100k/library --corpus /work/exp/c10 \\
        --exact-cache /work/exp/s100k/exact40.npy --codecs i8 u0.05 u0.1 u0.2 [--gaps]
"""

from __future__ import annotations

import argparse
import dataclasses
import lzma
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import cached_exhaustive_top10, collection_arguments, corpus_inputs  # noqa: E402

from encoders.matchmap import score_matrix  # noqa: E402
from search.engine import SearchEngine, SearchQuery  # noqa: E402

SAMPLE_MAPS = 2048


def steps_for(codec: str, coefficients: torch.Tensor) -> torch.Tensor:
    """(D,) float32 steps of ``codec`` found on ``coefficients`` (n, D) in the principal basis."""
    if codec == "i8":
        return (coefficients.abs().amax(0) / 127).clamp(min=1e-12)
    if codec.startswith("u"):
        rms = coefficients.square().mean().sqrt()
        return torch.full((coefficients.shape[1],), float(codec[1:]) * float(rms))
    raise SystemExit(f"unknown codec {codec!r}: i8 or u<fraction>")


def quantized(maps: torch.Tensor, basis: torch.Tensor, steps: torch.Tensor, clamp: int | None) -> torch.Tensor:
    """maps (K, R, D) float32 -> integer coefficients (K, R, D) in the basis (as float32)."""
    values = torch.round((maps @ basis) / steps)
    return values.clamp(-clamp, clamp) if clamp is not None else values


def record_bytes(values: np.ndarray) -> dict[str, float]:
    """values (n, R, D) integers -> mean compressed bytes per image by zlib, lzma, and the entropy bound."""
    peak = int(np.abs(values).max())
    dtype = np.int8 if peak <= 127 else np.int16
    records = [np.ascontiguousarray(v.T).astype(dtype).tobytes() for v in values]  # dimension-major
    entropy_bits = 0.0
    peaks = np.abs(values).max(axis=(0, 1))  # per dimension: a fixed width of bits covering -peak..peak
    fixed_bits = float(np.ceil(np.log2(2 * peaks + 1)).sum()) * values.shape[1]
    for d in range(values.shape[2]):
        _, counts = np.unique(values[:, :, d], return_counts=True)
        p = counts / counts.sum()
        entropy_bits += float(-(p * np.log2(p)).sum()) * values.shape[1]
    return {
        "raw": values.shape[1] * values.shape[2] * np.dtype(dtype).itemsize,
        "zlib": float(np.mean([len(zlib.compress(r, 9)) for r in records])),
        "lzma": float(np.mean([len(lzma.compress(r, preset=9)) for r in records[:256]])),
        "entropy": entropy_bits / 8,
        "fixed": fixed_bits / 8,
        "peak": peak,
    }


def overlap(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))


def print_gaps(coll, audio: torch.Tensor, lengths: torch.Tensor) -> None:
    """How close MISA's 10th and 11th places are: per caption, the gap between its exact 10th and 11th
    scores over every image, as a share of the spread (standard deviation) of its scores."""
    ids = coll.ids()
    scores = torch.cat([score_matrix(audio, lengths, torch.from_numpy(coll.feature_maps(ids[i : i + 2000])
                                                                    .astype(np.float32)))["misa"]
                        for i in range(0, len(ids), 2000)], dim=1)
    top = torch.topk(scores, 11, dim=1).values
    share = ((top[:, 9] - top[:, 10]) / scores.std(dim=1)).numpy()
    print("gap between the exact 10th and 11th scores, as a share of a caption's score spread: "
          + ", ".join(f"under {bound:g} for {np.mean(share < bound):.3f}" for bound in (0.001, 0.003, 0.01))
          + " of captions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    collection_arguments(parser)
    parser.add_argument("--codecs", nargs="+", default=["i8", "u0.05", "u0.1", "u0.2"])
    parser.add_argument("--gaps", action="store_true",
                        help="also print how close each caption's exact 10th and 11th scores are (an exhaustive pass)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
    engine.warm_up()
    engine.wait_held()
    coll = engine.collection(args.collection)
    _, captions, _ = corpus_inputs(args.corpus)
    prepared = [engine.prepare_audio(b) for b in captions[: args.queries]]
    audio, lengths = engine.encode([p.logmel for p in prepared])
    truth = cached_exhaustive_top10(engine, None, audio, lengths, args.exact_cache, args.collection)
    _, candidates = engine.resolve_counts(10, 0, coll.size)
    ids = coll.ids()
    sample_ids = ids[np.random.default_rng(0).choice(len(ids), min(SAMPLE_MAPS, len(ids)), replace=False)]
    sample = torch.from_numpy(coll.feature_maps(np.sort(sample_ids)).astype(np.float32))
    dim = sample.shape[-1]
    regions = sample.reshape(-1, dim).double()
    basis = torch.linalg.eigh(regions.T @ regions)[1].flip(1).float()  # every principal direction, as region_basis
    coefficients = (sample @ basis).reshape(-1, dim)
    store_maps = coll.feature_maps
    served_limits, every_k_limits = engine.limits, dataclasses.replace(engine.limits, exact_rescore_at_least=10**6)

    def served(limits, through=None) -> list[list[int]]:
        engine.limits = limits
        coll.feature_maps = through or store_maps
        try:
            queries = [SearchQuery(p, args.collection, 10, candidates) for p in prepared]
            return [[h.image_id for h in r.hits] for r in engine.search_batch(queries)]
        finally:
            coll.feature_maps, engine.limits = store_maps, served_limits

    if args.gaps:
        print_gaps(coll, audio, lengths)
    print(f"{coll.size} images, {len(prepared)} captions, K={candidates}; the store's float16 maps: "
          f"served {overlap(served(served_limits), truth):.3f}, every K exactly "
          f"{overlap(served(every_k_limits), truth):.3f} of the exhaustive top 10")
    for codec in args.codecs:
        steps = steps_for(codec, coefficients)
        clamp = 127 if codec == "i8" else None
        values = quantized(sample, basis, steps, clamp)
        size = record_bytes(values.numpy().astype(np.int32))

        def through(image_ids, steps=steps, clamp=clamp):
            maps = torch.from_numpy(store_maps(image_ids).astype(np.float32))
            return ((quantized(maps, basis, steps, clamp) * steps) @ basis.T).numpy()

        error = float(((values * steps) @ basis.T - sample).square().sum()
                      / sample.square().sum())
        print(f"  {codec}: raw {size['raw']} B, zlib {size['zlib']:.0f} B, lzma {size['lzma']:.0f} B, fixed widths "
              f"{size['fixed']:.0f} B, entropy {size['entropy']:.0f} B per image (largest |value| {size['peak']}); relative squared error "
              f"{error:.2e}; served {overlap(served(served_limits, through), truth):.3f}, every K by the codec "
              f"{overlap(served(every_k_limits, through), truth):.3f}", flush=True)
    print(f"reproduce: python bench/bench_store_codec.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
