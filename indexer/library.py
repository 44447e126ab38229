"""The indexer's facade: a :class:`Library` of named collections, each a :class:`Collection`.

On disk, a library is a data directory plus a catalog database (by default the SQLite file
``<data dir>/catalog.sqlite``; any SQLAlchemy URL, e.g. PostgreSQL, instead)::

    <data dir>/catalog.sqlite
    <data dir>/collections/<storage key>/write.lock              one writer per collection (flock)
    <data dir>/collections/<storage key>/stage1-g<gen>.faiss     stage-1 index of catalog generation <gen>
    <data dir>/collections/<storage key>/store-<id>/maps-*.bin   feature maps (see feature_store)
    <data dir>/collections/<storage key>/store-<id>/pooled-*.bin pooled vectors

Crash safety: the catalog is the source of truth. A batch is committed (one transaction: its image
rows, the collection's next free slot and counters, generation + 1) only after its feature maps are
fsynced into slots past the committed ones, so a kill at any point loses at most the batch in flight,
whose slots the next run overwrites. The FAISS file is derived: it is written at the end of a run,
named after the generation it reflects, and rebuilt from the store's pooled vectors by whoever finds no
file of the catalog's current generation.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import shutil
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tqdm import tqdm

from indexer import code_store, stage1_index
from indexer.catalog import (
    STATUS_FAILED,
    STATUS_INDEXED,
    CollectionRow,
    ImageRow,
    catalog_bytes,
    open_catalog,
    sqlite_url,
    total_image_rows,
    utcnow,
)
from indexer.discover import discover_images
from indexer.feature_store import FeatureStore, StoreLayout, compact_store

if TYPE_CHECKING:
    from indexer.ingest import PreparedBatch

CATALOG_FILENAME = "catalog.sqlite"
COLLECTIONS_FOLDER = "collections"
LOCK_FILENAME = "write.lock"
# remove_images compacts the store once removed images' holes exceed this share of its slots.
COMPACT_HOLE_FRACTION = 0.5
# A collection's id -> position lookup is one int32 table over its id range while that range is at most
# this many times its image count (plus 65,536): 4 bytes per id, about 4 MB at a million images.
POSITION_TABLE_SPAN = 4


def default_data_dir() -> Path:
    """$MATCHMAP_DATA_DIR, else ~/.local/share/matchmap."""
    configured = os.environ.get("MATCHMAP_DATA_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".local" / "share" / "matchmap"


class DataDirNotFound(FileNotFoundError):
    """A data directory that was named (``--data-dir`` / $MATCHMAP_DATA_DIR) but does not exist, opened to read."""

    def __str__(self) -> str:
        return str(self.args[0])


log = logging.getLogger(__name__)
_UNREAD = object()  # Collection._region_ids before its first read


class CollectionNotFound(KeyError):
    """No collection of that name in the catalog. The message (for the local CLI and the server's log)
    names the catalog and the collections it holds; ``name`` is the collection asked for, all that a
    remote client is told."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "collection not found"


class ModelMismatchError(ValueError):
    """A model other than the one a collection was built with was used to search it or add to it."""


class CollectionBusyError(RuntimeError):
    """Another process is writing the collection."""


@dataclass
class CollectionInfo:
    """Summary of one collection, as ``matchmap collections`` lists it."""

    name: str
    images: int
    failed: int
    model_name: str
    model_version: str
    bytes: int
    index_type: str
    index_params: dict[str, Any]
    embed_dim: int
    grid: tuple[int, int]


@dataclass
class ImageRecord:
    """One image row of the catalog."""

    id: int
    uri: str
    content_hash: str
    width: int
    height: int
    status: str
    error: str | None


@dataclass
class IndexReport:
    """What one :meth:`Library.index` run did.

    ``skipped_duplicates``: files not embedded because their content is already in the collection:
    ``unchanged`` of them are indexed files seen again (same uri, same content); the others are
    ``duplicates``, (copy's uri, uri of the image with the same content): a collection holds each
    content once, so a copy gets no entry of its own (search would show the same picture twice).
    ``replaced``: images whose file (same uri) now has different content; the old version was removed.
    """

    added: int
    skipped_duplicates: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    replaced: int = 0
    unchanged: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def _record(row: ImageRow) -> ImageRecord:
    return ImageRecord(
        id=row.id,
        uri=row.uri,
        content_hash=row.content_hash or "",
        width=row.width or 0,
        height=row.height or 0,
        status=row.status,
        error=row.error,
    )


def _model_label(name: str, version: str) -> str:
    return f"{name} (weights {version})"


class _SlotTable:
    """Sorted ids of a collection's indexed images and their feature-store slots.

    Appends (one per ingested batch) are buffered and merged on the next lookup, so indexing N images
    costs O(N) here, not O(N^2 / batch).
    """

    def __init__(self, ids: np.ndarray, slots: np.ndarray):
        self._parts: list[tuple[np.ndarray, np.ndarray]] = [(ids, slots)]
        self._count = len(ids)
        self._inverse: tuple[np.ndarray, int, np.ndarray] | None = None  # see _position_table

    def __len__(self) -> int:
        return self._count

    def append(self, ids: np.ndarray, slots: np.ndarray) -> None:
        self._parts.append((ids, slots))
        self._count += len(ids)

    def extended(self, ids: np.ndarray, slots: np.ndarray) -> _SlotTable:
        """A new table: this one's rows plus ``ids``/``slots`` (this one is left as it is)."""
        table = _SlotTable.__new__(_SlotTable)
        table._parts = [*self._parts, (ids, slots)]
        table._count = self._count + len(ids)
        table._inverse = None
        return table

    def last_id(self) -> int:
        """The largest id held (-1 when empty)."""
        return max((int(part[0].max()) for part in self._parts if len(part[0])), default=-1)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) sorted, slots (N,)) int64."""
        if len(self._parts) > 1:
            ids = np.concatenate([part[0] for part in self._parts])
            slots = np.concatenate([part[1] for part in self._parts])
            if np.any(np.diff(ids) < 0):
                order = np.argsort(ids, kind="stable")
                ids, slots = ids[order], slots[order]
            self._parts = [(ids, slots)]
        return self._parts[0]

    def positions_of(self, image_ids: np.ndarray, collection_name: str) -> np.ndarray:
        """image ids (K,) -> their positions (K,) in id order; KeyError naming up to 10 ids not indexed here."""
        ids, _ = self.arrays()
        table = self._position_table(ids)
        if table is not None:  # one gather: a binary search per id cost 5 ms for 16,000 ids of a million
            first, positions = table
            offsets = image_ids - first
            inside = (offsets >= 0) & (offsets < len(positions))
            where = np.full(len(image_ids), -1, dtype=np.int64)
            where[inside] = positions[offsets[inside]]
            found = where >= 0
        else:
            where = np.minimum(np.searchsorted(ids, image_ids), max(len(ids) - 1, 0))
            found = (ids[where] == image_ids) if len(ids) else np.zeros(len(image_ids), dtype=bool)
        if not found.all():
            missing = image_ids[~found][:10].tolist()
            raise KeyError(f"collection {collection_name!r} has no indexed images with ids {missing}")
        return where

    def _position_table(self, ids: np.ndarray) -> tuple[int, np.ndarray] | None:
        """(first id, positions) where ``positions[i - first]`` is id i's position in ``ids`` (the sorted
        ids of :meth:`arrays`) or -1: built once per merged ``ids`` when they are dense enough (ids are
        the catalog's, assigned in order; removals leave holes), else None (binary search instead)."""
        cached = self._inverse
        if cached is not None and cached[0] is ids:
            return cached[1], cached[2]
        if len(ids) == 0 or int(ids[-1]) - int(ids[0]) >= POSITION_TABLE_SPAN * len(ids) + 65536:
            return None
        first = int(ids[0])
        positions = np.full(int(ids[-1]) - first + 1, -1, dtype=np.int32)
        positions[ids - first] = np.arange(len(ids), dtype=np.int32)
        self._inverse = (ids, first, positions)  # one assignment: a reader sees the old pair or the new
        return first, positions

    def slots_of(self, image_ids: np.ndarray, collection_name: str) -> np.ndarray:
        """image ids (K,) -> slots (K,); KeyError naming up to 10 ids that are not indexed here."""
        return self.arrays()[1][self.positions_of(image_ids, collection_name)]

    def remove(self, image_ids: np.ndarray) -> None:
        ids, slots = self.arrays()
        keep = ~np.isin(ids, image_ids)
        self._parts = [(ids[keep], slots[keep])]
        self._count = int(keep.sum())

    def set_slots(self, slots: np.ndarray) -> None:
        """Replace every slot (after compaction); ``slots`` in the order of :meth:`arrays`."""
        ids, _ = self.arrays()
        self._parts = [(ids, slots)]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the images whose id is ``index`` modulo ``count``. Ids are handed
    out in indexing order, so each shard gets an even share of any run of new images, and a shard's
    images never move to another shard as the collection grows."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count")

    def __str__(self) -> str:
        return f"shard {self.index + 1} of {self.count}"


def _in_shard(shard: Shard | None, ids: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, slots) pairs of ``shard`` (all of them for None)."""
    if shard is None:
        return ids, slots
    keep = ids % shard.count == shard.index
    return ids[keep], slots[keep]


class Collection:
    """A searchable collection: stage-1 index in memory, feature maps memory-mapped, rows in the catalog.

    A Collection is a snapshot as of when it was opened (``generation``); :meth:`is_current` tells
    whether the catalog has changed since (then open it again through :meth:`Library.collection`).
    """

    def __init__(self, library: Library, session: Session, row: CollectionRow, shard: Shard | None = None):
        self._library = library
        self._row = row
        self.shard = shard
        self.folder = library.collection_folder(row.storage_key)
        self.store = FeatureStore(
            self.folder / row.store_layout["directory"], StoreLayout.from_dict(row.store_layout)
        )
        ids, slots = library._live_slots(session, row.id)
        # what the catalog held at this snapshot, shard or not: appended() compares against it
        self._catalog_images, self._catalog_last_id = len(ids), int(ids[-1]) if len(ids) else -1
        self._table = _SlotTable(*_in_shard(shard, ids, slots))
        self._index = self._load_or_rebuild_index()
        self._region_ids_lock = threading.Lock()
        self._region_ids: tuple[Any, np.ndarray] | None | object = _UNREAD

    # -- the public, read-only view -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._row.name

    @property
    def model_name(self) -> str:
        return self._row.model_name

    @property
    def model_version(self) -> str:
        return self._row.model_version

    @property
    def grid(self) -> tuple[int, int]:
        return (self._row.grid_rows, self._row.grid_cols)

    @property
    def embed_dim(self) -> int:
        return self._row.embed_dim

    @property
    def size(self) -> int:
        """Number of indexed images (of this snapshot's shard, when it is one)."""
        return len(self._table)

    @property
    def generation(self) -> int:
        """The catalog generation this snapshot reflects."""
        return self._row.generation

    @property
    def index_type(self) -> str:
        return self._row.index_type

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._row.index_params)

    def ids(self) -> np.ndarray:
        """The indexed images' ids (N,) int64, ascending (the order of positions_of)."""
        return self._table.arrays()[0]

    def appended(self) -> Collection | None:
        """This snapshot brought up to the catalog's current state by appending, when it can be.

        When every change since this snapshot only added images (the catalog's count of indexed images
        grew by exactly the rows added since, and the store layout and stage-1 choice are as they
        were: nothing was removed, replaced, compacted or rebuilt), returns a new snapshot that shares
        this one's store and stage-1 index, with the new images' pooled vectors added to the index
        (flat: add_with_ids; IVF: into its trained lists; no rebuild) and their rows appended to the
        slot table. The new images' ids are past every id held here, so positions are kept. This
        snapshot must not be searched afterwards (its index holds the new vectors too). Returns this
        snapshot itself when the catalog has not changed, None when something else changed (open the
        collection again). Costs two small catalog queries and the new images' store reads.
        """
        # a shard compares with what the whole catalog held (its own rows are only some of them)
        held, last_id = ((self.size, self._table.last_id()) if self.shard is None
                         else (self._catalog_images, self._catalog_last_id))
        with self._library._snapshot() as session:
            row = session.get(CollectionRow, self._row.id)
            if row is None:
                return None
            if row.generation == self.generation:
                return self
            if any(getattr(row, c) != getattr(self._row, c) for c in _APPEND_INVARIANTS):
                return None
            # rows committed after `row` was read (slots past its next_slot) wait for the next refresh
            ids, slots = self._library._live_slots(session, row.id, after_id=last_id, below_slot=row.next_slot)
            if held + len(ids) != row.images_indexed:  # something was removed too
                return None
            state = CollectionRow()
            _copy_state(row, state)
        fresh = Collection.__new__(Collection)
        fresh._library, fresh._row, fresh.folder, fresh.store = self._library, state, self.folder, self.store
        fresh.shard, fresh._catalog_images = self.shard, held + len(ids)
        fresh._catalog_last_id = int(ids[-1]) if len(ids) else last_id
        ids, slots = _in_shard(self.shard, ids, slots)
        fresh._table = self._table.extended(ids, slots)
        fresh._index = self._index
        if len(ids):
            stage1_index.add_vectors(fresh._index, self.store.read_pooled(slots), ids)
        fresh._region_ids_lock, fresh._region_ids = threading.Lock(), _UNREAD
        with self._region_ids_lock:
            held = self._region_ids
        if held is not _UNREAD and held is not None:  # extend what this snapshot holds by the new images
            centroids, region_ids = held
            if len(ids):
                region_ids = np.concatenate([region_ids, centroids.distinct_first(centroids.assign(
                    self.store.read_maps(slots)))])
            fresh._region_ids = (centroids, region_ids)
        return fresh

    def is_current(self) -> bool:
        """Whether the catalog still holds this snapshot's generation (one small query)."""
        with self._library._sessions() as session:
            generation = session.execute(
                select(CollectionRow.generation).where(CollectionRow.id == self._row.id)
            ).scalar_one_or_none()
        return generation == self._row.generation

    def check_model(self, model) -> None:
        """Raise ModelMismatchError unless ``model`` is the model (config and weights) this collection was built with."""
        name, version = model.config.name, model.version
        if (name, version) != (self.model_name, self.model_version):
            raise ModelMismatchError(
                f"collection {self.name!r} was indexed with model {_model_label(self.model_name, self.model_version)}, "
                f"but the model in use is {_model_label(name, version)}: its embeddings are not comparable. "
                f"Use the checkpoint the collection was built with, or re-index it into a new collection "
                f"with this model."
            )

    def search_stage1(self, queries: np.ndarray, k: int, recall_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, D) float32 pooled audio vectors -> (scores (B, k) float32, image ids (B, k) int64).

        Scores are inner products with the images' pooled vectors, i.e. SISA of the stored maps (exact
        for a flat index). Every row holds min(k, size) real results, whatever the index type (the
        search parameters follow k, or ``recall_k`` when the k are re-ranked down to that many:
        ``stage1_index.search``); the rest (k > size) are id -1, score -inf.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ValueError(
                f"queries must be (B, {self.embed_dim}) pooled audio vectors for collection {self.name!r}, "
                f"got shape {queries.shape}"
            )
        return stage1_index.search(self._index, queries, k, self._row.index_params, recall_k)

    def feature_maps(self, image_ids: Sequence[int]) -> np.ndarray:
        """image ids (K,) -> their feature maps (K, R, D) float16, R = rows * cols, in one batched store read.

        Raises KeyError for ids that are not indexed images of this collection (e.g. -1 pads).
        """
        slots = self._table.slots_of(np.asarray(image_ids, dtype=np.int64).reshape(-1), self.name)
        return self.store.read_maps(slots)

    def positions_of(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """image ids (K,) -> their positions (K,) among the indexed images in id order, the order
        :meth:`iter_feature_maps` yields them in. KeyError for ids that are not indexed images here."""
        return self._table.positions_of(np.asarray(image_ids, dtype=np.int64).reshape(-1), self.name)

    def iter_feature_maps(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every indexed image's feature map, in id order: (ids (b,) int64, maps (b, R, D) float16) per
        batch of at most ``batch`` images (for loading a collection's maps into memory)."""
        ids, slots = self._table.arrays()
        for start in range(0, len(ids), batch):
            yield ids[start : start + batch], self.store.read_maps(slots[start : start + batch])

    def region_codes(self) -> tuple[Any, np.ndarray]:
        """Every indexed image's region codes (N, code_store.CODE_BYTES) uint8 in id order, and their
        codec (``indexer.region_codec.RegionCodec``): read from the codes the indexer wrote beside the
        store; images indexed since are coded here, in memory. Where the indexer wrote none (a
        collection indexed before codes existed), a codec is trained on maps spread over the
        collection and every map is coded (reading them all). Nothing is written."""
        slots = self._table.arrays()[1]
        files = code_store.CodeFile(self.store.folder)
        meta = files.meta()
        codec = files.codec(meta) if meta is not None else code_store.train_codec(self.store, slots)[0]
        return codec, self._slot_records(files, meta, slots, "codes", codec.encode)

    def region_centroid_ids(self) -> tuple[Any, np.ndarray] | None:
        """Every indexed image's regions' centroid ids (N, R) uint16 in id order, and the centroids
        (``indexer.region_centroids.RegionCentroids``), as the indexer wrote them beside the store;
        images indexed since are assigned here, in memory. None where the indexer wrote no centroids
        (a collection last indexed before they existed: its next index run writes them)."""
        slots = self._table.arrays()[1]
        files = code_store.CodeFile(self.store.folder)
        meta = files.meta()
        if meta is None or not code_store.has_region_ids(meta):
            return None
        centroids = files.centroids(meta)
        return centroids, self._slot_records(files, meta, slots, "region_ids", centroids.assign)

    def held_region_centroid_ids(self, wait: bool = True) -> tuple[Any, np.ndarray] | None:
        """:meth:`region_centroid_ids`, read on first use and then kept with this snapshot (R x 2 bytes
        per image: 128 MB at a million images of 64 regions), each image's distinct ids first
        (``RegionCentroids.distinct_first``); snapshots made by :meth:`appended` extend it by their new images.
        ``wait=False``: None at once while another thread is reading them."""
        if not self._region_ids_lock.acquire(blocking=wait):
            return None
        try:
            if self._region_ids is _UNREAD:
                self.positions_of(self.ids()[:1])  # builds the lookup stage 1 finds its candidates by, too
                try:
                    read = self.region_centroid_ids()
                    self._region_ids = None if read is None else (read[0], read[0].distinct_first(read[1]))
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # they only speed stage 1 up
                    log.warning("collection %r: its region centroids could not be read (%s: %s); stage 1 "
                                "goes without them until the next index run writes them again",
                                self.name, type(error).__name__, error)
                    self._region_ids = None
            return self._region_ids  # type: ignore[return-value]
        finally:
            self._region_ids_lock.release()

    def _slot_records(self, files: code_store.CodeFile, meta: dict | None, slots: np.ndarray, part: str,
                      encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``part`` of the codes of ``slots``, in order: read where the indexer wrote them, made by
        ``encode`` (maps -> records) from the store's maps elsewhere."""
        written = slots < (files.rows(meta) if meta is not None else 0)
        if meta is not None and written.all():  # the usual case: no copy through a mask
            return files.read(meta, slots, part)
        missing = np.flatnonzero(~written)
        made = [encode(self.store.read_maps(slots[missing[start : start + code_store.CODE_BATCH]]))
                for start in range(0, len(missing), code_store.CODE_BATCH)]
        records = np.empty((len(slots), made[0].shape[1]), made[0].dtype)
        records[missing] = np.concatenate(made)
        if written.any():
            records[written] = files.read(meta, slots[written], part)
        return records

    def images(self, image_ids: Sequence[int]) -> list[ImageRecord]:
        """The catalog rows of ``image_ids``, in the order asked, in one query; KeyError for unknown ids."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return []
        with self._library._sessions() as session:
            rows = session.execute(select(ImageRow).where(ImageRow.id.in_(set(ids)))).scalars()  # see _own_rows
            by_id = {row.id: _record(row) for row in rows if row.collection_id == self._row.id}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"collection {self.name!r} has no images with ids {missing[:10]}")
        return [by_id[i] for i in ids]

    def uris(self, image_ids: Sequence[int]) -> dict[int, str]:
        """id -> uri of those of ``image_ids`` that are image rows of this collection now, in one query
        (ids removed since this snapshot was opened are left out)."""
        ids = {int(i) for i in image_ids}
        if not ids:
            return {}
        return dict(self._own_rows(ImageRow.id, ImageRow.uri, ids=ids))

    def _own_rows(self, *columns, ids: set[int]) -> list[tuple]:
        """``columns`` of the rows of ``ids`` that belong to this collection. Looked up by primary key
        alone and the collection checked here: with the collection in the WHERE clause, SQLite walked
        the collection's index (every row of it): 8 ms per search at 100,000 images, against 0.1 ms.
        A plain connection, not an ORM session: every search asks, and a session cost 0.4 ms more."""
        with self._library._engine.connect() as connection:
            rows = connection.execute(select(*columns, ImageRow.collection_id).where(ImageRow.id.in_(ids))).all()
        return [tuple(row[:-1]) for row in rows if row[-1] == self._row.id]

    def ids_for_uris(self, uris: Sequence[str]) -> dict[str, list[int]]:
        """uri -> ids of the collection's image rows (indexed or failed) with that uri, in one query."""
        wanted = set(uris)
        found: dict[str, list[int]] = {uri: [] for uri in wanted}
        if not wanted:
            return found
        with self._library._sessions() as session:
            rows = session.execute(
                select(ImageRow.uri, ImageRow.id).where(
                    ImageRow.collection_id == self._row.id, ImageRow.uri.in_(wanted)
                )
            )
            for uri, image_id in rows:
                found[uri].append(image_id)
        return found

    def known_ids(self, image_ids: Sequence[int]) -> set[int]:
        """The subset of ``image_ids`` that are image rows (indexed or failed) of this collection, one query."""
        wanted = {int(i) for i in image_ids}
        if not wanted:
            return set()
        return {image_id for (image_id,) in self._own_rows(ImageRow.id, ids=wanted)}

    def remove_images(self, image_ids: Sequence[int]) -> int:
        """Remove images (indexed or failed) by id from catalog, stage-1 index and store; -> number removed.

        Ids not in the collection are ignored. Their feature-store slots become holes; once holes
        exceed half of the store's slots the store is compacted (see :meth:`Library.compact`).
        """
        return self._library._remove_images(self, image_ids)

    # -- maintenance used by the Library (under the collection's write lock) ----------------------
    def _load_or_rebuild_index(self) -> faiss.Index:
        # a shard builds its own index over its images; the saved one holds the whole collection
        index = stage1_index.load_index(self.folder, self.generation) if self.shard is None else None
        if (
            index is not None
            and stage1_index.index_type_of(index) == self._row.index_type
            and index.ntotal == self.size
            and index.d == self.embed_dim
        ):
            stage1_index.apply_search_params(index, self._row.index_type, self._row.index_params)
            return index
        return self._rebuild_index(self._row.index_type, self._row.index_params)[0]

    def _rebuild_index(self, index_type: str, params: dict[str, Any] | None) -> tuple[faiss.Index, dict]:
        ids, slots = self._table.arrays()
        vectors = self.store.read_pooled(slots)
        if index_type != "flat" and len(vectors) == 0:
            index_type, params = "flat", {}
        return stage1_index.build_index(vectors, ids, index_type, params or None)

    def _added(self, ids: np.ndarray, slots: np.ndarray, pooled: np.ndarray) -> None:
        stage1_index.add_vectors(self._index, pooled, ids)
        self._table.append(ids, slots)

    def _adopt(self, other: Collection) -> None:
        """Take over the state of a fresher snapshot of the same collection."""
        _copy_state(other._row, self._row)
        self.store, self._table, self._index = other.store, other._table, other._index

    def _removed(self, ids: np.ndarray) -> None:
        self._table.remove(ids)
        if len(ids) and not stage1_index.remove_ids(self._index, ids):
            self._index = self._rebuild_index(self._row.index_type, self._row.index_params)[0]


class Library:
    """A data directory and its catalog: open collections, index images into them, remove them."""

    def __init__(self, data_dir: Path, db_url: str):
        self.data_dir = data_dir
        self.db_url = db_url
        self._engine, self._sessions = open_catalog(db_url)

    @classmethod
    def open(
        cls, data_dir: str | Path | None = None, db_url: str | None = None, *, create: bool = False
    ) -> Library:
        """Open the library at ``data_dir`` (default :func:`default_data_dir`).

        A missing folder is created when ``create`` (what writers such as ``matchmap index`` pass) or
        when it is the built-in default ~/.local/share/matchmap (a first run finds no collections
        yet). A folder that was named (``data_dir`` or $MATCHMAP_DATA_DIR) and does not exist is
        refused with :class:`DataDirNotFound` when only reading: a mistyped path must not silently
        become a new, empty catalog.

        The catalog is the SQLite file ``data_dir/catalog.sqlite`` unless ``db_url`` names another
        database (e.g. ``postgresql+psycopg2://user:pass@host/db``); the index and store files are in
        ``data_dir`` either way. Raises RuntimeError when the catalog cannot be opened.
        """
        named = data_dir is not None or bool(os.environ.get("MATCHMAP_DATA_DIR"))
        folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if folder.exists() and not folder.is_dir():
            raise DataDirNotFound(f"data directory {folder} is a file, not a directory")
        if not folder.exists() and named and not create:
            source = "--data-dir" if data_dir is not None else "$MATCHMAP_DATA_DIR"
            raise DataDirNotFound(
                f"data directory {folder} (from {source}) does not exist: check the path, "
                "or index into it first (`matchmap index --data-dir DIR ...` creates it)"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"cannot create the data directory {folder}: {exc}") from exc
        return cls(folder.resolve(), db_url or sqlite_url(folder / CATALOG_FILENAME))

    def close(self) -> None:
        """Release the catalog's connections."""
        self._engine.dispose()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def collection_folder(self, storage_key: str) -> Path:
        """The folder of the collection with ``storage_key``."""
        return self.data_dir / COLLECTIONS_FOLDER / storage_key

    # -- reading ---------------------------------------------------------------------------------
    def list_collections(self) -> list[CollectionInfo]:
        """All collections, by name, with counts, model, index choice and bytes on disk."""
        with self._sessions() as session:
            rows = session.execute(select(CollectionRow).order_by(CollectionRow.name)).scalars().all()
            all_rows = total_image_rows(session) if rows else 0
        catalog_total = catalog_bytes(self._engine) if rows else 0
        infos = []
        for row in rows:
            folder = self.collection_folder(row.storage_key)
            store = FeatureStore(
                folder / row.store_layout["directory"], StoreLayout.from_dict(row.store_layout)
            )
            stage1_file = stage1_index.current_index_file(folder) if folder.exists() else None
            catalog_share = catalog_total * (row.images_indexed + row.images_failed) // max(all_rows, 1)
            infos.append(
                CollectionInfo(
                    name=row.name,
                    images=row.images_indexed,
                    failed=row.images_failed,
                    model_name=row.model_name,
                    model_version=row.model_version,
                    bytes=int(catalog_share)
                    + (stage1_file.stat().st_size if stage1_file else 0)
                    + (store.bytes_on_disk() + code_store.CodeFile(store.folder).bytes_on_disk()
                       if store.folder.exists() else 0),
                    index_type=row.index_type,
                    index_params=dict(row.index_params),
                    embed_dim=row.embed_dim,
                    grid=(row.grid_rows, row.grid_cols),
                )
            )
        return infos

    def _row(self, session: Session, name: str) -> CollectionRow:
        row = session.execute(select(CollectionRow).where(CollectionRow.name == name)).scalar_one_or_none()
        if row is None:
            known = session.execute(select(CollectionRow.name).order_by(CollectionRow.name)).scalars().all()
            listed = ", ".join(repr(n) for n in known) if known else "none yet"
            raise CollectionNotFound(f"no collection named {name!r} in {self.db_url_shown} (collections: {listed})", name)
        return row

    @property
    def db_url_shown(self) -> str:
        """The catalog URL with any password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def collection(self, name: str, shard: Shard | None = None) -> Collection:
        """Open collection ``name`` for searching; CollectionNotFound if there is none. With ``shard``,
        the snapshot holds only that shard's images (its own stage-1 index and maps; ``serve --ray``)."""
        with self._snapshot() as session:
            return Collection(self, session, self._row(session, name), shard)

    @contextmanager
    def _snapshot(self) -> Iterator[Session]:
        # The collection row and its (id, slot) list must come from one consistent snapshot.
        with self._sessions() as session:
            if self._engine.dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session

    @staticmethod
    def _live_slots(session: Session, collection_id: int, after_id: int | None = None,
                    below_slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of the collection's indexed images in id order (those past ``after_id`` and
        below ``below_slot`` when given). Read as a flat stream of ints: numpy over a list of Row
        objects took 12 s for 100,000 rows on 2 busy cores, this 1.1 s. Executed on the session's
        connection (Core, no ORM result processing): 1.16 s for a million rows against 1.67 s."""
        query = select(ImageRow.id, ImageRow.store_slot).where(
            ImageRow.collection_id == collection_id, ImageRow.status == STATUS_INDEXED)
        if after_id is not None:
            query = query.where(ImageRow.id > after_id)
        if below_slot is not None:
            query = query.where(ImageRow.store_slot < below_slot)
        flat = np.fromiter(itertools.chain.from_iterable(session.connection().execute(query.order_by(ImageRow.id))),
                           dtype=np.int64)
        table = flat.reshape(-1, 2)
        return table[:, 0].copy(), table[:, 1].copy()

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _write_lock(self, storage_key: str) -> Iterator[None]:
        folder = self.collection_folder(storage_key)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_FILENAME, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CollectionBusyError(
                    f"another process is writing this collection (lock {folder / LOCK_FILENAME}); "
                    "wait for it to finish and run again"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _create_or_get_row(
        self, name: str, model, index_type: str | None, flat_threshold: int | None
    ) -> CollectionRow:
        with self._sessions() as session:
            row = session.execute(
                select(CollectionRow).where(CollectionRow.name == name)
            ).scalar_one_or_none()
            if row is not None:
                return row
            rows, cols = model.image_grid
            policy = index_type or "auto"
            row = CollectionRow(
                name=name,
                storage_key=uuid.uuid4().hex,
                model_name=model.config.name,
                model_version=model.version,
                embed_dim=model.config.embed_dim,
                grid_rows=rows,
                grid_cols=cols,
                index_policy=policy,
                flat_threshold=flat_threshold or stage1_index.DEFAULT_FLAT_THRESHOLD,
                index_type="flat",  # what an empty collection has; the rule re-decides after each run
                index_params={},
                store_layout=StoreLayout(regions=rows * cols, dim=model.config.embed_dim).to_dict(),
                next_slot=0,
                images_indexed=0,
                images_failed=0,
                generation=0,
            )
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # created concurrently by another process: use theirs
                session.rollback()
                return self._row(session, name)
            return row

    def index(
        self,
        name: str,
        paths: Sequence[str],
        model,
        *,
        batch_size: int = 32,
        index_type: str | None = None,
        progress: bool = True,
        flat_threshold: int | None = None,
        encoder=None,
    ) -> IndexReport:
        """Index the images under ``paths`` (folders, globs, files, manifests) into collection ``name``.

        Creates the collection on first use with ``model``'s name, weights version, grid and embed dim.
        Only new content is embedded: files whose content hash the collection already holds are
        skipped and counted. Unreadable or undecodable files are recorded as failed with the reason
        and reported, never abort the run. ``index_type`` ("auto" | "flat" | "ivf" | "hnsw") and
        ``flat_threshold`` (vectors below which "auto" stays exact) change the collection's rule
        when given; the stage-1 index is re-decided at the end of the run.

        ``encoder``: where images are embedded. None embeds in this process (a background thread reads
        and decodes); ``indexer.ray_encode.RayEncoder`` on a Ray cluster. Either way this process
        writes each batch (store, then catalog), so crash safety and skipping are the same.

        Raises PathsError (a ValueError) for paths that name nothing, ModelMismatchError when the
        collection was built with another model, CollectionBusyError when another process writes it.
        """
        if index_type is not None and index_type not in stage1_index.INDEX_POLICIES:
            raise ValueError(f"index_type must be one of {stage1_index.INDEX_POLICIES}, got {index_type!r}")
        if flat_threshold is not None and flat_threshold < 1:
            raise ValueError(f"flat_threshold must be a positive number of vectors, got {flat_threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from indexer import ingest  # torch and the encoders load here, not for listing or removing

        files = discover_images(paths)
        model.eval()
        row = self._create_or_get_row(name, model, index_type, flat_threshold)
        with self._write_lock(row.storage_key):
            collection = self._open_for_writing(name)
            collection.check_model(model)
            self._update_rule(collection, index_type, flat_threshold)
            collection.store.create()
            report = IndexReport(added=0, skipped_duplicates=0)

            lookup = functools.partial(self._known_hashes, collection)
            if encoder is None:
                embedded = ingest.encode_locally(model, files, lookup, batch_size)
            else:
                embedded = encoder(files, functools.partial(self._indexed_hashes, collection), lookup, batch_size)
            with tqdm(
                total=len(files), unit="img", desc=f"indexing {name}", disable=not progress, smoothing=0.1
            ) as bar:
                for batch, maps, pooled in embedded:
                    self._store_batch(collection, batch, maps, pooled, report)
                    bar.update(batch.files)
            self._finish_index(collection)
        return report

    def add_embedded(
        self,
        name: str,
        model,
        batches: Iterable[tuple[Sequence[tuple[str, str, int, int]], np.ndarray, np.ndarray]],
        *,
        total: int | None = None,
        progress: bool = True,
    ) -> IndexReport:
        """Add images embedded elsewhere to collection ``name``, a batch at a time: each batch is
        (images, maps, pooled), images being (uri, content hash, width, height) and maps (B, R, D) and
        pooled (B, D) their feature maps and stage-1 vectors from ``model`` (encoded by other workers,
        say, or the maps of a scaled benchmark). Each batch is made durable as :meth:`index` makes its
        own (store first, then the catalog) and contents the collection already holds are skipped; the
        stage-1 index is re-decided once at the end. ``total``: images to expect, for the progress bar.
        """
        from indexer.ingest import PreparedBatch, PreparedImage

        rows, cols = model.image_grid
        row = self._create_or_get_row(name, model, None, None)
        with self._write_lock(row.storage_key):
            collection = self._open_for_writing(name)
            collection.check_model(model)
            collection.store.create()
            report = IndexReport(added=0, skipped_duplicates=0)
            with tqdm(total=total, unit="img", desc=f"adding to {name}", disable=not progress) as bar:
                for images, maps, pooled in batches:
                    expected = (len(images), rows * cols, model.config.embed_dim)
                    if maps.shape != expected or pooled.shape != (len(images), model.config.embed_dim):
                        raise ValueError(f"maps {maps.shape} and pooled {pooled.shape} do not fit {len(images)} "
                                         f"images of model {model.config.name} (maps {expected})")
                    known = self._known_hashes(collection, [h for _, h, _, _ in images])
                    batch, keep = PreparedBatch(), []
                    for i, (uri, content_hash, width, height) in enumerate(images):
                        if content_hash in known:
                            batch.skipped.append((uri, known[content_hash]))
                        else:
                            batch.images.append(PreparedImage(uri, content_hash, width, height, pixels=None))
                            keep.append(i)
                    self._store_batch(collection, batch, np.ascontiguousarray(maps[keep], dtype=np.float16),
                                      np.ascontiguousarray(pooled[keep], dtype=np.float32), report)
                    bar.update(len(images))
            self._finish_index(collection)
        return report

    def _open_for_writing(self, name: str) -> Collection:
        collection = self.collection(name)
        self._sweep_strays(collection)
        return collection

    def _update_rule(
        self, collection: Collection, index_type: str | None, flat_threshold: int | None
    ) -> None:
        if index_type is None and flat_threshold is None:
            return
        with self._sessions.begin() as session:
            row = session.get(CollectionRow, collection._row.id)
            if index_type is not None:
                row.index_policy = index_type
            if flat_threshold is not None:
                row.flat_threshold = flat_threshold
            collection._row.index_policy = row.index_policy
            collection._row.flat_threshold = row.flat_threshold

    def _known_hashes(self, collection: Collection, hashes: list[str]) -> dict[str, str]:
        """{content hash: uri of the indexed image holding it} for those of ``hashes`` already indexed."""
        with self._sessions() as session:
            rows = session.execute(
                select(ImageRow.content_hash, ImageRow.uri).where(
                    ImageRow.collection_id == collection._row.id,
                    ImageRow.status == STATUS_INDEXED,
                    ImageRow.content_hash.in_(set(hashes)),
                )
            )
            return {content_hash: uri for content_hash, uri in rows}

    def _indexed_hashes(self, collection: Collection) -> set[str]:
        """Every content hash the collection holds (for encoders that skip known contents remotely)."""
        with self._sessions() as session:
            return set(
                session.execute(
                    select(ImageRow.content_hash).where(
                        ImageRow.collection_id == collection._row.id, ImageRow.status == STATUS_INDEXED
                    )
                ).scalars()
            )

    def _store_batch(
        self,
        collection: Collection,
        batch: PreparedBatch,
        maps: np.ndarray,
        pooled: np.ndarray,
        report: IndexReport,
    ) -> None:
        """Make one batch durable: maps (B, R, D) and pooled (B, D) into the store, then the catalog rows."""
        first_slot = collection._row.next_slot
        if batch.images:
            collection.store.write(first_slot, maps, pooled)  # durable before the catalog points at it
        with self._sessions.begin() as session:
            row = session.get(CollectionRow, collection._row.id, with_for_update=True)
            failed_before = session.execute(
                delete(ImageRow).where(
                    ImageRow.collection_id == row.id,
                    ImageRow.status == STATUS_FAILED,
                    ImageRow.uri.in_(set(batch.uris)),
                )
            ).rowcount
            copies = [(uri, original) for uri, original in batch.skipped if uri != original]
            # An indexed row at a new image's uri, or at a copy's uri (the file now holds other content,
            # which an image elsewhere already has), is an old version of that file.
            replaced = (
                session.execute(
                    select(ImageRow.id).where(
                        ImageRow.collection_id == row.id,
                        ImageRow.status == STATUS_INDEXED,
                        ImageRow.uri.in_({image.uri for image in batch.images} | {uri for uri, _ in copies}),
                    )
                )
                .scalars()
                .all()
            )
            if replaced:
                session.execute(delete(ImageRow).where(ImageRow.id.in_(replaced)))
            added = [
                ImageRow(
                    collection_id=row.id,
                    uri=image.uri,
                    content_hash=image.content_hash,
                    width=image.width,
                    height=image.height,
                    status=STATUS_INDEXED,
                    store_slot=first_slot + position,
                )
                for position, image in enumerate(batch.images)
            ]
            failed = [
                ImageRow(
                    collection_id=row.id,
                    uri=item.uri,
                    content_hash=item.content_hash,
                    status=STATUS_FAILED,
                    error=item.reason,
                )
                for item in batch.failed
            ]
            session.add_all(added + failed)
            session.flush()
            row.next_slot = first_slot + len(added)
            row.images_indexed += len(added) - len(replaced)
            row.images_failed += len(failed) - failed_before
            if added or replaced:
                row.generation += 1
            row.updated_at = utcnow()
            session.flush()
            _copy_state(row, collection._row)
        ids = np.array([image.id for image in added], dtype=np.int64)
        slots = first_slot + np.arange(len(added), dtype=np.int64)
        if len(replaced):
            collection._removed(np.array(replaced, dtype=np.int64))
        if len(added):
            collection._added(ids, slots, pooled)
        report.added += len(added)
        report.replaced += len(replaced)
        report.skipped_duplicates += len(batch.skipped)
        report.unchanged += len(batch.skipped) - len(copies)
        report.duplicates.extend(copies)
        report.failed.extend((item.uri, item.reason) for item in batch.failed)

    def _finish_index(self, collection: Collection) -> None:
        """Re-decide the stage-1 index by the collection's rule, then save it for the current generation."""
        row = collection._row
        wanted = stage1_index.decide_index_type(collection.size, row.index_policy, row.flat_threshold)
        if collection.size == 0:
            wanted = "flat"  # nothing to train an approximate index on
        grown = wanted == row.index_type and stage1_index.needs_rebuild(
            row.index_type, row.index_params, collection.size, row.index_policy, row.flat_threshold
        )
        if wanted != row.index_type or grown:
            index, params = collection._rebuild_index(wanted, None)
            with self._sessions.begin() as session:
                stored = session.get(CollectionRow, row.id, with_for_update=True)
                stored.index_type = wanted
                stored.index_params = params
                stored.generation += 1
                stored.updated_at = utcnow()
                session.flush()
                _copy_state(stored, row)
            collection._index = index
        self._save_current(collection)
        self._update_codes(collection)

    @staticmethod
    def _update_codes(collection: Collection) -> None:
        """Region codes for every slot of the store (``indexer.code_store``), so that a server opening
        the collection reads 2 KB per image instead of coding every map."""
        code_store.bring_up_to_date(collection.store, collection._row.next_slot, collection._table.arrays()[1])

    def _sweep_strays(self, collection: Collection) -> None:
        """Delete leftovers of interrupted writes: store folders the catalog does not point at."""
        if not collection.folder.exists():
            return
        for path in collection.folder.iterdir():
            if path.is_dir() and path.name.startswith("store-") and path != collection.store.folder:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_images(self, collection: Collection, image_ids: Sequence[int]) -> int:
        ids = sorted({int(i) for i in image_ids})
        if not ids:
            return 0
        with self._write_lock(collection._row.storage_key):
            # The caller's snapshot may be stale (another process may have written since): work on a fresh one.
            fresh = self._open_for_writing(collection.name)
            with self._sessions.begin() as session:
                row = session.get(CollectionRow, fresh._row.id, with_for_update=True)
                found = session.execute(
                    select(ImageRow.id, ImageRow.status).where(
                        ImageRow.collection_id == row.id, ImageRow.id.in_(ids)
                    )
                ).all()
                indexed = [i for i, status in found if status == STATUS_INDEXED]
                if found:
                    session.execute(delete(ImageRow).where(ImageRow.id.in_([i for i, _ in found])))
                row.images_indexed -= len(indexed)
                row.images_failed -= len(found) - len(indexed)
                if indexed:
                    row.generation += 1
                row.updated_at = utcnow()
                session.flush()
                _copy_state(row, fresh._row)
            fresh._removed(np.array(indexed, dtype=np.int64))
            self._save_current(fresh)
            holes = fresh._row.next_slot - fresh.size
            if holes > COMPACT_HOLE_FRACTION * fresh._row.next_slot:
                self._compact_locked(fresh)
        collection._adopt(fresh)
        return len(found)

    @staticmethod
    def _save_current(collection: Collection) -> None:
        if not stage1_index.index_path(collection.folder, collection.generation).exists():
            stage1_index.save_index(collection._index, collection.folder, collection.generation)

    def compact(self, name: str) -> int:
        """Rewrite collection ``name``'s feature store without the holes removals left; -> bytes freed."""
        row = self.collection(name)._row
        with self._write_lock(row.storage_key):
            collection = self._open_for_writing(name)
            return self._compact_locked(collection)

    def _compact_locked(self, collection: Collection) -> int:
        before = collection.store.bytes_on_disk() if collection.store.folder.exists() else 0
        ids, slots = collection._table.arrays()
        order = np.argsort(slots, kind="stable")
        live_ids, live_slots = ids[order], slots[order]
        layout = StoreLayout.from_dict(
            {**collection.store.layout.to_dict(), "directory": f"store-{uuid.uuid4().hex[:12]}"}
        )
        target = FeatureStore(collection.folder / layout.directory, layout)
        compact_store(collection.store, live_slots, target)
        with self._sessions.begin() as session:
            if len(live_ids):
                session.execute(
                    update(ImageRow),
                    [{"id": int(i), "store_slot": slot} for slot, i in enumerate(live_ids)],
                )
            row = session.get(CollectionRow, collection._row.id, with_for_update=True)
            row.store_layout = layout.to_dict()
            row.next_slot = len(live_ids)
            row.generation += 1
            row.updated_at = utcnow()
            session.flush()
            _copy_state(row, collection._row)
        old = collection.store
        old.close()
        collection.store = target
        new_slots = np.empty_like(live_slots)
        new_slots[order] = np.arange(len(live_slots), dtype=np.int64)
        collection._table.set_slots(new_slots)
        shutil.rmtree(old.folder, ignore_errors=True)
        self._save_current(collection)
        self._update_codes(collection)
        return before - target.bytes_on_disk()

    def remove_collection(self, name: str) -> None:
        """Delete collection ``name``: its catalog rows, stage-1 index and feature store."""
        with self._sessions() as session:
            row = self._row(session, name)
        with self._write_lock(row.storage_key):
            with self._sessions.begin() as session:
                session.execute(delete(ImageRow).where(ImageRow.collection_id == row.id))
                session.execute(delete(CollectionRow).where(CollectionRow.id == row.id))
            shutil.rmtree(self.collection_folder(row.storage_key), ignore_errors=True)


# What stays the same while a collection only grows (see Collection.appended).
_APPEND_INVARIANTS = ("storage_key", "model_name", "model_version", "embed_dim", "grid_rows", "grid_cols",
                      "index_type", "index_params", "store_layout")


def _copy_state(source: CollectionRow, target: CollectionRow) -> None:
    """Mirror a committed collection row into the in-memory snapshot a Collection holds."""
    for column in CollectionRow.__table__.columns.keys():
        setattr(target, column, getattr(source, column))
