"""Weighting the region codec by speech: does coding X W (W = C^1/2, C the second moment of audio frames)
rank better than coding X, when the codes alone rank?

MISA's error for a frame a is e . a (e the coding error of a region), so what matters is e's part along
the directions where speech frames lie. Coding Y = X W and decoding X = Y' W^-1 makes the codec's squared
error in Y exactly the variance of e . a for frames of second moment C. C is fitted on the first half of
the corpus's val captions; top-10 overlap with exact MISA (over every image of the collection, ranked by
the decoded codes) is measured on the other half. The codecs train on the first 1,024 maps, as the
indexer's. The collection is one that ``bench/bench_search.py --work-dir W`` built (W/library).

    python bench/bench_codec_metric.py --library /work/exp/b10k/library --corpus /work/exp/c10
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import COLLECTION, corpus_inputs, misa_all, top10_overlap  # noqa: E402

from indexer.region_codec import RegionCodec  # noqa: E402
from search.engine import SearchEngine  # noqa: E402


def decoded(codec: RegionCodec, maps: np.ndarray, into: np.ndarray | None = None,
            back: np.ndarray | None = None) -> np.ndarray:
    """maps (N, R, D) -> coded and decoded, through ``into`` (D, D) before and ``back`` after."""
    parts = []
    for i in range(0, len(maps), 2048):
        x = maps[i : i + 2048].astype(np.float32)
        y = codec.decode(torch.from_numpy(codec.encode(x if into is None else x @ into))).numpy()
        parts.append(y if back is None else y @ back)
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="the `matchmap synth` corpus whose val captions query")
    parser.add_argument("--checkpoint", type=Path, default=Path("encoders/default_model/tiny.pt"))
    parser.add_argument("--bytes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--ridge", type=float, default=1e-3, help="added to C's eigenvalues, times the largest")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"reproduce: python bench/bench_codec_metric.py {' '.join(sys.argv[1:])}")
    engine = SearchEngine.open(args.checkpoint, args.library, device="cpu")
    _, maps = zip(*engine.collection(COLLECTION).iter_feature_maps(), strict=True)
    maps = np.concatenate(maps)
    _, queries, _ = corpus_inputs(args.corpus)
    audio, lengths = engine.encode([engine.prepare_audio(b).logmel for b in queries])
    half = len(queries) // 2
    frames = torch.cat([audio[i, : int(lengths[i])] for i in range(half)]).double().numpy()
    values, vectors = np.linalg.eigh(frames.T @ frames / len(frames))
    share = values[::-1].cumsum() / values.sum()
    print(f"speech frames' second moment ({len(frames)} frames of {half} captions): "
          + ", ".join(f"top {k} directions {share[k - 1]:.2f}" for k in (1, 8, 32, 64)))
    values = np.maximum(values, 0) + args.ridge * values.max()
    into = ((vectors * np.sqrt(values)) @ vectors.T).astype(np.float32)
    back = ((vectors / np.sqrt(values)) @ vectors.T).astype(np.float32)
    test_audio, test_lengths = audio[half:], lengths[half:]
    exact_scores = misa_all(test_audio, test_lengths, maps)
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :10]
    train = maps[:1024].astype(np.float32)
    print(f"{len(maps)} images, {len(queries) - half} queries; top-10 overlap with exact MISA, ranked by the codes alone:")
    for budget in args.bytes:
        plain = RegionCodec.train(train, budget)
        weighted = RegionCodec.train(train @ into, budget)
        o_plain = top10_overlap(misa_all(test_audio, test_lengths, decoded(plain, maps)), exact)
        o_weighted = top10_overlap(misa_all(test_audio, test_lengths, decoded(weighted, maps, into, back)), exact)
        print(f"  {budget} B: plain {o_plain:.3f}, weighted by speech frames {o_weighted:.3f}", flush=True)


if __name__ == "__main__":
    main()
