"""What opening a collection costs at N images: the catalog's (id, slot) rows and the stage-1 file.

Builds a catalog of N indexed image rows (bulk-inserted; no feature maps written: opening reads none)
and a flat stage-1 file of N vectors for its generation, then times ``Library.collection`` (what the
server does at start-up and on a full reopen; resident maps come on top: N x 32 KB read for ``tiny``)
with and without migration 0002's covering index, side by side (median of 5 opens each), plus its
parts: the rows query and the FAISS read, and the rows read as before (numpy over Row objects).

Then the region codes a server holds for such a collection (``indexer.code_store``: N x 2 KB written
beside the store; random bytes here, a codec trained on random maps): ``Collection.region_codes``
as it reads them now (sequential windows) against a record-by-record gather through a memory map (as
before), each from the page cache (warm) and with the file's pages dropped first (cold,
``posix_fadvise(DONTNEED)``), side by side. A server listens after the open; with ``serve
--hold-first`` (or before background holding) it listened after the open and the codes.

``--serve`` then starts real ``matchmap serve --json`` processes on that library (the collection is
recorded as built by the shipped model; its store holds no maps, so it is for start-up only, not
queries), by default and with ``--hold-first``, side by side, and reports the seconds from the
process's start to its "ready" line (listening) and to its "held" line (codes in memory), and the
server's own memory (RssAnon) once held.

    .venv/bin/python bench/bench_open.py [--images 100000] [--work-dir bench-open] [--serve]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select, text

from indexer import Library, code_store, stage1_index
from indexer.catalog import STATUS_INDEXED, CollectionRow, ImageRow, utcnow
from indexer.feature_store import StoreLayout
from indexer.region_codec import RegionCodec


def shipped_version() -> str:
    """The version of encoders/default_model/tiny.pt: a server opens the collection only if it matches."""
    from encoders import create_model

    return create_model().version


def build(work: Path, n: int, dim: int = 256) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with Library.open(work, create=True) as library:
        key = uuid.uuid4().hex
        with library._sessions.begin() as session:
            row = CollectionRow(name="big", storage_key=key, model_name="tiny", model_version=shipped_version(), embed_dim=dim,
                                grid_rows=8, grid_cols=8, index_policy="flat", flat_threshold=10**9, index_type="flat",
                                index_params={}, store_layout=StoreLayout(regions=64, dim=dim).to_dict(), next_slot=n,
                                images_indexed=n, images_failed=0, generation=1)
            session.add(row)
            session.flush()
            now = utcnow()
            for start in range(0, n, 20_000):
                session.execute(insert(ImageRow), [
                    {"collection_id": row.id, "uri": f"/photos/{i:08d}.jpg", "content_hash": f"{i:064x}",
                     "width": 256, "height": 256, "status": STATUS_INDEXED, "store_slot": i, "created_at": now}
                    for i in range(start, min(n, start + 20_000))])
        ids = np.arange(1, n + 1, dtype=np.int64)
        vectors = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
        index, _ = stage1_index.build_index(vectors, ids, "flat")
        library.collection_folder(key).mkdir(parents=True)
        stage1_index.save_index(index, library.collection_folder(key), 1)


def write_codes(work: Path, n: int) -> None:
    """Codes for every slot of the collection "big", as the indexer leaves them (random bytes)."""
    with Library.open(work) as library:
        coll = library.collection("big")
        folder, (regions, dim) = coll.store.folder, (coll.grid[0] * coll.grid[1], coll.embed_dim)
    folder.mkdir(parents=True, exist_ok=True)
    files = code_store.CodeFile(folder)
    rng = np.random.default_rng(1)
    meta = files.start(RegionCodec.train(rng.standard_normal((256, regions, dim), dtype=np.float32),
                                         code_store.CODE_BYTES), trained_on=n)
    for first in range(0, n, 65536):
        files.append(meta, first, rng.integers(0, 256, (min(n, first + 65536) - first, code_store.CODE_BYTES),
                                               dtype=np.uint8))
    files.publish(meta)


def gathered_as_before(coll) -> np.ndarray:
    """The codes read as before: one fancy index through a memory map, a record at a time."""
    files = code_store.CodeFile(coll.store.folder)
    meta = files.meta()
    _, slots = coll._table.arrays()
    path = files.folder / f"codes-{meta['tag']}.u8"
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(files.rows(meta), code_store.CODE_BYTES))
    return np.asarray(mapped[slots])


def drop_pages(folder: Path) -> None:
    for path in folder.rglob("codes-*.u8"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_codes(work: Path, repeats: int = 3) -> dict:
    times: dict[str, list[float]] = {}
    with Library.open(work) as library:
        coll = library.collection("big")
        reference = coll.region_codes()[1]
        for _ in range(repeats):
            for way, read in (("now", lambda: coll.region_codes()[1]), ("before", lambda: gathered_as_before(coll))):
                for cache in ("cold", "warm"):
                    if cache == "cold":
                        drop_pages(coll.store.folder)
                    started = time.perf_counter()
                    codes = read()
                    times.setdefault(f"{way} {cache}", []).append(time.perf_counter() - started)
                    assert codes.shape == reference.shape and np.array_equal(codes[::997], reference[::997])
                    del codes
    return {key: statistics.median(values) for key, values in times.items()}


def serve_start(work: Path, *extra: str, tree: Path | None = None) -> dict:
    """Seconds from starting `matchmap serve --json` on ``work`` to its ready and held lines; own memory.
    ``tree``: serve with that checkout's code (an older one, which held before listening and printed no
    held line: held = ready)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(work), "--port", str(port), "--host",
         "127.0.0.1", "--http", "0", "--device", "cpu", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tree,
        env=dict(os.environ, MATCHMAP_TOKEN="", **({"PYTHONPATH": str(tree)} if tree else {})))
    seconds = {}
    try:
        while len(seconds) < (1 if tree else 2):
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"matchmap serve exited ({process.wait()}) before it was ready and held")
            event = json.loads(line)
            seconds[event["event"]] = time.perf_counter() - started
            if event["event"] == "ready" and event["collections"] != ["big"]:
                raise RuntimeError(f"the server opened {event['collections']}, not the collection 'big'")
        status = Path(f"/proc/{process.pid}/status").read_text()
        anon_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon")))
    finally:
        process.terminate()
        process.wait(60)
    return {"ready_s": seconds["ready"], "held_s": seconds.get("held", seconds["ready"]), "anon_mb": anon_kb / 1024}


def time_open(work: Path, repeats: int = 5) -> dict:
    opens, rows, faiss_reads, rows_before = [], [], [], []
    with Library.open(work) as library:
        for _ in range(repeats):
            started = time.perf_counter()
            coll = library.collection("big")
            opens.append(time.perf_counter() - started)
            started = time.perf_counter()
            with library._sessions() as session:
                library._live_slots(session, coll._row.id)
            rows.append(time.perf_counter() - started)
            started = time.perf_counter()
            stage1_index.load_index(coll.folder, coll.generation)
            faiss_reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            with library._sessions() as session:  # how _live_slots read them before
                np.array(session.execute(select(ImageRow.id, ImageRow.store_slot).where(
                    ImageRow.collection_id == coll._row.id, ImageRow.status == STATUS_INDEXED
                ).order_by(ImageRow.id)).all(), dtype=np.int64)
            rows_before.append(time.perf_counter() - started)
    return {"open_s": statistics.median(opens), "rows_s": statistics.median(rows),
            "faiss_s": statistics.median(faiss_reads), "rows_before_s": statistics.median(rows_before),
            "size": coll.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work-dir", default="bench-open")
    parser.add_argument("--serve", action="store_true", help="also time real `matchmap serve` start-ups")
    parser.add_argument("--previous-tree", type=Path, default=None,
                        help="with --serve: also start the server of this checkout (an earlier version), side by side")
    parser.add_argument("--serve-only", action="store_true",
                        help="only the serve start-ups, on the library an earlier run left in --work-dir")
    args = parser.parse_args()
    work = Path(args.work_dir)
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# command: {sys.executable} {' '.join(sys.argv)}")
    if not args.serve_only:
        measure_open_and_codes(work, args.images)
    if args.serve or args.serve_only:
        Library.open(work).close()  # the catalog upgraded again (the "before" timing took 0002's index away)
        print("matchmap serve, codes dropped from the page cache first (median of 3), seconds from process start:")
        budget = ("--resident-maps-mb", f"{1.5 * args.images * code_store.CODE_BYTES / 2**20:.0f}")  # codes, not maps
        servers = [("--hold-first", ("--hold-first", *budget), None), ("default (background)", budget, None)]
        if args.previous_tree is not None:
            servers.insert(0, (f"previous: {args.previous_tree.name}", budget, args.previous_tree.resolve()))
        for name, extra, tree in servers:
            runs = []
            for _ in range(3):
                drop_pages(Path(work).resolve() / "collections")
                runs.append(serve_start(work.resolve(), *extra, tree=tree))
            r = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"  {name:>26}: listening {r['ready_s']:.1f}, codes held {r['held_s']:.1f}; "
                  f"own memory {r['anon_mb']:.0f} MB")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


def measure_open_and_codes(work: Path, images: int) -> None:
    build(work, images)
    after = time_open(work)
    with Library.open(work) as library, library._engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_images_live_slots"))  # as before migration 0002
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))
        before = time_open(work)
    print(f"{'':>22} {'open s':>8} {'rows s':>8} {'faiss s':>8} {'rows as before s':>16}")
    for name, r in (("no 0002 index", before), ("with 0002 index", after)):
        print(f"{name:>22} {r['open_s']:>8.3f} {r['rows_s']:>8.3f} {r['faiss_s']:>8.3f} "
              f"{r['rows_before_s']:>16.3f}   ({r['size']} images)")
    print(f"rows now / as before, with the index: {after['rows_s'] / after['rows_before_s']:.2f}")
    write_codes(work, images)
    codes = time_codes(work)
    print(f"region codes ({images * code_store.CODE_BYTES / 2**30:.2f} GiB), median of 3, seconds:")
    for cache in ("cold", "warm"):
        now, before = codes[f"now {cache}"], codes[f"before {cache}"]
        print(f"  {cache:>4}: now {now:.2f}, before {before:.2f} ({before / now:.1f}x)")
    print(f"listening after the open: {after['open_s']:.2f} s; with the codes held first: "
          f"{after['open_s'] + codes['now cold']:.2f} s cold (before this change {after['open_s'] + codes['before cold']:.2f} s)")


if __name__ == "__main__":
    main()
