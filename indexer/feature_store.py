"""The feature store: every indexed image's spatial feature map (R x D) for the stage-2 MISA rerank.

Layout (recorded per collection in the catalog as :class:`StoreLayout`): a folder of append-only
shard files, each holding ``rows_per_shard`` consecutive *slots*. A slot is one image's map, stored
row-major as ``regions x dim`` values of ``dtype`` (float16: half the bytes of float32, and the
rerank accumulates in float32 anyway). Beside each maps shard, a pooled shard holds the image's
masked-mean pooled vector (float32, ``dim`` values) computed from the *stored* maps, so the stage-1
index can be rebuilt without reading the maps and its inner products equal SISA of what stage 2 reads.

Records are read with ``pread`` (each run of consecutive slots in one call), so a collection larger than
RAM can be served: a gather reads only the bytes of the requested slots. Writes go through ``os.pwrite`` at the slot's offset followed by
``fsync``; a slot is referenced by the catalog only after its bytes are durable, so a crash leaves at
worst an unreferenced tail that the next write overwrites.

Removed images leave holes (unreferenced slots); :func:`compact_store` rewrites the live slots into a
fresh folder (see ``Library.compact``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ROWS_PER_SHARD = 4096


@dataclass(frozen=True)
class StoreLayout:
    """How a collection's feature maps are laid out on disk.

    ``directory`` is relative to the collection's folder; compaction moves to a new one.
    """

    regions: int
    dim: int
    dtype: str = "float16"
    pooled_dtype: str = "float32"
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    directory: str = "store-0"

    def __post_init__(self) -> None:
        if self.regions <= 0 or self.dim <= 0 or self.rows_per_shard <= 0:
            raise ValueError(
                f"store layout needs positive regions, dim and rows_per_shard, got {self.regions}, "
                f"{self.dim}, {self.rows_per_shard}"
            )
        for name in (self.dtype, self.pooled_dtype):
            if np.dtype(name).kind != "f":
                raise ValueError(f"store layout dtypes must be floating point, got {name!r}")

    @property
    def map_bytes(self) -> int:
        """Bytes of one slot's feature map."""
        return self.regions * self.dim * np.dtype(self.dtype).itemsize

    @property
    def pooled_bytes(self) -> int:
        """Bytes of one slot's pooled vector."""
        return self.dim * np.dtype(self.pooled_dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form stored in the catalog."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


class _ShardedArray:
    """Fixed-width records split over shard files ``<prefix>-NNNNNN.bin``, read with pread."""

    def __init__(self, folder: Path, prefix: str, record_shape: tuple[int, ...], dtype: str, rows: int):
        self.folder = folder
        self.prefix = prefix
        self.record_shape = record_shape
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = rows
        self.record_bytes = int(np.prod(record_shape)) * self.dtype.itemsize
        self._fds: dict[int, tuple[int, int]] = {}  # shard -> (read-only descriptor, rows when last checked)
        self._lock = threading.Lock()

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"{self.prefix}-{shard:06d}.bin"

    def shard_files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}-*.bin"))

    def write(self, first_slot: int, records: np.ndarray) -> None:
        """Write ``records`` (B, *record_shape) at slots first_slot.. and make them durable."""
        records = np.ascontiguousarray(records, dtype=self.dtype)
        created = False
        position = 0
        while position < len(records):
            slot = first_slot + position
            shard, local = divmod(slot, self.rows_per_shard)
            count = min(len(records) - position, self.rows_per_shard - local)
            path = self.shard_path(shard)
            created |= not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                data = records[position : position + count].tobytes()
                offset = local * self.record_bytes
                while data:
                    written = os.pwrite(fd, data, offset)
                    data = data[written:]
                    offset += written
                os.fsync(fd)
            finally:
                os.close(fd)
            position += count
        if created:
            _fsync_directory(self.folder)

    def read(self, slots: np.ndarray) -> np.ndarray:
        """Gather the records of ``slots`` (K,) -> (K, *record_shape): per shard, each run of consecutive
        rows with one ``pread`` into the result.

        Not through the memory map: a page fault reads around the faulting page, so gathering 32 random
        maps of a million-image store (larger than the page cache) through it took about 90 ms even with
        every record asked for at once (MADV_WILLNEED), where 32 ``pread`` of exactly their bytes took
        about 7 (docs/search.md, "A million images, read as they lie")."""
        out = np.empty((len(slots), *self.record_shape), dtype=self.dtype)
        if len(slots) == 0:
            return out
        shards, local = np.divmod(slots, self.rows_per_shard)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            rows = local[where]
            fd = self._descriptor(int(shard), int(rows.max()) + 1)
            order = np.argsort(rows, kind="stable")
            where, rows = where[order], rows[order]
            starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # first of each run of rows
            into = np.empty((len(rows), *self.record_shape), dtype=self.dtype)
            for first, end in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)], strict=True):
                self._pread(fd, memoryview(into[first:end]).cast("B"), int(rows[first]) * self.record_bytes, shard)
            out[where] = into
        return out

    def _pread(self, fd: int, buffer: memoryview, offset: int, shard: int) -> None:
        done = 0
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise ValueError(f"feature store shard {self.shard_path(shard)} ended at byte {offset + done}, "
                                 "before a record the catalog references (was it moved or truncated?)")
            done += got

    def _descriptor(self, shard: int, need_rows: int) -> int:
        """A read-only descriptor of ``shard``'s file, checked to hold ``need_rows`` rows."""
        with self._lock:
            held = self._fds.get(shard)
            if held is None or held[1] < need_rows:
                path = self.shard_path(shard)
                rows = path.stat().st_size // self.record_bytes if path.exists() else 0
                if rows < need_rows:
                    raise ValueError(
                        f"feature store shard {path} holds {rows} slots but slot {need_rows - 1} was asked "
                        "for: the store is missing data the catalog references (was it moved or truncated?)"
                    )
                fd = held[0] if held is not None else os.open(path, os.O_RDONLY)
                held = self._fds[shard] = (fd, rows)
            return held[0]

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


class FeatureStore:
    """Feature maps and pooled vectors of one collection, addressed by slot.

    ``folder`` is the store folder (``<collection folder>/<layout.directory>``).
    """

    def __init__(self, folder: str | Path, layout: StoreLayout):
        self.folder = Path(folder)
        self.layout = layout
        self._maps = _ShardedArray(
            self.folder, "maps", (layout.regions, layout.dim), layout.dtype, layout.rows_per_shard
        )
        self._pooled = _ShardedArray(
            self.folder, "pooled", (layout.dim,), layout.pooled_dtype, layout.rows_per_shard
        )

    def create(self) -> None:
        """Create the store folder (and its parent) durably."""
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_directory(self.folder.parent)

    def write(self, first_slot: int, maps: np.ndarray, pooled: np.ndarray) -> None:
        """Store maps (B, R, D) and pooled (B, D) at slots first_slot..first_slot+B-1, durably (fsync).

        ``maps`` must already be in the layout's dtype when the pooled vectors were computed from it:
        the store does not recompute them.
        """
        expected = (self.layout.regions, self.layout.dim)
        if maps.ndim != 3 or maps.shape[1:] != expected:
            raise ValueError(f"feature maps must be (B, {expected[0]}, {expected[1]}), got {maps.shape}")
        if pooled.shape != (maps.shape[0], self.layout.dim):
            raise ValueError(
                f"pooled vectors must be ({maps.shape[0]}, {self.layout.dim}), got {pooled.shape}"
            )
        if first_slot < 0:
            raise ValueError(f"first_slot must be >= 0, got {first_slot}")
        self._maps.write(first_slot, maps)
        self._pooled.write(first_slot, pooled)

    def read_maps(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """slots (K,) int -> (K, R, D) feature maps in the layout's dtype."""
        return self._maps.read(np.asarray(slots, dtype=np.int64))

    def read_pooled(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """slots (K,) int -> (K, D) pooled vectors (float32)."""
        return self._pooled.read(np.asarray(slots, dtype=np.int64)).astype(np.float32, copy=False)

    def bytes_on_disk(self) -> int:
        """Bytes of all shard files, holes and uncommitted tails included."""
        files = self._maps.shard_files() + self._pooled.shard_files()
        return sum(f.stat().st_size for f in files)

    def close(self) -> None:
        """Close the shard files' descriptors (files stay)."""
        self._maps.close()
        self._pooled.close()


def compact_store(
    source: FeatureStore, live_slots: np.ndarray, target: FeatureStore, chunk: int = 1024
) -> None:
    """Copy the slots ``live_slots`` (L,) of ``source`` to slots 0..L-1 of the empty ``target``, durably."""
    target.create()
    for start in range(0, len(live_slots), chunk):
        slots = live_slots[start : start + chunk]
        target.write(start, source.read_maps(slots), source.read_pooled(slots))


def _fsync_directory(folder: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
