"""Ingestion: read, hash, decode and embed image files in batches, off the main thread where it pays.

A background thread reads and hashes files, asks the catalog which hashes it already holds, and
decodes only the new ones (worker threads; Pillow releases the GIL while decoding), so the main thread
spends its time in the network. Every file ends up in exactly one of three piles per
:class:`PreparedBatch`: new images ready to embed, failures (path, reason), or skipped duplicates.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from encoders import load_image

T = TypeVar("T")

# A batch is emitted at the latest after this many files, new or not, so that duplicates and
# failures are committed (and their IN-lists stay short) even when nothing is new.
FILES_PER_BATCH_FACTOR = 4


@dataclass
class PreparedImage:
    """A decoded new image: its identity in the catalog and the network input (3, S, S)."""

    uri: str
    content_hash: str
    width: int
    height: int
    pixels: torch.Tensor


@dataclass
class FailedImage:
    """A file that could not be read or decoded; ``content_hash`` is None when it could not be read."""

    uri: str
    content_hash: str | None
    reason: str


@dataclass
class PreparedBatch:
    """The outcome of a run of consecutive files: new images, failures, and how many were duplicates."""

    images: list[PreparedImage] = field(default_factory=list)
    failed: list[FailedImage] = field(default_factory=list)
    # (uri, uri of the image with the same content: indexed before, or earlier in this run)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> int:
        """Files this batch accounts for."""
        return len(self.images) + len(self.failed) + len(self.skipped)

    @property
    def uris(self) -> list[str]:
        """Every file's uri, whatever its outcome."""
        return [i.uri for i in self.images] + [f.uri for f in self.failed] + [uri for uri, _ in self.skipped]


@dataclass
class _ReadFile:
    uri: str
    data: bytes | None
    content_hash: str | None
    error: str | None


def _read_file(path: Path) -> _ReadFile:
    uri = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _ReadFile(uri, None, None, f"cannot read the file: {exc.strerror or exc}")
    return _ReadFile(uri, data, hashlib.sha256(data).hexdigest(), None)


def decode_read(decode: Callable[[bytes, str], tuple[torch.Tensor, int, int]], read: _ReadFile
                ) -> PreparedImage | FailedImage:
    """Decode a file that was read and hashed: the image ready to embed, or the failure and its reason."""
    assert read.data is not None and read.content_hash is not None
    try:
        pixels, width, height = decode(read.data, read.uri)
    except Exception as exc:  # any per-file failure is reported and recorded; the run goes on
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return FailedImage(read.uri, read.content_hash, reason)
    return PreparedImage(read.uri, read.content_hash, width, height, pixels)


def prepare_batches(
    files: Sequence[Path],
    decode: Callable[[bytes, str], tuple[torch.Tensor, int, int]],
    known_hashes: Callable[[list[str]], dict[str, str]],
    batch_size: int,
    workers: int = 2,
) -> Iterator[PreparedBatch]:
    """Yield batches of at most ``batch_size`` new images covering ``files`` in order.

    ``decode(data, uri) -> (pixels (3, S, S), width, height)`` raises on bad input (its message becomes
    the failure reason); ``known_hashes(hashes) -> {hash: uri}`` for those already indexed. A file
    whose hash is known, or was seen earlier in the same run, is skipped with the uri that holds it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seen: dict[str, str] = {}  # hash -> uri of its first file in this run
    pending = PreparedBatch()
    decode_one = functools.partial(decode_read, decode)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="matchmap-decode") as pool:
        for start in range(0, len(files), batch_size):
            reads = list(pool.map(_read_file, files[start : start + batch_size]))
            hashes = [r.content_hash for r in reads if r.content_hash is not None]
            known = known_hashes(hashes) if hashes else {}
            to_decode = []
            for read in reads:
                if read.content_hash is None:
                    pending.failed.append(FailedImage(read.uri, None, read.error or "unreadable"))
                elif read.content_hash in known or read.content_hash in seen:
                    original = known.get(read.content_hash) or seen[read.content_hash]
                    pending.skipped.append((read.uri, original))
                else:
                    seen[read.content_hash] = read.uri
                    to_decode.append(read)
            for outcome in pool.map(decode_one, to_decode):
                if isinstance(outcome, PreparedImage):
                    pending.images.append(outcome)
                else:
                    pending.failed.append(outcome)
                if len(pending.images) == batch_size:
                    yield pending
                    pending = PreparedBatch()
            if pending.files >= FILES_PER_BATCH_FACTOR * batch_size:
                yield pending
                pending = PreparedBatch()
    if pending.files:
        yield pending


def in_background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a daemon thread, ``depth`` ahead of the consumer; its errors re-raise here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("done", done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(("error", exc))

    thread = threading.Thread(target=produce, name="matchmap-prepare", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def image_decoder(model) -> Callable[[bytes, str], tuple[torch.Tensor, int, int]]:
    """decode(file bytes, uri) -> (pixels (3, S, S) for ``model``, width, height) of the image as stored."""

    def decode(data: bytes, uri: str) -> tuple[torch.Tensor, int, int]:
        image = load_image(data, name=uri)  # ImageDecodeError names the file and the problem
        return model.image_frontend(image), image.width, image.height

    return decode


def embed_images(model, pixels: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Embed a batch: pixels B x (3, S, S) -> (maps (B, R, D) float16, pooled (B, D) float32); B may be 0.

    The pooled vectors are the model's stage-1 vectors (``MatchmapModel.stage1_image_vectors``) of the
    *float16* maps as stored: without learned heads their masked mean, so that stage-1 inner products
    equal SISA of exactly what stage 2 reads back.
    """
    rows, cols = model.image_grid
    if not pixels:
        dim = model.config.embed_dim
        return np.zeros((0, rows * cols, dim), np.float16), np.zeros((0, dim), np.float32)
    device = next(model.parameters()).device
    with torch.inference_mode():
        grids = model.encode_images(torch.stack(list(pixels)).to(device))  # (B, H, W, D)
    expected = (len(pixels), rows, cols, model.config.embed_dim)
    if tuple(grids.shape) != expected:
        raise RuntimeError(
            f"model {model.config.name} returned image maps {tuple(grids.shape)}, expected {expected}"
        )
    maps = grids.reshape(len(pixels), rows * cols, -1).to(torch.float16)
    with torch.inference_mode():
        pooled = model.stage1_image_vectors(maps)
    return maps.cpu().numpy(), pooled.cpu().numpy().astype(np.float32, copy=False)


def encode_locally(
    model, files: Sequence[Path], known_hashes: Callable[[list[str]], dict[str, str]], batch_size: int
) -> Iterator[tuple[PreparedBatch, np.ndarray, np.ndarray]]:
    """(batch, maps, pooled) for ``files`` in order, embedded in this process by ``model``.

    A background thread reads, hashes and decodes (:func:`prepare_batches`) while this one embeds.
    """
    batches = prepare_batches(files, image_decoder(model), known_hashes, batch_size)
    for batch in in_background(batches):
        yield (batch, *embed_images(model, [image.pixels for image in batch.images]))
