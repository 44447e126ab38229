"""A Python client for the matchmap search service (``matchmap query`` is built on it).

    with SearchClient("localhost:50051") as client:
        for hit in client.search("caption.wav", "demo", top_k=5):
            print(hit.rank, hit.score, hit.uri)

Failures raise :class:`SearchServiceError` carrying the gRPC status code and the server's message;
:class:`ServerUnreachable` (a subclass) when no server answers at the target.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.auth import bearer_metadata


@dataclass(frozen=True)
class PcmAudio:
    """Raw mono signed 16-bit little-endian samples at ``sample_rate`` Hz."""

    samples_s16le: bytes
    sample_rate: int


AudioLike = str | Path | bytes | PcmAudio  # a file path, a file's bytes (encoders.formats.AUDIO_FORMATS_TEXT), or raw PCM
ImageLike = str | Path | bytes


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 = best
    image_id: str
    uri: str
    score: float  # MISA
    stage1_score: float  # pooled inner product (SISA without stage-1 heads)


class SearchHits(list[Hit]):
    """The ranked hits of one query (a list, best first) plus what the server reported about it."""

    def __init__(self, hits: Iterable[Hit], response: search_pb2.SearchResponse):
        super().__init__(hits)
        t = response.timings
        self.timings_ms = {
            "decode": t.decode_ms,
            "queue": t.queue_ms,
            "encode": t.encode_ms,
            "stage1": t.stage1_ms,
            "stage2": t.stage2_ms,
            "total": t.total_ms,
        }
        self.model_version = response.model_version
        self.collection_size = response.collection_size
        self.candidates = response.candidates
        self.batch_size = response.batch_size
        self.audio_seconds = response.audio_seconds


@dataclass
class Heatmap:
    """Where a span of speech lands in an image: 0..1 per region of the part ``box`` of the image."""

    values: np.ndarray  # (rows, cols) float32, row-major over the image
    box: tuple[float, ...]  # [x0, y0, x1, y1] in the source image's pixels
    start_seconds: float
    end_seconds: float
    heat_min: float  # raw heat that 0 and 1 stand for: matchmap values, less the span contrast
    heat_max: float


@dataclass
class LocalizeResult(Heatmap):
    """A Localize answer: the heatmap plus per-frame grounding of the whole utterance."""

    frame_seconds: float = 0.0
    frame_scores: np.ndarray | None = None  # (T,) best region's similarity per audio frame
    frame_best_regions: np.ndarray | None = None  # (T,) that region's row-major index
    score: float = 0.0  # MISA of the whole utterance against the image
    model_version: str = ""


class SearchServiceError(RuntimeError):
    """The server answered a call with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ServerUnreachable(SearchServiceError):
    """No server answered at the target (UNAVAILABLE)."""


def _service_error(error: grpc.RpcError) -> SearchServiceError:
    code, details = error.code(), error.details() or ""
    kind = ServerUnreachable if code == grpc.StatusCode.UNAVAILABLE else SearchServiceError
    return kind(code, details)


def audio_input(audio: AudioLike) -> search_pb2.AudioInput:
    """The request field for a path, a file's bytes or raw PCM."""
    if isinstance(audio, PcmAudio):
        return search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=audio.samples_s16le, sample_rate=audio.sample_rate))
    if isinstance(audio, (str, Path)):
        return search_pb2.AudioInput(encoded=Path(audio).read_bytes())
    return search_pb2.AudioInput(encoded=bytes(audio))


def _heatmap_fields(response: search_pb2.LocalizeResponse | search_pb2.HighlightResponse) -> dict:
    """The Heatmap fields of a Localize or Highlight response."""
    return {
        "values": np.asarray(response.heatmap, dtype=np.float32).reshape(response.rows, response.cols),
        "box": tuple(response.heatmap_box),
        "start_seconds": response.start_seconds,
        "end_seconds": response.end_seconds,
        "heat_min": response.heat_min,
        "heat_max": response.heat_max,
    }


def _pem(source: str | Path | bytes | None) -> bytes | None:
    return source if source is None or isinstance(source, bytes) else Path(source).read_bytes()


class SearchClient:
    """A connection to a matchmap search server at ``target`` ("host:port").

    token: bearer token the server requires (or None); tls_ca: PEM file (or bytes) of the CA that
    signed the server's certificate, which switches the connection to TLS; tls_cert, tls_key: this
    client's certificate and key (PEM files or bytes), for a server that requires them (mTLS);
    timeout: seconds per call.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: str | Path | bytes | None = None,
        *,
        timeout: float = 30.0,
        max_message_mb: float = 16.0,
        tls_cert: str | Path | bytes | None = None,
        tls_key: str | Path | bytes | None = None,
    ):
        max_bytes = int(max_message_mb * 2**20)
        options = [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs its key: give both tls_cert and tls_key, or neither")
        if tls_ca is None and tls_cert is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
            )
            self._channel = grpc.secure_channel(target, credentials, options)
        self.target = target
        self.timeout = timeout
        self._metadata = bearer_metadata(token) if token else ()
        self._stub = search_pb2_grpc.SpokenImageSearchStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _service_error(error) from None

    def search(self, audio: AudioLike, collection: str, top_k: int = 10, candidates: int = 0) -> SearchHits:
        """Ranked hits (best first) for a spoken query; candidates 0 = the server's default."""
        request = search_pb2.SearchRequest(
            audio=audio_input(audio), collection=collection, top_k=top_k, candidates=candidates
        )
        response = self._call(self._stub.Search, request)
        hits = (
            Hit(rank, h.image_id, h.uri, h.score, h.stage1_score) for rank, h in enumerate(response.hits, start=1)
        )
        return SearchHits(hits, response)

    def localize(
        self,
        audio: AudioLike,
        *,
        image_id: str | int | None = None,
        image: ImageLike | None = None,
        collection: str = "",
        start_seconds: float = 0.0,
        end_seconds: float = 0.0,
    ) -> LocalizeResult:
        """Heatmap of the speech (or its span) over an indexed image (image_id + collection) or a sent one."""
        request = search_pb2.LocalizeRequest(
            audio=audio_input(audio), collection=collection, start_seconds=start_seconds, end_seconds=end_seconds
        )
        _set_image(request, image_id, image)
        r = self._call(self._stub.Localize, request)
        return LocalizeResult(
            **_heatmap_fields(r),
            frame_seconds=r.frame_seconds,
            frame_scores=np.asarray(r.frame_scores, dtype=np.float32),
            frame_best_regions=np.asarray(r.frame_best_regions, dtype=np.int64),
            score=r.score,
            model_version=r.model_version,
        )

    def highlight(
        self,
        chunks: Iterable[bytes],
        sample_rate: int,
        *,
        image_id: str | int | None = None,
        image: ImageLike | None = None,
        collection: str = "",
        window_seconds: float = 0.0,
    ) -> Iterator[Heatmap]:
        """Stream PCM chunks (mono s16le at ``sample_rate``); yields the heatmap of the latest speech.

        The server folds chunks that arrive while it computes into its next heatmap, so there may be
        fewer heatmaps than chunks; the last one covers the end of the stream.
        """
        start = search_pb2.HighlightStart(collection=collection, sample_rate=sample_rate, window_seconds=window_seconds)
        _set_image(start, image_id, image)

        def requests() -> Iterator[search_pb2.HighlightRequest]:
            yield search_pb2.HighlightRequest(start=start)
            for chunk in chunks:
                yield search_pb2.HighlightRequest(samples_s16le=bytes(chunk))

        try:
            # A stream may last as long as its audio: no overall deadline.
            for r in self._stub.Highlight(requests(), metadata=self._metadata):
                yield Heatmap(**_heatmap_fields(r))
        except grpc.RpcError as error:
            raise _service_error(error) from None

    def list_collections(self) -> search_pb2.ListCollectionsResponse:
        """The server's collections (``.collections``: name, images, model_version, searchable, ...)
        and the model it runs (``.model_name``, ``.model_version``)."""
        return self._call(self._stub.ListCollections, search_pb2.ListCollectionsRequest())

    def health(self, service: str = "") -> str:
        """The health service's status for ``service`` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, seconds: float) -> None:
        """Return once the server reports SERVING; ServerUnreachable if it does not within ``seconds``
        (not started yet, still loading, or NOT_SERVING)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.health() == "SERVING":
                    return
                why = "it reports NOT_SERVING"
            except ServerUnreachable as error:
                why = error.details or "no answer"
            if time.monotonic() >= deadline:
                raise ServerUnreachable(grpc.StatusCode.UNAVAILABLE, f"not serving after {seconds:g} s ({why})")
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _set_image(message, image_id: str | int | None, image: ImageLike | None) -> None:
    if (image_id is None) == (image is None):
        raise ValueError("give exactly one of image_id (an indexed image, with collection) or image (path or bytes)")
    if image_id is not None:
        message.image_id = str(image_id)
    else:
        message.image_bytes = image if isinstance(image, bytes) else Path(image).read_bytes()
