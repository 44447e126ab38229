"""The HTTP app: the search page, a JSON API mirroring the gRPC one, and live highlighting over a WebSocket.

    GET  /                      the page (static/, no build step)
    GET  /api/config            what the page needs to know (open: no token)
    GET  /api/collections       ListCollections
    POST /api/search            Search; the body is the audio (a WAV, FLAC, OGG, MP3 or AIFF file, or raw s16le PCM with ?sample_rate=)
    POST /api/localize          Localize an indexed image; the body is the audio
    GET  /api/collections/{collection}/images/{image_id}/thumbnail   a JPEG of at most 256 px, cached
    GET  /api/collections/{collection}/images/{image_id}/image       the image as the model saw it (JPEG)
    WS   /api/highlight         Highlight: a JSON start message, binary PCM chunks, {"end": true}
    GET  /openapi.json          the OpenAPI document (response schemas derived from the .proto)

Every request runs through the gRPC servicer (search.web.gateway); errors answer
``{"error": {"status", "code", "message"}}`` with the HTTP status of the gRPC code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos.matchmap.v1 import search_pb2
from search.auth import expected_authorization, token_problem
from search.errors import InvalidQuery
from search.web.gateway import ApiError, GatewayAbort, GatewayContext, call, json_schemas, to_json
from search.web.images import THUMBNAIL_SIZE, cached_jpeg

STATIC = Path(__file__).with_name("static")
AUDIO_TYPES = ["audio/wav", "audio/flac", "audio/ogg", "application/octet-stream"]
# An over-large upload is read to its end (and thrown away) up to this many times the limit, so the
# client gets the 413 answer rather than a reset connection; beyond it the connection is closed.
DRAIN_FACTOR = 4


def _schema_ref(message) -> dict:
    return {"$ref": f"#/components/schemas/{message.DESCRIPTOR.full_name}"}


def _responses(message) -> dict:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        200: {"content": {"application/json": {"schema": _schema_ref(message)}}},
        400: {"description": "bad input (the message names it)", **error},
        401: {"description": "token missing or wrong", **error},
        404: {"description": "no such collection or image", **error},
        413: {"description": "upload too large", **error},
        429: {"description": "the server's queue is full", **error},
    }


_AUDIO_BODY = {
    "requestBody": {
        "required": True,
        "description": "The spoken query: a WAV, FLAC, OGG, MP3 or AIFF file, or raw mono signed 16-bit little-endian "
                       "PCM when sample_rate is given.",
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES},
    }
}


def create_app(servicer, options) -> FastAPI:
    """The app over ``servicer`` (a search.server.SpokenImageSearchServicer) with ``options``'
    token and message limit."""
    engine = servicer.engine
    limit = int(options.max_message_mb * 2**20)
    expected = expected_authorization(options.token) if options.token else None
    app = FastAPI(
        title="matchmap",
        summary="Search images by speaking: the JSON mirror of matchmap.v1.SpokenImageSearch.",
        description="Live highlighting is a WebSocket at /api/highlight: send a JSON start message "
                    '{"collection", "image_id", "sample_rate", "window_seconds", "token"}, then binary '
                    'chunks of mono s16le PCM, then {"end": true}; each answer is a HighlightResponse as JSON.',
        version="1",
        docs_url=None,  # the interactive docs load scripts from a CDN; /openapi.json is the contract
        redoc_url=None,
    )

    # ---- errors: one JSON shape, the gRPC code's HTTP status ------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{' '.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse(ApiError(400, "INVALID_ARGUMENT", problems).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(error.status_code, "INVALID_ARGUMENT")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(ApiError(error.status_code, code, message).body(), status_code=error.status_code)

    # ---- token and body ----------------------------------------------------------------------------

    def authorized(request: Request) -> None:
        if expected is not None:
            problem = token_problem(request.headers.get("authorization"), expected, "the header")
            if problem is not None:
                raise ApiError(401, "UNAUTHENTICATED", problem)

    async def audio_body(request: Request) -> bytes:
        """The request body, at most the server's message limit (413 beyond it, naming both sizes)."""
        header = request.headers.get("content-length", "")
        declared = int(header) if header.isdigit() else None
        size, chunks, too_large = 0, [], False
        if declared is not None and declared > DRAIN_FACTOR * limit:
            size, too_large = declared, True
        else:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    too_large, chunks = True, []
                    if size > DRAIN_FACTOR * limit:
                        break
                else:
                    chunks.append(chunk)
        if too_large:
            size = max(size, declared or 0)
            raise ApiError(
                413, "RESOURCE_EXHAUSTED",
                f"the audio upload is {size / 2**20:.1f} MB{' or more' if declared is None else ''}; this server "
                f"accepts at most {options.max_message_mb:g} MB (and {engine.limits.max_audio_seconds:g} s of audio)",
            )
        return b"".join(chunks)

    def audio_input(data: bytes, sample_rate: int | None) -> search_pb2.AudioInput:
        if sample_rate:
            return search_pb2.AudioInput(pcm=search_pb2.RawPcm(samples_s16le=data, sample_rate=sample_rate))
        return search_pb2.AudioInput(encoded=data)

    api = [Depends(authorized)]
    sample_rate_query = Query(None, ge=1, description="Hz of raw s16le PCM in the body; omit for an encoded file")

    # ---- the API ------------------------------------------------------------------------------------

    @app.get("/api/config", tags=["page"])
    async def config() -> dict:
        """What the page needs before its first request (no token needed)."""
        return {
            "token_required": expected is not None,
            "max_upload_mb": options.max_message_mb,
            "max_audio_seconds": engine.limits.max_audio_seconds,
            "model_version": engine.model_version,
            "thumbnail_size": THUMBNAIL_SIZE,
        }

    @app.get("/api/collections", dependencies=api, responses=_responses(search_pb2.ListCollectionsResponse))
    async def list_collections(request: Request) -> JSONResponse:
        """ListCollections: every collection, each with whether this server's model can search it."""
        answer = await call(servicer.ListCollections, search_pb2.ListCollectionsRequest(), _peer(request))
        return JSONResponse(to_json(answer))

    @app.post("/api/search", dependencies=api, responses=_responses(search_pb2.SearchResponse), openapi_extra=_AUDIO_BODY)
    async def search(
        request: Request,
        collection: str = Query(..., description="the collection to search"),
        top_k: int = Query(0, ge=0, description="hits to return; 0 = the server's default"),
        candidates: int = Query(0, ge=0, description="stage-1 candidates re-ranked by MISA; 0 = default"),
        sample_rate: int | None = sample_rate_query,
    ) -> JSONResponse:
        """Search: the collection's images best matching the spoken query, best first."""
        data = await audio_body(request)
        answer = await call(servicer.Search, search_pb2.SearchRequest(
            audio=audio_input(data, sample_rate), collection=collection, top_k=top_k, candidates=candidates,
        ), _peer(request))
        return JSONResponse(to_json(answer))

    @app.post("/api/localize", dependencies=api, responses=_responses(search_pb2.LocalizeResponse), openapi_extra=_AUDIO_BODY)
    async def localize(
        request: Request,
        collection: str = Query(..., description="the collection holding the image"),
        image_id: str = Query(..., description="the image's id, as Search returns it"),
        start_seconds: float = Query(0.0, description="the span of speech to localize; 0, 0 = all of it"),
        end_seconds: float = Query(0.0),
        sample_rate: int | None = sample_rate_query,
    ) -> JSONResponse:
        """Localize: where in the image the speech (or its span) lands, and per-frame grounding."""
        data = await audio_body(request)
        answer = await call(servicer.Localize, search_pb2.LocalizeRequest(
            audio=audio_input(data, sample_rate), image_id=image_id, collection=collection,
            start_seconds=start_seconds, end_seconds=end_seconds,
        ), _peer(request))
        return JSONResponse(to_json(answer))

    async def image_jpeg(collection: str, image_id: str, size: int | None) -> Response:
        try:
            coll, record = await servicer._in_model_thread(engine.indexed_image, collection, image_id)
            data = await servicer._decoded(cached_jpeg, coll.folder, collection, record, size)
        except Exception as error:  # the engine's errors, as the gRPC API would answer them
            raise ApiError.from_exception(error) from None
        return Response(data, media_type="image/jpeg", headers={
            "Cache-Control": "private, max-age=86400", "ETag": f'"{record.content_hash[:40]}-{size or "full"}"',
        })

    image_responses = {200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such collection or image"}}

    @app.get("/api/collections/{collection}/images/{image_id}/thumbnail", dependencies=api, responses=image_responses,
             response_class=Response)
    async def thumbnail(collection: str, image_id: str) -> Response:
        """A JPEG of the indexed image, longest side at most 256 px (made once, then cached)."""
        return await image_jpeg(collection, image_id, THUMBNAIL_SIZE)

    @app.get("/api/collections/{collection}/images/{image_id}/image", dependencies=api, responses=image_responses,
             response_class=Response)
    async def image(collection: str, image_id: str) -> Response:
        """The indexed image as the model saw it (EXIF orientation applied), full size, as a JPEG:
        heatmap_box of Localize is in its pixels."""
        return await image_jpeg(collection, image_id, None)

    @app.websocket("/api/highlight")
    async def highlight(socket: WebSocket) -> None:
        """Highlight over a WebSocket (see the document's description)."""
        await socket.accept()
        try:
            start = json.loads(await socket.receive_text())
            if not isinstance(start, dict):
                raise InvalidQuery("the first message must be a JSON object: {collection, image_id, sample_rate}")
            if expected is not None:
                supplied = socket.headers.get("authorization") or (f"Bearer {start['token']}" if start.get("token") else None)
                problem = token_problem(supplied, expected, "the start message's \"token\" or the header")
                if problem is not None:
                    raise ApiError(401, "UNAUTHENTICATED", problem)
            first = search_pb2.HighlightRequest(start=search_pb2.HighlightStart(
                collection=str(start.get("collection", "")), image_id=str(start.get("image_id", "")),
                sample_rate=_uint(start, "sample_rate"), window_seconds=float(start.get("window_seconds") or 0),
            ))
            async for answer in servicer.Highlight(_chunks(socket, first), GatewayContext("websocket")):
                await socket.send_json(to_json(answer))
            await socket.close()
        except WebSocketDisconnect:
            pass
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, ApiError, GatewayAbort) as error:
            if isinstance(error, GatewayAbort):
                error = ApiError.from_grpc(error.code, error.details)
            elif not isinstance(error, ApiError):
                error = ApiError.from_exception(
                    error if isinstance(error, InvalidQuery) else InvalidQuery(f"the start message is not valid: {error}")
                )
            await socket.send_json(error.body())
            await socket.close(code=4000 + error.status if error.status < 1000 else 1011, reason=error.code)

    # ---- the page -----------------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(json_schemas(
                search_pb2.SearchResponse, search_pb2.LocalizeResponse, search_pb2.ListCollectionsResponse,
                search_pb2.HighlightResponse,
            ))
            components["schemas"]["Error"] = {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}}}}}
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            if expected is not None:
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _peer(request: Request) -> str:
    client = request.client
    return f"http:{client.host}:{client.port}" if client else "http"


def _uint(message: dict, key: str) -> int:
    value = message.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise InvalidQuery(f"{key} must be a whole number of Hz, got {value!r}")
    return int(value)


async def _chunks(socket: WebSocket, first: search_pb2.HighlightRequest) -> AsyncIterator[search_pb2.HighlightRequest]:
    """The start request, then one request per binary message, until {"end": true} or the socket closes."""
    yield first
    while True:
        message = await socket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            yield search_pb2.HighlightRequest(samples_s16le=message["bytes"])
        elif message.get("text") is not None:
            try:
                ended = json.loads(message["text"]).get("end") is True
            except (ValueError, AttributeError):
                ended = False
            if not ended:
                raise InvalidQuery('after the start message, send binary PCM chunks, then {"end": true}')
            return
