"""search: the gRPC spoken-query search service, its two-stage engine, localization and the client.

Light to import: the client (``search.client``) needs only grpc; the engine and server load torch.
"""

DEFAULT_PORT = 50051
