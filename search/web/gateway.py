"""Calling the gRPC servicer in process from HTTP handlers, and gRPC status codes as HTTP statuses.

The servicer answers every failure through ``context.abort(code, message)``; :class:`GatewayContext`
turns that into :class:`ApiError` (HTTP status, gRPC code name, the same message), so HTTP and gRPC
clients get the same checks and the same words.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from search.server import status_for

T = TypeVar("T")

# gRPC status -> HTTP status (google.rpc.Code's mapping; FAILED_PRECONDITION as 409: the collection
# conflicts with the server's model).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    """An HTTP error answer: status, a gRPC-style code name and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str) -> ApiError:
        return cls(HTTP_STATUS.get(code, 500), code.name, message)

    @classmethod
    def from_exception(cls, error: BaseException) -> ApiError:
        """The answer for an exception the engine raised (search.server.status_for decides the code)."""
        wire = status_for(error)
        code, message = (wire.code, wire.message) if hasattr(wire, "code") else wire
        return cls.from_grpc(code, message)

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


class GatewayAbort(grpc.aio.AbortError):
    """What GatewayContext.abort raises (an AbortError, so the servicer lets it through untouched)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class GatewayContext:
    """The part of grpc.aio.ServicerContext the servicer uses, for calls that arrive over HTTP."""

    def __init__(self, peer: str = "http"):
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise GatewayAbort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def time_remaining(self) -> float | None:
        return None  # HTTP requests carry no deadline

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple:
        return ()  # the token was checked by the HTTP layer

    def peer(self) -> str:
        return self._peer

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass


def raise_api_error(error: GatewayAbort) -> None:
    raise ApiError.from_grpc(error.code, error.details) from None


async def call(method: Callable[[Any, Any], Awaitable[T]], request: Message, peer: str = "http") -> T:
    """Await a unary servicer method; its abort becomes ApiError."""
    try:
        return await method(request, GatewayContext(peer))
    except GatewayAbort as error:
        raise_api_error(error)
        raise  # unreachable; for type checkers


def to_json(message: Message) -> dict:
    """A response message in the proto3 JSON mapping (field names as in the .proto; 64-bit ints as
    strings; every field present)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def json_schemas(*messages: type[Message]) -> dict[str, dict]:
    """JSON schemas (OpenAPI components) of ``messages`` and the messages they contain, derived from
    the .proto descriptors, so the OpenAPI document can never drift from the gRPC API."""
    fd = FieldDescriptor
    scalar = {
        fd.TYPE_DOUBLE: {"type": "number"}, fd.TYPE_FLOAT: {"type": "number"},
        fd.TYPE_INT64: {"type": "string", "format": "int64"}, fd.TYPE_UINT64: {"type": "string", "format": "uint64"},
        fd.TYPE_INT32: {"type": "integer"}, fd.TYPE_UINT32: {"type": "integer", "minimum": 0},
        fd.TYPE_BOOL: {"type": "boolean"}, fd.TYPE_STRING: {"type": "string"},
        fd.TYPE_BYTES: {"type": "string", "format": "byte"},
    }
    schemas: dict[str, dict] = {}
    pending = [m.DESCRIPTOR for m in messages]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in schemas:
            continue
        properties = {}
        for field in descriptor.fields:
            if field.message_type is not None:
                pending.append(field.message_type)
                schema = {"$ref": f"#/components/schemas/{field.message_type.full_name}"}
            else:
                schema = dict(scalar[field.type])
            properties[field.name] = {"type": "array", "items": schema} if field.is_repeated else schema
        schemas[descriptor.full_name] = {"type": "object", "properties": properties}
    return schemas
