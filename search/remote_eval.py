"""Recall@k of a live search service on a Places-format manifest (``matchmap eval --server`` uses it).

Every caption's audio is sent as a query; a caption scores a hit at k when its own image is among
the top k hits. The image is recognised by its uri: the path the manifest resolves to, or any uri
ending in the manifest's relative image path (so a server that indexed the same corpus under another
root still matches). With ``candidates`` >= the collection size, stage 2 re-ranks the whole
collection and the figures equal offline MISA recall over the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from search.client import SearchClient, SearchServiceError, ServerUnreachable


def _is_image(uri: str, local_path: Path, relative: str) -> bool:
    return uri == str(local_path) or uri.replace("\\", "/").endswith("/" + relative.lstrip("/"))


def remote_recall(
    target: str,
    manifest_path: str | Path,
    collection: str,
    ks: Sequence[int] = (1, 5, 10),
    token: str | None = None,
    index_first: bool = False,
    data_dir: str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    db_url: str | None = None,
    candidates: int = 0,
    tls_ca: str | Path | None = None,
    concurrency: int = 4,
) -> dict:
    """Speech-to-image recall@k through the service at ``target`` for every caption of the manifest.

    index_first: first index the manifest's images into ``collection`` in the library at
    ``data_dir`` / ``db_url`` (the one the server reads) with ``checkpoint`` (None = the shipped
    model; it must be the server's). candidates: stage-1 candidates per query (0 = server default).
    concurrency: queries in flight at once (the server batches them).

    Returns {"MISA": {"speech_to_image": {"R@1": x, ...}}, "pairs": N, "errors": n, "candidates": K,
    "collection": name, "server": target}; recall as fractions 0..1, a failed query counts as a miss.
    Raises ServerUnreachable when no server answers.
    """
    # Manifests are the training package's format; read through its reader, imported only here.
    from training.manifest import load_manifest

    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {tuple(ks)}")
    manifest = load_manifest(Path(manifest_path))
    entries = manifest.entries
    if not entries:
        raise ValueError(f"manifest {manifest_path} lists no captions")
    if index_first:
        images = dict.fromkeys(str(manifest.image_path(e)) for e in entries)  # each once, in order
        _index_images(list(images), collection, data_dir, db_url, checkpoint)

    top_k = max(ks)
    with SearchClient(target, token=token, tls_ca=tls_ca) as client:

        def rank_of_image(entry) -> tuple[int | None, int, str | None]:
            """(1-based rank of the caption's image within top_k or None, candidates, error)."""
            try:
                hits = client.search(manifest.audio_path(entry), collection, top_k=top_k, candidates=candidates)
            except ServerUnreachable:
                raise
            except SearchServiceError as error:
                return None, 0, f"{entry.uttid}: {error}"
            image = manifest.image_path(entry).resolve()
            rank = next((h.rank for h in hits if _is_image(h.uri, image, entry.image)), None)
            return rank, hits.candidates, None

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            answers = list(pool.map(rank_of_image, entries))

    ranks = [rank for rank, _, _ in answers]
    errors = [error for _, _, error in answers if error is not None]
    recall = {f"R@{k}": sum(1 for r in ranks if r is not None and r <= k) / len(entries) for k in ks}
    return {
        "MISA": {"speech_to_image": recall},
        "pairs": len(entries),
        "errors": len(errors),
        "error_examples": errors[:5],
        "candidates": max((c for _, c, _ in answers), default=0),
        "collection": collection,
        "server": target,
    }


def _index_images(
    images: list[str],
    collection: str,
    data_dir: str | Path | None,
    db_url: str | None,
    checkpoint: str | Path | None,
) -> None:
    from encoders import create_model
    from indexer import Library

    model = create_model(str(checkpoint) if checkpoint is not None else None)
    with Library.open(data_dir, db_url, create=True) as library:
        library.index(collection, images, model, progress=False)
