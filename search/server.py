"""The gRPC spoken-query search service (``matchmap serve``), on grpc.aio.

The event loop only moves bytes. Audio decoding runs in a small thread pool; all model, index and
catalog work runs in ONE model thread (torch releases the GIL inside its kernels, so the loop stays
responsive). Concurrent Search calls meet in a :class:`MicroBatcher`: whatever queued while the
model was busy is encoded in one forward pass. Every failure becomes a status code with a message a
person can act on (see :func:`status_for`); nothing a client sends can stop the server.
SIGTERM / SIGINT: health turns NOT_SERVING, new calls are refused, in-flight calls finish, then stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoders import AUDIO_FORMATS_TEXT, AudioDecodeError, ImageDecodeError
from indexer import CollectionNotFound, ModelMismatchError
from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search import DEFAULT_MODEL_THREADS, DEFAULT_PORT
from search.auth import BearerTokenInterceptor
from search.batcher import MicroBatcher
from search.engine import ImageMap, SearchEngine, SearchQuery, SearchResult
from search.errors import (
    ImageNotFound,
    InvalidQuery,
    Overloaded,
    PortUnavailable,
    QueryError,
    QueryOutOfRange,
    ShardUnavailable,
    ShuttingDown,
)
from search.localization import Localization
from search.threads import single_core_thread, thread_team

log = logging.getLogger("matchmap.server")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SpokenImageSearch"].full_name
T = TypeVar("T")


@dataclass(frozen=True)
class ServerOptions:
    """How the server listens and what it accepts (the engine holds the per-query limits)."""

    host: str = "[::]"
    port: int = DEFAULT_PORT  # 0 = any free port (see SearchServer.port)
    token: str | None = None  # bearer token; None = no authentication
    tls_cert: Path | None = None  # PEM certificate chain and private key; both or neither
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mTLS)
    max_message_mb: float = 16.0  # largest request (audio or image bytes) accepted
    max_batch: int = 8  # queries encoded in one forward pass at most
    # Calls holding work (decoding, queued for the model, being scored; a Highlight stream counts
    # while it computes a heatmap) beyond which a new call gets RESOURCE_EXHAUSTED before any work.
    # It bounds the decode pool's and the model thread's queues too: all their work comes from them.
    max_queue: int = 64
    max_concurrent_rpcs: int = 256  # gRPC's own cap on calls open at once (streams included)
    decode_threads: int = 2  # each on one core (search.threads)
    model_threads: int = DEFAULT_MODEL_THREADS  # cores of the model thread's torch and FAISS work (search.threads)
    drain_seconds: float = 0.0  # after SIGTERM: NOT_SERVING while still answering, so balancers move away
    shutdown_grace_s: float = 30.0  # then how long in-flight calls may run on while new ones are refused
    http_port: int | None = None  # the web page and JSON API (search.web) beside gRPC; None = off, 0 = any free port

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
        if self.max_queue < 1 or self.max_concurrent_rpcs < 1 or self.max_batch < 1:
            raise ValueError("max_queue, max_concurrent_rpcs and max_batch must be >= 1")
        if self.decode_threads < 1 or self.model_threads < 1:
            raise ValueError("decode_threads and model_threads must be >= 1")
        if self.drain_seconds < 0 or self.shutdown_grace_s < 0:
            raise ValueError("drain_seconds and shutdown_grace_s must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in 0..65535, got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must lie in 0..65535, got {self.http_port}")
        if not self.max_message_mb > 0:
            raise ValueError(f"max_message_mb must be > 0, got {self.max_message_mb}")


# Wire messages never carry a file path or a URL (a catalog's, a checkpoint's): whatever slips through
# the messages below is masked. Windows drive paths too, for a server run there.
_PRIVATE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|(?<![\w.])(?:/|[A-Za-z]:\\)[^\s'\",;)]+")


def public_message(message: str) -> str:
    """``message`` with any URL or absolute path replaced by "<hidden>", for remote clients."""
    return _PRIVATE.sub("<hidden>", message)


@dataclass(frozen=True)
class WireError:
    """What a remote client gets for a failure: status code, message, and the request field at fault."""

    code: grpc.StatusCode
    message: str
    field: str | None = None

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """``grpc-status-details-bin``: a google.rpc.Status with a BadRequest naming the field, if any."""
        if self.field is None:
            return ()
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return (("grpc-status-details-bin", status.SerializeToString()),)


def status_for(error: BaseException) -> WireError:
    """The status a client gets for ``error`` (gRPC's guidance: see search.errors)."""
    if isinstance(error, CollectionNotFound):
        log.info("%s", error)  # names the catalog and its collections: for the log, not the wire
        return WireError(
            grpc.StatusCode.NOT_FOUND,
            f"no collection named {error.name!r} on this server; ListCollections lists the collections it holds",
            "collection",
        )
    if isinstance(error, QueryOutOfRange):
        return WireError(grpc.StatusCode.OUT_OF_RANGE, public_message(str(error)), error.field)
    if isinstance(error, ModelMismatchError):
        return WireError(grpc.StatusCode.FAILED_PRECONDITION, public_message(str(error)))
    if isinstance(error, (InvalidQuery, AudioDecodeError, ImageDecodeError)):
        field = error.field if isinstance(error, QueryError) else None
        return WireError(grpc.StatusCode.INVALID_ARGUMENT, public_message(str(error)), field)
    if isinstance(error, ImageNotFound):
        return WireError(grpc.StatusCode.NOT_FOUND, public_message(str(error)), "image_id")
    if isinstance(error, (ShuttingDown, ShardUnavailable)):
        return WireError(grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, Overloaded):
        return WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    log.error("internal error answering a request", exc_info=error)
    return WireError(
        grpc.StatusCode.INTERNAL, f"internal server error ({type(error).__name__}); the server log has details"
    )


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the call with ``error``'s status (status_for), BadRequest details included."""
    wire = status_for(error)
    await context.abort(wire.code, wire.message, trailing_metadata=wire.trailing_metadata())


def _answer_errors(method: Callable) -> Callable:
    """Turn exceptions of a unary handler into status codes (see status_for)."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # every failure gets a status; the server keeps serving
            failure = error
        await abort_with(context, failure)

    return handler


def _audio_source(audio: search_pb2.AudioInput, field: str = "audio") -> tuple[bytes, int | None]:
    """(bytes, sample rate or None for an encoded file) of an AudioInput; InvalidQuery when unset."""
    source = audio.WhichOneof("source")
    if source == "encoded":
        return audio.encoded, None
    if source == "pcm":
        return audio.pcm.samples_s16le, audio.pcm.sample_rate
    raise InvalidQuery(
        f"{field} is missing: set {field}.encoded (an audio file: {AUDIO_FORMATS_TEXT}) or {field}.pcm (raw PCM)",
        field=field,
    )


def _heatmap_fields(result: Localization, image: ImageMap) -> dict:
    """The fields LocalizeResponse and HighlightResponse share."""
    return {
        "rows": result.rows,
        "cols": result.cols,
        "heatmap": result.heatmap.reshape(-1).tolist(),
        "heatmap_box": [float(v) for v in image.box],
        "start_seconds": result.start_seconds,
        "end_seconds": result.end_seconds,
        "heat_min": result.heat_min,
        "heat_max": result.heat_max,
    }


class SpokenImageSearchServicer(search_pb2_grpc.SpokenImageSearchServicer):
    """The four RPCs of matchmap.v1.SpokenImageSearch over a SearchEngine."""

    def __init__(self, engine: SearchEngine, options: ServerOptions):
        self.engine = engine
        self.max_queue = options.max_queue
        self.busy = 0  # calls holding work now (see admitted); only touched on the event loop
        self._closing = False
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="matchmap-model",
                                                initializer=functools.partial(thread_team, options.model_threads))
        self._decode_threads = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="matchmap-decode",
                                                  initializer=single_core_thread)
        self.batcher: MicroBatcher[SearchQuery, SearchResult] = MicroBatcher(
            engine.search_batch, self._model_thread, max_batch=options.max_batch, max_queue=options.max_queue
        )

    async def _in_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, functools.partial(fn, *args))

    async def _decoded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._decode_threads, functools.partial(fn, *args, **kwargs)
        )

    @contextlib.contextmanager
    def admitted(self, new_call: bool = True) -> Iterator[None]:
        """Hold one of max_queue places while a call works. A new call gets Overloaded
        (RESOURCE_EXHAUSTED) at once, before decoding anything, when all are taken, and ShuttingDown
        (UNAVAILABLE) once the server stops admitting; a stream already admitted (``new_call`` False:
        Highlight's later heatmaps) is counted but never refused, so it can finish while the server drains."""
        if new_call and self._closing:
            raise ShuttingDown("the server is shutting down; retry against another replica")
        if new_call and self.busy >= self.max_queue:
            raise Overloaded(f"the server is busy with {self.busy} calls (its limit); retry in a moment")
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    def stop_admitting(self) -> None:
        """From now on every new call gets UNAVAILABLE (ShuttingDown) instead of work."""
        self._closing = True

    async def close(self) -> None:
        self.stop_admitting()
        await self.batcher.close()
        self._model_thread.shutdown(wait=True)
        self._decode_threads.shutdown(wait=True)

    async def _searched(self, data: bytes, sample_rate: int | None, collection: str, top_k: int,
                        candidates: int) -> SearchResult:
        """Decode the query, cut it to its speech and search. When the model thread is idle, the
        silence-trimmed query is scored while the VAD runs (on another core): the VAD keeps all of it
        for most queries, and then that answer is the answer; otherwise it is dropped and the cut query
        searched. The answer is the same either way, only earlier (docs/search.md, "Scoring while the
        VAD listens")."""
        trimmed = await self._decoded(self.engine.trimmed_audio, data, sample_rate=sample_rate)
        early = None
        if trimmed.audio is not None and self.engine.vad and self.batcher.idle:
            early = asyncio.ensure_future(self.batcher.submit(SearchQuery(trimmed.audio, collection, top_k, candidates)))
        try:
            audio = await self._decoded(self.engine.speech_audio, trimmed)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if early is not None and audio is trimmed.audio:
            return await early
        if early is not None:
            early.cancel()  # dropped unscored if its batch has not started; its answer unused if it has
        return await self.batcher.submit(SearchQuery(audio, collection, top_k, candidates))

    @_answer_errors
    async def Search(self, request: search_pb2.SearchRequest, context) -> search_pb2.SearchResponse:
        arrived = time.perf_counter()
        data, sample_rate = _audio_source(request.audio)
        self.engine.resolve_counts(request.top_k, request.candidates)  # bad counts refused before anything else
        with self.admitted():
            coll = await self._in_model_thread(self.engine.collection, request.collection)  # NOT_FOUND before decoding
            # The default K and the exhaustive allowance depend on the collection's size.
            top_k, candidates = self.engine.resolve_counts(request.top_k, request.candidates, coll.size)
            result = await self._searched(data, sample_rate, request.collection, top_k, candidates)
        timings = result.timings_ms
        return search_pb2.SearchResponse(
            hits=[
                search_pb2.Hit(image_id=str(h.image_id), uri=h.uri, score=h.score, stage1_score=h.stage1_score)
                for h in result.hits
            ],
            timings=search_pb2.Timings(
                decode_ms=timings["decode"],
                queue_ms=timings["queue"],
                encode_ms=timings["encode"],
                stage1_ms=timings["stage1"],
                stage2_ms=timings["stage2"],
                total_ms=1000 * (time.perf_counter() - arrived),
            ),
            model_version=self.engine.model_version,
            collection_size=result.collection_size,
            candidates=result.candidates,
            batch_size=result.batch_size,
            audio_seconds=result.audio_seconds,
        )

    async def _image_map(self, which: str | None, image_id: str, image_bytes: bytes, collection: str) -> ImageMap:
        if which == "image_id":
            return await self._in_model_thread(self.engine.indexed_image_map, collection, image_id)
        if which == "image_bytes":
            if not image_bytes:
                raise InvalidQuery("image_bytes is empty: send an image file's bytes (JPEG, PNG, ...)", field="image_bytes")
            return await self._in_model_thread(self.engine.sent_image_map, image_bytes)
        raise InvalidQuery("image is missing: set image_id (with collection) or image_bytes", field="image")

    @_answer_errors
    async def Localize(self, request: search_pb2.LocalizeRequest, context) -> search_pb2.LocalizeResponse:
        data, sample_rate = _audio_source(request.audio)
        with self.admitted():
            image = await self._image_map(
                request.WhichOneof("image"), request.image_id, request.image_bytes, request.collection
            )
            span = (request.start_seconds, request.end_seconds)
            result: Localization = await self._in_model_thread(
                functools.partial(self.engine.localize, data, image, span, sample_rate=sample_rate)
            )
        return search_pb2.LocalizeResponse(
            **_heatmap_fields(result, image),
            frame_seconds=result.frame_seconds,
            frame_scores=result.frame_scores.tolist(),
            frame_best_regions=result.frame_best_regions.tolist(),
            score=result.score,
            model_version=self.engine.model_version,
        )

    async def Highlight(
        self, request_iterator: AsyncIterator[search_pb2.HighlightRequest], context
    ) -> AsyncIterator[search_pb2.HighlightResponse]:
        """Heatmaps of the latest speech while audio streams in.

        Chunks that arrive while a heatmap is being computed are folded into the next one, so a fast
        sender gets fewer, fresher responses rather than a growing backlog; after the last chunk one
        final response covers the end of the stream.
        """
        reader: asyncio.Task | None = None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("message") != "start":
                raise InvalidQuery(
                    "the first Highlight message must be `start` (the image and the audio format)", field="start"
                )
            start = first.start
            with self.admitted():
                image = await self._image_map(
                    start.WhichOneof("image"), start.image_id, start.image_bytes, start.collection
                )
            highlighter = self.engine.highlighter(image, start.sample_rate, start.window_seconds)
            arrived = asyncio.Event()

            async def read_chunks() -> None:
                async for message in request_iterator:
                    if message.WhichOneof("message") != "samples_s16le":
                        raise InvalidQuery(
                            "after `start`, every Highlight message must carry samples_s16le", field="samples_s16le"
                        )
                    if message.samples_s16le:
                        highlighter.push(message.samples_s16le)  # keeps only the latest seconds
                        arrived.set()

            reader = asyncio.create_task(read_chunks())
            while True:
                waiter = asyncio.create_task(arrived.wait())
                await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if arrived.is_set():
                    arrived.clear()
                    with self.admitted(new_call=False):
                        result = await self._in_model_thread(highlighter.localize_latest)
                    if result is not None:
                        yield search_pb2.HighlightResponse(**_heatmap_fields(result, image))
                elif reader.done():
                    reader.result()  # raises what the reader met (a malformed message)
                    return
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, error)
        finally:
            if reader is not None and not reader.done():
                reader.cancel()

    @_answer_errors
    async def ListCollections(self, request, context) -> search_pb2.ListCollectionsResponse:
        rows = await self._in_model_thread(self.engine.list_collections)
        return search_pb2.ListCollectionsResponse(
            collections=[
                search_pb2.CollectionInfo(
                    name=info.name,
                    images=info.images,
                    failed=info.failed,
                    model_name=info.model_name,
                    model_version=info.model_version,
                    bytes=info.bytes,
                    index_type=info.index_type,
                    embed_dim=info.embed_dim,
                    grid_rows=info.grid[0],
                    grid_cols=info.grid[1],
                    searchable=searchable,
                )
                for info, searchable in rows
            ],
            model_name=self.engine.model.config.name,
            model_version=self.engine.model_version,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as given to --host) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnparsableRequest:
    """What the server's request deserializer gives for bytes that are not the method's message, so the
    servicer answers INVALID_ARGUMENT (grpc would answer UNKNOWN, or INTERNAL on a stream)."""

    def __init__(self, message_type: str, error: Exception):
        self.problem = InvalidQuery(f"the request is not a valid {message_type} message ({error})", field="request")


def _lenient_deserializer(message_class) -> Callable[[bytes], Any]:
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return UnparsableRequest(message_class.DESCRIPTOR.full_name, error)

    return deserialize


async def _parsed_stream(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, UnparsableRequest):
            raise request.problem
        yield request


def _refusing_unparsable(method: Callable, streaming: bool) -> Callable:
    if streaming:
        async def stream_handler(request_iterator, context):  # an async generator, as grpc.aio expects
            async for response in method(_parsed_stream(request_iterator), context):
                yield response

        return stream_handler

    async def unary_handler(request, context):
        if isinstance(request, UnparsableRequest):
            await abort_with(context, request.problem)
        return await method(request, context)

    return unary_handler


def add_search_service(servicer: SpokenImageSearchServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated ``add_SpokenImageSearchServicer_to_server`` does, but with
    request deserializers that turn bytes which do not parse into INVALID_ARGUMENT."""
    handlers = {}
    for method in search_pb2.DESCRIPTOR.services_by_name["SpokenImageSearch"].methods:
        request_class = getattr(search_pb2, method.input_type.name)
        response_class = getattr(search_pb2, method.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing_unparsable(getattr(servicer, method.name), method.client_streaming),
            request_deserializer=_lenient_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class SearchServer:
    """A started gRPC server: the search service, health and reflection on one port."""

    def __init__(self, engine: SearchEngine, options: ServerOptions | None = None):
        self.engine = engine
        self.options = options or ServerOptions()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: SpokenImageSearchServicer | None = None
        self._health = health.aio.HealthServicer()
        self.http = None  # search.web.HttpServer when options.http_port is set, once started

    async def start(self) -> int:
        """Bind and start serving; returns the port (the chosen one when options.port is 0)."""
        opts = self.options
        max_bytes = int(opts.max_message_mb * 2**20)
        self._server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(opts.token)] if opts.token else None,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=opts.max_concurrent_rpcs,
        )
        self._servicer = SpokenImageSearchServicer(self.engine, opts)
        add_search_service(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{opts.host}:{opts.port}"
        try:
            if opts.tls_cert is not None and opts.tls_key is not None:
                client_ca = opts.tls_client_ca.read_bytes() if opts.tls_client_ca is not None else None
                credentials = grpc.ssl_server_credentials(
                    [(opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())],
                    root_certificates=client_ca,
                    require_client_auth=client_ca is not None,
                )
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older versions returned 0
            self.port = 0
        if not self.port:
            raise PortUnavailable(f"cannot listen on {address}: the port is in use or the address is not local")
        if opts.token and opts.tls_cert is None and not is_loopback(opts.host):
            log.warning(
                "a bearer token is required but the server listens on %s in plaintext: the token crosses the "
                "network readable by anyone on the path; serve over TLS (--tls-cert, --tls-key) or on loopback",
                opts.host,
            )
        await self._server.start()
        if opts.http_port is not None:
            from search.web import HttpServer  # the same servicer (engine, model thread, batcher) over HTTP

            self.http = HttpServer(self._servicer, opts)
            try:
                await self.http.start()
            except BaseException:  # e.g. the HTTP port is taken: leave nothing half-started behind
                self.http = None
                await self._server.stop(0)
                await self._servicer.close()
                self._server = None
                raise
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING while calls are still answered for ``drain`` seconds (load
        balancers move away), then new calls are refused (UNAVAILABLE) and in-flight ones may finish
        for up to ``grace`` seconds (defaults: the options' drain_seconds, shutdown_grace_s)."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        drain = self.options.drain_seconds if drain is None else drain
        if drain > 0:
            log.info("NOT_SERVING; still answering for %.1f s before refusing new calls", drain)
            await asyncio.sleep(drain)
        grace = self.options.shutdown_grace_s if grace is None else grace
        await asyncio.gather(self._server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        if self._servicer is not None:
            await self._servicer.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(
    engine: SearchEngine,
    options: ServerOptions,
    on_ready: Callable[[int, str | None], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully. ``on_ready`` gets the gRPC port and the web
    page's URL (None when options.http_port is None) once both listen."""
    # Handlers first: a signal sent as soon as the ready line is read must stop the server gracefully,
    # not kill it (it did, now and then, when the handlers came after on_ready).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = SearchServer(engine, options)
    port = await server.start()
    if on_ready is not None:
        on_ready(port, server.http.url if server.http is not None else None)
    await stop.wait()
    log.info("signal received: finishing in-flight calls, then stopping")
    await server.stop()


class ServerThread:
    """A SearchServer on a background thread's own event loop, for tests, benchmarks and notebooks.

        with ServerThread(engine) as server:
            client = SearchClient(server.target)

    Listens on 127.0.0.1 and a free port unless ``options`` say otherwise. Leaving the block stops
    the server gracefully; the engine stays open (the caller owns it).
    """

    def __init__(self, engine: SearchEngine, options: ServerOptions | None = None):
        self.server = SearchServer(engine, options or ServerOptions(host="127.0.0.1", port=0))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="matchmap-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.server.port is not None, "the server is not started"
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
