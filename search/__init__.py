"""search: the gRPC spoken-query search service (and its web page, search.web), its two-stage engine,
localization and the client.

Light to import: the client (``search.client``) needs only grpc; the engine and server load torch.
"""

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080  # the search page and JSON API (search.web)

# Stage-1 candidates a query's stage 2 re-ranks when it does not say (`serve --candidates`). On 10,000
# scene images with 300 spoken captions of unheard voices, K=400 holds 0.988 of the exhaustive MISA
# top-10 with the shipped model's distilled stage-1 heads (0.963 with masked means, a model without
# heads), and K=4,000 all of it at about 5x the stage-2 time (bench/bench_search.py; docs/search.md).
DEFAULT_CANDIDATES = 400
# The most candidates one query may ask for: a bound on a query's stage-2 time and memory.
MAX_CANDIDATES = 4000
# ... except on a collection of at most this many images, where a query may ask for up to this many,
# i.e. for every image (an exhaustive search: how agreement with exhaustive MISA is measured through the API).
MAX_EXHAUSTIVE_CANDIDATES = 10_000
