"""The stage-1 index: FAISS inner-product search over pooled image vectors, ids = catalog image ids.

With masked-mean pooling, ``pooled_image . pooled_audio`` equals SISA, so an exact (flat) index gives
exact SISA top-K. The index type is chosen by rule, as autofaiss does, and recorded in the catalog:

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact, below ``flat_threshold`` vectors (default 50,000);
- ``ivf``: ``IndexIVFFlat`` with ``nlist ~ 4 sqrt(N)`` lists, k-means trained on the stored vectors
  (a seeded sample, so a rebuild gives the same index), and, for each K of ``TUNE_KS`` (100 to 4,000),
  the smallest power-of-two ``nprobe`` whose recall@K against the exact index reaches
  ``target_recall`` (0.95) on held-out-like queries (``nprobe_by_k``);
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``, only on request, ``efSearch`` tuned the same way.

**Every search honours its K** (:func:`search`): the search parameters are chosen per call from the
requested K and the collection size, not fixed at build time. IVF probes the lists its table tuned
for that K (scaled up past the largest tuned K), and at least enough lists to hold ``COVERAGE`` x K
vectors; once that is half the lists or more it probes them all, which is exact (an IVF-Flat index
keeps every vector). HNSW searches with ``efSearch >= K``, and exactly over its stored vectors once
K is a large share of N. A query that still comes back with fewer than min(K, N) real results (its
lists held too few vectors) is searched again with twice the lists, up to all of them: no search
returns fewer real candidates than min(K, N).

The FAISS file is *derived*: it is named after the catalog generation it reflects
(``stage1-g<generation>.faiss``) and rebuilt from the feature store's pooled vectors whenever no file
of the catalog's current generation exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("flat", "ivf", "hnsw")
INDEX_POLICIES = ("auto", *INDEX_TYPES)
DEFAULT_FLAT_THRESHOLD = 50_000
TARGET_RECALL = 0.95
TUNE_K = 100
# recall@K is tuned at each of these K (those below the collection size): nprobe / efSearch per K.
# A search for fewer than TUNE_K results uses TUNE_K's setting (tuned on queries near the data, so
# it keeps a margin for queries farther away, as the index did before K-dependent settings).
TUNE_KS = (TUNE_K, 400, 1000, 4000)
TUNE_QUERIES = 256
# IVF probes at least enough lists to hold this many times K vectors (lists of the average size).
COVERAGE = 4
# Once a search would probe this share of the lists (IVF) or explore this share of the vectors
# (HNSW efSearch), it scans everything instead: exact, and no slower.
EXACT_SHARE = 0.5
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# An IVF index trained on N vectors is retrained once the collection has grown past this many times N.
IVF_RETRAIN_GROWTH = 4
# k-means trains on at most this many vectors per list (faiss warns below 39).
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10
SEED = 1234


def decide_index_type(n_vectors: int, policy: str, flat_threshold: int = DEFAULT_FLAT_THRESHOLD) -> str:
    """The index type the rule picks for ``n_vectors``: the pinned type, else flat below the threshold."""
    if policy not in INDEX_POLICIES:
        raise ValueError(f"index type must be one of {INDEX_POLICIES}, got {policy!r}")
    if policy != "auto":
        return policy
    return "flat" if n_vectors < flat_threshold else "ivf"


def ivf_nlist(n_vectors: int) -> int:
    """Number of IVF lists for ``n_vectors``: about 4 sqrt(N), with at least 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // 39))


def needs_rebuild(
    index_type: str, params: dict[str, Any], n_vectors: int, policy: str, flat_threshold: int
) -> bool:
    """Whether the rule now wants a different index than the recorded one (type change, or IVF grown a lot)."""
    if decide_index_type(n_vectors, policy, flat_threshold) != index_type:
        return True
    if index_type == "ivf":
        trained_on = int(params.get("trained_on", 0))
        return n_vectors > IVF_RETRAIN_GROWTH * max(trained_on, 1)
    return False


def build_index(
    vectors: np.ndarray, ids: np.ndarray, index_type: str, params: dict[str, Any] | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build a stage-1 index over ``vectors`` (N, D) float32 with ``ids`` (N,) int64.

    ``params`` from an earlier build (as recorded in the catalog) are reused as they are, so a rebuild
    reproduces the recorded index; without them, IVF/HNSW search parameters are tuned for
    ``TARGET_RECALL`` and the tuning result is returned with them.
    """
    vectors = _as_vectors(vectors, "vectors")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ValueError(f"got {len(vectors)} vectors but {len(ids)} ids")
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(vectors, ids)
        return index, {}
    if index_type == "ivf":
        return _build_ivf(vectors, ids, params)
    if index_type == "hnsw":
        return _build_hnsw(vectors, ids, params)
    raise ValueError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}")


def _build_ivf(
    vectors: np.ndarray, ids: np.ndarray, params: dict[str, Any] | None
) -> tuple[faiss.Index, dict]:
    n, dim = vectors.shape
    if n == 0:
        raise ValueError(
            "an IVF index needs at least one vector to train on; use 'flat' for an empty collection"
        )
    nlist = int(params["nlist"]) if params else ivf_nlist(n)
    nlist = max(1, min(nlist, n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    sample = _seeded_sample(n, nlist * IVF_TRAIN_POINTS_PER_LIST)
    index.train(vectors[sample])
    index.add_with_ids(vectors, ids)
    if params:
        index.nprobe = int(params["nprobe"])
        return index, dict(params)

    def set_nprobe(value: int) -> None:
        index.nprobe = value

    table = _tune_table(index, vectors, ids, set_nprobe, _powers_of_two(nlist))
    nprobe, recall, k = _at_tune_k(table)
    index.nprobe = nprobe
    return index, {
        "nlist": nlist,
        "nprobe": nprobe,
        "trained_on": n,
        "recall_at_k": recall,
        "k": k,
        "target_recall": TARGET_RECALL,
        "nprobe_by_k": [[kk, value] for kk, value, _ in table],
        "recall_by_k": [[kk, rr] for kk, _, rr in table],
    }


def _build_hnsw(
    vectors: np.ndarray, ids: np.ndarray, params: dict[str, Any] | None
) -> tuple[faiss.Index, dict]:
    dim = vectors.shape[1]
    m = int(params["M"]) if params else HNSW_M
    hnsw = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(vectors, ids)
    if params:
        hnsw.hnsw.efSearch = int(params["efSearch"])
        return index, dict(params)

    def set_ef(value: int) -> None:
        hnsw.hnsw.efSearch = value

    table = _tune_table(index, vectors, ids, set_ef, [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    ef, recall, k = _at_tune_k(table)
    hnsw.hnsw.efSearch = ef
    return index, {
        "M": m,
        "efConstruction": HNSW_EF_CONSTRUCTION,
        "efSearch": ef,
        "recall_at_k": recall,
        "k": k,
        "target_recall": TARGET_RECALL,
        "ef_by_k": [[kk, value] for kk, value, _ in table],
        "recall_by_k": [[kk, rr] for kk, _, rr in table],
    }


def _tune_table(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    set_value: Callable[[int], None],
    candidates: list[int],
) -> list[tuple[int, int, float]]:
    """For each K of TUNE_KS below the collection size (at least one K): the smallest candidate value
    whose recall@K vs exact search reaches TARGET_RECALL -> [(K, value, recall)], K ascending.

    Queries are stored vectors plus Gaussian noise of half the data's per-dimension spread, so they
    are near the data (as spoken queries are) without being database points found trivially. The
    search for a larger K starts at the value found for the smaller one (recall@K needs no less).
    """
    n, dim = vectors.shape
    ks = [k for k in TUNE_KS if k < n] or [min(TUNE_K, n)]
    rng = np.random.default_rng(SEED)
    picked = vectors[_seeded_sample(n, TUNE_QUERIES)]
    noise = rng.standard_normal(picked.shape).astype(np.float32) * (0.5 * vectors.std(axis=0, keepdims=True))
    queries = np.ascontiguousarray(picked + noise, dtype=np.float32)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    _, truth_positions = exact.search(queries, ks[-1])
    truth = ids[truth_positions]
    table = []
    start = 0
    for k in ks:
        recall = 0.0
        for position in range(start, len(candidates)):
            start = position
            set_value(candidates[position])
            _, found_ids = index.search(queries, k)
            recall = recall_at_k(found_ids, truth, k)
            if recall >= TARGET_RECALL:
                break
        table.append((k, candidates[start], recall))
    return table


def _at_tune_k(table: list[tuple[int, int, float]]) -> tuple[int, float, int]:
    """(value, recall, K) of the table's row for TUNE_K (else its last row): the index's default setting."""
    for k, value, recall in table:
        if k == TUNE_K:
            return value, recall, k
    k, value, recall = table[-1]
    return value, recall, k


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k; found, truth: (B, >=k) ids, -1 ignored."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        hits += len(np.intersect1d(f[f >= 0], t[t >= 0]))
    return hits / (k * len(found)) if len(found) else 1.0


def search(
    index: faiss.Index, queries: np.ndarray, k: int, params: dict[str, Any] | None = None,
    recall_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """queries (B, D) float32 -> (scores (B, k) float32, ids (B, k) int64); missing results: id -1, score -inf.

    The search parameters follow ``k`` and the index's size (see the module docstring; ``params`` are
    the index's recorded parameters, as build_index returned them; without them, the index's own
    nprobe / efSearch serve as the setting tuned for TUNE_K). Every row holds min(k, ntotal)
    real results: rows an approximate search left short are searched again more widely, up to exactly.

    ``recall_k`` (at most k): probe as the tuned recall of the top ``recall_k`` needs, still returning k
    (IVF: enough lists to hold COVERAGE x k vectors). For a widened stage 1, whose k results are re-ranked
    down to ``recall_k``: scanning for recall@k itself is exhaustive sooner, a million vectors per query.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    queries = _as_vectors(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the index holds {index.d}-d vectors")
    kind = index_type_of(index)
    wanted = min(k, index.ntotal)
    if kind == "ivf":
        scores, ids = _search_ivf(index, queries, k, wanted, params or {}, recall_k)
    elif kind == "hnsw":
        scores, ids = _search_hnsw(index, queries, k, wanted, params or {})
    else:
        scores, ids = index.search(queries, k)
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids.astype(np.int64, copy=False)


def search_setting(index_type: str, params: dict[str, Any], k: int, n_vectors: int, n_lists: int = 0,
                   recall_k: int | None = None) -> int:
    """The nprobe (IVF, ``n_lists`` lists) or efSearch (HNSW) a search for ``k`` results uses first, over
    ``n_vectors`` vectors, tuned for the recall of the top ``recall_k`` (default k; see ``search``);
    ``n_lists`` (IVF) or ``n_vectors`` (HNSW) itself means "scan everything"."""
    if index_type == "ivf":
        table = params.get("nprobe_by_k") or [[int(params.get("k", TUNE_K)), int(params.get("nprobe", 1))]]
        value = _from_table(table, min(k, recall_k or k))
        lists = max(n_lists, 1)
        covering = math.ceil(COVERAGE * k * lists / max(n_vectors, 1))  # lists holding COVERAGE x k vectors
        value = max(value, covering, 1)
        return lists if value >= EXACT_SHARE * lists else value
    if index_type == "hnsw":
        table = params.get("ef_by_k") or [[int(params.get("k", TUNE_K)), int(params.get("efSearch", 16))]]
        value = max(_from_table(table, k), k)
        return n_vectors if value >= EXACT_SHARE * n_vectors else value
    raise ValueError(f"only ivf and hnsw have search settings, not {index_type!r}")


def _from_table(table: list[list[int]], k: int) -> int:
    """The tuned value of the smallest tuned K >= max(k, TUNE_K); past the largest, its value scaled by k / K."""
    k = max(k, TUNE_K)
    rows = sorted((int(kk), int(value)) for kk, value in table)
    for kk, value in rows:
        if k <= kk:
            return value
    kk, value = rows[-1]
    return math.ceil(value * k / kk)


def _search_ivf(
    index: faiss.Index, queries: np.ndarray, k: int, wanted: int, params: dict[str, Any], recall_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    ivf = faiss.extract_index_ivf(index)
    params = params if "nprobe" in params else {**params, "nprobe": ivf.nprobe}  # else: the index's own
    nprobe = search_setting("ivf", params, k, index.ntotal, ivf.nlist, recall_k)
    scores, ids = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    while len(short) and nprobe < ivf.nlist:  # lists too small for k here: widen, up to all (exact)
        nprobe = min(2 * nprobe, ivf.nlist)
        scores[short], ids[short] = index.search(
            queries[short], k, params=faiss.SearchParametersIVF(nprobe=nprobe)
        )
        short = short[(ids[short] >= 0).sum(axis=1) < wanted]
    return scores, ids


def _search_hnsw(
    index: faiss.Index, queries: np.ndarray, k: int, wanted: int, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    if "efSearch" not in params:  # the index's own
        params = {**params, "efSearch": faiss.downcast_index(index.index).hnsw.efSearch}
    ef = search_setting("hnsw", params, k, index.ntotal)
    if ef < index.ntotal:
        scores, ids = index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    else:
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        short = np.arange(len(queries))
    if len(short):  # exactly, over the graph's stored vectors
        storage = faiss.downcast_index(index.index).storage
        scores[short], positions = storage.search(queries[short], k)
        id_map = faiss.vector_to_array(index.id_map)
        ids[short] = np.where(positions >= 0, id_map[np.maximum(positions, 0)], -1)
    return scores, ids


def remove_ids(index: faiss.Index, ids: np.ndarray) -> bool:
    """Remove ``ids`` from ``index`` in place; False when the index type cannot remove (HNSW): rebuild it."""
    if isinstance(index, faiss.IndexIDMap2) and isinstance(
        faiss.downcast_index(index.index), faiss.IndexHNSW
    ):
        return False
    index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
    return True


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Append ``vectors`` (N, D) float32 with ``ids`` (N,) int64 to a built index."""
    index.add_with_ids(_as_vectors(vectors, "vectors"), np.ascontiguousarray(ids, dtype=np.int64))


def index_type_of(index: faiss.Index) -> str:
    """ "flat" | "ivf" | "hnsw" for an index this module built (anything else: its class name)."""
    inner = (
        faiss.downcast_index(index.index)
        if isinstance(index, faiss.IndexIDMap2)
        else faiss.downcast_index(index)
    )
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    return type(inner).__name__


def apply_search_params(index: faiss.Index, index_type: str, params: dict[str, Any]) -> None:
    """Set the recorded search-time parameters (IVF nprobe, HNSW efSearch) on a loaded index."""
    if index_type == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif index_type == "hnsw" and "efSearch" in params:
        faiss.downcast_index(index.index).hnsw.efSearch = int(params["efSearch"])


def index_path(folder: Path, generation: int) -> Path:
    """Where the stage-1 file reflecting catalog ``generation`` lives."""
    return Path(folder) / f"stage1-g{generation:012d}.faiss"


def load_index(folder: Path, generation: int) -> faiss.Index | None:
    """The stage-1 index saved for ``generation``, or None when there is none (rebuild it)."""
    path = index_path(folder, generation)
    if not path.exists():
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError:  # a torn or foreign file: it is derived, so rebuilding is always safe
        return None


def save_index(index: faiss.Index, folder: Path, generation: int) -> Path:
    """Atomically write ``index`` as the file of ``generation`` and delete files of other generations."""
    folder = Path(folder)
    final = index_path(folder, generation)
    partial = final.with_suffix(".faiss.partial")
    faiss.write_index(index, str(partial))
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)
    for stale in folder.glob("stage1-g*.faiss*"):
        if stale != final:
            stale.unlink(missing_ok=True)
    return final


def current_index_file(folder: Path) -> Path | None:
    """The stage-1 file present in ``folder`` (any generation), for size reports."""
    files = sorted(Path(folder).glob("stage1-g*.faiss"))
    return files[-1] if files else None


def _as_vectors(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _seeded_sample(n: int, at_most: int) -> np.ndarray:
    if n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(SEED).choice(n, size=at_most, replace=False))


def _powers_of_two(limit: int) -> list[int]:
    values = [1]
    while values[-1] < limit:
        values.append(min(values[-1] * 2, limit))
    return values
