"""The indexer end to end: real image files, a tiny model from a checkpoint, SQLite and PostgreSQL catalogs.

PostgreSQL runs when MATCHMAP_TEST_PG_URL is set (each test in its own schema, dropped after); it is
skipped only when the variable is absent, and a set but unreachable server fails the test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from encoders import create_model, pair_score, pool_audio, save_checkpoint, score_matrix
from indexer import (
    CollectionNotFound,
    Library,
    ModelMismatchError,
    PathsError,
    Shard,
)
from matchmap.cli import main as cli_main

PG_ENV = "MATCHMAP_TEST_PG_URL"
N_IMAGES = 24
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- real inputs -----------------------------------------------------------------------------------
def draw_scene(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A distinct little picture: a colored background with a few colored shapes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        box = (x0, y0, x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40)))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return image


def write_images(folder: Path, count: int, first_seed: int = 0) -> list[Path]:
    """``count`` PNGs named img-SEED.png (sorted = seed order)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(first_seed, first_seed + count):
        path = folder / f"img-{seed:04d}.png"
        draw_scene(seed).save(path)
        paths.append(path)
    return paths


def write_bad_files(folder: Path) -> dict[str, Path]:
    """A corrupt, a truncated and a non-image file, all with image extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    whole = folder / "whole.png"
    draw_scene(999).save(whole)
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:300])
    whole.unlink()
    text_file = folder / "notes.png"
    text_file.write_text("this is not a picture\n")
    return {"corrupt": corrupt, "truncated": truncated, "not_image": text_file}


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("photos") / "photos", N_IMAGES)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (the SQLite default) or a PostgreSQL URL confined to a fresh schema."""
    if request.param == "sqlite":
        yield None
        return
    url = os.environ.get(PG_ENV)
    if url is None:
        pytest.skip(f"{PG_ENV} is not set")
    engine = create_engine(url)
    schema = f"matchmap_test_{uuid.uuid4().hex[:12]}"
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        pytest.fail(f"{PG_ENV} is set but PostgreSQL cannot be reached: {exc}")
    try:
        yield (
            make_url(url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def library(tmp_path, db_url):
    with Library.open(tmp_path / "data", db_url, create=True) as opened:
        yield opened


def all_ids(collection) -> np.ndarray:
    """Every indexed id, through stage-1 search with k = size."""
    _, ids = collection.search_stage1(np.ones((1, collection.embed_dim), np.float32), max(collection.size, 1))
    return np.sort(ids[0][ids[0] >= 0])


def maps_by_uri(collection) -> dict[str, np.ndarray]:
    ids = all_ids(collection)
    return {r.uri: m for r, m in zip(collection.images(ids), collection.feature_maps(ids), strict=True)}


def ranked_uris(collection, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    scores, ids = collection.search_stage1(queries, k)
    out = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        valid = row_ids >= 0
        records = collection.images(row_ids[valid])
        out.append([(r.uri, round(float(s), 4)) for r, s in zip(records, row_scores[valid], strict=True)])
    return out


# -- catalog-backed behaviour, on SQLite and PostgreSQL ----------------------------------------------
def test_index_search_and_fetch(library, model, images):
    report = library.index("photos", [str(images[0].parent)], model, batch_size=5, progress=False)
    assert (report.added, report.skipped_duplicates, report.failed) == (N_IMAGES, 0, [])

    [info] = library.list_collections()
    assert (info.name, info.images, info.failed) == ("photos", N_IMAGES, 0)
    assert (info.model_name, info.model_version) == (model.config.name, model.version)
    assert info.index_type == "flat" and info.embed_dim == model.config.embed_dim
    assert info.grid == model.image_grid and info.bytes > 0

    collection = library.collection("photos")
    rows, cols = model.image_grid
    ids = all_ids(collection)
    assert len(ids) == N_IMAGES == collection.size
    records = collection.images(ids[::-1])
    assert [r.id for r in records] == list(ids[::-1])
    assert {r.uri for r in records} == {str(p) for p in images}
    assert all(
        r.status == "indexed" and (r.width, r.height) == (96, 80) and len(r.content_hash) == 64
        for r in records
    )

    maps = collection.feature_maps(ids[:5])
    assert maps.shape == (5, rows * cols, model.config.embed_dim) and maps.dtype == np.float16
    # The stored maps are what the model computes for these files.
    by_uri = dict(zip((r.uri for r in collection.images(ids[:5])), maps, strict=True))
    for uri, stored in by_uri.items():
        from encoders import load_image

        with torch.inference_mode():
            fresh = model.encode_images(model.image_frontend(load_image(uri))[None])[0]
        np.testing.assert_allclose(
            stored.astype(np.float32), fresh.reshape(rows * cols, -1).numpy(), atol=2e-3, rtol=2e-3
        )

    with pytest.raises(KeyError, match="no indexed images"):
        collection.feature_maps([-1])
    with pytest.raises(ValueError, match="queries must be"):
        collection.search_stage1(np.zeros((2, 3), np.float32), 3)


def test_stage1_scores_equal_sisa_of_stored_maps(library, model, images):
    library.index("photos", [str(p) for p in images], model, progress=False)
    collection = library.collection("photos")
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 12, collection.embed_dim, generator=generator)
    lengths = torch.tensor([12, 7, 3])
    queries = pool_audio(audio, lengths).numpy()

    scores, ids = collection.search_stage1(queries, collection.size)
    stored = torch.from_numpy(collection.feature_maps(ids[0]).astype(np.float32))  # ranked for query 0
    sisa = score_matrix(audio, lengths, stored, kinds=("sisa",))["sisa"]
    np.testing.assert_allclose(scores[0], sisa[0].numpy(), rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(scores[0]) <= 1e-6)  # ranked best first
    # ...and SISA as the plain definition (mean of the matchmap) for a few pairs of every query.
    for q in range(3):
        top = torch.from_numpy(collection.feature_maps(ids[q][:3]).astype(np.float32))
        for j in range(3):
            expected = pair_score(top[j], audio[q, : lengths[q]], "sisa")
            assert scores[q][j] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_incremental_add_and_duplicates(library, model, images, tmp_path, db_url):
    first = library.index("photos", [str(p) for p in images[:10]], model, batch_size=4, progress=False)
    assert (first.added, first.skipped_duplicates) == (10, 0)
    before = maps_by_uri(library.collection("photos"))

    copy = tmp_path / "copy-of-first.png"
    shutil.copy(images[0], copy)
    second = library.index("photos", [str(images[0].parent), str(copy)], model, batch_size=4, progress=False)
    assert (second.added, second.skipped_duplicates, second.failed) == (N_IMAGES - 10, 11, [])
    assert (second.unchanged, second.duplicates) == (10, [(str(copy), str(images[0]))])

    again = library.index("photos", [str(images[0].parent)], model, progress=False)
    assert (again.added, again.skipped_duplicates, again.unchanged, again.duplicates) == (0, N_IMAGES, N_IMAGES, [])

    collection = library.collection("photos")
    assert collection.size == N_IMAGES
    after = maps_by_uri(collection)
    assert str(copy) not in after  # same content as an indexed image: not indexed twice
    for uri, stored in before.items():
        np.testing.assert_array_equal(after[uri], stored)  # earlier images were not re-embedded or moved

    # Incremental results equal a one-shot build of the same images.
    with Library.open(tmp_path / "one-shot", db_url, create=True) as other:
        other.index("all-at-once", [str(images[0].parent)], model, progress=False)
        queries = np.random.default_rng(0).standard_normal((4, collection.embed_dim)).astype(np.float32)
        assert ranked_uris(collection, queries, 8) == ranked_uris(other.collection("all-at-once"), queries, 8)


def test_a_file_that_became_a_copy_of_another_loses_its_old_entry(library, model, tmp_path):
    folder = tmp_path / "changing"
    paths = write_images(folder, 3)
    library.index("c", [str(folder)], model, progress=False)
    shutil.copy(paths[0], paths[2])  # img-2 now shows img-0's picture
    report = library.index("c", [str(folder)], model, progress=False)
    assert (report.added, report.replaced, report.unchanged) == (0, 1, 2)
    assert report.duplicates == [(str(paths[2]), str(paths[0]))]
    collection = library.collection("c")
    assert sorted(r.uri for r in collection.images(all_ids(collection))) == [str(paths[0]), str(paths[1])]


def test_cli_names_copies_at_other_paths_and_gives_them_no_entry(tmp_path, checkpoint, images):
    second_folder = tmp_path / "backup"
    second_folder.mkdir()
    for path in images[:3]:
        shutil.copy(path, second_folder / path.name)
    base = ["index", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(checkpoint), "-q", "--collection", "c"]
    code, out, err = run_cli(*base, str(images[0]), str(images[1]), str(second_folder))
    assert code == 0, err
    assert "added 3 images" in out and "0 already indexed, 2 copies of indexed images skipped" in out
    assert f"copy: {second_folder / images[2].name}" not in err  # new content: indexed, not a copy
    for path in images[:2]:
        assert f"copy: {second_folder / path.name} has the same content as {path}; not indexed again" in err
    code, out, err = run_cli(*base, "--json", str(second_folder), str(images[0]))
    report = json.loads(out)
    assert (report["added"], report["skipped_duplicates"], report["unchanged"], report["images"]) == (0, 4, 2, 3)
    assert report["duplicates"] == [{"path": str(second_folder / p.name), "duplicate_of": str(p)} for p in images[:2]]
    assert err == ""


def test_changed_file_replaces_its_old_version(library, model, tmp_path):
    folder = tmp_path / "changing"
    paths = write_images(folder, 4)
    library.index("c", [str(folder)], model, progress=False)
    draw_scene(1234).save(paths[1])
    report = library.index("c", [str(folder)], model, progress=False)
    assert (report.added, report.replaced, report.skipped_duplicates) == (1, 1, 3)
    collection = library.collection("c")
    records = collection.images(all_ids(collection))
    assert sorted(r.uri for r in records) == sorted(str(p) for p in paths)


def test_bad_files_are_reported_recorded_and_do_not_stop_the_run(library, model, tmp_path):
    folder = tmp_path / "mixed"
    good = write_images(folder, 6)
    bad = write_bad_files(folder)
    report = library.index("mixed", [str(folder)], model, batch_size=4, progress=False)
    assert report.added == len(good)
    failed = dict(report.failed)
    assert set(failed) == {str(p) for p in bad.values()}
    assert "truncated" in failed[str(bad["truncated"])]
    assert "not a recognized image format" in failed[str(bad["not_image"])]
    assert all(str(p) in reason for p, reason in ((p, failed[str(p)]) for p in bad.values()))

    collection = library.collection("mixed")
    [info] = library.list_collections()
    assert (info.images, info.failed) == (6, 3)
    by_uri = collection.ids_for_uris([str(p) for p in bad.values()])
    records = collection.images([ids[0] for ids in by_uri.values()])
    assert {r.status for r in records} == {"failed"} and all(r.error for r in records)

    # Running again reports them again but does not pile up failure rows; a fixed file gets indexed.
    draw_scene(77).save(bad["not_image"])
    again = library.index("mixed", [str(folder)], model, progress=False)
    assert (again.added, again.skipped_duplicates, len(again.failed)) == (1, 6, 2)
    [info] = library.list_collections()
    assert (info.images, info.failed) == (7, 2)


def test_remove_images_keeps_index_store_and_catalog_consistent(library, model, images, tmp_path):
    library.index("photos", [str(images[0].parent)], model, batch_size=8, progress=False)
    collection = library.collection("photos")
    ids = all_ids(collection)
    kept_maps = dict(zip(ids[3:].tolist(), collection.feature_maps(ids[3:]), strict=True))

    assert collection.remove_images(ids[:3].tolist() + [10**9]) == 3
    assert collection.size == N_IMAGES - 3
    assert set(all_ids(collection)) == set(ids[3:])
    with pytest.raises(KeyError):
        collection.images(ids[:1])
    reopened = library.collection("photos")  # from the catalog and the saved stage-1 file
    assert set(all_ids(reopened)) == set(ids[3:])
    [info] = library.list_collections()
    assert info.images == N_IMAGES - 3

    # Removing more than half of the slots compacts the store: fewer bytes, same maps for the rest.
    store_before = reopened.store.bytes_on_disk()
    assert reopened.remove_images(ids[3:15].tolist()) == 12
    assert reopened.store.bytes_on_disk() < store_before
    for collection_view in (reopened, library.collection("photos")):
        remaining = all_ids(collection_view)
        assert set(remaining) == set(ids[15:])
        for image_id, stored in zip(remaining, collection_view.feature_maps(remaining), strict=True):
            np.testing.assert_array_equal(stored, kept_maps[int(image_id)])
    folders = [p.name for p in reopened.folder.iterdir() if p.is_dir()]
    assert folders == [reopened.store.folder.name]  # the old store is gone

    # Images can be added after a compaction; removed content can come back.
    report = library.index("photos", [str(images[0].parent)], model, progress=False)
    assert (report.added, report.skipped_duplicates) == (15, N_IMAGES - 15)
    assert library.collection("photos").size == N_IMAGES


def test_stage1_file_is_derived_and_rebuilt_when_missing_or_torn(library, model, images):
    library.index("photos", [str(images[0].parent)], model, progress=False)
    queries = np.random.default_rng(5).standard_normal((3, model.config.embed_dim)).astype(np.float32)
    collection = library.collection("photos")
    expected = ranked_uris(collection, queries, 10)
    [stage1_file] = collection.folder.glob("stage1-g*.faiss")
    assert stage1_file.name.endswith(f"{collection.generation:012d}.faiss")

    stage1_file.write_bytes(stage1_file.read_bytes()[:100])  # torn
    assert ranked_uris(library.collection("photos"), queries, 10) == expected
    stage1_file.unlink()  # gone
    assert ranked_uris(library.collection("photos"), queries, 10) == expected


def test_a_catalog_made_before_migrations_is_upgraded_in_place_and_keeps_its_rows(tmp_path, db_url, model, images,
                                                                                   caplog):
    """A catalog with the schema of before Alembic (revision 0001, no alembic_version table), as the
    code of then left it, opens under today's code: stamped 0001, upgraded to the newest revision in
    place, with every collection, image row and search result it had."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from indexer.catalog import MIGRATIONS

    data = tmp_path / "data"
    with Library.open(data, db_url, create=True) as library:
        library.index("old", [str(p) for p in images[:6]], model, progress=False)
        url = db_url or library.db_url
        before = library.collection("old")
        expected = (sorted(all_ids(before).tolist()), [r.uri for r in before.images(all_ids(before))],
                    ranked_uris(before, np.ones((2, before.embed_dim), np.float32), 4))
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:  # back to the schema of before migrations, as it was made then
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
        connection.execute(text("DROP TABLE alembic_version"))
    with engine.connect() as connection:
        assert "ix_images_live_slots" not in {i["name"] for i in inspect(connection).get_indexes("images")}

    caplog.set_level(logging.INFO)
    with Library.open(data, db_url) as library:
        [info] = library.list_collections()
        assert (info.name, info.images) == ("old", 6)
        # one line says so, and Alembic's per-open chatter (plugins, DDL mode) stays out of the log
        assert [r.getMessage() for r in caplog.records if "upgraded" in r.getMessage()] == [
            f"catalog schema upgraded in place from revision 0001 to {newest_revision()}"]
        assert not [r for r in caplog.records if r.name.startswith("alembic") and r.levelno < logging.WARNING]
        after = library.collection("old")
        assert (sorted(all_ids(after).tolist()), [r.uri for r in after.images(all_ids(after))],
                ranked_uris(after, np.ones((2, after.embed_dim), np.float32), 4)) == expected
        library.index("old", [str(p) for p in images[6:8]], model, progress=False)  # and it takes new images
        assert library.collection("old").size == 8
    with engine.connect() as connection:
        assert "ix_images_live_slots" in {i["name"] for i in inspect(connection).get_indexes("images")}
        heads = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert heads == [newest_revision()]
    engine.dispose()


def newest_revision() -> str:
    from indexer.catalog import MIGRATIONS

    return sorted(p.name for p in (MIGRATIONS / "versions").glob("0*.py"))[-1].split("_")[0]


def test_remove_collection(library, model, images):
    library.index("a", [str(images[0])], model, progress=False)
    library.index("b", [str(images[1])], model, progress=False)
    folder = library.collection("a").folder
    library.remove_collection("a")
    assert [i.name for i in library.list_collections()] == ["b"]
    assert not folder.exists()
    with pytest.raises(CollectionNotFound, match="'a'.*collections: 'b'"):
        library.collection("a")
    with pytest.raises(CollectionNotFound):
        library.remove_collection("a")


def test_ivf_is_chosen_above_the_threshold_and_recorded(library, model, images):
    library.index("big", [str(p) for p in images[:8]], model, flat_threshold=12, progress=False)
    assert library.collection("big").index_type == "flat"
    library.index("big", [str(images[0].parent)], model, progress=False)  # grows past the threshold
    [info] = library.list_collections()
    assert info.index_type == "ivf"
    params = info.index_params
    assert params["nlist"] >= 1 and 1 <= params["nprobe"] <= params["nlist"]
    assert params["trained_on"] == N_IMAGES and params["recall_at_k"] >= params["target_recall"] == 0.95
    collection = library.collection("big")
    assert (collection.index_type, collection.index_params) == ("ivf", params)
    query = np.random.default_rng(1).standard_normal((1, collection.embed_dim)).astype(np.float32)
    scores, ids = collection.search_stage1(query, 5)
    assert len(set(ids[0])) == 5 and np.all(ids[0] >= 0)
    collection.remove_images(ids[0][:2].tolist())
    remaining = library.collection("big")
    assert remaining.index_type == "ivf" and not set(ids[0][:2]) & set(all_ids(remaining))
    assert remaining.size == N_IMAGES - 2

    # A type pinned on a new, small collection is built as asked.
    library.index("pinned", [str(p) for p in images[:3]], model, index_type="ivf", progress=False)
    pinned = library.collection("pinned")
    assert pinned.index_type == "ivf" and pinned.index_params["nlist"] == 1
    assert set(all_ids(pinned)) == set(pinned.known_ids(all_ids(pinned)))

    # An explicit override pins the type; HNSW supports removal by rebuilding.
    library.index("big", [str(images[0].parent)], model, index_type="hnsw", progress=False)
    collection = library.collection("big")
    assert collection.index_type == "hnsw" and collection.index_params["efSearch"] >= 16
    removed = all_ids(collection)[:2]
    collection.remove_images(removed.tolist())
    assert not set(removed) & set(all_ids(library.collection("big")))


def test_model_mismatch_is_refused(library, model, images):
    library.index("photos", [str(images[0])], model, progress=False)
    torch.manual_seed(1)
    other = create_model("tiny")
    assert other.version != model.version
    collection = library.collection("photos")
    collection.check_model(model)
    with pytest.raises(
        ModelMismatchError, match=rf"indexed with model tiny \(weights {model.version}\).*{other.version}"
    ):
        collection.check_model(other)
    with pytest.raises(ModelMismatchError):
        library.index("photos", [str(images[1])], other, progress=False)
    assert library.collection("photos").size == 1


def test_paths_that_name_nothing_are_errors(library, model, tmp_path):
    with pytest.raises(PathsError, match="no such file"):
        library.index("x", [str(tmp_path / "missing")], model, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PathsError, match="no image files"):
        library.index("x", [str(tmp_path / "empty")], model, progress=False)
    with pytest.raises(PathsError, match="matches no image"):
        library.index("x", [str(tmp_path / "*.png")], model, progress=False)
    assert library.list_collections() == []


def test_image_formats_and_globs(library, model, tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    for seed, ext in enumerate(["jpg", "jpeg", "webp", "bmp", "gif", "tiff", "PNG"]):
        draw_scene(seed).save(folder / f"pic{seed}.{ext}")
    (folder / "readme.txt").write_text("skipped: not an image extension")
    report = library.index("formats", [str(folder / "*")], model, progress=False)
    assert (report.added, report.failed) == (7, [])


def test_places_manifest_as_input(library, model, images, tmp_path):
    # A real Places-format manifest: base paths relative to the file, one entry per caption.
    entries = [
        {"wav": f"{i}.wav", "image": p.name, "uttid": f"u{i}", "speaker": "s", "asr_text": "a red circle"}
        for i, p in enumerate([*images[:5], images[0]])  # two captions of one image
    ]
    entries.append({"wav": "x.wav", "image": "gone.png", "uttid": "ux", "speaker": "s", "asr_text": "lost"})
    manifest = tmp_path / "val.json"
    manifest.write_text(
        json.dumps({"image_base_path": str(images[0].parent), "audio_base_path": "wavs", "data": entries})
    )
    report = library.index("manifest", [str(manifest)], model, progress=False)
    assert report.added == 5 and report.skipped_duplicates == 0
    [(path, reason)] = report.failed
    assert path == str(images[0].parent / "gone.png") and "No such file" in reason
    with pytest.raises(PathsError, match="not a usable Places-format manifest"):
        (tmp_path / "other.json").write_text('{"data": 3}')
        library.index("manifest", [str(tmp_path / "other.json")], model, progress=False)


# -- the command line -----------------------------------------------------------------------------
def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_index_collections_remove_json_and_exit_codes(tmp_path, checkpoint, images):
    data = str(tmp_path / "data")
    good = ["--data-dir", data, "--checkpoint", str(checkpoint), "--no-progress"]
    code, out, err = run_cli("index", *good, "--collection", "c", "--json", *[str(p) for p in images[:5]])
    assert code == 0, err
    report = json.loads(out)
    assert (report["added"], report["skipped_duplicates"], report["failed"], report["images"]) == (
        5,
        0,
        [],
        5,
    )

    bad = write_bad_files(tmp_path / "bad")
    code, out, err = run_cli(
        "index", *good, "--collection", "c", "--json", str(images[0].parent), str(tmp_path / "bad")
    )
    assert code == 1
    report = json.loads(out)
    assert report["added"] == N_IMAGES - 5 and report["skipped_duplicates"] == 5
    assert {f["path"] for f in report["failed"]} == {str(p) for p in bad.values()}
    assert all(f["reason"] for f in report["failed"])
    for path in bad.values():
        assert f"failed: {path}: " in err

    code, out, err = run_cli("collections", "--data-dir", data, "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert {"name", "images", "failed", "model", "bytes"} <= set(listed)
    assert (listed["name"], listed["images"], listed["failed"], listed["model"]) == ("c", N_IMAGES, 3, "tiny")
    assert listed["bytes"] > 0
    code, out, _ = run_cli("collections", "--data-dir", data)
    assert code == 0 and "c " in out and str(N_IMAGES) in out

    code, out, err = run_cli(
        "remove", "--data-dir", data, "--collection", "c", "--json", str(images[0]), "no-such.png"
    )
    assert code == 1 and json.loads(out) == {"collection": "c", "removed": 1, "not_found": ["no-such.png"]}
    assert "no-such.png" in err
    code, out, _ = run_cli("remove", "--data-dir", data, "--collection", "c")
    assert code == 0
    code, out, _ = run_cli("collections", "--data-dir", data, "--json")
    assert json.loads(out) == []


def test_cli_fatal_errors_exit_2(tmp_path, checkpoint, images):
    data = str(tmp_path / "data")
    base = ["--data-dir", data, "--checkpoint", str(checkpoint), "--no-progress"]
    code, _, err = run_cli("index", *base, "--collection", "c", str(tmp_path / "nothing-here"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = run_cli("index", *base, str(images[0]))  # --collection missing
    assert code == 2
    assert run_cli("index", *base, "--collection", "c", str(images[0]))[0] == 0
    code, _, err = run_cli("remove", "--data-dir", data, "--collection", "absent")
    assert code == 2 and "no collection named 'absent'" in err
    torch.manual_seed(2)
    other = tmp_path / "other.pt"
    save_checkpoint(other, create_model("tiny"))
    code, _, err = run_cli(
        "index", "--data-dir", data, "--checkpoint", str(other), "--collection", "c", str(images[1])
    )
    assert code == 2 and "indexed with model" in err
    for command in ("index", "collections", "remove"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "Exit codes:" in out


# -- crash safety ---------------------------------------------------------------------------------
def kill_once_indexed(process: subprocess.Popen, data_dir: Path, db_url: str | None, collection: str, *,
                      at_least: int, timeout: float = 180) -> int:
    """SIGKILL ``process`` (a `matchmap index` run) once ``collection`` holds ``at_least`` images; their count."""
    indexed_at_kill = 0
    with Library.open(data_dir, db_url, create=True) as watcher:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            infos = [i for i in watcher.list_collections() if i.name == collection]
            if infos and infos[0].images >= at_least:
                process.send_signal(signal.SIGKILL)
                indexed_at_kill = infos[0].images
                break
            time.sleep(0.005)
    process.wait(timeout=60)
    stderr = process.stderr.read() if process.stderr else b""
    assert process.returncode == -signal.SIGKILL, f"the indexer ended before it could be killed: {stderr!r}"
    return indexed_at_kill


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, checkpoint, db_url):
    folder = tmp_path / "many"
    write_images(folder, 160)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(data: Path, collection: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "matchmap",
            "index",
            "--data-dir",
            str(data),
            "--checkpoint",
            str(checkpoint),
        ]
        if db_url:
            cmd += ["--db", db_url]
        return [*cmd, "--collection", collection, "--batch-size", "2", "--no-progress", "--json", str(folder)]

    crashed_dir, clean_dir = tmp_path / "crashed", tmp_path / "clean"
    process = subprocess.Popen(
        command(crashed_dir, "crashed"),
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    indexed_at_kill = kill_once_indexed(process, crashed_dir, db_url, "crashed", at_least=20)
    assert 20 <= indexed_at_kill < 160

    resumed = subprocess.run(
        command(crashed_dir, "crashed"), env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["images"] == 160 and report["added"] + report["skipped_duplicates"] == 160
    assert report["skipped_duplicates"] >= indexed_at_kill
    clean = subprocess.run(
        command(clean_dir, "clean"), env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr

    queries = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    with Library.open(crashed_dir, db_url) as crashed, Library.open(clean_dir, db_url) as uninterrupted:
        a, b = crashed.collection("crashed"), uninterrupted.collection("clean")
        assert a.size == b.size == 160
        records = a.images(all_ids(a))
        assert len({r.content_hash for r in records}) == 160  # nothing duplicated, nothing lost
        assert ranked_uris(a, queries, 20) == ranked_uris(b, queries, 20)
        maps_a, maps_b = maps_by_uri(a), maps_by_uri(b)
        assert maps_a.keys() == maps_b.keys()
        for uri in maps_a:
            np.testing.assert_array_equal(maps_a[uri], maps_b[uri])


def test_add_embedded_stores_maps_made_elsewhere_like_index_does(library, model, images, tmp_path):
    """Images embedded elsewhere (other workers, a scaled bench) land as index() would put them: the
    same maps and stage-1 vectors, searchable, durable across a reopen; known contents are skipped and a
    batch whose arrays do not fit the model is refused before anything is written."""
    from indexer.ingest import embed_images, image_decoder

    decode = image_decoder(model)
    pixels = [decode(p.read_bytes(), str(p))[0] for p in images[:6]]
    maps, pooled = embed_images(model, pixels)
    records = [(f"remote://{i}", f"{i:064x}", 96, 80) for i in range(6)]
    report = library.add_embedded("remote", model, [(records[:4], maps[:4], pooled[:4]),
                                                    (records[2:], maps[2:], pooled[2:])], progress=False)
    assert (report.added, report.skipped_duplicates) == (6, 2)

    library.index("local", [str(p) for p in images[:6]], model, progress=False)
    remote, local = library.collection("remote"), library.collection("local")
    assert remote.size == 6 and remote.generation >= 2
    by_uri = maps_by_uri(remote)
    for i in range(6):
        np.testing.assert_array_equal(by_uri[f"remote://{i}"], maps[i])
    # The same images rank the same under both, by the same stage-1 scores.
    queries = pooled[:3]
    remote_ranks = [[(int(u.removeprefix("remote://")), s) for u, s in row] for row in ranked_uris(remote, queries, 6)]
    local_ranks = [[(next(i for i, p in enumerate(images[:6]) if str(p) == u), s) for u, s in row]
                   for row in ranked_uris(local, queries, 6)]
    assert remote_ranks == local_ranks

    with pytest.raises(ValueError, match="do not fit"):
        library.add_embedded("remote", model, [([("remote://x", "f" * 64, 1, 1)], maps[:2], pooled[:2])],
                             progress=False)
    assert library.collection("remote").size == 6


def test_lookups_by_id_stay_inside_their_collection(library, model, images):
    """uris, images and known_ids answer by primary key (fast), so they must check the collection
    themselves: another collection's ids are unknown here."""
    library.index("a", [str(p) for p in images[:3]], model, progress=False)
    library.index("b", [str(p) for p in images[3:6]], model, progress=False)
    a, b = library.collection("a"), library.collection("b")
    a_ids, b_ids = all_ids(a).tolist(), all_ids(b).tolist()
    assert set(a.uris(a_ids + b_ids)) == set(a_ids)
    assert a.known_ids(a_ids + b_ids) == set(a_ids)
    assert [r.uri for r in a.images(a_ids)] == [str(p) for p in images[:3]]
    with pytest.raises(KeyError, match="has no images with ids"):
        a.images(b_ids[:1])


def test_shards_partition_a_collection_and_follow_it_as_it_grows(library, model, images):
    """``serve --ray`` opens a collection as shards: each holds the images whose id is its index
    modulo the count, searches only them, and appends only its own share of images added later."""
    library.index("photos", [str(p) for p in images[:15]], model, batch_size=4, progress=False)
    whole = library.collection("photos")
    shards = [library.collection("photos", Shard(i, 3)) for i in range(3)]
    held = [all_ids(s) for s in shards]
    assert sorted(np.concatenate(held).tolist()) == all_ids(whole).tolist()
    assert all(len(h) and np.all(h % 3 == i) for i, h in enumerate(held))
    assert sum(s.size for s in shards) == whole.size and all(s.generation == whole.generation for s in shards)
    queries = np.random.default_rng(0).standard_normal((2, whole.embed_dim)).astype(np.float32)
    # The best 5 of the whole are the best 5 of the shards' best 5s, with the same scores.
    scores, ids = whole.search_stage1(queries, 5)
    merged = [sorted(((float(sc), int(i)) for s in shards for sc, i in zip(*(a[q] for a in s.search_stage1(
        queries, 5)), strict=True) if i >= 0), reverse=True)[:5] for q in range(2)]
    for q in range(2):
        assert [i for _, i in merged[q]] == ids[q].tolist()
        np.testing.assert_allclose([sc for sc, _ in merged[q]], scores[q], rtol=1e-5)
    some = held[1][:2]
    np.testing.assert_array_equal(shards[1].feature_maps(some), whole.feature_maps(some))
    with pytest.raises(KeyError):
        shards[0].feature_maps(held[1][:1])  # another shard's image is not here

    library.index("photos", [str(p) for p in images[15:]], model, batch_size=4, progress=False)
    grown = [s.appended() for s in shards]
    assert all(g is not None and g is not s for g, s in zip(grown, shards, strict=True))  # appended, not reopened
    regrown = [all_ids(g) for g in grown]
    assert sorted(np.concatenate(regrown).tolist()) == all_ids(library.collection("photos")).tolist()
    assert all(np.all(h % 3 == i) for i, h in enumerate(regrown))
    assert [g.appended() is g for g in grown] == [True] * 3
    with pytest.raises(ValueError, match="shard 3 of 3"):
        Shard(3, 3)
