"""Region codes beside a collection's feature store: 2 KB per image, written at indexing time.

A server holds a large collection's maps in memory as transform codes (``indexer.region_codec``;
``search.resident.ResidentCodes``): 2 GB at a million images where bfloat16 maps take 32 GB. Making
the codes when the server opens the collection means reading every map in the store (32 GB at a
million), so the indexer writes them as it indexes, and a server loads them as it loads the stage-1
index, coding in memory only the images indexed since.

Files, in the store folder (``store-*``; compaction starts a new store folder, whose codes are made
anew from the compacted maps):

- ``codes.json``: ``{"tag": T, "trained_on": N, "code_bytes": B, "centroids": C, "regions": R}``,
  replaced atomically last;
- ``codec-T.npz``: the codec, trained on ``N`` maps spread evenly over the collection;
- ``codes-T.u8``: one record of B bytes per store slot, in slot order (removed images' slots keep
  theirs until compaction), append-only: a crash leaves a shorter file, never a wrong record;
- ``centroids-T.npz`` and ``regions-T.u16``: C region centroids (``indexer.region_centroids``) learnt
  from the same maps, and each slot's R regions' nearest centroid ids (2 bytes each), kept as the codes
  are. A slot counts as coded once both files hold its record.

A set written before region centroids existed (no ``centroids`` in ``codes.json``) still serves its
codes; the next index run trains a new set with both.

**Drift.** A codec learns from the maps that existed when it was trained; images unlike them would be
coded coarsely. The indexer trains it again, on maps spread over the whole collection, when the
collection has doubled since (``RETRAIN_GROWTH``), and codes every slot again: over a collection's
life that reads each map about twice (1 + 1/2 + 1/4 ...), at indexing time, never at start-up.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from indexer.region_centroids import RegionCentroids
from indexer.region_codec import RegionCodec

CODE_BYTES = 2048  # bytes per image: as stage 2's coarse pass this kept the bfloat16 agreement (docs/search.md)
CODEC_TRAIN_IMAGES = 1024  # maps a codec trains on
RETRAIN_GROWTH = 2.0  # train the codec again once the collection has grown by this factor since
CODE_BATCH = 4096  # maps read and coded at a time
READ_WINDOW_ROWS = 16384  # codes read per window (32 MB), see CodeFile.read


def train_codec(store, live_slots: np.ndarray) -> tuple[RegionCodec, RegionCentroids]:
    """A codec of CODE_BYTES per image and region centroids, both trained on the maps of
    CODEC_TRAIN_IMAGES of ``live_slots`` of ``store`` (an indexer FeatureStore), spread evenly over them."""
    sample = np.sort(np.asarray(live_slots, dtype=np.int64))[spread(len(live_slots), CODEC_TRAIN_IMAGES)]
    maps = store.read_maps(sample).astype(np.float32)
    return RegionCodec.train(maps, CODE_BYTES), RegionCentroids.train(maps)


def spread(count: int, take: int) -> np.ndarray:
    """``take`` positions (at most ``count``) spread evenly over 0..count-1, ascending, distinct."""
    return np.unique(np.linspace(0, count - 1, num=min(count, take)).round().astype(np.int64))


class CodeFile:
    """The codes of one store folder (see the module's doc for the files). Two parts per slot: its
    transform code (``"codes"``, CODE_BYTES uint8) and its regions' centroid ids (``"region_ids"``,
    R uint16)."""

    def __init__(self, store_folder: str | Path) -> None:
        self.folder = Path(store_folder)

    @property
    def _meta_path(self) -> Path:
        return self.folder / "codes.json"

    def meta(self) -> dict | None:
        """The current codes' description, or None when there are none (or none complete)."""
        try:
            meta = json.loads(self._meta_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("code_bytes") != CODE_BYTES or not self._codec_path(meta["tag"]).exists():
            return None
        if has_region_ids(meta) and not self._centroids_path(meta["tag"]).exists():
            return None
        return meta

    def _codec_path(self, tag: str) -> Path:
        return self.folder / f"codec-{tag}.npz"

    def _centroids_path(self, tag: str) -> Path:
        return self.folder / f"centroids-{tag}.npz"

    def _part(self, meta: dict, part: str) -> tuple[Path, int, np.dtype, int]:
        """(file, bytes per record, dtype, values per record) of ``part`` of ``meta``'s set."""
        if part == "codes":
            return self.folder / f"codes-{meta['tag']}.u8", CODE_BYTES, np.dtype(np.uint8), CODE_BYTES
        if part == "region_ids" and has_region_ids(meta):
            regions = int(meta["regions"])
            return self.folder / f"regions-{meta['tag']}.u16", 2 * regions, np.dtype(np.uint16), regions
        raise ValueError(f"no such part of region codes: {part!r}")

    def codec(self, meta: dict) -> RegionCodec:
        return RegionCodec.load(self._codec_path(meta["tag"]))

    def centroids(self, meta: dict) -> RegionCentroids:
        return RegionCentroids.load(self._centroids_path(meta["tag"]))

    def rows(self, meta: dict) -> int:
        """How many slots (from slot 0) have their code and (in a set with centroids) their region ids."""
        counts = []
        for part in ("codes", "region_ids") if has_region_ids(meta) else ("codes",):
            path, record, _, _ = self._part(meta, part)
            counts.append(path.stat().st_size // record if path.exists() else 0)
        return min(counts)

    def read(self, meta: dict, slots: np.ndarray, part: str = "codes") -> np.ndarray:
        """slots (K,) all below :meth:`rows` -> their records of ``part``: (K, CODE_BYTES) uint8 codes,
        or (K, R) uint16 region ids.

        Read in windows of READ_WINDOW_ROWS slots, in slot order: a window where at least a quarter of
        the slots are asked for is read whole, sequentially, and the rest are gathered through a memory
        map. A collection's codes are mostly one run of slots, and gathering them a record at a time
        (half a page each) took most of a million-image server's start-up (docs/search.md)."""
        path, _, dtype, width = self._part(meta, part)
        slots = np.asarray(slots, dtype=np.int64)
        rows = self.rows(meta)
        if len(slots) == 0 or rows == 0:
            return np.zeros((0, width), dtype)
        if int(slots.max()) >= rows or int(slots.min()) < 0:
            raise ValueError(f"codes cover slots 0..{rows - 1}, asked for slot {int(slots.max())}")
        out = np.empty((len(slots), width), dtype)
        if np.all(np.diff(slots) == 1):  # one run of slots: read straight into place
            with open(path, "rb") as f:
                _read_records(f, int(slots[0]), out)
            return out
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        bounds = np.searchsorted(ordered, np.arange(0, rows + READ_WINDOW_ROWS, READ_WINDOW_ROWS))
        mapped = None
        with open(path, "rb") as f:
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                if lo == hi:
                    continue
                first, last = int(ordered[lo]), int(ordered[hi - 1])
                if 4 * (hi - lo) >= last - first + 1:  # dense: one sequential read of the span
                    window = _read_records(f, first, np.empty((last - first + 1, width), dtype))
                    out[order[lo:hi]] = window[ordered[lo:hi] - first]
                else:
                    if mapped is None:
                        mapped = np.memmap(f, dtype=dtype, mode="r", shape=(rows, width))
                    out[order[lo:hi]] = mapped[ordered[lo:hi]]
        del mapped
        return out

    # ---- writing (the indexer, under the collection's write lock) ------------------------------

    def start(self, codec: RegionCodec, centroids: RegionCentroids, trained_on: int, regions: int) -> dict:
        """A new, empty set of codes for ``codec`` and ``centroids`` (maps of ``regions`` regions); the
        old set stays current until :meth:`publish`."""
        meta = {"tag": uuid.uuid4().hex[:12], "trained_on": int(trained_on), "code_bytes": CODE_BYTES,
                "centroids": centroids.count, "regions": int(regions)}
        codec.save(self._codec_path(meta["tag"]))
        centroids.save(self._centroids_path(meta["tag"]))
        for part in ("codes", "region_ids"):
            self._part(meta, part)[0].touch()
        return meta

    def append(self, meta: dict, first_slot: int, codes: np.ndarray, region_ids: np.ndarray) -> None:
        """Write codes (B, CODE_BYTES) and region ids (B, R) for slots first_slot.. (which must be the
        next rows), durably."""
        if self.rows(meta) != first_slot:
            raise ValueError(f"codes hold {self.rows(meta)} rows; cannot append at slot {first_slot}")
        for part, records in (("codes", codes), ("region_ids", region_ids)):
            path, record, dtype, _ = self._part(meta, part)
            with open(path, "r+b") as f:
                f.seek(first_slot * record)
                f.truncate()  # a torn record of an earlier crash goes
                f.write(np.ascontiguousarray(records, dtype=dtype).tobytes())
                f.flush()
                os.fsync(f.fileno())

    def _set_files(self) -> list[Path]:
        return [path for pattern in ("codec-*.npz", "codes-*.u8", "centroids-*.npz", "regions-*.u16")
                for path in self.folder.glob(pattern)]

    def publish(self, meta: dict) -> None:
        """Make ``meta``'s codes current (atomic), then delete every other set in the folder."""
        temporary = self._meta_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(meta))
        os.replace(temporary, self._meta_path)
        for path in self._set_files():
            if meta["tag"] not in path.name:
                path.unlink(missing_ok=True)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self._set_files())


def has_region_ids(meta: dict) -> bool:
    """Whether a set (``CodeFile.meta``) has region centroids and ids (sets written before them have not)."""
    return "centroids" in meta


def _read_records(f, first_slot: int, into: np.ndarray) -> np.ndarray:
    """Fill ``into`` (n, width) with the records of slots first_slot.. of the open file ``f``."""
    f.seek(first_slot * into.shape[1] * into.itemsize)
    if f.readinto(memoryview(into).cast("B")) != into.nbytes:
        raise ValueError(f"codes file ended before slot {first_slot + len(into) - 1}")
    return into


def bring_up_to_date(store, slot_count: int, live_slots: np.ndarray) -> dict:
    """Give every slot below ``slot_count`` of ``store`` (an indexer FeatureStore) its codes: train the
    codec first when there is none, or when the live images (``live_slots``) have grown RETRAIN_GROWTH
    times past the number the current codec saw. Returns {"trained": bool, "coded": slots coded}."""
    files = CodeFile(store.folder)
    meta = files.meta()
    trained = False
    if len(live_slots) < 2 and meta is None:
        return {"trained": False, "coded": 0}
    if meta is None or not has_region_ids(meta) or len(live_slots) >= RETRAIN_GROWTH * meta["trained_on"]:
        codec, centroids = train_codec(store, live_slots)
        meta = files.start(codec, centroids, trained_on=len(live_slots), regions=codec.bits.shape[0])
        trained = True
    codec, centroids = files.codec(meta), files.centroids(meta)
    start = files.rows(meta)
    for first in range(start, slot_count, CODE_BATCH):
        slots = np.arange(first, min(first + CODE_BATCH, slot_count), dtype=np.int64)
        maps = store.read_maps(slots)
        files.append(meta, first, codec.encode(maps), centroids.assign(maps))
    if trained:
        files.publish(meta)
    return {"trained": trained, "coded": max(0, slot_count - start)}
