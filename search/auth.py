"""Optional bearer-token authentication for the gRPC server.

With a token configured, every call must carry ``authorization: Bearer <token>`` metadata, or it is
answered UNAUTHENTICATED before reaching the service. The health service stays open so load
balancers and orchestrators can probe without secrets.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)


def token_problem(supplied: str | None, expected: bytes, how_to_send: str) -> str | None:
    """Why ``supplied`` (an authorization value) does not authenticate, or None when it does.

    ``expected`` is ``b"Bearer <token>"``; compared in constant time. ``how_to_send`` tells the
    client where the token goes (gRPC metadata, an HTTP header). Shared by gRPC and HTTP.
    """
    if supplied is None:
        return f"this server requires a token: send {how_to_send} 'authorization: Bearer <token>'"
    if not hmac.compare_digest(str(supplied).encode(), expected):
        return "the bearer token is not valid for this server"
    return None


def expected_authorization(token: str) -> bytes:
    """The authorization value that ``token`` expects; ValueError for an empty token."""
    if not token:
        raise ValueError("the bearer token must not be empty")
    return f"Bearer {token}".encode()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a client with ``token``."""
    return (("authorization", f"Bearer {token}"),)


def _unauthenticated_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def abort(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, token: str):
        self._expected = expected_authorization(token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        problem = token_problem(metadata.get("authorization"), self._expected, "metadata")
        return handler if problem is None else _unauthenticated_handler(handler, problem)
