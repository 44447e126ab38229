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


def prune_by_centroids(coll, audio: Tensor, lengths: Tensor, scores: np.ndarray, ids: np.ndarray,
                       keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each query's stage-1 candidates ``ids`` (B, K') with pooled ``scores`` (-1 pads), the ``keep``
    best by pooled score + centroid interaction, both standardized -> (scores, ids) (B, keep), pads last.
    ``coll`` must hold region centroid ids (``Collection.held_region_centroid_ids``); ``audio`` (B, T, D)
    and ``lengths`` (B,) are the queries' audio maps."""
    centroids, region_ids = coll.held_region_centroid_ids()
    valid = ids >= 0
    positions = np.zeros_like(ids)
    positions[valid] = coll.positions_of(ids[valid])
    gathered = torch.from_numpy(region_ids[positions].astype(np.int64)).to(audio.device)  # (B, K', R)
    approx = centroids.interaction(audio, lengths, gathered).cpu().numpy().astype(np.float64)
    blend = standardized(np.asarray(scores, np.float64), valid) + standardized(approx, valid)
    order = np.argsort(-np.where(valid, blend, -np.inf), axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
