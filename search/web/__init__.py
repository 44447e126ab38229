"""HTTP beside gRPC: the search page and a JSON API over the same servicer (``matchmap serve --http``).

Every request goes through :class:`search.server.SpokenImageSearchServicer` (one engine, one model
thread, one micro-batcher); this package only translates HTTP and WebSocket messages to the
servicer's protobuf requests and its gRPC status codes back to HTTP statuses (:mod:`search.web.gateway`).
The page (``static/``) needs no build step.
"""

from search.web.app import create_app
from search.web.serving import HttpServer

__all__ = ["HttpServer", "create_app"]
