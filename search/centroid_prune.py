"""Stage 1's second step: of a wider list from the pooled vectors, keep the K that MISA likely ranks first.

FAISS over pooled vectors (one per image) misses some of exact MISA's top 10 in its top K: a pooled
vector averages every region, MISA keeps each frame's best one. So stage 1 asks FAISS for
``SearchLimits.stage1_widen`` x K candidates, scores them by the centroid interaction (each region as
its nearest centroid, ``indexer.region_centroids``; MISA's form at the cost of a gather), and keeps the
K best by the sum of the two scores, each standardized over the query's candidates. Neither score alone
holds MISA's top 10 as well as the two together: on 10,000 scene images, K=100 of 400 held 0.875 of it
by the pooled score, 0.893 by the centroids and 0.963 by the sum (docs/search.md, "Centroid interaction").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def standardized(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each row of ``scores`` (B, K) as z-scores over its ``valid`` entries (others are left as they are)."""
    count = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    masked = np.where(valid, scores, 0.0)
    mean = masked.sum(axis=1, keepdims=True) / count
    spread = np.sqrt(np.where(valid, (scores - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count)
    return (scores - mean) / np.maximum(spread, 1e-12)


def centroid_scores(coll, audio: Tensor, lengths: Tensor, ids: np.ndarray) -> np.ndarray | None:
    """The centroid interaction of each query ``audio[b]`` (B, T, D; ``lengths`` (B,)) with its candidates
    ``ids`` (B, K') of ``coll`` (-1: none) -> (B, K') float64, NaN where there is no candidate; None when
    ``coll`` holds no region centroid ids (``Collection.held_region_centroid_ids``)."""
    held = coll.held_region_centroid_ids()
    if held is None:
        return None
    centroids, region_ids = held
    valid = ids >= 0
    positions = np.zeros_like(ids)
    positions[valid] = coll.positions_of(ids[valid])
    gathered = torch.from_numpy(region_ids[positions].astype(np.int64)).to(audio.device)  # (B, K', R)
    approx = centroids.interaction(audio, lengths, gathered).cpu().numpy().astype(np.float64)
    return np.where(valid, approx, np.nan)


def faiss_recall_k(keep: int, wide: int) -> int:
    """The K whose recall FAISS's probes are tuned for (``Collection.search_stage1``'s ``recall_k``) when
    stage 1 takes ``wide`` candidates from it and keeps ``keep`` by the centroid interaction: keep / widen.
    The interaction re-ranks FAISS's whole list, so FAISS need not hold flat search's top K exactly, only
    what MISA ranks first somewhere in its wide list. On a million images (K=4,000 of 16,000), probing as
    recall@1,000 needs (512 lists) held the same 0.990 of the exhaustive MISA top 10 as probing for
    recall@4,000 (1,024 lists), in 10 ms instead of 17 ms; 128 lists still held 0.990, 64 held 0.988
    (bench/bench_stage1_width.py --nprobes, docs/search.md). Without widening: ``keep`` itself."""
    return keep if wide <= keep else max(1, keep * keep // wide)


def keep_best(scores: np.ndarray, ids: np.ndarray, approx: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each query's candidates ``ids`` (B, K') with pooled ``scores`` and centroid scores ``approx``
    (-1 pads), the ``keep`` best by the sum of the two, each standardized over the row's candidates
    -> (scores, ids) (B, keep), pads last."""
    valid = ids >= 0
    blend = standardized(np.asarray(scores, np.float64), valid) + standardized(np.nan_to_num(approx), valid)
    order = np.argsort(-np.where(valid, blend, -np.inf), axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def prune_by_centroids(coll, audio: Tensor, lengths: Tensor, scores: np.ndarray, ids: np.ndarray,
                       keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each query's stage-1 candidates ``ids`` (B, K') with pooled ``scores`` (-1 pads), the ``keep``
    best by :func:`keep_best`; ``coll`` must hold region centroid ids. ``audio`` (B, T, D) and ``lengths``
    (B,) are the queries' audio maps."""
    return keep_best(scores, ids, centroid_scores(coll, audio, lengths, ids), keep)
