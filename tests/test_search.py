"""The search service end to end: a real collection indexed from the tiny corpus with a tiny model,
a real gRPC server on a loopback port, the real client and CLI."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import search.engine
from encoders import create_model, load_audio, score_matrix
from encoders.matchmap import pool_audio, pool_images
from indexer import Library
from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.cli import query
from search.client import PcmAudio, SearchClient, SearchServiceError, ServerUnreachable
from search.engine import SearchEngine, SearchLimits
from search.remote_eval import remote_recall
from search.resident import CODE_BYTES
from search.server import ServerOptions, ServerThread
from search.vad import keep_speech
from training.manifest import load_manifest

COLLECTION = "corpus"
OK = grpc.StatusCode.OK


# ---- fixtures: one model, one indexed collection, one server for the module ---------------------


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def data_dir(tiny_corpus, model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("library")
    manifests = [load_manifest(tiny_corpus / name) for name in ("train.json", "val.json")]
    with Library.open(folder) as library:
        report = library.index(COLLECTION, [str(p) for p in image_paths(*manifests)], model, progress=False)
    assert report.added > 10 and not report.failed
    return folder


@pytest.fixture(scope="module")
def engine(checkpoint, data_dir):
    engine = SearchEngine.open(checkpoint, data_dir, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with SearchClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def val(tiny_corpus):
    return load_manifest(tiny_corpus / "val.json")


@pytest.fixture(scope="module")
def caption_wav(val) -> Path:
    return val.audio_path(val.entries[0])


@pytest.fixture(scope="module")
def val_image(val) -> Path:
    return val.image_path(val.entries[0])


def image_paths(*manifests) -> list[Path]:
    return [m.image_path(e).resolve() for m in manifests for e in m.entries]


def stored_maps(engine, collection: str, images: list[Path]) -> tuple[np.ndarray, torch.Tensor]:
    """(ids (N,) sorted, maps (N, R, D) float32) of the indexed ``images``, read from the collection."""
    coll = engine.collection(collection)
    found = coll.ids_for_uris(sorted({str(p) for p in images}))
    assert all(found.values()), f"images not indexed: {[u for u, ids in found.items() if not ids]}"
    ids = np.array(sorted({i for ids in found.values() for i in ids}))
    return ids, torch.from_numpy(coll.feature_maps(ids).astype(np.float32))


def offline_audio_maps(model, wav_paths) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio maps through the plain encoders API, as the service makes them from a query:
    load_audio -> keep_speech (VAD, then trim_silence) -> front end -> encode_audio."""
    features = [model.audio_frontend(keep_speech(load_audio(p), 16000)) for p in wav_paths]
    logmels = torch.stack([f for f, _ in features])
    lengths = torch.tensor([n for _, n in features])
    with torch.no_grad():
        return model.encode_audio(logmels, lengths)


# The held maps keep every dimension where a test compares stage 2 with reading the store: the test
# model's weights are random, so its audio frames need not lie where its image regions do, and the
# region vectors' principal directions (search.resident.region_basis) need not keep its MISA ranking.
# The held basis is tested with the shipped model (test_stage1_widen.py). As a held_energy_floor: never fewer
# dims than held_energy keeps, so a budget too small for them holds the codes.
EVERY_DIM = 1.0

# ---- search -------------------------------------------------------------------------------------


def test_search_returns_ranked_hits_with_timings_and_model(client, engine, caption_wav, tiny_corpus):
    hits = client.search(caption_wav, COLLECTION, top_k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(h.uri).is_file() and Path(h.uri).is_relative_to(tiny_corpus) for h in hits)
    assert len({h.image_id for h in hits}) == 5
    assert hits.model_version == engine.model_version
    assert hits.collection_size == engine.collection(COLLECTION).size
    assert hits.candidates == min(SearchLimits().default_candidates, hits.collection_size)
    t = hits.timings_ms
    assert t["total"] >= t["encode"] > 0 and t["decode"] > 0 and t["stage1"] > 0 and t["stage2"] > 0
    assert hits.audio_seconds == pytest.approx(soundfile.info(str(caption_wav)).duration, abs=0.01)


def test_two_stage_over_the_whole_collection_equals_exhaustive_misa_and_sisa(client, engine, model, val, tiny_corpus):
    ids, maps = stored_maps(engine, COLLECTION, image_paths(val, load_manifest(tiny_corpus / "train.json")))
    assert len(ids) == engine.collection(COLLECTION).size
    wavs = [val.audio_path(e) for e in val.entries[:4]]
    audio, lengths = offline_audio_maps(model, wavs)
    expected = score_matrix(audio, lengths, maps, kinds=("misa", "sisa"))
    sisa_from_pooled = pool_audio(audio, lengths) @ pool_images(maps).T
    for i, wav in enumerate(wavs):
        hits = client.search(wav, COLLECTION, top_k=len(ids), candidates=len(ids))
        assert hits.candidates == len(ids)
        order = torch.argsort(expected["misa"][i], descending=True)
        assert [int(h.image_id) for h in hits] == ids[order.numpy()].tolist()
        position = {int(image_id): j for j, image_id in enumerate(ids)}
        got_misa = [h.score for h in hits]
        got_sisa = [h.stage1_score for h in hits]
        want = [position[int(h.image_id)] for h in hits]
        np.testing.assert_allclose(got_misa, expected["misa"][i, want].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_sisa, expected["sisa"][i, want].numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(got_sisa, sisa_from_pooled[i, want].numpy(), rtol=1e-3, atol=1e-5)


def test_resident_maps_and_codes_rank_like_reading_the_store_and_return_exact_scores(checkpoint, data_dir, engine,
                                                                                     model, val, tiny_corpus):
    # bfloat16 maps (or 2 KB codes, when the maps do not fit the budget) over every candidate from memory,
    # exact float32 over the best 10: the same top 5, same scores. Every dimension is held: this model's
    # weights are random, so its audio frames need not lie where its image regions do (the held basis
    # is tested with the shipped model, in test_stage1_widen.py).
    coarse = SearchEngine.open(checkpoint, data_dir, device="cpu",
                               limits=SearchLimits(exact_rescore_at_least=10, exact_rescore_factor=2,
                                                   held_energy=EVERY_DIM))
    codes = SearchEngine.open(checkpoint, data_dir, device="cpu",
                              limits=SearchLimits(exact_rescore_at_least=10, exact_rescore_factor=2,
                                                  resident_maps_mb=0.5, held_energy=EVERY_DIM,
                                                  held_energy_floor=EVERY_DIM))
    from_store = SearchEngine.open(checkpoint, data_dir, device="cpu", limits=SearchLimits(resident_maps_mb=0))
    try:
        assert coarse.warm_up() == codes.warm_up() == [COLLECTION]
        size = coarse.collection(COLLECTION).size
        rows, cols = model.image_grid
        assert coarse.resident_bytes()[COLLECTION] == size * rows * cols * model.embed_dim * 2  # bfloat16
        assert size * rows * cols * model.embed_dim * 2 > 0.5 * 2**20  # so the codes engine holds codes:
        assert codes.resident_bytes()[COLLECTION] == size * CODE_BYTES
        from_store.warm_up()
        assert from_store.resident_bytes() == {}
        for entry in val.entries[:6]:
            data = val.audio_path(entry).read_bytes()
            b = from_store.search(data, COLLECTION, top_k=5, candidates=size)
            for held in (coarse, codes):
                a = held.search(data, COLLECTION, top_k=5, candidates=size)
                assert a.candidates == b.candidates == size
                assert [h.image_id for h in a.hits] == [h.image_id for h in b.hits]
                np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-6)
    finally:
        for opened in (coarse, codes, from_store):
            opened.close()


def test_candidates_are_bounded_but_an_exhaustive_search_stays_possible(checkpoint, data_dir, engine, val, monkeypatch):
    """Over gRPC: a query may ask for at most max_candidates, except on a collection of at most
    max_exhaustive_candidates images, which it may search whole. Stage 2 reads the store in chunks
    (memory bounded whatever K), and ranks as reading every map at once did."""
    size = engine.collection(COLLECTION).size
    data = val.audio_path(val.entries[0]).read_bytes()
    want = engine.search(data, COLLECTION, top_k=3, candidates=size)
    monkeypatch.setattr("search.engine.STORE_READ_CHUNK", 7)  # several chunks even at this size
    for exhaustive_up_to, allowed in ((size, True), (size - 1, False)):
        limits = SearchLimits(default_candidates=3, max_candidates=4, max_exhaustive_candidates=exhaustive_up_to,
                              resident_maps_mb=0)
        bounded = SearchEngine.open(checkpoint, data_dir, device="cpu", limits=limits)
        try:
            with ServerThread(bounded) as running, grpc.insecure_channel(running.target) as channel:
                stub = search_pb2_grpc.SpokenImageSearchStub(channel)
                request = search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=data), collection=COLLECTION, top_k=3)
                assert stub.Search(request, timeout=30).candidates == 3  # the default
                request.candidates = size
                if allowed:
                    got = stub.Search(request, timeout=30)
                    assert got.candidates == size
                    assert [int(h.image_id) for h in got.hits] == [h.image_id for h in want.hits]
                    np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-6)
                else:
                    with pytest.raises(grpc.RpcError) as raised:
                        stub.Search(request, timeout=30)
                    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    details = raised.value.details()
                    assert f"candidates is {size}" in details and f"at most {size - 1} images" in details, details
        finally:
            bounded.close()


def test_the_default_k_grows_with_the_collection(checkpoint, data_dir, engine, val):
    """A query that does not say gets max(default_candidates, candidates_share x the collection's images),
    at most max_candidates, over gRPC; a query that says keeps its own K."""
    size = engine.collection(COLLECTION).size
    data = val.audio_path(val.entries[0]).read_bytes()
    for share, cap, want in ((0.5, size, -(-size // 2)), (0.0, size, 3), (1.0, size - 2, size - 2)):
        limits = SearchLimits(default_candidates=3, candidates_share=share, max_candidates=cap, resident_maps_mb=0)
        scaled = SearchEngine.open(checkpoint, data_dir, device="cpu", limits=limits)
        try:
            assert scaled.default_candidates_for(size) == want and scaled.default_candidates_for(None) == 3
            with ServerThread(scaled) as running, grpc.insecure_channel(running.target) as channel:
                stub = search_pb2_grpc.SpokenImageSearchStub(channel)
                request = search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=data), collection=COLLECTION,
                                                   top_k=2)
                assert stub.Search(request, timeout=30).candidates == want
                request.candidates = 2
                assert stub.Search(request, timeout=30).candidates == 2
        finally:
            scaled.close()
    with pytest.raises(ValueError, match="candidates_share"):
        SearchLimits(candidates_share=1.5)


# int8: room for the int8 maps of the 36 images, not for the bfloat16 ones of 20.
# codes: ranked exactly (see the next test for why); what is checked of them is their append.
# "past the budget": room for the maps of the 20 images the holder sees, not for the 36 they grow to
@pytest.mark.parametrize("resident_maps_mb, rescore", [(4096.0, 4), (0.6, 4), (0.3, 64), (None, 4)],
                         ids=["maps", "int8", "codes", "past the budget"])
def test_maps_held_in_the_background_answer_as_the_store_and_take_in_images_added_meanwhile(
        checkpoint, model, val, tiny_corpus, tmp_path, monkeypatch, resident_maps_mb, rescore):
    """warm_up(background=True) opens the collection and returns before its maps (or codes) are held;
    queries meanwhile read the store and rank as an engine that reads them all; images indexed while
    the holder works are appended to what it holds once it is done, unless that would not fit the
    budget (then nothing is held and the store answers)."""
    rows, cols = model.image_grid
    map_bytes = rows * cols * model.embed_dim * 2  # bfloat16
    past_budget = resident_maps_mb is None
    if past_budget:
        resident_maps_mb = 21 * map_bytes / 2**20
    monkeypatch.setattr("search.engine.COLLECTION_REFRESH_SECONDS", 0.0)
    paths = image_paths(val, load_manifest(tiny_corpus / "train.json"))
    data = [val.audio_path(e).read_bytes() for e in val.entries[:3]]
    release = threading.Event()
    real_held_for = search.engine.held_for

    def slow_held_for(*args, **kwargs):
        assert release.wait(60)
        return real_held_for(*args, **kwargs)

    with Library.open(tmp_path / "lib", create=True) as writer:
        writer.index("live", [str(p) for p in paths[:20]], model, progress=False)
        limits = SearchLimits(exact_rescore_at_least=rescore, exact_rescore_factor=1, resident_maps_mb=resident_maps_mb,
                              held_energy=EVERY_DIM, held_energy_floor=EVERY_DIM)
        engine = SearchEngine.open(checkpoint, tmp_path / "lib", device="cpu", limits=limits)
        reference = SearchEngine.open(checkpoint, tmp_path / "lib", device="cpu", limits=SearchLimits(resident_maps_mb=0))
        reference.warm_up()
        monkeypatch.setattr("search.engine.held_for", slow_held_for)  # the holder waits until released
        try:
            assert engine.warm_up(background=True) == ["live"]
            assert engine.resident_bytes() == {} and not engine.wait_held(timeout=0.2)
            first = engine.search(data[0], "live", top_k=5, candidates=20)  # answered from the store
            assert [h.image_id for h in first.hits] == [h.image_id for h in
                                                        reference.search(data[0], "live", top_k=5, candidates=20).hits]
            writer.index("live", [str(p) for p in paths[20:]], model, batch_size=4, progress=False)
            assert engine.collection("live").size == len(paths)  # appended while nothing is held
            release.set()
            assert engine.wait_held(timeout=60)
            size = engine.collection("live").size
            if past_budget:
                assert engine.resident_bytes() == {}
            else:
                per_image = {4096.0: map_bytes, 0.6: map_bytes // 2, 0.3: CODE_BYTES}[resident_maps_mb]
                assert engine.resident_bytes()["live"] >= size * per_image  # the added images are held too
                assert held_kind(engine, "live") == {4096.0: "bfloat16", 0.6: "int8", 0.3: "codes"}[resident_maps_mb]
            for query in data:
                got = engine.search(query, "live", top_k=5, candidates=len(paths))
                want = reference.search(query, "live", top_k=5, candidates=len(paths))
                assert [h.image_id for h in got.hits] == [h.image_id for h in want.hits]
                np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5)
        finally:
            release.set()
            engine.close()
            reference.close()


def held_kind(engine: SearchEngine, collection: str) -> str:
    """What the engine holds of ``collection``: "bfloat16" or "int8" maps, or "codes"."""
    held = engine._resident[collection]
    return str(held.maps.dtype).removeprefix("torch.") if hasattr(held, "maps") else "codes"


@pytest.mark.parametrize("thread", ["holder", "reopen"])
def test_close_waits_for_the_background_holder(checkpoint, model, val, tiny_corpus, tmp_path, monkeypatch, thread):
    """close() lets the holder (or a background reopen) finish the collection it reads before the library
    closes: a process that exited while the holder still ran torch code aborted (`serve` on a taken port
    exited -6, not 3)."""
    paths = image_paths(val, load_manifest(tiny_corpus / "train.json"))
    release = threading.Event()
    outcome = []
    real_held_for = search.engine.held_for

    def slow_held_for(*args, **kwargs):
        assert release.wait(60)
        try:
            outcome.append(real_held_for(*args, **kwargs))
        except Exception as error:
            outcome.append(error)
            raise

    with Library.open(tmp_path / "lib", create=True) as writer:
        writer.index("live", [str(p) for p in paths[:8]], model, progress=False)
    engine = SearchEngine.open(checkpoint, tmp_path / "lib", device="cpu")
    if thread == "reopen":
        engine.collection("live")
        with Library.open(tmp_path / "lib") as writer:
            writer.collection("live").remove_images([int(engine.collection("live").ids()[0])])
        monkeypatch.setattr("search.engine.COLLECTION_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr("search.engine.held_for", slow_held_for)
    try:
        if thread == "holder":
            assert engine.warm_up(background=True) == ["live"]
        else:
            engine.collection("live")  # not only additions: reopened in the background
        closer = threading.Thread(target=engine.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive()  # waiting for the holder
    finally:
        release.set()
    closer.join(60)
    assert not closer.is_alive()
    assert len(outcome) == 1 and outcome[0] is not None and not isinstance(outcome[0], Exception)


# int8: room for the int8 maps of the 36 images, not for the bfloat16 ones of 20 (the 16 added later are
# turned into int8 steps found on the first 20).
# codes: a codec learnt from 20 maps of this random-weight model codes the 16 added later too coarsely
# to choose among them (docs/search.md, "drift"); here the codes' append is checked, not their ranking
@pytest.mark.parametrize("resident_maps_mb, rescore", [(4096.0, 4), (0.6, 4), (0.3, 64)], ids=["maps", "int8", "codes"])
def test_a_growing_collection_is_appended_to_and_other_changes_reopen_in_the_background(
        checkpoint, model, val, tiny_corpus, tmp_path, monkeypatch, resident_maps_mb, rescore):
    """Images indexed while the engine serves a collection are appended to its open snapshot (stage-1
    vectors, rows, resident maps or codes; the collection is not opened again) and found; a removal
    reopens the collection in a background thread while queries go on, then the new snapshot takes over."""
    monkeypatch.setattr("search.engine.COLLECTION_REFRESH_SECONDS", 0.0)
    paths = image_paths(val, load_manifest(tiny_corpus / "train.json"))
    data = [val.audio_path(e).read_bytes() for e in val.entries[:3]]
    with Library.open(tmp_path / "lib", create=True) as writer:
        writer.index("live", [str(p) for p in paths[:20]], model, progress=False)
        engine = SearchEngine.open(checkpoint, tmp_path / "lib", device="cpu",
                                   limits=SearchLimits(exact_rescore_at_least=rescore, exact_rescore_factor=1,
                                                       resident_maps_mb=resident_maps_mb, held_energy=EVERY_DIM,
                                                       held_energy_floor=EVERY_DIM))
        reference = SearchEngine.open(checkpoint, tmp_path / "lib", device="cpu", limits=SearchLimits(resident_maps_mb=0))
        try:
            assert engine.search(data[0], "live", top_k=3).collection_size == 20
            before = engine.resident_bytes()["live"]
            assert held_kind(engine, "live") == {4096.0: "bfloat16", 0.6: "int8", 0.3: "codes"}[resident_maps_mb]
            opened = []

            def slow_open(name, shard=None, real=engine.library.collection):  # a reopen takes a while:
                opened.append(name)  # queries must not wait
                time.sleep(3.0)  # longer than a query takes even on 2 busy cores
                return real(name, shard)

            monkeypatch.setattr(engine.library, "collection", slow_open)
            writer.index("live", [str(p) for p in paths[20:]], model, batch_size=4, progress=False)
            grown = engine.collection("live")
            assert grown.size == len(paths) and opened == []  # appended, not reopened
            assert engine.resident_bytes()["live"] > before
            for query in data:  # every image, the new ones included, ranked as an engine that read them all
                got = engine.search(query, "live", top_k=5, candidates=len(paths))
                want = reference.search(query, "live", top_k=5, candidates=len(paths))
                assert got.collection_size == want.collection_size == len(paths)
                assert [h.image_id for h in got.hits] == [h.image_id for h in want.hits]
                np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5)

            best = engine.search(data[0], "live", top_k=1).hits[0].image_id
            writer.collection("live").remove_images([best])
            deadline, answered_by_old = time.monotonic() + 60, 0
            while True:  # the old snapshot answers (without the removed image) until the new one is in
                hits = engine.search(data[0], "live", top_k=3, candidates=len(paths))
                assert best not in [h.image_id for h in hits.hits]
                if hits.collection_size == len(paths) - 1:
                    break
                answered_by_old += 1
                assert time.monotonic() < deadline, "the reopened collection never took over"
                time.sleep(0.05)
            assert opened == ["live"] and answered_by_old > 0
        finally:
            engine.close()
            reference.close()


def test_raw_pcm_and_the_encoded_file_give_the_same_hits(client, caption_wav):
    samples, rate = soundfile.read(str(caption_wav), dtype="int16")
    from_pcm = client.search(PcmAudio(samples.astype("<i2").tobytes(), rate), COLLECTION, top_k=5)
    from_file = client.search(caption_wav.read_bytes(), COLLECTION, top_k=5)
    assert [h.image_id for h in from_pcm] == [h.image_id for h in from_file]
    np.testing.assert_allclose([h.score for h in from_pcm], [h.score for h in from_file], rtol=1e-5)


def test_how_much_silence_surrounds_a_query_changes_nothing(client, caption_wav):
    # A push-to-talk button pressed 1 s or 4 s early (and released as late): the service trims the
    # silence to the same margin, so the answers are the same. (What trimming buys in recall is
    # measured with the shipped model by bench/bench_robustness.py --trim-silence.)
    samples, rate = soundfile.read(str(caption_wav), dtype="int16")
    answers = []
    for seconds in (1, 4):
        silence = np.zeros(seconds * rate, dtype=np.int16)
        padded = np.concatenate([silence, samples, silence]).astype("<i2").tobytes()
        answers.append(client.search(PcmAudio(padded, rate), COLLECTION, top_k=5))
    assert [h.image_id for h in answers[0]] == [h.image_id for h in answers[1]]
    np.testing.assert_allclose([h.score for h in answers[0]], [h.score for h in answers[1]], rtol=1e-5)


def test_concurrent_queries_are_batched_and_answered_as_if_alone(client, server, engine, val, monkeypatch):
    # Queries batch when they queue while the model is busy. The VAD's decode time (search.vad) spreads
    # their arrival out on these 2 cores so that the model is never busy; without it they queue.
    monkeypatch.setattr(engine, "vad", False)
    wavs = [val.audio_path(e) for e in val.entries[:8]] * 2
    alone = [[h.image_id for h in client.search(w, COLLECTION, top_k=3)] for w in wavs[:8]]
    batches_before = server.server._servicer.batcher.batches
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda w: client.search(w, COLLECTION, top_k=3), wavs))
    assert [[h.image_id for h in hits] for hits in together] == alone * 2
    assert max(hits.batch_size for hits in together) > 1
    assert server.server._servicer.batcher.batches - batches_before < len(wavs)


def test_queries_of_every_length_are_encoded_in_a_few_shapes_as_if_unpadded(engine):
    """oneDNN makes convolution primitives per input shape (8 ms each on these cores): the engine pads a
    query's log-mel to a multiple of QUERY_FRAME_MULTIPLE frames, and its frames stay its own."""
    from encoders.models import QUERY_FRAME_MULTIPLE

    model = engine.model
    seen: list[int] = []
    hook = model.audio_net.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[-1]))
    generator = torch.Generator().manual_seed(0)
    logmels = [torch.randn(model.config.audio.n_mels, n, generator=generator) for n in range(150, 450, 13)]
    try:
        encoded = [engine.encode([logmel]) for logmel in logmels]
    finally:
        hook.remove()
    assert sorted(set(seen)) == list(range(160, 481, QUERY_FRAME_MULTIPLE))  # 11 shapes for 24 lengths
    with torch.inference_mode():
        for logmel, (audio, lengths) in zip(logmels, encoded, strict=True):
            exact, exact_lengths = model.encode_audio(logmel[None], torch.tensor([logmel.shape[1]]))
            assert torch.equal(lengths.cpu(), exact_lengths)
            torch.testing.assert_close(audio, exact, rtol=1e-4, atol=1e-5)


def test_warm_up_meets_every_shape_a_query_can_bring(engine, monkeypatch):
    """A fresh server would pay 4-8 ms for each new input shape on a query's path: warm_up runs the audio
    branch on every padded length up to max_frames and the VAD on every padded length of audio the
    server takes, so queries of any length find their shapes met; and the image branch on the one shape
    every image sent to Localize or Highlight is encoded in."""
    from search import vad

    model = engine.model
    warmed_audio: list[int] = []
    warmed_vad: list[int] = []
    warmed_images: list[tuple[int, ...]] = []
    lstm = torch.lstm
    seen = warmed_audio, warmed_vad, warmed_images
    hook = model.audio_net.register_forward_pre_hook(lambda _module, args: seen[0].append(args[0].shape[-1]))
    image_hook = model.image_net.register_forward_pre_hook(lambda _module, args: seen[2].append(tuple(args[0].shape)))
    monkeypatch.setattr(vad.torch, "lstm", lambda x, *rest: seen[1].append(x.shape[0]) or lstm(x, *rest))
    try:
        assert engine.warm_query_shapes() == (len(warmed_audio), len(warmed_vad))
        query_audio: list[int] = []
        query_vad: list[int] = []
        query_images: list[tuple[int, ...]] = []
        seen = query_audio, query_vad, query_images
        generator = torch.Generator().manual_seed(1)
        max_frames = model.config.audio.max_frames
        for frames in torch.randint(1, max_frames + 1, (12,), generator=generator).tolist() + [1, max_frames]:
            engine.encode([torch.randn(model.config.audio.n_mels, frames, generator=generator)])
        longest = int(engine.limits.max_audio_seconds * engine.sample_rate)
        for samples in torch.randint(1, longest + 1, (8,), generator=generator).tolist() + [1, longest]:
            vad.speech_probabilities(torch.zeros(samples), engine.sample_rate)
        for size in [(300, 200), (97, 180)]:
            engine.sent_image_map(_png_bytes(Image.new("RGB", size, "white")))
    finally:
        hook.remove()
        image_hook.remove()
    assert set(query_audio) <= set(warmed_audio) and set(query_vad) <= set(warmed_vad)
    assert len(query_images) == 2 and set(query_images) == set(warmed_images)
    assert len(warmed_audio) == len(set(warmed_audio)) == max_frames // 32  # each shape once
    assert len(warmed_vad) == len(set(warmed_vad))


def test_warm_up_meets_each_shape_at_the_team_size_that_will_serve_it(engine, monkeypatch):
    """oneDNN keeps a primitive per shape and team size, so a shape warmed on two cores is new again to a
    model thread on one: warm_query_shapes runs the branches on ``model_team`` cores and the VAD on
    ``decode_team``, whatever the calling thread's own team, and leaves the caller's team as it was."""
    import faiss

    from search.threads import _libgomp

    gomp = _libgomp()
    model = engine.model
    teams: dict[str, set[tuple[int, int]]] = {"audio": set(), "image": set(), "vad": set()}

    def team_now() -> tuple[int, int]:
        return int(gomp.omp_get_max_threads()), int(faiss.omp_get_max_threads())

    hooks = [model.audio_net.register_forward_pre_hook(lambda *_: teams["audio"].add(team_now())),
             model.image_net.register_forward_pre_hook(lambda *_: teams["image"].add(team_now()))]
    vad_pass = search.engine.speech_probabilities
    monkeypatch.setattr(search.engine, "speech_probabilities",
                        lambda *args: teams["vad"].add(team_now()) or vad_pass(*args))
    seen: dict[str, object] = {}

    def warm(model_team: int, decode_team: int) -> None:
        gomp.omp_set_num_threads(2)
        faiss.omp_set_num_threads(2)
        engine.warm_query_shapes(model_team, decode_team)
        seen["after"] = team_now()

    try:
        for model_team, decode_team in [(1, 1), (2, 1)]:
            for kind in teams.values():
                kind.clear()
            worker = threading.Thread(target=warm, args=(model_team, decode_team))
            worker.start()
            worker.join()
            assert teams == {"audio": {(model_team, model_team)}, "image": {(model_team, model_team)},
                             "vad": {(decode_team, decode_team)}}
            assert seen["after"] == (2, 2)
    finally:
        for hook in hooks:
            hook.remove()


def test_a_served_query_runs_on_the_cores_the_server_gives_its_model_thread(engine, caption_wav):
    """ServerOptions.model_threads (`serve --model-threads`) is the OpenMP team of the model thread's
    torch and FAISS work (search.threads): one core by default, where a team of two waited at every step
    for the core that decoding, gRPC or the client held."""
    import faiss

    from search.threads import _libgomp

    gomp = _libgomp()
    seen: list[tuple[int, int]] = []
    hook = engine.model.audio_net.register_forward_pre_hook(
        lambda *_: seen.append((int(gomp.omp_get_max_threads()), int(faiss.omp_get_max_threads()))))
    try:
        for threads in (None, 2, 1):
            options = ServerOptions(host="127.0.0.1", port=0) if threads is None else \
                ServerOptions(host="127.0.0.1", port=0, model_threads=threads)
            seen.clear()
            with ServerThread(engine, options) as running, SearchClient(running.target) as served:
                assert len(served.search(caption_wav, COLLECTION, top_k=3)) == 3
            assert seen == [(threads or 1, threads or 1)], (threads, seen)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="model_threads"):
        ServerOptions(model_threads=0)


def test_the_trimmed_query_is_scored_while_the_vad_listens_and_its_answer_kept_only_when_the_vad_cuts_nothing(
        engine, val, monkeypatch):
    """With the model thread idle, the server scores the silence-trimmed query while the VAD runs: a
    clean caption's answer comes after about the longer of the two, not their sum; a caption the VAD
    cuts (noise before it) is answered for its cut, as in process."""
    clean = val.audio_path(val.entries[1]).read_bytes()
    wave, rate = soundfile.read(io.BytesIO(clean), dtype="float32")
    noise = 0.01 * np.random.default_rng(0).standard_normal(2 * rate).astype("float32")  # -40 dBFS
    buffer = io.BytesIO()
    soundfile.write(buffer, np.concatenate([noise, wave]), rate, format="WAV")
    noisy = buffer.getvalue()
    expected = {}
    for data, cut in ((clean, False), (noisy, True)):
        trimmed = engine.trimmed_audio(data)
        assert (engine.speech_audio(trimmed) is not trimmed.audio) == cut  # what the VAD does to each
        expected[data] = [(str(h.image_id), round(h.score, 4)) for h in engine.search(data, COLLECTION, top_k=5).hits]
    pause = 0.5  # each of the VAD and the model's work, made slow enough to see whether they overlap
    cut_to_speech, search_batch = search.engine.speech_cut, engine.search_batch
    monkeypatch.setattr(search.engine, "speech_cut", lambda *args: time.sleep(pause) or cut_to_speech(*args))
    monkeypatch.setattr(engine, "search_batch", lambda *args: time.sleep(pause) or search_batch(*args))
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0)) as running, \
            SearchClient(running.target) as served:
        for data, cut in ((clean, False), (noisy, True), (clean, False)):
            started = time.perf_counter()
            hits = served.search(data, COLLECTION, top_k=5)
            took = time.perf_counter() - started
            assert [(h.image_id, round(h.score, 4)) for h in hits] == expected[data]
            assert took >= 2 * pause if cut else took < 1.6 * pause, (cut, took)


def test_list_collections_and_health(client, engine):
    listing = client.list_collections()
    assert listing.model_version == engine.model_version and listing.model_name == "tiny"
    (info,) = [c for c in listing.collections if c.name == COLLECTION]
    assert info.searchable and info.images == engine.collection(COLLECTION).size
    assert (info.grid_rows, info.grid_cols) == engine.model.image_grid and info.embed_dim == 256
    assert info.bytes > 0
    assert client.health() == "SERVING"
    assert client.health("matchmap.v1.SpokenImageSearch") == "SERVING"


def test_a_collection_built_with_another_model_is_refused_not_misranked(client, data_dir, val, caption_wav):
    torch.manual_seed(1)
    other = create_model("tiny")
    with Library.open(data_dir) as library:
        library.index("other-model", [str(val.image_path(e)) for e in val.entries[:3]], other, progress=False)
    listing = {c.name: c for c in client.list_collections().collections}
    assert not listing["other-model"].searchable and listing[COLLECTION].searchable
    with pytest.raises(SearchServiceError) as raised:
        client.search(caption_wav, "other-model")
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "was indexed with model" in raised.value.details


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"matchmap.v1.SpokenImageSearch", "grpc.health.v1.Health"} <= services


# ---- localization --------------------------------------------------------------------------------


def test_localize_an_indexed_image_and_a_sent_one(client, engine, caption_wav, val_image):
    image_id = client.search(caption_wav, COLLECTION, top_k=1)[0].image_id
    result = client.localize(caption_wav, image_id=image_id, collection=COLLECTION)
    rows, cols = engine.model.image_grid
    assert result.values.shape == (rows, cols)
    assert result.values.min() == 0.0 and result.values.max() == pytest.approx(1.0)
    assert result.heat_max > result.heat_min
    duration = soundfile.info(str(caption_wav)).duration
    frames = len(result.frame_scores)
    assert frames == len(result.frame_best_regions) > 0
    assert frames * result.frame_seconds == pytest.approx(duration, abs=2 * result.frame_seconds)
    assert result.frame_best_regions.max() < rows * cols
    assert result.score == pytest.approx(float(result.frame_scores.mean()), rel=1e-4)  # MISA
    x0, y0, x1, y1 = result.box  # the centre crop of the 256 x 256 image
    assert 0 < x0 < x1 < 256 and 0 < y0 < y1 < 256

    span = client.localize(caption_wav, image_id=image_id, collection=COLLECTION, start_seconds=0.5, end_seconds=1.0)
    assert span.start_seconds <= 0.5 < 1.0 <= span.end_seconds <= 1.0 + span.frame_seconds
    assert not np.allclose(span.values, result.values)

    sent = client.localize(caption_wav, image=val_image)
    assert sent.box == (0.0, 0.0, 256.0, 256.0)
    assert sent.values.max() == pytest.approx(1.0) and sent.values.ndim == 2


def test_highlight_streams_heatmaps_of_the_latest_speech(client, caption_wav, val_image):
    samples, rate = soundfile.read(str(caption_wav), dtype="int16")
    pcm = samples.astype("<i2").tobytes()
    chunk = rate // 4 * 2  # 0.25 s of 16-bit samples
    chunks = [pcm[i : i + chunk] for i in range(0, len(pcm), chunk)]
    frames = list(client.highlight(iter(chunks), rate, image=val_image, window_seconds=1.0))
    assert 1 <= len(frames) <= len(chunks)
    ends = [f.end_seconds for f in frames]
    assert ends == sorted(ends)
    assert frames[-1].end_seconds == pytest.approx(len(samples) / rate, abs=0.2)
    for f in frames:
        assert f.end_seconds - f.start_seconds <= 1.0 + 0.2
        assert f.values.max() <= 1.0 and f.values.min() >= 0.0
        assert f.box == (0.0, 0.0, 256.0, 256.0)


# ---- bad input never hurts the service ------------------------------------------------------------


def pcm(seconds: float, rate: int = 16000) -> search_pb2.AudioInput:
    noise = np.random.default_rng(0).normal(0, 3000, int(seconds * rate)).astype("<i2")
    return search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=noise.tobytes(), sample_rate=rate))


def wav_input(path: Path) -> search_pb2.AudioInput:
    return search_pb2.AudioInput(encoded=path.read_bytes())


BAD_SEARCHES = {
    "no audio": (lambda w: search_pb2.SearchRequest(collection=COLLECTION), "INVALID_ARGUMENT", "audio is missing"),
    "empty bytes": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=b""), collection=COLLECTION), "INVALID_ARGUMENT", "empty"),
    "garbage": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=os.urandom(4000)), collection=COLLECTION), "INVALID_ARGUMENT", "cannot decode"),
    "truncated wav": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=w.read_bytes()[:5000]), collection=COLLECTION), "INVALID_ARGUMENT", "truncated"),
    "an image as audio": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=_png_bytes()), collection=COLLECTION), "INVALID_ARGUMENT", "cannot decode"),
    "zero sample rate": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=b"\x10\x00" * 800, sample_rate=0)), collection=COLLECTION), "INVALID_ARGUMENT", "sample_rate is 0"),
    "odd pcm bytes": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=b"\x10\x00" * 800 + b"\x01", sample_rate=16000)), collection=COLLECTION), "INVALID_ARGUMENT", "16-bit samples"),
    "silence": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=bytes(32000), sample_rate=16000)), collection=COLLECTION), "INVALID_ARGUMENT", "silent"),
    "nan samples": (lambda w: search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=_float_wav(np.full(8000, np.nan))), collection=COLLECTION), "INVALID_ARGUMENT", "NaN"),
    "too long": (lambda w: search_pb2.SearchRequest(audio=pcm(31.0, 8000), collection=COLLECTION), "INVALID_ARGUMENT", "limit of 30"),
    "unknown collection": (lambda w: search_pb2.SearchRequest(audio=wav_input(w), collection="nope"), "NOT_FOUND", "no collection named 'nope'"),
    "no collection": (lambda w: search_pb2.SearchRequest(audio=wav_input(w)), "INVALID_ARGUMENT", "collection is empty"),
    "top_k too big": (lambda w: search_pb2.SearchRequest(audio=wav_input(w), collection=COLLECTION, top_k=10**6), "INVALID_ARGUMENT", "top_k"),
    "candidates below top_k": (lambda w: search_pb2.SearchRequest(audio=wav_input(w), collection=COLLECTION, top_k=20, candidates=5), "INVALID_ARGUMENT", "candidates"),
    "candidates too many": (lambda w: search_pb2.SearchRequest(audio=wav_input(w), collection=COLLECTION, candidates=2**32 - 1), "INVALID_ARGUMENT", "candidates"),
}


def _png_bytes(image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or Image.new("RGB", (32, 32), (200, 30, 30))).save(buffer, format="PNG")
    return buffer.getvalue()


def _float_wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_search_requests_get_a_status_a_person_can_act_on(server, caption_wav, case):
    build, code, words = BAD_SEARCHES[case]
    with grpc.insecure_channel(server.target) as channel:
        stub = search_pb2_grpc.SpokenImageSearchStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Search(build(caption_wav), timeout=30)
        assert raised.value.code().name == code, raised.value.details()
        assert words in raised.value.details()
        assert stub.Search(search_pb2.SearchRequest(audio=wav_input(caption_wav), collection=COLLECTION, top_k=2)).hits


def test_bad_localize_and_highlight_requests(client, caption_wav, val_image):
    cases = [
        (dict(image_id="999999", collection=COLLECTION), "NOT_FOUND", "no indexed image with id 999999"),
        (dict(image_id="not-an-id", collection=COLLECTION), "INVALID_ARGUMENT", "not an image id"),
        (dict(image=b"not an image"), "INVALID_ARGUMENT", "not a recognized image"),
        (dict(image_id="1", collection="nope"), "NOT_FOUND", "no collection named"),
        (dict(image=val_image, start_seconds=50.0), "OUT_OF_RANGE", "span starts"),
        (dict(image=b"x" * 10, start_seconds=2.0, end_seconds=1.0), "INVALID_ARGUMENT", "not a recognized image"),
    ]
    for kwargs, code, words in cases:
        with pytest.raises(SearchServiceError) as raised:
            client.localize(caption_wav, **kwargs)
        assert raised.value.code.name == code and words in raised.value.details, raised.value
    with pytest.raises(SearchServiceError, match="INVALID_ARGUMENT.*window_seconds"):
        list(client.highlight(iter([b"\x00\x10" * 100]), 16000, image_id="1", collection=COLLECTION, window_seconds=99.0))
    with pytest.raises(SearchServiceError, match="INVALID_ARGUMENT.*sample_rate is 0"):
        list(client.highlight(iter([b"\x00\x10" * 100]), 0, image_id="1", collection=COLLECTION))
    with grpc.insecure_channel(client.target) as channel:
        stub = search_pb2_grpc.SpokenImageSearchStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Highlight(iter([search_pb2.HighlightRequest(samples_s16le=b"\x00\x01")]), timeout=10))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first Highlight message" in raised.value.details()
    assert client.search(caption_wav, COLLECTION, top_k=1)


def wav_with_header(fmt: int, channels: int, rate: int, bits: int, declared: int, payload: bytes) -> bytes:
    """A WAV file whose header fields are whatever the caller says (for fuzzing the decoder)."""
    block = channels * max(bits // 8, 1)
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block & 0xFFFFFFFF, block & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", declared) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


forged_wavs = st.builds(
    wav_with_header,
    fmt=st.sampled_from([1, 3, 6, 7, 0xFFFE, 0]),
    channels=st.integers(0, 9),
    rate=st.one_of(st.sampled_from([8000, 16000, 44100]), st.integers(0, 2**32 - 1)),
    bits=st.sampled_from([0, 8, 16, 24, 32, 64, 7]),
    declared=st.one_of(st.integers(0, 4000), st.integers(0, 2**32 - 1)),
    payload=st.binary(max_size=4000),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    audio=st.one_of(
        st.binary(max_size=3000).map(lambda b: search_pb2.AudioInput(encoded=b)),
        forged_wavs.map(lambda b: search_pb2.AudioInput(encoded=b)),
        st.builds(
            lambda b, r: search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=b, sample_rate=r)),
            st.binary(max_size=6000),
            st.one_of(
                st.integers(0, 2**32 - 1), st.integers(1000, 192_000), st.sampled_from([0, 1, 8000, 16000, 44100])
            ),
        ),
        st.just(None),
    ),
    collection=st.one_of(st.just(COLLECTION), st.text(max_size=20)),
    top_k=st.integers(0, 2**32 - 1),
    candidates=st.integers(0, 2**32 - 1),
    span=st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(width=32)),
    image=st.one_of(st.binary(max_size=500), st.text(max_size=8)),
)
def test_random_requests_always_get_a_proper_status(server, caption_wav, audio, collection, top_k, candidates, span, image):
    proper = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION"}
    with grpc.insecure_channel(server.target) as channel:
        stub = search_pb2_grpc.SpokenImageSearchStub(channel)
        calls = [
            lambda: stub.Search(search_pb2.SearchRequest(audio=audio, collection=collection, top_k=top_k, candidates=candidates), timeout=30),
            lambda: stub.Localize(search_pb2.LocalizeRequest(
                audio=audio, collection=collection, start_seconds=span[0], end_seconds=span[1],
                **({"image_bytes": image} if isinstance(image, bytes) else {"image_id": image})), timeout=30),
        ]
        for call in calls:
            try:
                call()
                code, details = "OK", ""
            except grpc.RpcError as error:
                code, details = error.code().name, error.details()
            assert code in proper, f"{code}: {details}"
            assert code == "OK" or len(details) > 10
        valid = stub.Search(search_pb2.SearchRequest(audio=wav_input(caption_wav), collection=COLLECTION, top_k=1), timeout=30)
        assert len(valid.hits) == 1


def test_deadlines_are_honoured_and_the_server_keeps_serving(server, caption_wav):
    with SearchClient(server.target, timeout=0.001) as hasty:
        with pytest.raises(SearchServiceError) as raised:
            hasty.search(caption_wav, COLLECTION)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with SearchClient(server.target) as patient:
        assert patient.search(caption_wav, COLLECTION, top_k=1)


def test_oversized_messages_are_refused(engine, caption_wav):
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, max_message_mb=0.05)) as small:
        with SearchClient(small.target) as c:
            with pytest.raises(SearchServiceError) as raised:
                c.search(b"\x00" * 100_000, COLLECTION)
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.health() == "SERVING"


# ---- auth, TLS, shutdown ---------------------------------------------------------------------------


def test_bearer_token_is_required_except_for_health(engine, caption_wav):
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, token="s3cret")) as guarded:
        for token in (None, "wrong"):
            with SearchClient(guarded.target, token=token) as c:
                with pytest.raises(SearchServiceError) as raised:
                    c.search(caption_wav, COLLECTION)
                assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(SearchServiceError, match="UNAUTHENTICATED"):
                    list(c.highlight(iter([]), 16000, image_id="1", collection=COLLECTION))
                assert c.health() == "SERVING"
        with SearchClient(guarded.target, token="s3cret") as c:
            assert len(c.search(caption_wav, COLLECTION, top_k=2)) == 2


def test_tls(engine, caption_wav, tls_files):
    cert, key = tls_files
    options = ServerOptions(host="localhost", port=0, tls_cert=cert, tls_key=key)
    with ServerThread(engine, options) as secure:
        target = f"localhost:{secure.port}"
        with SearchClient(target, tls_ca=cert) as c:
            assert len(c.search(caption_wav, COLLECTION, top_k=2)) == 2
        with SearchClient(target, timeout=3) as plaintext:
            with pytest.raises(SearchServiceError):
                plaintext.search(caption_wav, COLLECTION)


def test_graceful_stop_finishes_in_flight_calls_and_reports_not_serving(engine, caption_wav):
    samples, rate = soundfile.read(str(caption_wav), dtype="int16")
    pcm_bytes = samples.astype("<i2").tobytes()
    running = ServerThread(engine).start()
    more_audio, got_first = threading.Event(), threading.Event()

    def chunks():
        yield pcm_bytes[: len(pcm_bytes) // 2]
        got_first.wait(30)
        more_audio.wait(30)  # the stream is still open when the stop begins
        yield pcm_bytes[len(pcm_bytes) // 2 :]

    with SearchClient(running.target) as c:
        watch_channel = grpc.insecure_channel(running.target)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        frames = []

        def stream():
            for frame in c.highlight(chunks(), rate, image_id="1", collection=COLLECTION):
                frames.append(frame)
                got_first.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert got_first.wait(30)
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 20})
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        with pytest.raises(ServerUnreachable):
            SearchClient(running.target, timeout=5).search(caption_wav, COLLECTION)
        more_audio.set()
        streamer.join(30)
        stopper.join(30)
        watch_channel.close()
    assert not stopper.is_alive() and not streamer.is_alive()
    assert frames[-1].end_seconds == pytest.approx(len(samples) / rate, abs=0.2)  # the stream finished


def test_serve_command_stops_cleanly_on_sigterm(checkpoint, data_dir, caption_wav):
    env = dict(os.environ, MATCHMAP_TOKEN="")
    process = subprocess.Popen(
        [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(data_dir), "--checkpoint", str(checkpoint),
         "--port", "0", "--host", "127.0.0.1", "--device", "cpu", "--no-http"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "listening on" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited before listening"
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        assert COLLECTION in line
        with SearchClient(f"127.0.0.1:{port}") as c:
            assert len(c.search(caption_wav, COLLECTION, top_k=3)) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


# ---- the query command and remote recall ------------------------------------------------------------


def test_query_command_prints_a_table_or_json_and_exits_by_outcome(server, caption_wav, val, tmp_path):
    runner = CliRunner()
    args = ["--server", server.target, "--top-k", "3"]
    table = runner.invoke(query, [*args, "--collection", COLLECTION, str(caption_wav)])
    assert table.exit_code == 0, table.output
    assert re.search(r"^\s+1\s+-?\d+\.\d{4}\s+-?\d+\.\d{4}\s+\d+\s+/", table.output, re.M)
    assert "timings: decode" in table.output

    second = val.audio_path(val.entries[1])
    as_json = runner.invoke(query, [*args, "--json", str(caption_wav), str(second)])  # the only collection
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.stdout)  # stdout alone: the in-process server may log to stderr meanwhile
    assert answer["collection"] == COLLECTION and len(answer["queries"]) == 2
    assert [h["rank"] for h in answer["queries"][0]["hits"]] == [1, 2, 3]
    assert answer["queries"][1]["timings_ms"]["total"] > 0

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    partly = runner.invoke(query, [*args, "--json", str(caption_wav), str(not_audio)])
    assert partly.exit_code == 1
    errors = [q for q in json.loads(partly.stdout)["queries"] if "error" in q]
    assert errors == [{"audio": str(not_audio), "error": {"code": "INVALID_ARGUMENT", "message": errors[0]["error"]["message"]}}]

    assert runner.invoke(query, [*args, str(tmp_path / "missing.wav")]).exit_code == 2
    assert runner.invoke(query, [*args, "--top-k", "0", str(caption_wav)]).exit_code == 2
    unreachable = runner.invoke(query, ["--server", f"127.0.0.1:{unused_port()}", "--collection", COLLECTION, str(caption_wav)])
    assert unreachable.exit_code == 3 and "cannot reach" in unreachable.output


def test_an_mp3_query_is_decoded_and_answered(server, caption_wav, tmp_path):
    samples, rate = soundfile.read(caption_wav, dtype="float32")
    mp3 = tmp_path / "caption.mp3"
    soundfile.write(mp3, samples, rate, format="MP3")
    answers = {}
    for path in (caption_wav, mp3):
        result = CliRunner().invoke(query, ["--server", server.target, "--collection", COLLECTION, "--top-k", "3",
                                            "--json", str(path)])
        assert result.exit_code == 0, result.output
        answers[path.suffix] = json.loads(result.output)["queries"][0]
    assert len(answers[".mp3"]["hits"]) == 3
    assert answers[".mp3"]["audio_seconds"] == pytest.approx(answers[".wav"]["audio_seconds"], abs=0.02)


def unused_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_recall(model, engine, collection: str, manifest, ks) -> dict[str, float]:
    """Speech-to-image MISA recall@k over the manifest's images, scored exhaustively offline."""
    images = image_paths(manifest)
    ids, maps = stored_maps(engine, collection, images)
    id_of = engine.collection(collection).ids_for_uris([str(p) for p in images])
    audio, lengths = offline_audio_maps(model, [manifest.audio_path(e) for e in manifest.entries])
    misa = score_matrix(audio, lengths, maps, kinds=("misa",))["misa"]  # (captions, images)
    ranking = ids[torch.argsort(misa, dim=1, descending=True).numpy()]  # image ids, best first
    ranks = [int(np.flatnonzero(ranking[i] == id_of[str(p)][0])[0]) + 1 for i, p in enumerate(images)]
    return {f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}


def test_remote_recall_equals_offline_misa_recall(server, engine, model, checkpoint, data_dir, tiny_corpus, val):
    ks = (1, 5, 10)
    # index_first builds a fresh val-only collection that the running server picks up.
    result = remote_recall(
        server.target, tiny_corpus / "val.json", "val-only", ks=ks, index_first=True, data_dir=data_dir,
        checkpoint=checkpoint, candidates=1000,
    )
    assert result["pairs"] == len(val.entries) and result["errors"] == 0
    assert result["candidates"] == engine.collection("val-only").size
    assert result["MISA"]["speech_to_image"] == offline_recall(model, engine, "val-only", val, ks)
    assert result["MISA"]["speech_to_image"]["R@10"] >= result["MISA"]["speech_to_image"]["R@1"]


# ---- GPU ---------------------------------------------------------------------------------------------


# ---- CUDA: the resident-maps stage 2 on the GPU, on its own collection (no speech engine needed) ----

STAGE2_COLLECTION = "stage2"
STAGE2_IMAGES = 160  # above the 64 best that stage 2 re-scores exactly, so the resident pass runs


@pytest.fixture(scope="module")
def stage2_library(model, tmp_path_factory) -> Path:
    """A collection of STAGE2_IMAGES random blocky images indexed with the test model."""
    folder = tmp_path_factory.mktemp("stage2")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(STAGE2_IMAGES):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        paths.append(folder / f"blocks-{i:04d}.png")
        Image.fromarray(blocks.repeat(16, 0).repeat(16, 1)).save(paths[-1])
    with Library.open(folder / "library", create=True) as library:
        report = library.index(STAGE2_COLLECTION, [str(p) for p in paths], model, progress=False)
    assert report.added == STAGE2_IMAGES and not report.failed
    return folder / "library"


def noise_queries(count: int, seed: int = 0) -> list[bytes]:
    """WAV bytes of ``count`` amplitude-modulated noise captions of 1.5 to 5 s."""
    rng = np.random.default_rng(seed)
    wavs = []
    for _ in range(count):
        n = int(16000 * rng.uniform(1.5, 5.0))
        envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 3 * np.pi * n / 16000, n))
        buffer = io.BytesIO()
        soundfile.write(buffer, (0.2 * rng.standard_normal(n) * envelope).astype(np.float32), 16000, format="WAV")
        wavs.append(buffer.getvalue())
    return wavs


def assert_rankings_agree(want, got) -> None:
    """Two searches' hits agree up to ties within the precision gate's tolerance (encoders.precision)."""
    from encoders.precision import compare_rankings

    comparison = compare_rankings([(h.image_id, h.score) for h in want.hits], [(h.image_id, h.score) for h in got.hits])
    assert comparison.agree, comparison.problems


# Stage 2 in exact float32 over every candidate: nothing resident, no bfloat16 pass below a million candidates.
EXACT_STAGE2 = SearchLimits(resident_maps_mb=0, exact_rescore_at_least=10**6)


def check_stage2_ranks_like_exact_cpu(checkpoint, library: Path, device: str, monkeypatch) -> None:
    """Stage 2 on ``device`` (default limits: resident maps) against the CPU scoring every candidate
    exactly from the store: both the resident bfloat16 pass + exact re-score (candidates above the
    64 it re-scores) and the plain exact path (candidates below) give the CPU's top 10, up to ties
    within the gate's tolerance (encoders.precision)."""
    from encoders.precision import restore_float32_settings, use_exact_float32
    from search.resident import ResidentMaps

    resident_calls = []
    real_misa = ResidentMaps.paired_misa

    def spy(self, audio, lengths, positions, valid, **kwargs):
        resident_calls.append((self.maps.device.type, audio.device.type, int(valid.sum())))
        return real_misa(self, audio, lengths, positions, valid, **kwargs)

    monkeypatch.setattr(ResidentMaps, "paired_misa", spy)
    settings = use_exact_float32()
    exact = SearchEngine.open(checkpoint, library, device="cpu", limits=EXACT_STAGE2)
    engine = SearchEngine.open(checkpoint, library, device=device, limits=SearchLimits(held_energy=EVERY_DIM))
    try:
        assert engine.warm_up() == [STAGE2_COLLECTION]
        assert engine.resident_bytes()[STAGE2_COLLECTION] > 0
        refine = max(engine.limits.exact_rescore_at_least, engine.limits.exact_rescore_factor * 10)
        for candidates in (STAGE2_IMAGES, refine // 2):
            for data in noise_queries(4):
                resident_calls.clear()
                want = exact.search(data, STAGE2_COLLECTION, top_k=10, candidates=candidates)
                assert not resident_calls
                got = engine.search(data, STAGE2_COLLECTION, top_k=10, candidates=candidates)
                assert got.candidates == want.candidates == candidates
                if candidates > refine:  # the resident pass ran, on the engine's device, over every candidate
                    assert resident_calls == [(device, device, candidates)]
                else:
                    assert not resident_calls
                assert_rankings_agree(want, got)
    finally:
        exact.close()
        engine.close()
        restore_float32_settings(settings)


def test_stage2_resident_maps_rank_like_exact_scoring(checkpoint, stage2_library, monkeypatch):
    # The same check as the CUDA one below, on the CPU, so that it runs everywhere.
    check_stage2_ranks_like_exact_cpu(checkpoint, stage2_library, "cpu", monkeypatch)


@pytest.mark.parametrize("resident_mb", [4096.0, 0.0], ids=["resident", "store"])
def test_a_batch_of_queries_ranks_each_as_it_would_alone(checkpoint, stage2_library, resident_mb):
    """Stage 2 scores a batch's queries in one call (each against its own candidates): every query of
    a batch gets the hits it gets alone, whatever its neighbours' lengths and top_k, and a query to an
    unknown collection fails alone."""
    from indexer.library import CollectionNotFound
    from search.engine import SearchQuery

    engine = SearchEngine.open(checkpoint, stage2_library, device="cpu", limits=SearchLimits(resident_maps_mb=resident_mb))
    try:
        engine.warm_up()
        prepared = [engine.prepare_audio(data) for data in noise_queries(5, seed=7)]
        top_ks = [10, 3, 25, 1, 10]
        queries = [SearchQuery(p, STAGE2_COLLECTION, k, STAGE2_IMAGES) for p, k in zip(prepared, top_ks, strict=True)]
        batch = engine.search_batch([*queries, SearchQuery(prepared[0], "no-such-collection", 10, 10)])
        assert isinstance(batch[-1], CollectionNotFound)
        for query, together in zip(queries, batch[:-1], strict=True):
            alone = engine.search_batch([query])[0]
            assert together.batch_size == 6 and alone.batch_size == 1
            assert [h.image_id for h in together.hits] == [h.image_id for h in alone.hits]
            assert len(together.hits) == query.top_k and together.candidates == STAGE2_IMAGES
            np.testing.assert_allclose([h.score for h in together.hits], [h.score for h in alone.hits], atol=1e-5)
            assert [h.score for h in together.hits] == sorted((h.score for h in together.hits), reverse=True)
    finally:
        engine.close()


def test_a_collection_that_is_not_resident_gets_the_bfloat16_pass_from_the_store(checkpoint, stage2_library,
                                                                                  monkeypatch):
    """Over the memory budget (here 0), stage 2 still scores every candidate in bfloat16 (read from the
    store through the page cache) from STORE_COARSE_AT_LEAST candidates on, and re-scores the best
    exactly: the top 10 of exact scoring. Below that, exact scoring of every candidate."""

    calls = []
    real = search.engine.misa_caption_by_caption
    monkeypatch.setattr("search.engine.misa_caption_by_caption",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    exact = SearchEngine.open(checkpoint, stage2_library, device="cpu", limits=EXACT_STAGE2)
    paged = SearchEngine.open(checkpoint, stage2_library, device="cpu", limits=SearchLimits(resident_maps_mb=0))
    try:
        assert paged.warm_up() == [STAGE2_COLLECTION] and paged.resident_bytes() == {}
        paged.search(noise_queries(1, seed=3)[0], STAGE2_COLLECTION, top_k=10, candidates=STAGE2_IMAGES)
        assert not calls  # 160 candidates: below the default STORE_COARSE_AT_LEAST
        monkeypatch.setattr("search.engine.STORE_COARSE_AT_LEAST", STAGE2_IMAGES)
        for data in noise_queries(4, seed=3):
            want = exact.search(data, STAGE2_COLLECTION, top_k=10, candidates=STAGE2_IMAGES)
            assert not calls
            got = paged.search(data, STAGE2_COLLECTION, top_k=10, candidates=STAGE2_IMAGES)
            assert calls == [1] and got.candidates == STAGE2_IMAGES
            calls.clear()
            assert_rankings_agree(want, got)
    finally:
        exact.close()
        paged.close()


def test_resident_maps_score_a_batch_in_one_call_as_one_query_at_a_time():
    """The accelerators' path (one gather, one paired_misa call) and the CPU's (a caption at a time,
    cache-sized blocks) give the same bfloat16 MISA, and padding entries score -inf."""
    from search.resident import ResidentMaps

    generator = torch.Generator().manual_seed(5)
    maps = torch.randn(300, 16, 32, generator=generator).bfloat16()
    resident = ResidentMaps("c", 1, maps)
    audio = torch.randn(3, 11, 32, generator=generator)
    lengths = torch.tensor([11, 4, 7])
    positions = torch.randint(0, 300, (3, 50), generator=generator).numpy()
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[2, 40:] = False
    one_call = resident.paired_misa(audio, lengths, positions, valid, one_call=True)
    per_query = resident.paired_misa(audio, lengths, positions, valid, one_call=False, cpu_chunk=16)
    assert torch.isinf(one_call[2, 40:]).all() and torch.isinf(per_query[2, 40:]).all()
    torch.testing.assert_close(one_call[valid], per_query[valid], rtol=0, atol=2e-2)
    exact = score_matrix(audio[1:2, :4], lengths[1:2], maps[positions[1]].float())["misa"][0]
    torch.testing.assert_close(per_query[1], exact, rtol=0, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stage2_on_cuda_ranks_like_cpu(checkpoint, stage2_library, monkeypatch):
    check_stage2_ranks_like_exact_cpu(checkpoint, stage2_library, "cuda", monkeypatch)
