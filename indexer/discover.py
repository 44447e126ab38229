"""Turn the PATH arguments of ``matchmap index`` into the list of image files to ingest.

A PATH is a folder (searched recursively for image extensions), a glob (``photos/**/*.jpg``; matches
filtered by image extension), a Places-format manifest (``.json``: its images), or a single file
(always attempted, whatever its extension: the user named it, so a non-image is reported as failed).
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GLOB_CHARACTERS = set("*?[")


class PathsError(ValueError):
    """A PATH argument that names nothing usable (missing, empty glob, unreadable manifest)."""


def is_image_name(path: Path) -> bool:
    """Whether ``path`` has one of the image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def discover_images(paths: Sequence[str | Path]) -> list[Path]:
    """Resolve PATH arguments to absolute image file paths, deduplicated, in a stable order.

    Folders are walked in sorted order; the files of one argument keep their order (a manifest's
    order) and arguments are taken in the order given. Raises PathsError naming the argument when
    one matches nothing.
    """
    if not paths:
        raise PathsError("no PATH given: name image folders, files, globs or a manifest .json")
    found: dict[Path, None] = {}
    for argument in paths:
        for path in _expand(str(argument)):
            found.setdefault(path.resolve(), None)
    return list(found)


def _expand(argument: str) -> Iterable[Path]:
    if _GLOB_CHARACTERS & set(argument) and not Path(argument).exists():
        matches = [Path(m) for m in sorted(glob.glob(argument, recursive=True))]
        images = [m for m in matches if m.is_file() and is_image_name(m)]
        if not images:
            raise PathsError(f"{argument}: the pattern matches no image files")
        return images
    path = Path(argument)
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
        if not images:
            raise PathsError(
                f"{argument}: the folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return images
    if path.is_file():
        return _manifest_images(path) if path.suffix.lower() == ".json" else [path]
    raise PathsError(f"{argument}: no such file or folder")


def _manifest_images(path: Path) -> list[Path]:
    # The Places-format reader belongs to training; imported only when a manifest is given. Files are
    # not checked here: a missing or broken image is reported and recorded per file, like any other.
    from training.manifest import load_manifest

    try:
        manifest = load_manifest(path, check_files=False)
    except ValueError as exc:
        raise PathsError(f"{path}: not a usable Places-format manifest: {exc}") from exc
    if not manifest.entries:
        raise PathsError(f"{path}: the manifest lists no images")
    return [manifest.image_path(entry) for entry in manifest.entries]
