"""What a query can throw at the service, with the shipped model over real gRPC: streaming FLACs that
do not declare their length, recordings longer than the model takes, noise around the speech, and
errors that must not leak the server's paths or catalog."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import soundfile
from google.rpc import error_details_pb2, status_pb2

from encoders import create_model
from indexer import Library
from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.engine import SearchEngine
from search.server import ServerThread, public_message
from training.manifest import load_manifest
from training.synth import synthesize_corpus

COLLECTION = "scenes"
CAPTIONS = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening_corpus")
    synthesize_corpus(out, pairs=1, val_pairs=CAPTIONS, seed=777, engines=("espeak",), workers=1, progress=False)
    return load_manifest(out / "val.json")


@pytest.fixture(scope="module")
def data_dir(scenes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening_library")
    with Library.open(folder) as library:
        library.index(COLLECTION, [str(scenes.image_path(e)) for e in scenes.entries], create_model(), progress=False)
        library.index("private-holiday-photos", [str(scenes.image_path(scenes.entries[0]))], create_model(),
                      progress=False)
    return folder


@pytest.fixture(scope="module")
def stub(data_dir):
    engine = SearchEngine.open(None, data_dir, device="cpu")
    with ServerThread(engine) as server, grpc.insecure_channel(server.target) as channel:
        yield search_pb2_grpc.SpokenImageSearchStub(channel)
    engine.close()


def samples_of(scenes, i: int) -> np.ndarray:
    samples, rate = soundfile.read(str(scenes.audio_path(scenes.entries[i])), dtype="float32")
    assert rate == 16000
    return samples


def encoded(samples: np.ndarray, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format=fmt)
    return buffer.getvalue()


def search(stub, data: bytes, top_k: int = 5) -> list[str]:
    reply = stub.Search(search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=data), collection=COLLECTION,
                                                 top_k=top_k), timeout=60)
    return [h.image_id for h in reply.hits]


def unknown_length_flac(samples: np.ndarray) -> bytes:
    """A FLAC whose STREAMINFO says "total samples unknown" (0), as streaming encoders write it."""
    data = bytearray(encoded(samples, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    streaminfo = 8
    data[streaminfo + 13] &= 0xF0  # total samples: the low 36 bits of bytes 10..17
    data[streaminfo + 14 : streaminfo + 18] = bytes(4)
    assert soundfile.info(io.BytesIO(bytes(data))).frames > 2**40  # libsndfile: length unknown
    return bytes(data)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert details is not None, "no google.rpc.Status details"
    status = status_pb2.Status.FromString(details)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


def test_a_flac_of_unknown_length_is_searched_like_the_same_wav(stub, scenes):
    samples = samples_of(scenes, 0)
    assert search(stub, unknown_length_flac(samples)) == search(stub, encoded(samples))


def test_a_long_flac_of_unknown_length_is_refused_at_the_limit(stub, scenes):
    long = np.tile(samples_of(scenes, 0), 20)[: 40 * 16000]  # 40 s, over the server's 30 s
    error = rpc_error(lambda: search(stub, unknown_length_flac(long)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "30 s" in error.details(), error.details()
    assert search(stub, encoded(samples_of(scenes, 0)))  # still serving


def test_a_query_longer_than_the_model_takes_is_refused_naming_the_limit(stub, scenes):
    speech = np.concatenate([samples_of(scenes, i) for i in range(CAPTIONS)])
    speech = speech[: 20 * 16000]  # 20 s of captions: accepted by the server's 30 s, not by the model
    assert len(speech) == 20 * 16000
    error = rpc_error(lambda: search(stub, encoded(speech)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "10.24 s" in error.details() and "20." in error.details()
    assert bad_request_fields(error) == ["audio"]
    image = scenes.image_path(scenes.entries[0]).read_bytes()
    error = rpc_error(lambda: stub.Localize(search_pb2.LocalizeRequest(
        audio=search_pb2.AudioInput(encoded=encoded(speech)), image_bytes=image), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "10.24 s" in error.details()


def test_faint_noise_around_a_caption_does_not_change_what_it_finds(stub, scenes):
    # White noise at -40 dBFS before the caption (2-5 s) and 0.5 s after, 9 s in all (within the model's 10.24 s):
    # MISA averages over every frame, so without the VAD (search.vad) the noise outweighs the speech
    # (11 s of it: 0 of 16 captions found in the top 10 in issue 18).
    # The VAD keeps 0.25 s of the noise on each side, so a near tie at the top may flip: tiny-0b6ddfff39d0
    # keeps 14 of 16 best hits (tiny-b9792a4f6ced 15 or 16), and every clean best hit among the noisy top 3.
    rng = np.random.default_rng(0)
    same_best = 0
    for i in range(CAPTIONS):
        clean = samples_of(scenes, i)
        before = round((9.0 - 0.5 - len(clean) / 16000) * 16000)
        assert before >= 2 * 16000
        noisy = np.concatenate([rng.standard_normal(before) * 0.01, clean, rng.standard_normal(8000) * 0.01])
        best, noisy_hits = search(stub, encoded(clean))[0], search(stub, encoded(noisy.astype(np.float32)))
        assert best in noisy_hits[:3], (i, best, noisy_hits)
        same_best += best == noisy_hits[0]
    assert same_best >= CAPTIONS - 2, same_best


def test_an_unknown_collection_is_not_found_without_naming_the_catalog_or_other_collections(stub, scenes, data_dir):
    request = search_pb2.SearchRequest(audio=search_pb2.AudioInput(encoded=encoded(samples_of(scenes, 0))),
                                       collection="nope")
    error = rpc_error(lambda: stub.Search(request, timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    message = error.details()
    assert "'nope'" in message and "ListCollections" in message
    for secret in (str(data_dir), "sqlite", "catalog.db", "private-holiday-photos", COLLECTION):
        assert secret not in message, message
    assert bad_request_fields(error) == ["collection"]


def test_a_bad_field_is_named_in_bad_request_details(stub, scenes):
    audio = search_pb2.AudioInput(encoded=encoded(samples_of(scenes, 0)))
    for request, field in [
        (search_pb2.SearchRequest(audio=audio, collection=COLLECTION, top_k=10**6), "top_k"),
        (search_pb2.SearchRequest(audio=audio, collection=COLLECTION, top_k=20, candidates=5), "candidates"),
        (search_pb2.SearchRequest(collection=COLLECTION), "audio"),
        (search_pb2.SearchRequest(audio=audio), "collection"),
    ]:
        error = rpc_error(lambda r=request: stub.Search(r, timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert bad_request_fields(error) == [field]


def test_wire_messages_mask_paths_and_urls():
    assert public_message("cannot open /srv/data/catalog.db here") == "cannot open <hidden> here"
    assert public_message("catalog postgresql://matchmap:pw@db:5432/x failed") == "catalog <hidden> failed"
    assert public_message("top_k is 5; it must lie in 1..1000 (0 = 10)") == "top_k is 5; it must lie in 1..1000 (0 = 10)"
    assert public_message("audio lasts 2.50 s / 3 s") == "audio lasts 2.50 s / 3 s"
