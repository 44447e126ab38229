"""`matchmap serve --ray` on a real local Ray cluster of two nodes (ray.cluster_utils.Cluster).

The bar of issue 15: through `serve --ray` on 2 nodes the same gRPC client gets the same results as
from a single `matchmap serve`, and killing a shard replica while queries run costs no failed query
(Ray Serve holds requests for the dead shard until its new replica is up; the front asks a shard
again when a request fails in flight, tested without Ray in tests/test_sharded_engine.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SCENES as COLLECTION
from test_serve_lifecycle import free_port

from search.client import SearchClient
from search.engine import SearchEngine
from search.server import ServerThread

pytest.importorskip("ray")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single(checkpoint, scenes_data_dir):
    """The reference: the same collection served by one ordinary process."""
    engine = SearchEngine.open(checkpoint, scenes_data_dir, device="cpu")
    with ServerThread(engine) as running, SearchClient(running.target) as client:
        yield client
    engine.close()


@pytest.fixture(scope="module")
def sharded(ray_cluster, checkpoint, scenes_data_dir):
    """`matchmap serve --ray ADDRESS --shards 2` as a user starts it; -> (client, process, stderr lines)."""
    port = free_port()
    command = [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(scenes_data_dir), "--checkpoint", str(checkpoint),
               "--host", "127.0.0.1", "--port", str(port), "--no-http", "--device", "cpu", "--json",
               "--ray", ray_cluster.address, "--shards", "2"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MATCHMAP_TOKEN": "", "PYTHONUNBUFFERED": "1"})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    try:
        line = process.stdout.readline()
        assert line, f"serve --ray exited {process.poll()}: {''.join(stderr)[-3000:]}"
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["shards"] == 2 and ready["collections"] == [COLLECTION]
        assert ready["resident_maps_bytes"] > 0  # held by the shards
        with SearchClient(f"127.0.0.1:{port}") as client:
            yield client, process, stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def hits_of(result) -> list[tuple[str, str]]:
    return [(h.image_id, h.uri) for h in result]


def test_the_sharded_service_answers_as_a_single_one(single, sharded, scene_files):
    client = sharded[0]
    assert client.health() == "SERVING"
    [listed] = client.list_collections().collections
    assert listed.name == COLLECTION and listed.images == len(scene_files[0])
    for wav in scene_files[1][:6]:
        for top_k, candidates in ((10, 0), (5, 8), (len(scene_files[0]), len(scene_files[0]))):
            want = single.search(wav, COLLECTION, top_k=top_k, candidates=candidates)
            got = client.search(wav, COLLECTION, top_k=top_k, candidates=candidates)
            assert hits_of(got) == hits_of(want)
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose([h.stage1_score for h in got], [h.stage1_score for h in want], rtol=1e-4,
                                       atol=1e-5)
            assert (got.collection_size, got.candidates) == (want.collection_size, want.candidates)
    best = single.search(scene_files[1][0], COLLECTION, top_k=1)[0]
    here = client.localize(scene_files[1][0], image_id=best.image_id, collection=COLLECTION)
    there = single.localize(scene_files[1][0], image_id=best.image_id, collection=COLLECTION)
    np.testing.assert_allclose(here.values, there.values, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="no collection named 'nope'"):
        client.search(scene_files[1][0], "nope")
    with pytest.raises(Exception, match="holds no indexed image"):
        client.localize(scene_files[1][0], image_id="999999", collection=COLLECTION)


def _replica_pids(shard: int) -> list[int]:
    """Processes of shard ``shard``'s Serve replica (Ray names a worker process after its actor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ServeReplica:matchmap-shard-%d" % shard in title:
                pids.append(int(entry.name))
    return pids


def test_a_shard_replica_killed_under_load_costs_no_failed_query(single, sharded, scene_files):
    client = sharded[0]
    wavs = scene_files[1][:4]
    expected = {str(w): hits_of(single.search(w, COLLECTION)) for w in wavs}
    [victim] = _replica_pids(1)
    answers, failures, stop = [], [], threading.Event()

    def load() -> None:
        with SearchClient(client.target) as own:
            while not stop.is_set():
                for wav in wavs:
                    try:
                        answers.append((str(wav), hits_of(own.search(wav, COLLECTION)), time.monotonic()))
                    except Exception as error:  # every failure counts against the bar
                        failures.append(repr(error))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        while len(answers) < 4:
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 120
        while time.monotonic() < deadline and not (_replica_pids(1) and any(t > killed + 1 for *_, t in answers[-8:])
                                                   and len([a for a in answers if a[2] > killed]) >= 16):
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    after = [a for a in answers if a[2] > killed]
    assert len(after) >= 16, f"only {len(after)} answers after the kill"
    assert all(hits == expected[wav] for wav, hits, _ in answers)  # never a partial (one-shard) answer
    replacement = _replica_pids(1)
    assert replacement and victim not in replacement, "Ray Serve should have started a new replica"
