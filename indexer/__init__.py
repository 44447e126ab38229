"""indexer: collection ingestion, the FAISS stage-1 index, the feature-map store and the catalog.

The public API (what ``search`` and users' scripts use; nothing else touches the files or tables)::

    from indexer import Library
    with Library.open(data_dir, db_url=None) as library:
        report = library.index("photos", ["~/Pictures"], model)   # incremental, idempotent
        collection = library.collection("photos")
        collection.check_model(model)                             # ModelMismatchError
        scores, ids = collection.search_stage1(pooled_audio, k)   # (B, D) -> (B, k), (B, k)
        maps = collection.feature_maps(ids[0][ids[0] >= 0])       # (K, R, D) float16
        records = collection.images(ids[0][ids[0] >= 0])          # catalog rows
"""

from indexer.discover import IMAGE_EXTENSIONS, PathsError
from indexer.library import (
    Collection,
    CollectionBusyError,
    CollectionInfo,
    CollectionNotFound,
    ImageRecord,
    IndexReport,
    Library,
    ModelMismatchError,
    default_data_dir,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "Collection",
    "CollectionBusyError",
    "CollectionInfo",
    "CollectionNotFound",
    "ImageRecord",
    "IndexReport",
    "Library",
    "ModelMismatchError",
    "PathsError",
    "default_data_dir",
]
