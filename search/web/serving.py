"""uvicorn in the gRPC server's event loop: start beside it, stop with it (no signal handlers of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from search.errors import PortUnavailable
from search.web.app import create_app

log = logging.getLogger("matchmap.http")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its SIGINT/SIGTERM handlers: the process's graceful shutdown stays in charge."""

    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket on ``host`` ("[::]" and "::" listen on IPv6 and IPv4) and ``port`` (0 = any free)."""
    host = host.strip("[]") or "::"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {error}") from error
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise PortUnavailable(
            f"cannot listen for HTTP on {host}:{port}: the port is in use or the address is not local (--http, --no-http)"
        ) from error
    sock.setblocking(False)
    return sock


class HttpServer:
    """The web page and JSON API (search.web.app) of a started servicer, served by uvicorn on
    ``options.host`` and ``options.http_port``, with the gRPC server's TLS certificate and token."""

    def __init__(self, servicer, options):
        self.options = options
        self.app = create_app(servicer, options)
        self.port: int | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        shown = "localhost" if host.strip("[]") in ("", "::", "0.0.0.0") else host
        return f"{'https' if self.options.tls_cert else 'http'}://{shown}:{self.port}/"

    async def start(self) -> int:
        opts = self.options
        sock = listening_socket(opts.host, opts.http_port or 0)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the process's logging stays as configured
            log_level="warning",  # uvicorn's own start/stop lines would repeat the server's
            access_log=False,
            ssl_certfile=str(opts.tls_cert) if opts.tls_cert else None,
            ssl_keyfile=str(opts.tls_key) if opts.tls_key else None,
            timeout_graceful_shutdown=opts.shutdown_grace_s,
            ws_max_size=int(opts.max_message_mb * 2**20),
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="matchmap-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.005)
        log.info("HTTP: the search page and JSON API on %s", self.url)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` seconds), close WebSockets."""
        if self._server is None or self._task is None:
            return
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        await self._task
        self._server = self._task = None
