"""The feature store and the stage-1 index on their own: fast paths against the obvious slow ones."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer import stage1_index
from indexer.feature_store import FeatureStore, StoreLayout, compact_store


def random_maps(n: int, layout: StoreLayout, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, layout.regions, layout.dim)).astype(np.float16)
    return maps, maps.astype(np.float32).mean(axis=1)


@pytest.fixture
def layout() -> StoreLayout:
    return StoreLayout(regions=4, dim=8, rows_per_shard=3)


def test_store_round_trips_across_shards_in_any_order(tmp_path, layout):
    store = FeatureStore(tmp_path / "store-0", layout)
    store.create()
    maps, pooled = random_maps(7, layout)
    store.write(0, maps[:2], pooled[:2])
    store.write(2, maps[2:], pooled[2:])  # spans shards 0, 1 and 2
    assert len(list(store.folder.glob("maps-*.bin"))) == 3
    order = [6, 0, 3, 3, 5, 1]
    np.testing.assert_array_equal(store.read_maps(order), maps[order])
    np.testing.assert_array_equal(store.read_pooled(order), pooled[order])
    assert store.read_maps([]).shape == (0, 4, 8)
    assert store.bytes_on_disk() == 7 * (layout.map_bytes + layout.pooled_bytes)


def test_reads_gather_runs_and_scattered_slots_and_see_writes_made_after_them(tmp_path):
    """Runs of consecutive slots (read in one call each), duplicates and scattered slots, in any order;
    slots written after a read are found by the next (the shard file grew); a slot past a shard file's
    end (a store cut short) is an error that names the shard."""
    layout = StoreLayout(regions=4, dim=8, rows_per_shard=50)
    store = FeatureStore(tmp_path / "store-0", layout)
    store.create()
    maps, pooled = random_maps(120, layout, seed=3)
    store.write(0, maps[:60], pooled[:60])
    order = [12, 13, 14, 15, 3, 49, 50, 51, 14, 0, 59, 58, 57]
    np.testing.assert_array_equal(store.read_maps(order), maps[order])
    store.write(60, maps[60:], pooled[60:])
    later = [61, 119, 100, 101, 102, 60]
    np.testing.assert_array_equal(store.read_maps(later), maps[later])
    np.testing.assert_array_equal(store.read_pooled(later), pooled[later])
    shard = store.folder / "maps-000002.bin"
    with open(shard, "r+b") as f:
        f.truncate(5 * layout.map_bytes)  # slots 100..104 remain of 100..119
    store.close()
    reopened = FeatureStore(tmp_path / "store-0", layout)
    np.testing.assert_array_equal(reopened.read_maps([104, 100]), maps[[104, 100]])
    with pytest.raises(ValueError, match="maps-000002.bin holds 5 slots"):
        reopened.read_maps([100, 110])


def test_rewriting_an_uncommitted_tail_replaces_it(tmp_path, layout):
    # A crash after writing slots 5.. but before the catalog commit: the next run writes there again.
    store = FeatureStore(tmp_path / "store-0", layout)
    store.create()
    maps, pooled = random_maps(7, layout, seed=1)
    store.write(0, maps, pooled)
    replacement, replacement_pooled = random_maps(2, layout, seed=2)
    store.write(5, replacement, replacement_pooled)
    np.testing.assert_array_equal(store.read_maps([4, 5, 6]), np.concatenate([maps[4:5], replacement]))


def test_reading_slots_the_store_lacks_names_the_shard(tmp_path, layout):
    store = FeatureStore(tmp_path / "store-0", layout)
    store.create()
    store.write(0, *random_maps(2, layout))
    with pytest.raises(ValueError, match=r"maps-000000\.bin holds 2 slots"):
        store.read_maps([2])
    with pytest.raises(ValueError, match="feature maps must be"):
        store.write(2, np.zeros((1, 5, 8), np.float16), np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="positive"):
        StoreLayout(regions=0, dim=8)


def test_compaction_keeps_live_slots_in_order(tmp_path, layout):
    source = FeatureStore(tmp_path / "store-0", layout)
    source.create()
    maps, pooled = random_maps(8, layout, seed=3)
    source.write(0, maps, pooled)
    live = np.array([1, 4, 5, 7])
    target = FeatureStore(tmp_path / "store-1", layout)
    compact_store(source, live, target, chunk=3)
    np.testing.assert_array_equal(target.read_maps(range(4)), maps[live])
    np.testing.assert_array_equal(target.read_pooled(range(4)), pooled[live])
    assert target.bytes_on_disk() == source.bytes_on_disk() // 2


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    return centers[rng.integers(0, 64, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)


def test_rule_picks_flat_below_the_threshold_and_ivf_above():
    assert stage1_index.decide_index_type(49_999, "auto") == "flat"
    assert stage1_index.decide_index_type(50_000, "auto") == "ivf"
    assert stage1_index.decide_index_type(10, "auto", flat_threshold=5) == "ivf"
    assert stage1_index.decide_index_type(10**7, "hnsw") == "hnsw"
    assert stage1_index.ivf_nlist(1_000_000) == 4000 and stage1_index.ivf_nlist(20) == 1
    assert stage1_index.needs_rebuild("ivf", {"trained_on": 1000}, 4001, "auto", 100)
    assert not stage1_index.needs_rebuild("ivf", {"trained_on": 1000}, 3000, "auto", 100)
    with pytest.raises(ValueError, match="index type must be one of"):
        stage1_index.decide_index_type(1, "pq")


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_index_meets_its_recorded_recall(index_type):
    vectors = clustered(6000, 32, seed=0)
    ids = np.arange(6000, dtype=np.int64) * 3 + 7  # ids are catalog ids, not positions
    index, params = stage1_index.build_index(vectors, ids, index_type)
    assert params["recall_at_k"] >= params["target_recall"] == 0.95

    # Recall on queries the tuning never saw, against the exact flat index.
    exact, _ = stage1_index.build_index(vectors, ids, "flat")
    queries = clustered(200, 32, seed=9)
    _, truth = stage1_index.search(exact, queries, 10)
    _, found = stage1_index.search(index, queries, 10)
    assert stage1_index.recall_at_k(found, truth, 10) >= 0.9

    # A rebuild from the recorded parameters (after a crash, in a reader) reproduces the index:
    # exactly for IVF (seeded k-means); HNSW's parallel graph construction may differ in ties.
    rebuilt, same_params = stage1_index.build_index(vectors, ids, index_type, params)
    assert same_params == params
    _, found_again = stage1_index.search(rebuilt, queries, 10)
    if index_type == "ivf":
        np.testing.assert_array_equal(found_again, found)
    else:
        assert stage1_index.recall_at_k(found_again, truth, 10) >= 0.9


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_search_honours_k_at_every_size(index_type):
    """An approximate index returns min(K, N) real results for any K, with recall@K against flat
    search that does not collapse as K grows (an IVF tuned for K=100 returned a few hundred)."""
    n = 6000
    vectors = clustered(n, 32, seed=0)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    index, params = stage1_index.build_index(vectors, ids, index_type)
    exact, _ = stage1_index.build_index(vectors, ids, "flat")
    rng = np.random.default_rng(5)
    near = clustered(40, 32, seed=0)[:20] + 0.3 * rng.standard_normal((20, 32)).astype(np.float32)
    queries = np.concatenate([near, 3 * rng.standard_normal((20, 32)).astype(np.float32)])  # and far off
    for k in (10, 400, 1000, 2500, n - 1, n + 50):
        _, found = stage1_index.search(index, queries, k, params)
        assert ((found >= 0).sum(axis=1) == min(k, n)).all(), k
        assert all(len(set(row[row >= 0])) == min(k, n) for row in found), k  # no id twice
        _, truth = stage1_index.search(exact, queries, k)
        assert stage1_index.recall_at_k(found, truth, min(k, n)) >= 0.9, k
    assert stage1_index.recall_at_k(stage1_index.search(index, queries, n, params)[1],
                                    stage1_index.search(exact, queries, n)[1], n) == 1.0


def test_ivf_lists_too_small_for_k_are_widened_until_full():
    """Lists of very unequal sizes (one dense blob, many sparse clusters): probing the lists that hold
    4 x K vectors on average leaves queries near the sparse clusters short; they are searched again
    with more lists, so every query still gets K real results."""
    rng = np.random.default_rng(3)
    blob = 5 * rng.standard_normal((1, 16)) + 0.1 * rng.standard_normal((1900, 16))
    centers = 5 * rng.standard_normal((49, 16))
    sparse = centers[np.arange(100) % 49] + 0.1 * rng.standard_normal((100, 16))
    vectors = np.concatenate([blob, sparse]).astype(np.float32)
    index, params = stage1_index.build_index(vectors, np.arange(2000), "ivf", {"nlist": 50, "nprobe": 1})
    queries = centers.astype(np.float32)
    _, first_try = index.search(queries, 100, params=faiss.SearchParametersIVF(
        nprobe=stage1_index.search_setting("ivf", params, 100, 2000, 50)))
    assert ((first_try >= 0).sum(axis=1) < 100).any()  # the case this test is about
    _, found = stage1_index.search(index, queries, 100, params)
    assert ((found >= 0).sum(axis=1) == 100).all()


def test_ivf_setting_grows_with_k_and_turns_exact():
    params = {"nlist": 100, "nprobe": 4, "k": 100, "nprobe_by_k": [[100, 4], [400, 8], [1000, 16]]}
    setting = [stage1_index.search_setting("ivf", params, k, 100_000, 100) for k in (10, 100, 300, 1000, 2000)]
    assert setting == [4, 4, 8, 16, 32]
    assert stage1_index.search_setting("ivf", params, 2000, 10_000, 100) == 100  # 4 x K is most of N: all lists
    # An index recorded before per-K tuning (one nprobe for K=100) widens in proportion to K, and
    # always probes lists holding 4 x K vectors.
    old = {"nlist": 1000, "nprobe": 8, "k": 100}
    assert stage1_index.search_setting("ivf", old, 400, 1_000_000, 1000) == 32
    assert stage1_index.search_setting("ivf", {**old, "nprobe": 1}, 100, 100_000, 1000) == 4  # covering
    # A widened search (2,000 re-ranked down to 400) probes as recall@400 needs, with lists holding 4 x 2,000
    assert stage1_index.search_setting("ivf", params, 2000, 100_000, 100, recall_k=400) == 8
    assert stage1_index.search_setting("ivf", params, 2000, 100_000, 100) == 32  # as recall@2,000 needs
    assert stage1_index.search_setting("ivf", params, 8000, 100_000, 100, recall_k=400) == 32  # covering 4 x 8,000
    assert stage1_index.search_setting("hnsw", {"efSearch": 64}, 1000, 100_000) == 1000
    assert stage1_index.search_setting("hnsw", {"efSearch": 64}, 6000, 10_000) == 10_000  # exact


def test_flat_search_pads_removes_and_saves_by_generation(tmp_path):
    vectors = clustered(5, 16, seed=1)
    index, _ = stage1_index.build_index(vectors, np.array([10, 11, 12, 13, 14]), "flat")
    scores, ids = stage1_index.search(index, vectors[:1], 8)
    assert ids[0, 0] == 10 and list(ids[0, 5:]) == [-1, -1, -1] and np.all(np.isneginf(scores[0, 5:]))
    np.testing.assert_allclose(scores[0, :5], np.sort(vectors @ vectors[0])[::-1], rtol=1e-5)

    assert stage1_index.remove_ids(index, np.array([10]))
    assert 10 not in stage1_index.search(index, vectors[:1], 5)[1]

    stage1_index.save_index(index, tmp_path, generation=3)
    stage1_index.save_index(index, tmp_path, generation=4)
    assert [p.name for p in tmp_path.iterdir()] == ["stage1-g000000000004.faiss"]
    assert stage1_index.load_index(tmp_path, 3) is None
    assert stage1_index.load_index(tmp_path, 4).ntotal == 4
    with pytest.raises(ValueError, match="dimension 3"):
        stage1_index.search(index, np.zeros((1, 3), np.float32), 1)
