"""``matchmap serve --ray``: a collection split into shards, each a Ray Serve replica, behind the usual front.

Each shard (one Serve deployment per shard, ``CollectionShard``) opens the collection as
``indexer.Shard(i, N)``: the images whose id is i modulo N, with their own stage-1 index and feature
maps, so each node holds 1/N of the maps. The front is the ordinary ``matchmap serve`` process (the
same gRPC API, health, reflection, auth, web page), whose engine (``ShardedEngine``) encodes each
query once and fans out to the shards through Serve deployment handles, in two rounds (three when stage 1
is widened):

1. stage 1: every shard returns its best W = ``stage1_widen`` x K by stage-1 score; the front keeps
   the best W of them all, and (where the collection has region centroids) asks every shard for the
   centroid interaction of those it holds, and keeps the K best by the same blend as a single
   machine (``search.centroid_prune.keep_best``): exactly the K a single machine's stage 1 would pick;
2. stage 2: every shard re-scores by MISA those of the K that it holds and returns its best top_k;
   the front merges them by score.

So the results are a single machine's (the same candidates, the same exact MISA), while stage 2's
maps and arithmetic are split across the shards. A shard that fails to answer (its replica died;
Ray Serve starts a new one) is asked again until ``retry_seconds`` pass: both rounds only read, so
retrying is safe, and a query fails only if its shard stays away that long (UNAVAILABLE).

Why not Serve's own gRPC proxy as the ingress: it serves neither grpc.health.v1 nor reflection,
knows nothing of our auth, and takes no client-streaming calls (Highlight); the front keeps all
of that, and Serve still places, health-checks and restarts the shards (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer import CollectionNotFound, ModelMismatchError, Shard
from search.centroid_prune import centroid_scores, faiss_recall_k, keep_best
from search.engine import (
    COLLECTION_REFRESH_SECONDS,
    GroupAnswer,
    Hit,
    ImageMap,
    SearchEngine,
    SearchLimits,
    SearchQuery,
    _ms_since,
    image_key,
)
from search.errors import ImageNotFound, InvalidQuery, ShardUnavailable

log = logging.getLogger(__name__)
SERVE_APP_PREFIX = "matchmap-shard"
# How long the front keeps asking a shard that does not answer (a replica restarting loads the model
# and its maps: seconds), and how long it waits for one answer.
RETRY_SECONDS = 60.0
ANSWER_TIMEOUT_SECONDS = 30.0
# The errors a shard sends back as values, by name, and how the front raises them again.
_ERRORS: dict[str, Callable[[dict], Exception]] = {
    "CollectionNotFound": lambda e: CollectionNotFound(e["message"], e.get("name", "")),
    "ModelMismatchError": lambda e: ModelMismatchError(e["message"]),
    "ImageNotFound": lambda e: ImageNotFound(e["message"]),
    "InvalidQuery": lambda e: InvalidQuery(e["message"], field=e.get("field")),
    "KeyError": lambda e: LookupError(e["message"]),
    "ValueError": lambda e: ValueError(e["message"]),
}


@dataclass(frozen=True)
class ShardSpec:
    """What every shard replica opens: the model, the library (shared storage and catalog), its limits."""

    checkpoint: str | None
    data_dir: str | None
    db_url: str | None
    device: str = "auto"
    limits: SearchLimits = SearchLimits()
    vad: bool = True


def _as_reply(error: Exception) -> dict:
    kind = type(error).__name__
    if kind not in _ERRORS:
        kind = "KeyError" if isinstance(error, LookupError) else "ValueError"
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return {"error": {"kind": kind, "message": str(message), "name": getattr(error, "name", ""),
                      "field": getattr(error, "field", None)}}


class CollectionShard:
    """One shard's search engine: the body of a Serve deployment (``deploy_shards`` wraps it).

    Every method answers a dict; an error the front should show the client comes back as
    ``{"error": {...}}`` rather than raised, so it keeps its type across the process boundary.
    """

    def __init__(self, spec: ShardSpec, index: int, count: int):
        self.shard = Shard(index, count)
        self.engine = SearchEngine.open(spec.checkpoint, spec.data_dir, spec.db_url, device=spec.device,
                                        limits=spec.limits, vad=spec.vad, shard=self.shard)
        self.engine.warm_up(query_shapes=False)  # the front encodes queries; a replica scores them
        self._lock = threading.Lock()  # Serve may call a replica from several threads; the engine is not re-entrant

    def _answer(self, fn: Callable[[], dict]) -> dict:
        with self._lock:
            try:
                return fn()
            except (LookupError, ValueError) as error:
                return _as_reply(error)

    def describe(self, name: str) -> dict:
        def run() -> dict:
            coll = self.engine.collection(name)
            return {"size": coll.size, "generation": coll.generation, "folder": str(coll.folder),
                    "resident_bytes": self.engine.resident_bytes().get(name, 0)}
        return self._answer(run)

    def stage1(self, name: str, pooled: np.ndarray, k: int, recall_k: int | None = None) -> dict:
        def run() -> dict:
            coll = self.engine.collection(name)
            scores, ids = coll.search_stage1(pooled, k, recall_k)
            return {"scores": scores, "ids": ids, "size": coll.size}
        return self._answer(run)

    def centroid_scores(self, name: str, audio: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> dict:
        """The centroid interaction of each query with those of its candidates ``ids`` (-1: another shard's)
        this shard holds ({"scores": None} when the collection has no region centroids)."""
        def run() -> dict:
            coll = self.engine.collection(name)
            with torch.inference_mode():
                scores = centroid_scores(coll, torch.from_numpy(audio), torch.from_numpy(lengths), ids)
            return {"scores": scores}
        return self._answer(run)

    def rerank(self, name: str, audio: np.ndarray, lengths: np.ndarray, ids: np.ndarray, stage1_scores: np.ndarray,
               top_ks: list[int]) -> dict:
        def run() -> dict:
            coll = self.engine.collection(name)
            with torch.inference_mode():
                batch, _ = self.engine._rerank(coll, torch.from_numpy(audio).to(self.engine.device),
                                               torch.from_numpy(lengths).to(self.engine.device), ids, stage1_scores,
                                               top_ks)
            return {"hits": [[asdict(h) for h in hits] for hits, _ in batch]}
        return self._answer(run)

    def image(self, name: str, image_id: int) -> dict:
        def run() -> dict:
            coll, record = self.engine.indexed_image(name, image_id)
            return {"record": record, "features": np.asarray(coll.feature_maps([record.id]))[0], "grid": coll.grid,
                    "folder": str(coll.folder)}
        return self._answer(run)


@dataclass
class ShardedCollection:
    """What the front knows of a sharded collection: its name, size (all shards) and folder."""

    name: str
    size: int
    generation: int
    folder: Path
    resident_bytes: int = 0  # feature maps the shards hold in memory

    def held_region_centroid_ids(self, wait: bool = True) -> None:
        """None: the front holds no region centroid ids (the shards hold theirs)."""
        return None


class ShardedEngine(SearchEngine):
    """The front's engine: the model (query encoding, localization, highlighting) and the catalog
    (ListCollections) here; stage 1 and stage 2 on the shards (``handles``, one per shard, in order)."""

    def __init__(self, model, library, handles: Sequence[Any], *, device: str = "auto",
                 limits: SearchLimits | None = None, vad: bool = True, retry_seconds: float = RETRY_SECONDS):
        super().__init__(model, library, device=device, limits=replace(limits or SearchLimits(), resident_maps_mb=0),
                         vad=vad)
        self.handles = list(handles)
        self.retry_seconds = retry_seconds
        self.retries = 0  # shard calls asked again after a failure (a dead replica), for operators and tests
        self._described: dict[str, tuple[ShardedCollection, float]] = {}

    @property
    def shards(self) -> int:
        return len(self.handles)

    def _ask(self, method: str, per_shard: Sequence[tuple | None]) -> list[dict | None]:
        """Call ``method`` on every shard with its arguments (None: skip that shard) at once, then
        collect the answers, asking a shard again while it fails, up to ``retry_seconds``."""
        pending = [None if args is None else getattr(h, method).remote(*args)
                   for h, args in zip(self.handles, per_shard, strict=True)]
        replies: list[dict | None] = []
        for i, (response, args) in enumerate(zip(pending, per_shard, strict=True)):
            if response is None:
                replies.append(None)
                continue
            deadline, pause = time.monotonic() + self.retry_seconds, 0.2
            while True:
                try:
                    reply = response.result(timeout_s=ANSWER_TIMEOUT_SECONDS)
                    break
                except Exception as error:  # a dead or restarting replica, a lost node, a timeout
                    if time.monotonic() + pause > deadline:
                        raise ShardUnavailable(
                            f"shard {i + 1} of {self.shards} did not answer for {self.retry_seconds:g} s "
                            f"({type(error).__name__}); retry later") from error
                    log.warning("shard %d of %d failed (%s: %s); asking again", i + 1, self.shards,
                                type(error).__name__, error)
                    time.sleep(pause)
                    pause = min(2.0, pause * 2)
                    self.retries += 1
                    response = getattr(self.handles[i], method).remote(*args)
            if "error" in reply:
                raise _ERRORS[reply["error"]["kind"]](reply["error"])
            replies.append(reply)
        return replies

    def collection(self, name: str) -> ShardedCollection:  # type: ignore[override]
        if not name:
            raise InvalidQuery(
                "collection is empty: name the collection to search (ListCollections lists them)", field="collection")
        now = time.monotonic()
        cached = self._described.get(name)
        if cached is not None and now - cached[1] < COLLECTION_REFRESH_SECONDS:
            return cached[0]
        replies = self._ask("describe", [(name,)] * self.shards)
        coll = ShardedCollection(name, sum(r["size"] for r in replies), min(r["generation"] for r in replies),
                                 Path(replies[0]["folder"]), sum(r["resident_bytes"] for r in replies))
        self._described[name] = (coll, now)
        return coll

    def resident_bytes(self) -> dict[str, int]:
        """Collection name -> bytes of its feature maps the shards hold in memory (as last described)."""
        return {name: coll.resident_bytes for name, (coll, _) in self._described.items() if coll.resident_bytes}

    def _answer_group(self, name: str, candidates: int, audio: torch.Tensor, lengths: torch.Tensor,
                      pooled: np.ndarray, members: list[int], queries: Sequence[SearchQuery]
                      ) -> list[GroupAnswer | Exception]:
        """Both rounds on the shards for the queries ``members`` (module docstring); an error of the
        group (an unknown collection, a shard that stays away) is every member's."""
        try:
            return self._on_shards(name, candidates, audio[members].float().cpu().numpy(),
                                   lengths[members].cpu().numpy(), pooled[members],
                                   [queries[i].top_k for i in members])
        except (LookupError, ValueError, ShardUnavailable) as error:
            return [error] * len(members)

    def _on_shards(self, name: str, k: int, audio: np.ndarray, lengths: np.ndarray, pooled: np.ndarray,
                   top_ks: list[int]) -> list[GroupAnswer]:
        started = time.perf_counter()
        wide = self.limits.stage1_widen * k
        replies = self._ask("stage1", [(name, pooled, wide, faiss_recall_k(k, wide))] * self.shards)
        size = sum(r["size"] for r in replies)
        scores = np.concatenate([r["scores"] for r in replies], axis=1)
        ids = np.concatenate([r["ids"] for r in replies], axis=1)
        wide = min(wide, size) if k < size else k  # as SearchEngine._stage1_width: K = every image is not widened
        best = np.argsort(-scores, axis=1, kind="stable")[:, :wide]  # a single stage 1's W (-1 pads last)
        scores, ids = np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)
        if wide > k:
            scores, ids = self._widened(name, audio, lengths, scores, ids, k)
        scored = (ids >= 0).sum(axis=1)
        stage1_ms = _ms_since(started)

        started = time.perf_counter()
        longest = int(lengths.max())
        calls: list[tuple | None] = []
        for s in range(self.shards):
            mine = (ids >= 0) & (ids % self.shards == s)
            width = int(mine.sum(axis=1).max())
            if width == 0:
                calls.append(None)
                continue
            shard_ids = np.full((len(ids), width), -1, dtype=np.int64)
            shard_scores = np.full((len(ids), width), -np.inf, dtype=np.float32)
            for b in range(len(ids)):
                row = np.flatnonzero(mine[b])
                shard_ids[b, : row.size], shard_scores[b, : row.size] = ids[b, row], scores[b, row]
            calls.append((name, audio[:, :longest], lengths, shard_ids, shard_scores, top_ks))
        hits_by_shard = [r["hits"] for r in self._ask("rerank", calls) if r is not None]
        stage2_ms = _ms_since(started)
        answers = []
        for b, top_k in enumerate(top_ks):
            merged = sorted((Hit(**h) for shard in hits_by_shard for h in shard[b]), key=lambda h: -h.score)
            answers.append(GroupAnswer(merged[:top_k], int(scored[b]), size, stage1_ms, stage2_ms))
        return answers

    def _widened(self, name: str, audio: np.ndarray, lengths: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """The K of the merged stage-1 list ``ids`` (B, W) a single machine keeps: each shard scores its own
        candidates by the centroid interaction; FAISS's top K where a shard has no region centroids."""
        longest = int(lengths.max())
        calls = [(name, audio[:, :longest], lengths, np.where(ids % self.shards == s, ids, -1))
                 for s in range(self.shards)]
        parts = [r["scores"] for r in self._ask("centroid_scores", calls)]
        if any(p is None for p in parts):
            return scores[:, :k], ids[:, :k]
        approx = np.full(ids.shape, np.nan)
        for s, part in enumerate(parts):
            mine = (ids >= 0) & (ids % self.shards == s)
            approx[mine] = part[mine]
        return keep_best(scores, ids, approx, k)

    def indexed_image(self, collection: str, image_id: str | int):  # type: ignore[override]
        reply = self._image(collection, image_id)
        coll = self.collection(collection)
        return replace(coll, folder=Path(reply["folder"])), reply["record"]

    def indexed_image_map(self, collection: str, image_id: str | int) -> ImageMap:
        reply = self._image(collection, image_id)
        return self._stored_image_map(reply["features"], reply["grid"], reply["record"])

    def _image(self, collection: str, image_id: str | int) -> dict:
        key = image_key(collection, image_id)
        calls: list[tuple | None] = [None] * self.shards
        calls[key % self.shards] = (collection, key)
        return next(r for r in self._ask("image", calls) if r is not None)


def deploy_shards(spec: ShardSpec, count: int, *, cpus_per_shard: float = 1.0, gpus_per_shard: float = 0.0) -> list:
    """Start ``count`` shard deployments on the connected Ray cluster (Serve without HTTP or gRPC
    proxies: the front is the only ingress); -> their handles, shard 0 first. Blocks until every
    shard has opened its share of every collection."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(CollectionShard, ray_actor_options={"num_cpus": cpus_per_shard,
                                                                     "num_gpus": gpus_per_shard},
                                  max_ongoing_requests=8, health_check_period_s=2, health_check_timeout_s=30)
    handles = []
    for i in range(count):
        app = deployment.options(name=f"shard-{i}").bind(spec, i, count)
        handles.append(serve.run(app, name=f"{SERVE_APP_PREFIX}-{i}", route_prefix=None))
    return handles


def remove_shards(count: int) -> None:
    """Delete the shard deployments ``deploy_shards`` started (on stop)."""
    from ray import serve

    for i in range(count):
        try:
            serve.delete(f"{SERVE_APP_PREFIX}-{i}", _blocking=False)
        except Exception as error:  # the cluster may be gone already
            log.warning("could not delete shard %d: %s", i, error)
