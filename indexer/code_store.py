"""Region codes beside a collection's feature store: 2 KB per image, written at indexing time.

A server holds a large collection's maps in memory as transform codes (``indexer.region_codec``;
``search.resident.ResidentCodes``): 2 GB at a million images where bfloat16 maps take 32 GB. Making
the codes when the server opens the collection means reading every map in the store (32 GB at a
million), so the indexer writes them as it indexes, and a server loads them as it loads the stage-1
index, coding in memory only the images indexed since.

Files, in the store folder (``store-*``; compaction starts a new store folder, whose codes are made
anew from the compacted maps):

- ``codes.json``: ``{"tag": T, "trained_on": N, "code_bytes": B}``, replaced atomically last;
- ``codec-T.npz``: the codec, trained on ``N`` maps spread evenly over the collection;
- ``codes-T.u8``: one record of B bytes per store slot, in slot order (removed images' slots keep
  theirs until compaction), append-only: a crash leaves a shorter file, never a wrong record.

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

from indexer.region_codec import RegionCodec

CODE_BYTES = 2048  # bytes per image: as stage 2's coarse pass this kept the bfloat16 agreement (docs/search.md)
CODEC_TRAIN_IMAGES = 1024  # maps a codec trains on
RETRAIN_GROWTH = 2.0  # train the codec again once the collection has grown by this factor since
CODE_BATCH = 4096  # maps read and coded at a time
READ_WINDOW_ROWS = 16384  # codes read per window (32 MB), see CodeFile.read


def train_codec(store, live_slots: np.ndarray) -> RegionCodec:
    """A codec of CODE_BYTES per image trained on the maps of CODEC_TRAIN_IMAGES of ``live_slots`` of
    ``store`` (an indexer FeatureStore), spread evenly over them."""
    sample = np.sort(np.asarray(live_slots, dtype=np.int64))[spread(len(live_slots), CODEC_TRAIN_IMAGES)]
    return RegionCodec.train(store.read_maps(sample).astype(np.float32), CODE_BYTES)


def spread(count: int, take: int) -> np.ndarray:
    """``take`` positions (at most ``count``) spread evenly over 0..count-1, ascending, distinct."""
    return np.unique(np.linspace(0, count - 1, num=min(count, take)).round().astype(np.int64))


class CodeFile:
    """The codes of one store folder (see the module's doc for the files)."""

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
        return meta

    def _codec_path(self, tag: str) -> Path:
        return self.folder / f"codec-{tag}.npz"

    def _codes_path(self, tag: str) -> Path:
        return self.folder / f"codes-{tag}.u8"

    def codec(self, meta: dict) -> RegionCodec:
        return RegionCodec.load(self._codec_path(meta["tag"]))

    def rows(self, meta: dict) -> int:
        """How many slots (from slot 0) have codes."""
        path = self._codes_path(meta["tag"])
        return path.stat().st_size // CODE_BYTES if path.exists() else 0

    def read(self, meta: dict, slots: np.ndarray) -> np.ndarray:
        """slots (K,) all below :meth:`rows` -> (K, CODE_BYTES) uint8.

        Read in windows of READ_WINDOW_ROWS slots, in slot order: a window where at least a quarter of
        the slots are asked for is read whole, sequentially, and the rest are gathered through a memory
        map. A collection's codes are mostly one run of slots, and gathering them a record at a time
        (half a page each) took most of a million-image server's start-up (docs/search.md)."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = self.rows(meta)
        if len(slots) == 0 or rows == 0:
            return np.zeros((0, CODE_BYTES), np.uint8)
        if int(slots.max()) >= rows or int(slots.min()) < 0:
            raise ValueError(f"codes cover slots 0..{rows - 1}, asked for slot {int(slots.max())}")
        out = np.empty((len(slots), CODE_BYTES), np.uint8)
        if np.all(np.diff(slots) == 1):  # one run of slots: read straight into place
            with open(self._codes_path(meta["tag"]), "rb") as f:
                _read_records(f, int(slots[0]), out)
            return out
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        bounds = np.searchsorted(ordered, np.arange(0, rows + READ_WINDOW_ROWS, READ_WINDOW_ROWS))
        mapped = None
        with open(self._codes_path(meta["tag"]), "rb") as f:
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                if lo == hi:
                    continue
                first, last = int(ordered[lo]), int(ordered[hi - 1])
                if 4 * (hi - lo) >= last - first + 1:  # dense: one sequential read of the span
                    window = _read_records(f, first, np.empty((last - first + 1, CODE_BYTES), np.uint8))
                    out[order[lo:hi]] = window[ordered[lo:hi] - first]
                else:
                    if mapped is None:
                        mapped = np.memmap(f, dtype=np.uint8, mode="r", shape=(rows, CODE_BYTES))
                    out[order[lo:hi]] = mapped[ordered[lo:hi]]
        del mapped
        return out

    # ---- writing (the indexer, under the collection's write lock) ------------------------------

    def start(self, codec: RegionCodec, trained_on: int) -> dict:
        """A new, empty set of codes for ``codec``; the old set stays current until :meth:`publish`."""
        meta = {"tag": uuid.uuid4().hex[:12], "trained_on": int(trained_on), "code_bytes": CODE_BYTES}
        codec.save(self._codec_path(meta["tag"]))
        self._codes_path(meta["tag"]).touch()
        return meta

    def append(self, meta: dict, first_slot: int, codes: np.ndarray) -> None:
        """Write codes (B, CODE_BYTES) for slots first_slot.. (which must be the next rows), durably."""
        path = self._codes_path(meta["tag"])
        if self.rows(meta) != first_slot:
            raise ValueError(f"codes hold {self.rows(meta)} rows; cannot append at slot {first_slot}")
        with open(path, "r+b") as f:
            f.seek(first_slot * CODE_BYTES)
            f.truncate()  # a torn record of an earlier crash goes
            f.write(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def publish(self, meta: dict) -> None:
        """Make ``meta``'s codes current (atomic), then delete every other set in the folder."""
        temporary = self._meta_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(meta))
        os.replace(temporary, self._meta_path)
        for path in [*self.folder.glob("codec-*.npz"), *self.folder.glob("codes-*.u8")]:
            if meta["tag"] not in path.name:
                path.unlink(missing_ok=True)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in [*self.folder.glob("codec-*.npz"), *self.folder.glob("codes-*.u8")])


def _read_records(f, first_slot: int, into: np.ndarray) -> np.ndarray:
    """Fill ``into`` (n, CODE_BYTES) with the records of slots first_slot.. of the open codes file ``f``."""
    f.seek(first_slot * CODE_BYTES)
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
    if meta is None or len(live_slots) >= RETRAIN_GROWTH * meta["trained_on"]:
        meta = files.start(train_codec(store, live_slots), trained_on=len(live_slots))
        trained = True
    codec = files.codec(meta)
    start = files.rows(meta)
    for first in range(start, slot_count, CODE_BATCH):
        slots = np.arange(first, min(first + CODE_BATCH, slot_count), dtype=np.int64)
        files.append(meta, first, codec.encode(store.read_maps(slots)))
    if trained:
        files.publish(meta)
    return {"trained": trained, "coded": max(0, slot_count - start)}
