"""Property-based fuzzing of every RPC over loopback, with an oracle for the status each request deserves.

Hypothesis draws *recipes* (which audio, image, counts, span, stream layout; its random bytes), the
test builds the request from real speech and images of the tiny corpus, and the oracle says which
status codes the request may get: OK only when every field is valid; otherwise one of the codes
its faults call for (a request with two faults may get either's code). INTERNAL and UNKNOWN are
never expected, so they always fail, and so does OK for an invalid request. After every call the
server must still answer a valid Search.

The codes (issue 18): malformed, undecodable, empty, silent or over-long audio, a bad sample rate,
top_k, candidates or window, a missing field, a malformed message -> INVALID_ARGUMENT; an unknown
collection or image id -> NOT_FOUND; a speech span outside the audio -> INVALID_ARGUMENT or
OUT_OF_RANGE.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

# The search suite's module fixtures: the tiny corpus indexed with a tiny model, served on loopback.
from test_search import COLLECTION, data_dir, engine, model, server, val

from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.engine import SearchLimits

INVALID, NOT_FOUND, OUT_OF_RANGE = "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE"
SPAN_FAULT = frozenset({INVALID, OUT_OF_RANGE})
SHARED_FIXTURES = (data_dir, engine, model, server, val)  # requested by name below
LIMITS = SearchLimits()  # the fixtures' engine runs the defaults
VALID_RATES = (8000, 11025, 16000, 22050, 44100, 48000)
# Out of 1000..192000 Hz, or (191999) sharing no factor with 16 kHz: a resampler gigabytes large.
BAD_RATES = (0, 1, 999, 192_001, 191_999, 2**32 - 1)
SPEECH_LIMIT_S = 10.24  # the most speech the tiny model's audio branch takes
RUN = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


@dataclass(frozen=True)
class Built:
    """A request part built from a recipe: the value, the codes its fault calls for (empty: valid)."""

    value: object
    faults: frozenset[str] = frozenset()
    seconds: float | None = None  # of valid audio


def expected_codes(*parts: Built) -> frozenset[str]:
    faults = frozenset().union(*(p.faults for p in parts))
    return faults or frozenset({"OK"})


def call_status(call) -> tuple[str, str, object]:
    """(status name, details, response or None) of ``call()``."""
    try:
        return "OK", "", call()
    except grpc.RpcError as error:
        return error.code().name, error.details() or "", None


def assert_status(code: str, details: str, allowed: frozenset[str], recipe) -> None:
    assert code in allowed, f"got {code} ({details!r}), expected one of {sorted(allowed)} for {recipe!r}"
    assert code == "OK" or len(details) > 10, f"{code} without a message a person can act on: {details!r}"


# ---- inputs: real speech and images, recoded and broken in known ways ---------------------------


@dataclass(repr=False)
class Bank:
    """Real inputs the recipes draw from."""

    speech: np.ndarray  # (N,) float32 at 16 kHz: a spoken caption
    wav: bytes  # the caption's WAV file
    image: bytes  # a scene image (PNG)
    image_ids: list[int]  # ids indexed in COLLECTION
    collection_size: int

    def pcm(self, rate: int, seconds: float | None = None) -> bytes:
        """The caption as s16le at ``rate`` (tiled or cut to ``seconds``)."""
        n = len(self.speech)
        at_rate = np.interp(np.arange(round(n * rate / 16000)) * 16000 / rate, np.arange(n), self.speech)
        if seconds is not None:
            at_rate = np.resize(at_rate, round(seconds * rate))
        return (np.clip(at_rate, -1, 1) * 32767).astype("<i2").tobytes()

    @property
    def seconds(self) -> float:
        return len(self.speech) / 16000


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def forged_wav(fmt: int, channels: int, rate: int, bits: int, payload: bytes) -> bytes:
    """A WAV file with the header fields given (the data chunk's size is the payload's)."""
    block = channels * max(bits // 8, 1)
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block & 0xFFFFFFFF, block & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def bank(val, server) -> Bank:
    entries = sorted(val.entries, key=lambda e: soundfile.info(str(val.audio_path(e))).duration)
    wav_path = val.audio_path(entries[0])  # the shortest caption: room for padding under every limit
    speech, rate = soundfile.read(str(wav_path), dtype="float32")
    assert rate == 16000 and speech.ndim == 1
    with grpc.insecure_channel(server.target) as channel:
        stub = search_pb2_grpc.SpokenImageSearchStub(channel)
        size = next(c.images for c in stub.ListCollections(search_pb2.ListCollectionsRequest()).collections
                    if c.name == COLLECTION)
        hits = stub.Search(search_pb2.SearchRequest(
            audio=search_pb2.AudioInput(encoded=wav_path.read_bytes()), collection=COLLECTION, top_k=size)).hits
    return Bank(speech, wav_path.read_bytes(), val.image_path(entries[0]).read_bytes(),
                sorted(int(h.image_id) for h in hits), size)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield search_pb2_grpc.SpokenImageSearchStub(channel)


def still_serving(stub, bank: Bank) -> None:
    """The server answers a valid query after whatever came before."""
    audio = search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=bank.pcm(16000), sample_rate=16000))
    response = stub.Search(search_pb2.SearchRequest(audio=audio, collection=COLLECTION, top_k=1), timeout=60)
    assert len(response.hits) == 1


# ---- recipes ----------------------------------------------------------------------------------------


def half_valid(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` half the time (a nested one_of would be flattened into its branches), so a fault usually
    arrives with valid company and its own code is the one the server must answer."""
    return st.booleans().flatmap(lambda ok: valid if ok else invalid)


valid_audio = st.one_of(
    st.tuples(st.just("wav")),
    st.tuples(st.just("flac")),
    st.tuples(st.just("ogg")),
    st.tuples(st.just("wav_stereo_44k")),
    st.tuples(st.just("pcm"), st.sampled_from(VALID_RATES)),
    st.tuples(st.just("pcm_padded"), st.sampled_from(VALID_RATES), st.floats(0.1, 1.5)),  # silence around speech
)
invalid_audio = st.one_of(
    st.tuples(st.just("pcm_bad_rate"), st.sampled_from(BAD_RATES)),
    st.tuples(st.just("pcm_odd_bytes"), st.sampled_from(VALID_RATES)),
    st.tuples(st.just("pcm_silent"), st.sampled_from(VALID_RATES), st.integers(0, 1), st.floats(0.05, 3.0)),
    st.tuples(st.just("pcm_empty"), st.sampled_from(VALID_RATES)),
    st.tuples(st.just("pcm_long"), st.sampled_from([12.0, 20.0, 31.0, 60.0])),  # over the model's or server's limit
    st.tuples(st.just("wav_long"), st.sampled_from([12.0, 31.0])),
    st.tuples(st.just("wav_nan")),
    st.tuples(st.just("truncated"), st.floats(0.0, 0.999)),
    st.tuples(st.just("garbage"), st.binary(max_size=3000)),
    st.tuples(st.just("forged"), st.sampled_from([0, 1, 3]), st.integers(0, 2), st.sampled_from([0, 500, 10**6, 16000]),
              st.sampled_from([0, 16]), st.binary(min_size=2, max_size=2000)).filter(
        lambda r: r[1] == 0 or r[2] == 0 or r[3] != 16000 or r[4] == 0),  # fmt, channels, rate, bits: one impossible
    st.tuples(st.just("encoded_empty")),
    st.tuples(st.just("unset_source")),  # AudioInput present, neither encoded nor pcm
    st.tuples(st.just("missing")),  # no audio field at all
)
audio_recipes = half_valid(valid_audio, invalid_audio)


def build_audio(recipe: tuple, bank: Bank) -> Built:
    """The AudioInput (None = leave the field unset) a recipe stands for, and its faults."""
    kind, *args = recipe
    bad = frozenset({INVALID})

    def pcm(data: bytes, rate: int) -> search_pb2.AudioInput:
        return search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=data, sample_rate=rate))

    def encoded(data: bytes) -> search_pb2.AudioInput:
        return search_pb2.AudioInput(encoded=data)

    s = bank.speech
    if kind == "wav":
        return Built(encoded(bank.wav), seconds=bank.seconds)
    if kind == "flac":
        return Built(encoded(encode(s, 16000, "FLAC")), seconds=bank.seconds)
    if kind == "ogg":
        return Built(encoded(encode(s, 16000, "OGG", "VORBIS")), seconds=bank.seconds)
    if kind == "wav_stereo_44k":
        at44 = np.frombuffer(bank.pcm(44100), "<i2").astype(np.float32) / 32768
        return Built(encoded(encode(np.stack([at44, 0.5 * at44], 1), 44100, "WAV")), seconds=bank.seconds)
    if kind == "pcm":
        return Built(pcm(bank.pcm(args[0]), args[0]), seconds=bank.seconds)
    if kind == "pcm_padded":
        rate, pad = args
        silence = bytes(2 * round(pad * rate))
        return Built(pcm(silence + bank.pcm(rate) + silence, rate), seconds=bank.seconds + 2 * pad)
    if kind == "pcm_bad_rate":
        return Built(pcm(bank.pcm(16000), args[0]), bad)
    if kind == "pcm_odd_bytes":
        return Built(pcm(bank.pcm(args[0]) + b"\x01", args[0]), bad)
    if kind == "pcm_silent":  # digital silence, or +-1 LSB (-90 dBFS)
        rate, lsb, seconds = args
        noise = np.random.default_rng(0).integers(-lsb, lsb + 1, round(seconds * rate)).astype("<i2")
        return Built(pcm(noise.tobytes(), rate), bad)
    if kind == "pcm_empty":
        return Built(pcm(b"", args[0]), bad)
    if kind == "pcm_long":
        return Built(pcm(bank.pcm(16000, args[0]), 16000), bad)
    if kind == "wav_long":
        return Built(encoded(encode(np.resize(s, round(args[0] * 16000)), 16000, "WAV")), bad)
    if kind == "wav_nan":
        return Built(encoded(encode(np.where(np.arange(len(s)) % 1000 == 7, np.nan, s), 16000, "WAV", "FLOAT")), bad)
    if kind == "truncated":
        return Built(encoded(bank.wav[: int(args[0] * (len(bank.wav) - 1))]), bad)
    if kind == "garbage":
        return Built(encoded(b"\x00\x01junk" + args[0]), bad)
    if kind == "forged":
        return Built(encoded(forged_wav(*args)), bad)
    if kind == "encoded_empty":
        return Built(encoded(b""), bad)
    if kind == "unset_source":
        return Built(search_pb2.AudioInput(), bad)
    if kind == "missing":
        return Built(None, bad)
    raise AssertionError(kind)


# An image: an indexed one by id (with a collection), or one sent with the request.
valid_image = st.one_of(
    st.tuples(st.just("id"), st.integers(0, 10**6)),  # an indexed id (index into the bank's ids)
    st.tuples(st.just("bytes"), st.sampled_from(["PNG", "JPEG"])),
)
invalid_image = st.one_of(
    st.tuples(st.just("id_unknown"), st.one_of(st.integers(10**6, 2**62), st.integers(-(2**62), -1))),
    st.tuples(st.just("id_text"), st.text("abcxyz._- +", max_size=8)),
    st.tuples(st.just("bytes_truncated"), st.floats(0.0, 0.5)),
    st.tuples(st.just("bytes_garbage"), st.binary(max_size=500)),
    st.tuples(st.just("bytes_empty")),
    st.tuples(st.just("missing")),
)
image_recipes = half_valid(valid_image, invalid_image)
invalid_collection = st.one_of(st.just(""), st.text(max_size=12))  # rarely COLLECTION itself: then valid
collection_recipes = half_valid(st.just(COLLECTION), invalid_collection)


def build_image(recipe: tuple, collection: str, bank: Bank) -> Built:
    """({"image_id" | "image_bytes": value} or {}, faults); the collection matters only for an id."""
    kind, *args = recipe
    bad = frozenset({INVALID})
    collection_faults = (frozenset({INVALID}) if collection == "" else
                         frozenset() if collection == COLLECTION else frozenset({NOT_FOUND}))
    if kind == "id":
        return Built({"image_id": str(bank.image_ids[args[0] % len(bank.image_ids)])}, collection_faults)
    if kind == "id_unknown":
        return Built({"image_id": str(args[0])}, frozenset({NOT_FOUND}) | collection_faults)
    if kind == "id_text":
        return Built({"image_id": args[0]}, bad | collection_faults)
    if kind == "bytes":
        buffer = io.BytesIO()
        Image.open(io.BytesIO(bank.image)).convert("RGB").save(buffer, format=args[0])
        return Built({"image_bytes": buffer.getvalue()})
    if kind == "bytes_truncated":
        return Built({"image_bytes": bank.image[: int(args[0] * len(bank.image))]}, bad)
    if kind == "bytes_garbage":
        return Built({"image_bytes": b"\x00\x01junk" + args[0]}, bad)
    if kind == "bytes_empty":
        return Built({"image_bytes": b""}, bad)
    if kind == "missing":
        return Built({}, bad)
    raise AssertionError(kind)


# ---- Search ----------------------------------------------------------------------------------------

counts = st.one_of(st.just(0), st.integers(1, 40), st.integers(990, 1010), st.integers(9990, 10_010),
                   st.integers(0, 2**32 - 1))


def search_count_faults(top_k: int, candidates: int) -> tuple[frozenset[str], int, int]:
    """(faults, effective top_k, effective candidates) of a request's counts (0 = the defaults)."""
    k = top_k or LIMITS.default_top_k
    c = candidates or max(LIMITS.default_candidates, k)
    # the fixtures' collection is small: it may be asked for up to max_exhaustive_candidates
    valid = 1 <= k <= LIMITS.max_top_k and k <= c <= LIMITS.max_exhaustive_candidates
    return frozenset() if valid else frozenset({INVALID}), k, c


@RUN
@given(audio=audio_recipes, collection=collection_recipes, top_k=counts, candidates=counts)
def test_search_gets_the_status_its_fields_call_for(stub, bank, audio, collection, top_k, candidates):
    built = build_audio(audio, bank)
    count_faults, k, c = search_count_faults(top_k, candidates)
    where = Built(collection, frozenset({INVALID}) if collection == "" else
                  frozenset() if collection == COLLECTION else frozenset({NOT_FOUND}))
    request = search_pb2.SearchRequest(collection=collection, top_k=top_k, candidates=candidates)
    if built.value is not None:
        request.audio.CopyFrom(built.value)
    allowed = expected_codes(built, Built(None, count_faults), where)
    code, details, response = call_status(lambda: stub.Search(request, timeout=60))
    assert_status(code, details, allowed, (audio, collection, top_k, candidates))
    if code == "OK":
        assert len(response.hits) == min(k, bank.collection_size)
        scores = [h.score for h in response.hits]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(v) for v in scores)
        assert response.candidates == min(c, bank.collection_size)
    still_serving(stub, bank)


# ---- Localize --------------------------------------------------------------------------------------

span_recipes = half_valid(st.one_of(
    st.tuples(st.just("all")),
    st.tuples(st.just("inside"), st.floats(0, 0.6), st.sampled_from(["to_end", "within", "past_end"]), st.floats(0, 1)),
), st.one_of(
    st.tuples(st.just("after"), st.floats(0.5, 1e6)),
    st.tuples(st.just("negative"), st.floats(1e-3, 1e6), st.booleans()),
    st.tuples(st.just("reversed"), st.floats(0.2, 0.6), st.floats(0.0, 1.0)),
    st.tuples(st.just("nonfinite"), st.sampled_from([math.nan, math.inf, -math.inf]), st.booleans()),
))


def build_span(recipe: tuple, seconds: float | None) -> Built:
    """(start, end) seconds of a span recipe, relative to the audio's duration (a guess for invalid audio)."""
    d = seconds if seconds is not None else 3.0
    kind, *args = recipe
    if kind == "all":
        return Built((0.0, 0.0))
    if kind == "inside":  # starts in the first 60 %, ends at the end, inside, or past it (clipped)
        start = args[0] * d
        end = {"to_end": 0.0, "within": start + 0.1 + args[2] * (d - start - 0.3), "past_end": d + 1 + 100 * args[2]}[args[1]]
        return Built((start, end))
    if kind == "after":
        return Built((d + args[0], 0.0), SPAN_FAULT)
    if kind == "negative":
        return Built((-args[0], 0.0) if args[1] else (0.0, -args[0]), SPAN_FAULT)
    if kind == "reversed":  # 0 < end <= start
        start = args[0] * d
        return Built((start, max(1e-3, args[1] * start)), SPAN_FAULT)
    if kind == "nonfinite":
        return Built((args[0], 1.0) if args[1] else (0.0, args[0]), SPAN_FAULT)
    raise AssertionError(kind)


def assert_heatmap(response) -> None:
    assert response.rows > 0 and response.cols > 0 and len(response.heatmap) == response.rows * response.cols
    assert all(0.0 <= v <= 1.0 for v in response.heatmap)
    assert response.start_seconds <= response.end_seconds and len(response.heatmap_box) == 4


@RUN
@given(audio=audio_recipes, image=image_recipes, collection=collection_recipes, span=span_recipes)
def test_localize_gets_the_status_its_fields_call_for(stub, bank, audio, image, collection, span):
    built = build_audio(audio, bank)
    picture = build_image(image, collection, bank)
    times = build_span(span, built.seconds)
    start, end = (float(np.float32(t)) for t in times.value)
    request = search_pb2.LocalizeRequest(collection=collection, start_seconds=start, end_seconds=end, **picture.value)
    if built.value is not None:
        request.audio.CopyFrom(built.value)
    allowed = expected_codes(built, picture, times)
    code, details, response = call_status(lambda: stub.Localize(request, timeout=60))
    assert_status(code, details, allowed, (audio, image, collection, span))
    if code == "OK":
        assert_heatmap(response)
        assert len(response.frame_scores) == len(response.frame_best_regions) > 0
        assert math.isfinite(response.score) and response.model_version
    still_serving(stub, bank)


# ---- Highlight -------------------------------------------------------------------------------------

valid_window = st.one_of(st.just(0.0), st.floats(0.05, 10.0))  # 0 = 1 s; at most the model's 10.24 s
invalid_window = st.one_of(st.floats(-1e6, -1e-3), st.floats(10.5, 1e9), st.sampled_from([math.nan, math.inf]))
audio_messages = st.one_of(
    st.tuples(st.just("speech"), st.floats(0, 0.9), st.floats(0.02, 0.5)),  # a slice of the caption
    st.tuples(st.just("bytes"), st.binary(max_size=3000)),  # any bytes are PCM (a partial sample waits)
)
bad_messages = st.one_of(st.tuples(st.just("start")), st.tuples(st.just("empty")))  # a second start; neither field
HIGHLIGHT_FIELDS = ("first", "image", "collection", "rate", "window", "messages")


@RUN
@given(broken=st.sets(st.sampled_from(HIGHLIGHT_FIELDS), max_size=2), data=st.data())
def test_highlight_gets_the_status_its_stream_calls_for(stub, bank, broken, data):
    """The ``broken`` fields (none, one or two) are drawn invalid, the others valid."""

    def pick(field: str, valid: st.SearchStrategy, invalid: st.SearchStrategy):
        return data.draw(invalid if field in broken else valid, label=field)

    first = pick("first", st.just("start"), st.sampled_from(["chunk", "empty", "none"]))
    image = pick("image", valid_image, invalid_image)
    collection = pick("collection", st.just(COLLECTION), invalid_collection)
    rate = pick("rate", st.sampled_from(VALID_RATES), st.sampled_from(BAD_RATES))
    window = pick("window", valid_window, invalid_window)
    messages = pick("messages", st.lists(audio_messages, max_size=5),
                    st.lists(st.one_of(audio_messages, bad_messages), min_size=1, max_size=5).filter(
                        lambda ms: any(kind in ("start", "empty") for kind, *_ in ms)))
    picture = build_image(image, collection, bank)
    start = search_pb2.HighlightStart(collection=collection, sample_rate=rate, window_seconds=window, **picture.value)
    faults = [picture]
    if rate not in VALID_RATES:
        faults.append(Built(None, frozenset({INVALID})))
    if not 0 <= window <= SPEECH_LIMIT_S:  # also NaN
        faults.append(Built(None, frozenset({INVALID})))
    stream = {"start": [search_pb2.HighlightRequest(start=start)],
              "chunk": [search_pb2.HighlightRequest(samples_s16le=bank.pcm(16000)[:3200])],
              "empty": [search_pb2.HighlightRequest()], "none": []}[first]
    if first != "start":  # the stream is refused at its first message (or for having none)
        faults = [Built(None, frozenset({INVALID}))]
        messages = messages if stream else []
    speech = bank.pcm(rate if rate in VALID_RATES else 16000)
    sent_audio = False
    for kind, *args in messages:
        if kind == "speech":
            begin = int(args[0] * len(speech)) & ~1
            chunk = speech[begin : begin + 2 * round(args[1] * 16000)]
            stream.append(search_pb2.HighlightRequest(samples_s16le=chunk))
            sent_audio |= bool(chunk)
        elif kind == "bytes":
            stream.append(search_pb2.HighlightRequest(samples_s16le=args[0]))
            sent_audio |= bool(args[0])
        else:
            stream.append(search_pb2.HighlightRequest(start=start) if kind == "start" else search_pb2.HighlightRequest())
            faults.append(Built(None, frozenset({INVALID})))
    allowed = expected_codes(*faults)
    if allowed == {"OK"} and not sent_audio:  # a stream that ends before any audio: nothing to show, or refused
        allowed = frozenset({"OK", INVALID})
    code, details, responses = call_status(lambda: list(stub.Highlight(iter(stream), timeout=60)))
    assert_status(code, details, allowed, (first, image, collection, rate, window, messages))
    if code == "OK":
        for response in responses:
            assert_heatmap(response)
    still_serving(stub, bank)


# ---- ListCollections, and malformed messages for every RPC ------------------------------------------

METHODS = {
    "Search": search_pb2.SearchRequest,
    "Localize": search_pb2.LocalizeRequest,
    "Highlight": search_pb2.HighlightRequest,
    "ListCollections": search_pb2.ListCollectionsRequest,
}


def parses(message_type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except Exception:  # google.protobuf.message.DecodeError, or the C++ parser's own
        return False
    return True


def call_raw(target: str, method: str, data: bytes) -> tuple[str, str, object]:
    """Send ``data`` as the serialized request of ``method`` (the one message of a Highlight stream)."""
    path = f"/matchmap.v1.SpokenImageSearch/{method}"
    with grpc.insecure_channel(target) as channel:
        if method == "Highlight":
            rpc = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            return call_status(lambda: list(rpc(iter([data]), timeout=60)))
        rpc = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        return call_status(lambda: rpc(data, timeout=60))


@RUN
@given(data=st.binary(max_size=200).filter(lambda b: parses(search_pb2.ListCollectionsRequest, b)))
def test_list_collections_answers_any_message_that_parses(server, stub, bank, data):
    """ListCollections has no fields: any bytes that parse (unknown fields are skipped) get the list."""
    code, details, response = call_raw(server.target, "ListCollections", data)
    assert_status(code, details, frozenset({"OK"}), data)
    listed = search_pb2.ListCollectionsResponse.FromString(response)
    assert [(c.name, c.images, c.searchable) for c in listed.collections] == [(COLLECTION, bank.collection_size, True)]
    still_serving(stub, bank)


@RUN
@given(method=st.sampled_from(sorted(METHODS)), data=st.binary(min_size=1, max_size=200))
def test_a_message_that_does_not_parse_is_invalid_argument(server, stub, bank, method, data):
    if parses(METHODS[method], data):
        data = b"\xff" + data  # a field number 0 / truncated varint: never parses
    code, details, _ = call_raw(server.target, method, data)
    assert_status(code, details, frozenset({INVALID}), (method, data))
    still_serving(stub, bank)


@pytest.mark.parametrize("image_id", [str(2**63), str(-(2**63) - 1), "9" * 30])
def test_an_image_id_beyond_int64_is_not_found(stub, bank, image_id):
    audio = search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=bank.pcm(16000), sample_rate=16000))
    request = search_pb2.LocalizeRequest(audio=audio, collection=COLLECTION, image_id=image_id)
    code, details, _ = call_status(lambda: stub.Localize(request, timeout=60))
    assert_status(code, details, frozenset({NOT_FOUND, INVALID}), image_id)
    start = search_pb2.HighlightStart(collection=COLLECTION, sample_rate=16000, image_id=image_id)
    code, details, _ = call_status(lambda: list(stub.Highlight(iter([search_pb2.HighlightRequest(start=start)]))))
    assert_status(code, details, frozenset({NOT_FOUND, INVALID}), image_id)
