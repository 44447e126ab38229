"""Region centroids: every region of an image as the id of its nearest of C centroids (PLAID's
centroid interaction), so stage 1 can pick, among many candidates, those whose MISA is likely high.

Stage 1's pooled vectors are one vector per image and caption: an inner product of two averages,
where MISA keeps, for each frame, the image's *best* region. Their top K misses some of MISA's top
10 (docs/search.md). The centroid interaction keeps MISA's form on a coarse version of the map: a
query's frames meet the C centroids once (T x C products), and an image's approximate MISA is, for
each frame, the best score among its R regions' centroids, averaged over the frames. That costs a
gather of R x T numbers per candidate, no product, and R ids of 2 bytes per image on disk and in
memory. ``search.centroid_prune`` blends it with the pooled score to keep K of a wider stage-1 list.

Centroids are learnt by k-means (faiss) on the region vectors of maps spread over the collection,
beside the transform codec, by ``indexer.code_store`` at indexing time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

CENTROIDS = 1024  # per collection: at K=100 of 400 on 10,000 scenes, 256 kept 0.954 of MISA's top 10, 1024 0.963
VECTORS_PER_CENTROID = 16  # fewer training vectors than this per centroid: fewer centroids
KMEANS_ITERATIONS = 20
ASSIGN_BATCH = 65536  # region vectors assigned at a time
INTERACTION_CHUNK = 512  # candidates whose (T, chunk, R) frame scores are gathered at once (4 MB at 32 frames)
# An image's R regions have few distinct centroids (of 64 regions: 26 on average, 37 at the 95th percentile,
# at most 51, on a million scene maps). Held with its distinct ids first (RegionCentroids.distinct_first), an
# image with at most NARROW_REGIONS of them (85 % of those maps) is scored from those alone. 32, a power of two: the max
# over a last axis of 40 or 48 ran slower than over 32 or 64 (16,000 candidates of a million: all 64 ids
# 21.4 ms, 32 where they hold every distinct one 15.1 ms, 40 18.2 ms, 48 24.2 ms: bench/bench_interaction.py).
NARROW_REGIONS = 32


@dataclass
class RegionCentroids:
    """C centroids (C, D) float32 of region vectors; ``ids`` of an image are uint16 (R,)."""

    centroids: np.ndarray

    def __post_init__(self) -> None:
        if self.centroids.ndim != 2 or not 1 <= len(self.centroids) <= 65536:
            raise ValueError(f"region centroids must be (C, D) with 1 <= C <= 65536, got {self.centroids.shape}")
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)

    @classmethod
    def train(cls, maps: np.ndarray, count: int = CENTROIDS, seed: int = 0) -> RegionCentroids:
        """k-means over the region vectors of ``maps`` (N, R, D): ``count`` centroids, fewer when there
        are under VECTORS_PER_CENTROID vectors per centroid (at least one)."""
        vectors = np.ascontiguousarray(np.asarray(maps, dtype=np.float32).reshape(-1, maps.shape[-1]))
        if len(vectors) == 0:
            raise ValueError("region centroids need at least one map to train on")
        count = max(1, min(count, len(vectors) // VECTORS_PER_CENTROID))
        if count == 1:
            return cls(vectors.mean(axis=0, keepdims=True))
        kmeans = faiss.Kmeans(vectors.shape[1], count, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                              min_points_per_centroid=VECTORS_PER_CENTROID)
        kmeans.train(vectors)
        return cls(kmeans.centroids)

    @property
    def count(self) -> int:
        return len(self.centroids)

    def assign(self, maps: np.ndarray) -> np.ndarray:
        """maps (N, R, D) -> (N, R) uint16: each region's nearest centroid (squared L2)."""
        n, r, d = maps.shape
        if d != self.centroids.shape[1]:
            raise ValueError(f"maps have {d} dims, the centroids {self.centroids.shape[1]}")
        index = faiss.IndexFlatL2(d)
        index.add(self.centroids)
        vectors = np.asarray(maps, dtype=np.float32).reshape(n * r, d)
        out = np.empty(n * r, np.uint16)
        for start in range(0, len(vectors), ASSIGN_BATCH):
            _, nearest = index.search(np.ascontiguousarray(vectors[start : start + ASSIGN_BATCH]), 1)
            out[start : start + ASSIGN_BATCH] = nearest[:, 0]
        return out.reshape(n, r)

    def distinct_first(self, region_ids: np.ndarray) -> np.ndarray:
        """Assigned ids (N, R) -> (N, R) uint16 as a snapshot holds them: each row's distinct ids in
        ascending order, then ``count`` (one past every centroid's id) where the row repeated an id. The
        best score over an image's regions is the best over its distinct ids, and :meth:`interaction`
        scores ``count`` as minus infinity, so it gives the same numbers for either form. Rows as they
        are when ``count`` would not fit in 16 bits (65,536 centroids)."""
        if self.count >= 2**16:
            return region_ids
        ordered = np.sort(np.asarray(region_ids, dtype=np.uint16), axis=1)
        repeated = np.zeros(ordered.shape, dtype=bool)
        repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        ordered[repeated] = self.count
        return np.sort(ordered, axis=1)

    def interaction(self, audio: Tensor, lengths: Tensor, region_ids: Tensor) -> Tensor:
        """Approximate MISA of each caption ``audio[b]`` (B, T, D) over its first ``lengths[b]`` frames
        against the images whose region ids are ``region_ids[b]`` (B, K, R) long -> (B, K) float32:
        for each frame the best of the image's regions' centroid scores, averaged over the frames.
        Rows may be as assigned or in :meth:`distinct_first`'s form (faster: only its first
        NARROW_REGIONS ids are read where the rest are pads)."""
        centroids = torch.from_numpy(self.centroids).to(audio.device)
        out = torch.empty(region_ids.shape[:2], device=audio.device)
        r = region_ids.shape[2]
        for b in range(len(region_ids)):
            length = int(lengths[b])
            # (T, C + 1): each true frame's score with each centroid, and minus infinity for distinct_first's
            # pad (``count``). Gathering columns and taking the max over a contiguous last axis (R) ran 1.75x faster
            # than gathering (C, T) rows and reducing the middle axis (docs/search.md, "A hundred thousand
            # images in 20 ms").
            frame_scores = torch.cat([audio[b, :length].float() @ centroids.T,
                                      torch.full((length, 1), float("-inf"), device=audio.device)], dim=1)
            ids = region_ids[b]
            narrow = (ids[:, NARROW_REGIONS] == self.count if r > NARROW_REGIONS
                      else torch.ones(len(ids), dtype=torch.bool, device=ids.device))
            for rows, width in ((narrow, min(r, NARROW_REGIONS)), (~narrow, r)):
                which = rows.nonzero().squeeze(1)
                if len(which) == 0:
                    continue
                block_ids = ids[which, :width].reshape(-1)
                for k0 in range(0, len(which), INTERACTION_CHUNK):
                    block = block_ids[k0 * width : (k0 + INTERACTION_CHUNK) * width]
                    best = frame_scores.index_select(1, block).view(length, -1, width).amax(dim=2)
                    out[b, which[k0 : k0 + INTERACTION_CHUNK]] = best.mean(dim=0)
        return out

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, centroids=self.centroids)

    @classmethod
    def load(cls, path: str | Path) -> RegionCentroids:
        with np.load(path) as f:
            return cls(f["centroids"])
