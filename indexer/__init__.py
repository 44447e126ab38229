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

Names are imported from their submodules on first use (encoders/_lazy.py), so ``import indexer``
(and ``matchmap index --help``) loads neither faiss nor SQLAlchemy.
"""

from encoders._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "indexer.discover": ("IMAGE_EXTENSIONS", "PathsError"),
        "indexer.library": (
            "Collection", "CollectionBusyError", "CollectionInfo", "CollectionNotFound", "DataDirNotFound", "ImageRecord",
            "IndexReport", "Library", "ModelMismatchError", "Shard", "default_data_dir",
        ),
    },
)
