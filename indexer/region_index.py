"""The region index: FAISS inner-product search over every stored region vector, for MISA candidates.

MISA scores an image by, for each audio frame, its best region; so the images whose individual
regions lie nearest to individual query frames are the right re-ranking candidates (ColBERT v1
style), which the mean-pooled stage-1 vector can miss. This index holds each image's R region
vectors (the feature store's fp16 maps, as float32) under ids ``image_id * R + region``.

The index type follows the stage-1 rule (:func:`stage1_index.build_index`): exact ``flat`` below
``flat_threshold`` region vectors, else IVF-Flat with ``nlist ~ 4 sqrt(N)`` trained on a seeded
sample, searched with ``NPROBE`` lists. NPROBE was chosen by measurement on real spoken queries, not
by stage 1's recall rule: on the 10,000-image bench collection (640,000 regions, nlist 3200), stage
1's rule (recall@100 >= 0.95 for noisy stored vectors) picks nprobe 1024 and ~200 ms per query,
while the two-stage top-10 agreement at K = 100 is 0.543 / 0.590 / 0.597 at nprobe 8 / 32 / 128
(256 hits per frame) for ~5 / 10 / 24 ms of region search. Like the stage-1 file the index is
derived data, named after the catalog generation it reflects (``regions-g<generation>.faiss``) and
rebuilt by whoever finds no file of that generation.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import faiss
import numpy as np

from indexer import stage1_index

FILE_PREFIX = "regions-g"
NPROBE = 32


def region_ids(image_ids: np.ndarray, regions: int) -> np.ndarray:
    """image ids (N,) int64 -> ids (N * regions,) int64 of their regions, ``image_id * regions + region``."""
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1, 1)
    return (image_ids * regions + np.arange(regions, dtype=np.int64)).reshape(-1)


def build(
    maps: np.ndarray, image_ids: np.ndarray, flat_threshold: int = stage1_index.DEFAULT_FLAT_THRESHOLD
) -> faiss.Index:
    """An index over maps (N, R, D) float16/float32 of images ``image_ids`` (N,) int64.

    Flat below ``flat_threshold`` region vectors (N * R), else IVF-Flat with tuned nprobe.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, R, D) feature maps, got shape {maps.shape}")
    n, regions, dim = maps.shape
    if len(image_ids) != n:
        raise ValueError(f"got {n} feature maps but {len(image_ids)} image ids")
    vectors = np.ascontiguousarray(maps.reshape(n * regions, dim), dtype=np.float32)
    ids = region_ids(image_ids, regions)
    if len(vectors) < flat_threshold:
        return stage1_index.build_index(vectors, ids, "flat")[0]
    nlist = stage1_index.ivf_nlist(len(vectors))
    index, _ = stage1_index.build_index(vectors, ids, "ivf", {"nlist": nlist, "nprobe": min(NPROBE, nlist)})
    return index


def candidates(
    index: faiss.Index, audio_frames: np.ndarray, regions: int, per_frame: int, limit: int
) -> np.ndarray:
    """Images owning each frame's nearest regions, best first -> (<= limit,) int64 image ids.

    audio_frames: (T, D) float32, the query's true frames. Each frame's ``per_frame`` nearest regions
    vote for their images; an image scores the sum over frames of its best region's inner product
    with that frame (frames that hit none of its regions add nothing), a lower bound on T * MISA that
    grows with both how many frames hit the image and how strongly.
    """
    frames = np.asarray(audio_frames)
    if frames.ndim != 2 or frames.shape[1] != index.d:
        raise ValueError(f"audio_frames must be (T, {index.d}) float32 frames, got shape {frames.shape}")
    if per_frame <= 0 or limit <= 0:
        raise ValueError(f"per_frame and limit must be positive, got per_frame={per_frame}, limit={limit}")
    if index.ntotal == 0 or len(frames) == 0:
        return np.zeros(0, dtype=np.int64)
    scores, ids = index.search(np.ascontiguousarray(frames, dtype=np.float32), min(per_frame, index.ntotal))
    found = ids >= 0
    frame_of = np.broadcast_to(np.arange(len(frames))[:, None], ids.shape)[found]
    images, scores = ids[found] // regions, scores[found]
    # best region per (frame, image): sort by score descending, keep each pair's first occurrence
    order = np.argsort(-scores, kind="stable")
    pairs = frame_of[order].astype(np.int64) * (int(images.max()) + 1) + images[order]
    _, first = np.unique(pairs, return_index=True)
    best_images, best_scores = images[order][first], scores[order][first]
    unique_images, owner = np.unique(best_images, return_inverse=True)
    totals = np.zeros(len(unique_images), dtype=np.float64)
    np.add.at(totals, owner, best_scores)
    ranked = np.argsort(-totals, kind="stable")[:limit]
    return unique_images[ranked].astype(np.int64)


def index_path(folder: Path, generation: int) -> Path:
    """Where the region index reflecting catalog ``generation`` lives."""
    return Path(folder) / f"{FILE_PREFIX}{generation:012d}.faiss"


def load(folder: Path, generation: int) -> faiss.Index | None:
    """The region index saved for ``generation``, or None when there is none or it is torn (rebuild it)."""
    path = index_path(folder, generation)
    if not path.exists():
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return None
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(NPROBE, index.nlist)  # the current setting, whatever the file was saved with
    return index


def save(index: faiss.Index, folder: Path, generation: int) -> Path:
    """Atomically write ``index`` as the file of ``generation``; delete files of other generations.

    Readers may build and save concurrently, so each writes its own temporary name before the rename.
    """
    folder = Path(folder)
    final = index_path(folder, generation)
    partial = folder / f"{final.name}.{uuid.uuid4().hex[:8]}.partial"
    faiss.write_index(index, str(partial))
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)
    for stale in folder.glob(f"{FILE_PREFIX}*.faiss"):
        if stale != final:
            stale.unlink(missing_ok=True)
    return final
