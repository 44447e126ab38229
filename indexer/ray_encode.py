"""``matchmap index --ray``: images read, hashed, decoded and encoded by a Ray Data pipeline.

The driver (the ``matchmap index`` process) keeps everything that must happen once and in order:
finding the files, asking the catalog which contents it already holds, and writing each encoded batch
(feature store first, then the catalog rows, as a local run does). The cluster does the work that
scales with the images: every worker is an actor that loads the model once and turns batches of file
paths into feature maps and stage-1 vectors (``map_batches`` over an actor pool, one GPU per actor
when the cluster has GPUs). Files are read by the workers, so on a real cluster they must sit on
storage every node sees at the same path, as must a ``--checkpoint`` (docs/scale-out.md).

Crash safety is the local run's: a batch is durable once written, and a rerun skips every content
the collection holds. Ray restarts a worker that dies and retries its batch; if the driver dies the
job ends, and the rerun encodes only what was not yet written.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.ingest import FailedImage, PreparedBatch, PreparedImage

# An address Ray understands: "local" (start a Ray on this machine, or join the one running here),
# "auto" (the cluster `ray start` made, or $RAY_ADDRESS), host:port, or ray://host:port (Ray Client).
_ADDRESS = re.compile(r"^(local|auto|ray://[\w.\-]+:\d+|[\w.\-]+:\d+)$")
STATUS_NEW, STATUS_KNOWN, STATUS_FAILED = "new", "known", "failed"


class RayAddressError(ValueError):
    """--ray was given something that is not a cluster address (often a PATH that followed it)."""


def check_address(address: str) -> str:
    """The address as Ray takes it; a clear error for anything else (``--ray photos/`` included)."""
    if not _ADDRESS.match(address):
        raise RayAddressError(
            f"--ray {address!r} is not a Ray cluster address (local, auto, HOST:PORT or ray://HOST:PORT); "
            "if it was meant as a PATH, write `--ray local` or put --ray after the PATHs"
        )
    return address


@dataclass
class RayRun:
    """What the cluster did in one run: images encoded per node, and the workers used."""

    nodes: Counter = field(default_factory=Counter)
    workers: int = 0
    cluster_cpus: float = 0.0
    cluster_gpus: float = 0.0
    connect_seconds: float = 0.0  # joining (or starting) the cluster
    first_batch_seconds: float = 0.0  # from joining to the first encoded batch: workers starting, models loading


class ImageEncoderWorker:
    """A Ray Data actor: the model loaded once; batches of paths in, maps and pooled vectors out."""

    def __init__(self, checkpoint: str | None, device: str, known_hashes: frozenset[str], threads: int):
        import torch

        from encoders import create_model
        from indexer import ingest

        torch.set_num_threads(threads)
        self.model = create_model(checkpoint, device=device).eval()
        self.decode = ingest.image_decoder(self.model)
        self.known = known_hashes
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from indexer import ingest

        uris = [str(u) for u in batch["uri"]]
        n = len(uris)
        status, hashes, reasons = [STATUS_FAILED] * n, [""] * n, [""] * n
        sizes = np.zeros((n, 2), np.int64)
        new_rows, pixels = [], []
        for row, uri in enumerate(uris):
            read = ingest._read_file(Path(uri))
            if read.content_hash is None:
                reasons[row] = read.error or "unreadable"
                continue
            hashes[row] = read.content_hash
            if read.content_hash in self.known:
                status[row] = STATUS_KNOWN
                continue
            outcome = ingest.decode_read(self.decode, read)  # failures reported per file, as a local run does
            if isinstance(outcome, FailedImage):
                reasons[row] = outcome.reason
                continue
            status[row] = STATUS_NEW
            sizes[row] = (outcome.width, outcome.height)
            new_rows.append(row)
            pixels.append(outcome.pixels)
        maps, pooled = ingest.embed_images(self.model, pixels)
        all_maps = np.zeros((n, *maps.shape[1:]), np.float16)
        all_pooled = np.zeros((n, pooled.shape[1]), np.float32)
        all_maps[new_rows], all_pooled[new_rows] = maps, pooled
        return {
            "uri": np.array(uris, dtype=object),
            "status": np.array(status, dtype=object),
            "content_hash": np.array(hashes, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "size": sizes,
            "maps": all_maps,
            "pooled": all_pooled,
            "node": np.array([self.node] * n, dtype=object),
        }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def connect(address: str) -> None:
    """Join (or, for "local", start) the Ray cluster at ``address``; quiet, no dashboard."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=None if address == "local" else address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        configure_logging=True,
    )


class RayEncoder:
    """The encoder ``Library.index(encoder=...)`` takes to embed on a Ray cluster instead of in process."""

    def __init__(self, address: str, checkpoint: Path | None, *, device: str = "auto", workers: int | None = None,
                 threads_per_worker: int = 1):
        self.address = check_address(address)
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.device = device
        self.workers = workers
        self.threads = threads_per_worker
        self.run = RayRun()

    def __call__(
        self,
        files: Sequence[Path],
        known_hashes: Callable[[], set[str]],
        lookup: Callable[[list[str]], dict[str, str]],
        batch_size: int,
    ) -> Iterator[tuple[PreparedBatch, np.ndarray, np.ndarray]]:
        """Yield (batch, maps, pooled) for ``files``, in file order, as the cluster finishes them.

        ``known_hashes()``: every content the collection holds (workers hash a file and go no further for those);
        ``lookup(hashes)``: {hash: indexed uri}, to name the image a skipped copy duplicates.
        """
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        started = time.perf_counter()
        connect(self.address)
        self.run.connect_seconds = time.perf_counter() - started
        resources = ray.cluster_resources()
        self.run.cluster_cpus = float(resources.get("CPU", 0))
        self.run.cluster_gpus = float(resources.get("GPU", 0))
        use_gpus = self.device != "cpu" and self.run.cluster_gpus >= 1
        if self.workers is not None:
            workers = self.workers
        elif use_gpus:
            workers = int(self.run.cluster_gpus)
        else:
            workers = max(1, int(self.run.cluster_cpus // self.threads))
        self.run.workers = workers
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        # Batches come back in file order, so that of two files with the same content the first in order
        # is the one indexed and the other its copy, as in a local run.
        context.execution_options.preserve_order = True
        known = frozenset(known_hashes())
        dataset = ray.data.from_items([{"uri": str(f)} for f in files], override_num_blocks=max(1, len(files) // batch_size))
        dataset = dataset.map_batches(
            ImageEncoderWorker,
            fn_constructor_kwargs={
                "checkpoint": self.checkpoint,
                "device": "cuda" if use_gpus else "cpu",
                "known_hashes": known,
                "threads": self.threads,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=0 if use_gpus else self.threads,
            num_gpus=1 if use_gpus else 0,
        )
        seen: dict[str, str] = {}  # hash -> uri of the first file holding it in this run
        joined = time.perf_counter()
        for columns in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if not self.run.first_batch_seconds:
                self.run.first_batch_seconds = time.perf_counter() - joined
            yield self._prepared(columns, seen, lookup)

    def _prepared(
        self, columns: dict[str, np.ndarray], seen: dict[str, str], lookup: Callable[[list[str]], dict[str, str]]
    ) -> tuple[PreparedBatch, np.ndarray, np.ndarray]:
        status, hashes = columns["status"], columns["content_hash"]
        originals = lookup([str(h) for h, s in zip(hashes, status, strict=True) if s == STATUS_KNOWN])
        batch, keep = PreparedBatch(), []
        for row, uri in enumerate(columns["uri"]):
            uri, content_hash = str(uri), str(hashes[row])
            if status[row] == STATUS_FAILED:
                batch.failed.append(FailedImage(uri, content_hash or None, str(columns["reason"][row])))
            elif status[row] == STATUS_KNOWN and content_hash in originals:
                batch.skipped.append((uri, originals[content_hash]))
            elif status[row] == STATUS_KNOWN:
                # Known when the run began, its image removed since: the worker made no maps for it, so
                # it is named failed rather than stored as zeros.
                batch.failed.append(FailedImage(uri, content_hash, "removed while indexing; run again"))
            elif content_hash in seen:  # a copy of a file encoded earlier in this run
                batch.skipped.append((uri, seen[content_hash]))
            else:
                seen[content_hash] = uri
                width, height = (int(v) for v in columns["size"][row])
                batch.images.append(PreparedImage(uri, content_hash, width, height, pixels=None))
                keep.append(row)
                self.run.nodes[str(columns["node"][row])] += 1
        maps = np.ascontiguousarray(columns["maps"][keep], dtype=np.float16)
        pooled = np.ascontiguousarray(columns["pooled"][keep], dtype=np.float32)
        return batch, maps, pooled


def shutdown() -> None:
    """Leave the cluster (a local one started by this process stops)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

