"""Region codes written at indexing time (indexer.code_store): read at open, never recomputed from every map."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from encoders import create_model
from indexer import Library, code_store
from indexer.code_store import CODE_BYTES, CodeFile
from indexer.feature_store import FeatureStore


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def scene_like_maps(model, count: int, first: int) -> tuple[list, np.ndarray, np.ndarray]:
    """``count`` add_embedded records and maps, numbered from ``first``: a few shared 'objects' placed
    at random regions over a smooth background, so the maps have the structure a codec learns."""
    rows, cols = model.image_grid
    dim = model.embed_dim
    objects = np.random.default_rng(7).standard_normal((12, dim)).astype(np.float32)
    rng = np.random.default_rng(first)
    maps = 0.3 * rng.standard_normal((count, rows * cols, dim)).astype(np.float32)
    for m in maps:
        for region in rng.integers(0, rows * cols, 3):
            m[region] += 2.0 * objects[rng.integers(len(objects))]
    records = [(f"img-{first + i}.png", hashlib.sha256(f"{first + i}".encode()).hexdigest(), 64, 64)
               for i in range(count)]
    maps16 = maps.astype(np.float16)
    return records, maps16, maps16.astype(np.float32).mean(axis=1)


def add(library: Library, model, count: int, first: int) -> None:
    library.add_embedded("c", model, [scene_like_maps(model, count, first)], progress=False)


def expected_records(coll, encode) -> np.ndarray:
    """What ``encode`` (a codec's encode, centroids' assign) makes of every map of ``coll``, in id order."""
    return np.concatenate([encode(maps) for _, maps in coll.iter_feature_maps()])


def test_indexing_writes_codes_that_open_reads_without_reading_a_map(tmp_path, model, monkeypatch):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 40, 0)
        coll = library.collection("c")
        files = CodeFile(coll.store.folder)
        meta = files.meta()
        assert meta is not None and meta["trained_on"] == 40 and files.rows(meta) == 40
        assert files.bytes_on_disk() > 40 * CODE_BYTES
        codec = files.codec(meta)
        want = expected_records(coll, codec.encode)

        def no_map_reads(*args, **kwargs):
            raise AssertionError("opening read a feature map although every image has written codes")

        assert meta["regions"] == 64 and 1 < meta["centroids"] <= 1024
        want_ids = expected_records(coll, files.centroids(meta).assign)
        assert len(np.unique(want_ids)) > 1

        monkeypatch.setattr(FeatureStore, "read_maps", no_map_reads)
        codec_read, codes = library.collection("c").region_codes()
        np.testing.assert_array_equal(codes, want)  # in id order, as ResidentCodes holds them
        assert codes.shape == (40, CODE_BYTES)
        centroids, region_ids = library.collection("c").held_region_centroid_ids()
        np.testing.assert_array_equal(region_ids, centroids.distinct_first(want_ids))  # in id order, as positions_of counts
        np.testing.assert_array_equal(centroids.centroids, files.centroids(meta).centroids)


@pytest.mark.parametrize("part", ["codes", "region_ids"])
def test_a_torn_tail_is_coded_in_memory_at_open_and_completed_by_the_next_index_run(tmp_path, model, part):
    """A crash while appending leaves 20 whole records and part of one in one file (the codes, or the
    region ids written after them): the missing slots are made in memory at open, the next run completes them."""
    def made(coll, meta):  # every map's records of this part, as the set's codec or centroids make them
        return expected_records(coll, files.codec(meta).encode if part == "codes" else files.centroids(meta).assign)

    def read_at_open(coll):
        return coll.region_codes()[1] if part == "codes" else coll.region_centroid_ids()[1]

    with Library.open(tmp_path, create=True) as library:
        add(library, model, 30, 0)
        coll = library.collection("c")
        files = CodeFile(coll.store.folder)
        meta = files.meta()
        want = made(coll, meta)
        path, record, _, _ = files._part(meta, part)
        with open(path, "r+b") as f:
            f.truncate(20 * record + 7)
        assert files.rows(meta) == 20
        np.testing.assert_array_equal(read_at_open(library.collection("c")), want)
        add(library, model, 5, 1000)  # grows by less than double: same set, the tail and the new slots coded
        after = files.meta()
        assert after["tag"] == meta["tag"] and files.rows(after) == 35
        np.testing.assert_array_equal(files.read(after, np.arange(35), part), made(library.collection("c"), after))


def test_the_codec_is_trained_again_when_the_collection_doubles_and_old_files_go(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 20, 0)
        folder = library.collection("c").store.folder
        first = CodeFile(folder).meta()
        add(library, model, 10, 500)  # 30 < 2 x 20: kept
        assert CodeFile(folder).meta()["tag"] == first["tag"]
        add(library, model, 15, 900)  # 45 >= 2 x 20: trained again on maps spread over all 45
        second = CodeFile(folder).meta()
        assert second["tag"] != first["tag"] and second["trained_on"] == 45
        assert sorted(p.name for p in folder.glob("*") if p.name.startswith(("code", "centroids", "regions"))) == sorted(
            ["codes.json", f"codec-{second['tag']}.npz", f"codes-{second['tag']}.u8",
             f"centroids-{second['tag']}.npz", f"regions-{second['tag']}.u16"]), "the old set's files go"
        coll = library.collection("c")
        np.testing.assert_array_equal(coll.region_codes()[1], expected_records(coll, CodeFile(folder).codec(second).encode))


def test_compaction_writes_codes_for_the_new_store(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 24, 0)
        coll = library.collection("c")
        old_folder = coll.store.folder
        ids = coll.ids()
        coll.remove_images(ids[::3].tolist() + ids[1::3].tolist())  # two thirds: compacts
        coll = library.collection("c")
        assert coll.store.folder != old_folder and not old_folder.exists()
        files = CodeFile(coll.store.folder)
        meta = files.meta()
        assert meta is not None and files.rows(meta) == coll.size == 8
        np.testing.assert_array_equal(coll.region_codes()[1], expected_records(coll, files.codec(meta).encode))


def test_a_collection_without_written_codes_is_coded_at_open(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 12, 0)
        coll = library.collection("c")
        for path in coll.store.folder.glob("code*"):
            path.unlink()  # as a collection indexed before codes existed
        codec, codes = library.collection("c").region_codes()
        np.testing.assert_array_equal(codes, expected_records(coll, codec.encode))
        assert not list(coll.store.folder.glob("code*")), "a reader writes nothing"


def test_spread_takes_distinct_positions_across_the_whole_range():
    assert code_store.spread(5, 1024).tolist() == [0, 1, 2, 3, 4]
    picks = code_store.spread(10_000, 1024)
    assert len(picks) == 1024 and picks[0] == 0 and picks[-1] == 9_999 and np.all(np.diff(picks) > 0)


def test_codes_follow_each_image_to_its_slot_across_holes(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 20, 0)
        coll = library.collection("c")
        coll.remove_images(coll.ids()[[0, 3, 4, 11]].tolist())  # holes, too few to compact
        coll = library.collection("c")
        assert coll.size == 16
        files = CodeFile(coll.store.folder)
        np.testing.assert_array_equal(coll.region_codes()[1], expected_records(coll, files.codec(files.meta()).encode))


@pytest.mark.parametrize("which", ["one run", "a run with holes", "sparse", "shuffled", "one slot"])
def test_codes_are_read_for_any_slots_in_the_order_asked(tmp_path, monkeypatch, which):
    """CodeFile.read reads dense windows sequentially and gathers sparse ones through a memory map:
    either way each asked slot gets its own record, in the order asked."""
    monkeypatch.setattr(code_store, "READ_WINDOW_ROWS", 64)  # several windows, dense and sparse ones
    rows = 1000
    records = np.random.default_rng(3).integers(0, 256, (rows, CODE_BYTES), dtype=np.uint8)
    region_ids = np.random.default_rng(5).integers(0, 1024, (rows, 64), dtype=np.uint16)
    files = CodeFile(tmp_path)
    meta = {"tag": "t", "trained_on": rows, "code_bytes": CODE_BYTES, "centroids": 1024, "regions": 64}
    files._part(meta, "codes")[0].write_bytes(records.tobytes())
    files._part(meta, "region_ids")[0].write_bytes(region_ids.tobytes())
    rng = np.random.default_rng(4)
    slots = {"one run": np.arange(100, 900),
             "a run with holes": np.setdiff1d(np.arange(rows), rng.choice(rows, 150, replace=False)),
             "sparse": np.sort(rng.choice(rows, 40, replace=False)),
             "shuffled": rng.permutation(rows)[:700],
             "one slot": np.array([999])}[which]
    assert np.array_equal(files.read(meta, slots), records[slots])
    assert np.array_equal(files.read(meta, slots, "region_ids"), region_ids[slots])
    with pytest.raises(ValueError, match="codes cover slots 0..999"):
        files.read(meta, np.array([5, rows]))


def test_a_set_written_before_centroids_keeps_serving_codes_and_the_next_run_adds_them(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 20, 0)
        folder = library.collection("c").store.folder
        files = CodeFile(folder)
        meta = files.meta()
        for path in [*folder.glob("centroids-*"), *folder.glob("regions-*")]:
            path.unlink()
        old = {k: meta[k] for k in ("tag", "trained_on", "code_bytes")}  # as the previous version wrote it
        (folder / "codes.json").write_text(json.dumps(old))
        coll = library.collection("c")
        assert coll.region_centroid_ids() is None and coll.held_region_centroid_ids() is None
        np.testing.assert_array_equal(coll.region_codes()[1], expected_records(coll, files.codec(old).encode))
        add(library, model, 2, 700)  # the next index run writes a whole new set, with centroids
        meta = files.meta()
        assert meta["tag"] != old["tag"] and "centroids" in meta and files.rows(meta) == 22
        coll = library.collection("c")
        centroids = files.centroids(meta)
        np.testing.assert_array_equal(coll.held_region_centroid_ids()[1],
                                      centroids.distinct_first(expected_records(coll, centroids.assign)))


def test_an_appended_snapshot_extends_the_held_region_ids(tmp_path, model):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 20, 0)
        reader = Library.open(tmp_path)
        coll = reader.collection("c")
        centroids, held = coll.held_region_centroid_ids()
        add(library, model, 6, 300)
        fresh = coll.appended()
        assert fresh is not None and fresh is not coll and fresh.size == 26
        got_centroids, region_ids = fresh.held_region_centroid_ids()
        assert got_centroids is centroids  # the snapshot's own centroids, not the new set's
        np.testing.assert_array_equal(region_ids[:20], held)
        np.testing.assert_array_equal(region_ids[20:], centroids.distinct_first(centroids.assign(
            fresh.feature_maps(fresh.ids()[20:]))))
        reader.close()


def test_unreadable_centroids_leave_stage1_unwidened_and_say_so(tmp_path, model, caplog):
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 12, 0)
        folder = library.collection("c").store.folder
        for path in folder.glob("centroids-*.npz"):
            path.write_bytes(b"not an npz file")
        coll = library.collection("c")
        assert coll.held_region_centroid_ids() is None
        assert "region centroids could not be read" in caplog.text
        np.testing.assert_array_equal(coll.region_codes()[1], expected_records(coll, CodeFile(folder).codec(
            CodeFile(folder).meta()).encode))  # the codes still serve


@pytest.mark.parametrize("lookup", ["table", "binary search"])
def test_positions_of_counts_in_id_order_across_holes_and_appends(tmp_path, model, monkeypatch, lookup):
    """Stage 1 and the held maps find an image's row by ``positions_of``: its place among the indexed ids
    in ascending order. Dense ids use one lookup table, sparse ones a binary search; both must agree
    with ``ids()`` after removals and after images appended to a live snapshot, and name missing ids."""
    if lookup == "binary search":
        monkeypatch.setattr("indexer.library.POSITION_TABLE_SPAN", -10**9)  # never dense enough
    with Library.open(tmp_path, create=True) as library:
        add(library, model, 30, 0)
        coll = library.collection("c")
        first = coll.ids()
        np.testing.assert_array_equal(coll.positions_of(first[[29, 0, 7]]), [29, 0, 7])
        coll.remove_images(first[[0, 5, 6, 29]].tolist())  # holes at both ends and inside
        for snapshot in (coll, library.collection("c")):  # the remover's own table and a fresh one
            ids = snapshot.ids()
            assert len(ids) == 26
            shuffled = np.random.default_rng(1).permutation(ids)
            np.testing.assert_array_equal(ids[snapshot.positions_of(shuffled)], shuffled)
        add(library, model, 5, 30)
        grown = snapshot.appended()
        assert grown is not None and grown.size == 31
        new_ids = grown.ids()
        np.testing.assert_array_equal(grown.positions_of(new_ids[::-1]), np.arange(31)[::-1])
        for missing in (int(first[0]), int(first[5]), int(new_ids[-1]) + 1, 10**12, -7):
            with pytest.raises(KeyError, match=str(missing)):
                grown.positions_of([int(new_ids[0]), missing])
