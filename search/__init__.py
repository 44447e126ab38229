"""search: the gRPC spoken-query search service (and its web page, search.web), its two-stage engine,
localization and the client.

Light to import: the client (``search.client``) needs only grpc; the engine and server load torch.
"""

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080  # the search page and JSON API (search.web)
# Cores the server's model thread uses for one batch of queries (`serve --model-threads`; search.threads).
# On 2 cores, one: a team of two waits at every step for the core the decode threads, gRPC or the client
# hold (docs/search.md, "One core per query").
DEFAULT_MODEL_THREADS = 1

# Stage-1 candidates a query's stage 2 re-ranks when it does not say: max(DEFAULT_CANDIDATES,
# DEFAULT_CANDIDATES_SHARE x the collection's images), at most MAX_CANDIDATES (`serve --candidates`,
# `--candidates-share`). Near-alike scenes crowd MISA's top 10 as a collection grows, so stage 1 must pass
# on more of them to hold it. Measured with the shipped model's distilled stage-1 heads (spoken captions
# of unheard voices; bench/bench_search.py, docs/search.md). On 10,000 scene images, with stage 1 widened
# (STAGE1_WIDEN), K=200 holds 0.992 of the exhaustive MISA top-10 and K=100 0.963; FAISS's own top K held
# 0.987 at the previous default of 400 and 0.955 at 200. On 100,000 (FAISS's top K, before widening),
# K=400 held 0.882 and K=1,000 0.972; widened (session 17, bench/bench_million.py), K=200 held 0.847,
# K=400 0.958 and K=1,000 0.985, so the share is 0.5 % (K=500 there), where it was 1 %.
DEFAULT_CANDIDATES = 200
DEFAULT_CANDIDATES_SHARE = 0.005
# Stage 1 takes this many times K candidates from FAISS's pooled vectors and keeps the K that the sum of the
# pooled score and the centroid interaction ranks first (search.centroid_prune; `serve --stage1-widen`).
# On 10,000 scene images, K=100 of 4 x 100 held 0.963 of the exhaustive MISA top 10, FAISS's own top 100
# 0.875 (docs/search.md).
STAGE1_WIDEN = 4
# The most candidates one query may ask for: a bound on a query's stage-2 time and memory.
MAX_CANDIDATES = 4000
# ... except on a collection of at most this many images, where a query may ask for up to this many,
# i.e. for every image (an exhaustive search: how agreement with exhaustive MISA is measured through the API).
MAX_EXHAUSTIVE_CANDIDATES = 10_000
# Stage 2's held maps keep the fewest principal directions of their region vectors holding this share of
# their second moment (search.resident.region_basis; `serve --held-energy`; 1 = every dimension): 112 of
# 256 dims for `tiny`, which kept exact MISA's top 10 on 100,000 scene images (bench/bench_held_basis.py).
HELD_ENERGY = 0.995
# ... and where those do not fit the memory budget even in int8, the most principal directions that do,
# so long as they hold at least this share, else 2 KB codes. 64 dims of `tiny`'s maps: a million images
# in 4.1 GB. On a million scene maps (augmented copies with noise, bench/scaled_collection.py) 64 dims held
# 0.9896 and 48 dims 0.9844; on 100,000 such maps 64 dims (0.990) kept 0.952 of exact MISA's top 10 where
# every dim kept 0.957 (bench/bench_held_basis.py), and 32 dims (0.972) 0.802.
HELD_ENERGY_FLOOR = 0.985
