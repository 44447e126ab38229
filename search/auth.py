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
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        supplied = metadata.get("authorization")
        if supplied is None:
            return _unauthenticated_handler(
                handler, "this server requires a token: send metadata 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(str(supplied).encode(), self._expected):
            return _unauthenticated_handler(handler, "the bearer token is not valid for this server")
        return handler
