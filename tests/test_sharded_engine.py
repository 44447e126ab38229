"""The front of `serve --ray` without Ray: ShardedEngine over CollectionShards called in process.

Shards are the replicas' own class (search.ray_serve.CollectionShard) behind stand-in handles with
Serve's calling convention (``handle.method.remote(*args).result(timeout_s=...)``), so the merge of
stage 1 and stage 2 across shards and the retry of a failing shard are checked quickly and exactly.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import SCENES

from encoders import create_model
from indexer import Library
from search.client import SearchClient, SearchServiceError
from search.engine import SearchEngine, SearchLimits
from search.ray_serve import CollectionShard, ShardedEngine, ShardSpec
from search.server import ServerThread

COLLECTION = SCENES


class Answer:
    def __init__(self, call):
        self.call = call

    def result(self, timeout_s=None):
        return self.call()


class StandInHandle:
    """A deployment handle over an in-process shard that fails its first ``failures`` calls."""

    def __init__(self, shard: CollectionShard, failures: int = 0):
        self.shard, self.failures, self.calls = shard, failures, 0

    def __getattr__(self, method):
        handle = self

        class Method:
            @staticmethod
            def remote(*args):
                def call():
                    handle.calls += 1
                    if handle.failures > 0:
                        handle.failures -= 1
                        raise RuntimeError("ActorDiedError: the replica died")
                    return getattr(handle.shard, method)(*args)
                return Answer(call)
        return Method


# Every dimension held: each shard would find its own held basis on its own maps (and the test model's
# weights are random), so stage 2's rough pass could keep other candidates than the single engine's.
SHARD_LIMITS = SearchLimits(exact_rescore_at_least=4, held_energy=1)

@pytest.fixture(scope="module")
def shards(checkpoint, scenes_data_dir):
    spec = ShardSpec(str(checkpoint), str(scenes_data_dir), None, device="cpu", limits=SHARD_LIMITS)
    return [CollectionShard(spec, i, 3) for i in range(3)]


def sharded_engine(checkpoint, scenes_data_dir, handles, **options) -> ShardedEngine:
    return ShardedEngine(create_model(str(checkpoint)), Library.open(scenes_data_dir), handles, device="cpu",
                         limits=SHARD_LIMITS, **options)


def test_three_shards_answer_as_one_engine_and_a_failing_shard_is_asked_again(checkpoint, scenes_data_dir, scene_files, shards):
    # exact_rescore_at_least=4: K above it takes the bfloat16 pass, whose picks the merge must keep too
    single = SearchEngine.open(checkpoint, scenes_data_dir, device="cpu", limits=SHARD_LIMITS)
    handles = [StandInHandle(s) for s in shards]
    front = sharded_engine(checkpoint, scenes_data_dir, handles)
    size = front.collection(COLLECTION).size
    assert size == single.collection(COLLECTION).size == len(scene_files[0])
    held = [s.engine.resident_bytes()[COLLECTION] for s in shards]  # each shard holds its own maps
    assert front.resident_bytes() == {COLLECTION: sum(held)} == single.resident_bytes() and min(held) > 0
    for wav in scene_files[1]:
        data = wav.read_bytes()
        for top_k, candidates in ((3, 0), (5, 8), (size, size)):
            want = single.search(data, COLLECTION, top_k, candidates)
            got = front.search(data, COLLECTION, top_k, candidates)
            assert [h.image_id for h in got.hits] == [h.image_id for h in want.hits]
            assert [h.uri for h in got.hits] == [h.uri for h in want.hits]
            np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5)
            assert (got.collection_size, got.candidates) == (want.collection_size, want.candidates)
    assert front.retries == 0
    handles[2].failures = 2  # its replica dies twice; the third call answers
    data = scene_files[1][0].read_bytes()
    again = front.search(data, COLLECTION, 5, 8)
    assert [h.image_id for h in again.hits] == [h.image_id for h in single.search(data, COLLECTION, 5, 8).hits]
    assert front.retries == 2
    single.close()


def test_a_shard_that_stays_away_is_unavailable_on_the_wire_and_the_front_keeps_serving(
        checkpoint, scenes_data_dir, scene_files, shards):
    handles = [StandInHandle(s) for s in shards]
    front = sharded_engine(checkpoint, scenes_data_dir, handles, retry_seconds=0.5)
    with ServerThread(front) as server, SearchClient(server.target) as client:
        assert len(client.search(scene_files[1][0], COLLECTION, top_k=3)) == 3
        handles[1].failures = 10**6
        with pytest.raises(SearchServiceError) as caught:
            client.search(scene_files[1][1], COLLECTION, top_k=3)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "shard 2 of 3 did not answer" in str(caught.value)
        handles[1].failures = 0
        assert len(client.search(scene_files[1][1], COLLECTION, top_k=3)) == 3
        with pytest.raises(SearchServiceError) as caught:
            client.search(scene_files[1][0], "nope")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        best = client.search(scene_files[1][0], COLLECTION, top_k=1)[0]
        heat = client.localize(scene_files[1][0], image_id=best.image_id, collection=COLLECTION)
        assert heat.values.shape == create_model(str(checkpoint)).image_grid


@pytest.mark.parametrize("arguments, problem", [
    (["--shards", "2"], "--shards needs --ray"),
    (["--ray", "photos/"], "'photos/' is not a Ray cluster address"),
])
def test_serve_ray_usage_errors_name_the_problem(tmp_path, arguments, problem):
    from click.testing import CliRunner

    from matchmap.cli import main

    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), *arguments])
    assert result.exit_code == 2 and problem in result.output, result.output
