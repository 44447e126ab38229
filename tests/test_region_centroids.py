"""Region centroids (indexer.region_centroids): nearest-centroid ids and the centroid interaction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.matchmap import paired_misa
from indexer.region_centroids import VECTORS_PER_CENTROID, RegionCentroids


def clustered_maps(count: int, regions: int = 16, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((12, dim))
    picks = rng.integers(0, len(centres), (count, regions))
    return (centres[picks] + 0.2 * rng.standard_normal((count, regions, dim))).astype(np.float32)


def test_each_region_gets_its_nearest_centroid():
    maps = clustered_maps(40)
    centroids = RegionCentroids.train(maps, count=12)
    ids = centroids.assign(maps)
    assert ids.shape == (40, 16) and ids.dtype == np.uint16
    distances = ((maps[:, :, None, :] - centroids.centroids[None, None]) ** 2).sum(-1)  # (N, R, C)
    np.testing.assert_array_equal(ids, distances.argmin(-1))


def test_few_training_vectors_make_fewer_centroids():
    maps = clustered_maps(2)  # 32 region vectors
    assert RegionCentroids.train(maps, count=1024).count == 32 // VECTORS_PER_CENTROID
    assert RegionCentroids.train(maps[:, :1], count=1024).count == 1  # the mean of what there is
    with pytest.raises(ValueError, match="at least one map"):
        RegionCentroids.train(maps[:0])


@pytest.mark.parametrize("chunk", [512, 2])
def test_the_interaction_is_misa_of_the_maps_made_of_their_centroids(monkeypatch, chunk):
    """For each frame the best region, averaged over the caption's true frames: exactly MISA
    (encoders.matchmap, the one scoring module) of each image's map with every region replaced by its
    centroid. Frames past a caption's length hold junk that must not count. Candidates are gathered a
    chunk at a time (2: a chunk boundary inside each caption's 5)."""
    monkeypatch.setattr("indexer.region_centroids.INTERACTION_CHUNK", chunk)
    maps = clustered_maps(30)
    centroids = RegionCentroids.train(maps, count=12)
    rng = np.random.default_rng(1)
    audio = torch.from_numpy(rng.standard_normal((3, 7, 8)).astype(np.float32))
    lengths = torch.tensor([7, 4, 2])
    audio[1, 4:] = 50.0
    audio[2, 2:] = -50.0
    candidates = torch.from_numpy(rng.integers(0, 30, (3, 5)))  # each caption's own 5 images
    ids = torch.from_numpy(centroids.assign(maps).astype(np.int64))[candidates]  # (3, 5, R)
    quantized = torch.from_numpy(centroids.centroids)[ids]  # (3, 5, R, D)
    want = paired_misa(audio, lengths, quantized)
    torch.testing.assert_close(centroids.interaction(audio, lengths, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("narrow", [40, 10])
def test_distinct_first_rows_score_as_the_assigned_ones(monkeypatch, narrow):
    """Held region ids keep each image's distinct ids first and pad the rest (distinct_first); the
    interaction reads only the first NARROW_REGIONS of an image with no more distinct ids, all of the
    others: the same numbers as from the ids as assigned. 64 regions over 12 centroids: every image has
    at most 12 distinct ids (8 to 12 here), so with 40 every one is narrow; with 10 some are, some not."""
    monkeypatch.setattr("indexer.region_centroids.NARROW_REGIONS", narrow)
    maps = clustered_maps(50, regions=64)
    centroids = RegionCentroids.train(maps, count=12)
    assigned = centroids.assign(maps)
    held = centroids.distinct_first(assigned)
    assert held.shape == assigned.shape and held.dtype == np.uint16
    for row, ids in zip(held, assigned, strict=True):
        distinct = np.unique(ids)
        np.testing.assert_array_equal(row[: len(distinct)], distinct)
        assert (row[len(distinct) :] == centroids.count).all()
    widths = np.array([len(np.unique(ids)) for ids in assigned])
    assert narrow == 40 or (widths <= narrow).any() and (widths > narrow).any()
    rng = np.random.default_rng(2)
    audio = torch.from_numpy(rng.standard_normal((2, 6, 8)).astype(np.float32))
    audio[1] *= 0.01  # scores near 0, some frames' best below it: a pad must never win
    lengths = torch.tensor([6, 3])
    candidates = torch.from_numpy(rng.integers(0, 50, (2, 30)))
    want = centroids.interaction(audio, lengths, torch.from_numpy(assigned.astype(np.int64))[candidates])
    got = centroids.interaction(audio, lengths, torch.from_numpy(held.astype(np.int64))[candidates])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a frame that every centroid of an image scores below zero: the pads must never be its best
    line = RegionCentroids(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32))
    rows = np.array([[0, 1] * 22, [2] * 44, [0, 1, 2, 2] * 11])
    frames = torch.tensor([[[-1.0, -1.0], [1.0, 0.5]]])
    want = line.interaction(frames, torch.tensor([2]), torch.from_numpy(rows.astype(np.int64))[None])
    held = line.distinct_first(rows)
    got = line.interaction(frames, torch.tensor([2]), torch.from_numpy(held.astype(np.int64))[None])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(want, torch.tensor([[0.5, -0.25, 0.5]]))


def test_centroids_survive_a_round_trip(tmp_path):
    centroids = RegionCentroids.train(clustered_maps(10), count=4)
    centroids.save(tmp_path / "c")
    np.testing.assert_array_equal(RegionCentroids.load(tmp_path / "c").centroids, centroids.centroids)
