"""search: the gRPC spoken-query search service (and its web page, search.web), its two-stage engine,
localization and the client.

Light to import: the client (``search.client``) needs only grpc; the engine and server load torch.
"""

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080  # the search page and JSON API (search.web)

# Stage-1 candidates a query's stage 2 re-ranks when it does not say: max(DEFAULT_CANDIDATES,
# DEFAULT_CANDIDATES_SHARE x the collection's images), at most MAX_CANDIDATES (`serve --candidates`,
# `--candidates-share`). Near-alike scenes crowd MISA's top 10 as a collection grows, so stage 1 must pass
# on more of them to hold it. Measured with the shipped model's distilled stage-1 heads (spoken captions
# of unheard voices; bench/bench_search.py, docs/search.md): on 10,000 scene images K=400 holds 0.988 of
# the exhaustive MISA top-10 (masked means, a model without heads: 0.963); on 100,000, K=400 holds 0.882
# and K=1,000 0.972.
DEFAULT_CANDIDATES = 400
DEFAULT_CANDIDATES_SHARE = 0.01
# The most candidates one query may ask for: a bound on a query's stage-2 time and memory.
MAX_CANDIDATES = 4000
# ... except on a collection of at most this many images, where a query may ask for up to this many,
# i.e. for every image (an exhaustive search: how agreement with exhaustive MISA is measured through the API).
MAX_EXHAUSTIVE_CANDIDATES = 10_000
