"""`matchmap index --ray` on a real local Ray cluster of two nodes (ray.cluster_utils.Cluster).

The bar of issue 15: a Ray-indexed collection and one indexed in process hold the same maps and give
the same search results on the same images; killing the driver midway and running it again loses
nothing and indexes nothing twice; a worker killed midway is restarted by Ray and the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_indexer import all_ids, kill_once_indexed, maps_by_uri, ranked_uris, write_bad_files, write_images

from encoders import create_model
from indexer import Library

ray = pytest.importorskip("ray")

from indexer.ray_encode import RayEncoder  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model(checkpoint)


def test_the_ray_indexed_collection_equals_the_one_indexed_in_process(ray_cluster, model, checkpoint, tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 40)
    bad = write_bad_files(folder)
    shutil.copy(folder / "img-0003.png", folder / "copy-of-3.png")

    with Library.open(tmp_path / "local", create=True) as library:
        local_report = library.index("photos", [str(folder)], model, batch_size=4, progress=False)
    encoder = RayEncoder(ray_cluster.address, checkpoint, device="cpu")
    with Library.open(tmp_path / "ray", create=True) as library:
        ray_report = library.index("photos", [str(folder)], model, batch_size=4, progress=False, encoder=encoder)

    assert ray_report.added == local_report.added == 40
    assert sorted(ray_report.failed) == sorted(local_report.failed)
    assert {path for path, _ in ray_report.failed} == {str(p) for p in bad.values()}
    # Files go in sorted order, so the first of two equal files is copy-of-3.png; img-0003.png is its copy.
    assert local_report.duplicates == [(str(folder / "img-0003.png"), str(folder / "copy-of-3.png"))]
    assert ray_report.duplicates == local_report.duplicates
    assert len(encoder.run.nodes) == 2, f"both nodes should encode: {dict(encoder.run.nodes)}"
    assert sum(encoder.run.nodes.values()) == 40

    queries = np.random.default_rng(5).standard_normal((8, model.config.embed_dim)).astype(np.float32)
    with Library.open(tmp_path / "local") as a, Library.open(tmp_path / "ray") as b:
        local, remote = a.collection("photos"), b.collection("photos")
        assert local.size == remote.size == 40
        maps_local, maps_remote = maps_by_uri(local), maps_by_uri(remote)
        assert maps_local.keys() == maps_remote.keys()
        for uri in maps_local:  # batches differ in composition across workers: equal up to fp16 rounding
            np.testing.assert_allclose(maps_remote[uri].astype(np.float32), maps_local[uri].astype(np.float32),
                                       atol=2e-3, rtol=1e-2)
        assert [[uri for uri, _ in hits] for hits in ranked_uris(remote, queries, 10)] == [
            [uri for uri, _ in hits] for hits in ranked_uris(local, queries, 10)
        ]


def _index_command(data: Path, checkpoint: Path, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "matchmap", "index", "--data-dir", str(data), "--checkpoint", str(checkpoint),
            "--collection", "photos", "--batch-size", "8", "--device", "cpu", "-q", "--json", *extra, str(folder)]


def test_a_driver_killed_midway_then_rerun_loses_nothing_and_indexes_nothing_twice(ray_cluster, checkpoint, tmp_path):
    folder = tmp_path / "many"
    write_images(folder, 160)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    process = subprocess.Popen(_index_command(crashed, checkpoint, folder, "--ray", ray_cluster.address),
                               env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    indexed_at_kill = kill_once_indexed(process, crashed, None, "photos", at_least=16)
    assert 16 <= indexed_at_kill < 160

    resumed = subprocess.run(_index_command(crashed, checkpoint, folder, "--ray", ray_cluster.address),
                             env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["images"] == 160 and report["added"] + report["unchanged"] == 160
    assert report["unchanged"] >= indexed_at_kill
    assert sum(report["ray"]["images_by_node"].values()) == report["added"]
    local = subprocess.run(_index_command(clean, checkpoint, folder), env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr

    queries = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    with Library.open(crashed) as a, Library.open(clean) as b:
        resumed_coll, clean_coll = a.collection("photos"), b.collection("photos")
        assert resumed_coll.size == clean_coll.size == 160
        records = resumed_coll.images(all_ids(resumed_coll))
        assert len({r.content_hash for r in records}) == len(records) == 160
        assert [[u for u, _ in hits] for hits in ranked_uris(resumed_coll, queries, 10)] == [
            [u for u, _ in hits] for hits in ranked_uris(clean_coll, queries, 10)
        ]


def test_ray_usage_errors_name_the_problem(checkpoint, tmp_path):
    folder, other = tmp_path / "photos", tmp_path / "more"
    write_images(folder, 2)
    write_images(other, 2, first_seed=2)
    # `--ray` followed by PATHs: the first is not silently taken for a cluster address.
    result = subprocess.run(_index_command(tmp_path / "data", checkpoint, other, "--ray", str(folder)),
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "is not a Ray cluster address" in result.stderr and "--ray local" in result.stderr
    assert not (tmp_path / "data").exists()


def _encoding_actors() -> list:
    """The processes of this machine's encoding actors (Ray titles them after the actor class)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("ImageEncoderWorker" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_worker_killed_midway_is_replaced_and_the_run_completes(ray_cluster, checkpoint, tmp_path):
    folder = tmp_path / "many"
    write_images(folder, 160)
    data = tmp_path / "data"
    process = subprocess.Popen(_index_command(data, checkpoint, folder, "--ray", ray_cluster.address),
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    with Library.open(data, create=True) as watcher:
        while process.poll() is None and killed is None:
            infos = [i for i in watcher.list_collections() if i.name == "photos"]
            actors = _encoding_actors()
            if infos and infos[0].images >= 16 and actors:
                killed = actors[0].pid
                actors[0].kill()
    stdout, stderr = process.communicate(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert process.returncode == 0, stderr
    assert stdout.startswith("{"), f"stdout is not the JSON report: {stdout[:2000]}"
    report = json.loads(stdout)
    assert report["added"] == report["images"] == 160 and report["failed"] == []
    with Library.open(data) as library:
        collection = library.collection("photos")
        records = collection.images(all_ids(collection))
        assert len({r.content_hash for r in records}) == len(records) == 160
