"""search: the gRPC spoken-query search service (and its web page, search.web), its two-stage engine,
localization and the client.

Light to import: the client (``search.client``) needs only grpc; the engine and server load torch.
"""

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080  # the search page and JSON API (search.web)
