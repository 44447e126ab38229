"""Thumbnails and display copies of indexed images, made on first request and cached on disk.

Both are decoded as the model saw the image (``encoders.load_image``: EXIF orientation applied), so
a heatmap's ``heatmap_box`` (source-image pixels) lands on the display copy exactly. Files live in
the collection's folder, ``thumbnails/<content hash>-<size>.jpg``: a re-indexed file with new
content gets new ones, and the grid never ships a full-size image.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from PIL import Image

from encoders import ImageDecodeError, load_image
from indexer import ImageRecord
from search.errors import ImageNotFound

log = logging.getLogger("matchmap.http")

THUMBNAIL_SIZE = 256  # longest side, pixels: 2x the page's grid cells, sharp on high-density screens
THUMBNAIL_QUALITY = 82
DISPLAY_QUALITY = 90


def cached_jpeg(folder: Path, collection: str, record: ImageRecord, size: int | None) -> bytes:
    """The JPEG of ``record`` with its longest side at most ``size`` pixels (None = full size), from
    the cache in ``folder`` or made now. ImageNotFound (naming the id, never the path) when the
    indexed file can no longer be read."""
    path = folder / "thumbnails" / f"{record.content_hash[:40]}-{size or 'full'}.jpg"
    try:
        return path.read_bytes()
    except OSError:
        pass
    try:
        image = load_image(record.uri)
    except (ImageDecodeError, OSError) as error:
        log.warning("image %s of collection %r cannot be read: %s", record.id, collection, error)
        raise ImageNotFound(
            f"image {record.id} of collection {collection!r} can no longer be read on the server "
            "(moved, deleted or changed since it was indexed)"
        ) from None
    if size is not None:
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMBNAIL_QUALITY if size else DISPLAY_QUALITY, optimize=True)
    data = out.getvalue()
    try:  # atomic: concurrent requests for one image each write their own temp file
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError as error:  # a read-only library still serves, uncached
        log.warning("cannot cache a thumbnail of image %s: %s", record.id, error)
    return data
