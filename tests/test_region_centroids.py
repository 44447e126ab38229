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


def test_centroids_survive_a_round_trip(tmp_path):
    centroids = RegionCentroids.train(clustered_maps(10), count=4)
    centroids.save(tmp_path / "c")
    np.testing.assert_array_equal(RegionCentroids.load(tmp_path / "c").centroids, centroids.centroids)
