"""``matchmap index``, ``matchmap collections`` and ``matchmap remove``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn

import click

from matchmap.options import checkpoint_option, device_option, quiet_option

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL = 0, 1, 2

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the catalog, stage-1 indexes and feature stores; only `index` creates it when missing "
    "[default: $MATCHMAP_DATA_DIR, else ~/.local/share/matchmap].",
)
db_option = click.option(
    "--db",
    "db_url",
    envvar="MATCHMAP_DB_URL",
    default=None,
    help="SQLAlchemy URL of the catalog, e.g. postgresql+psycopg2://user:pass@host/db "
    "[default: $MATCHMAP_DB_URL, else the SQLite file catalog.sqlite in the data dir].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def _fatal(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FATAL)


def _exits_2_on_error(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report errors as one line and exit 2, so that exit 1 keeps meaning "some files failed"."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from indexer import (
            CollectionBusyError,
            CollectionNotFound,
            DataDirNotFound,
            ModelMismatchError,
            PathsError,
        )

        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors keep click's own message and exit code 2
        except (PathsError, CollectionNotFound, DataDirNotFound, ModelMismatchError, CollectionBusyError) as exc:
            _fatal(str(exc))
        except (RuntimeError, OSError, ValueError) as exc:
            _fatal(f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug: show it, but keep exit code 1 for "some files failed"
            traceback.print_exc()
            _fatal("internal error (traceback above)")

    return run


def _open_library(data_dir: Path | None, db_url: str | None, *, create: bool = False):
    """Only `index` creates a missing data dir; reading commands refuse one that was named but is absent."""
    from indexer import Library

    return Library.open(data_dir, db_url, create=create)


INDEX_EPILOG = """\b
Exit codes:
  0  all files were indexed (or skipped as already indexed)
  1  some files failed to read or decode: each is reported on stderr (and under
     "failed" with --json) and recorded as failed in the catalog; the rest were indexed
  2  usage or fatal error (a PATH that names nothing, unknown model checkpoint, the
     collection was built with another model, catalog unreachable, collection busy)

\b
Running the same command again is safe and cheap: content already in the collection
is skipped (by SHA-256), and a run killed midway resumes where its last committed
batch ended. A collection holds each picture once: a byte-identical copy at another
path is skipped and named on stderr ("copy: PATH has the same content as INDEXED").
"""


@click.command(epilog=INDEX_EPILOG)
@data_dir_option
@db_option
@checkpoint_option("Model checkpoint to embed with [default: the shipped default model].")
@click.option("--collection", "collection_name", required=True, help="Collection to create or add to.")
@click.option(
    "--index-type",
    type=click.Choice(["auto", "flat", "ivf", "hnsw"]),
    default=None,
    help="Stage-1 index: auto = exact flat below --flat-threshold vectors, IVF above; or pin one. "
    "[default: the collection's current rule; auto for a new collection]",
)
@click.option(
    "--flat-threshold",
    type=click.IntRange(min=1),
    default=None,
    help="With --index-type auto: collections of fewer vectors get an exact flat index [default: 50000].",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Encode on a Ray cluster (pip install '.[ray]'): local (a Ray on this machine, the value when "
    "none is given), auto ($RAY_ADDRESS or the cluster `ray start` made), HOST:PORT or ray://HOST:PORT. "
    "Files and --checkpoint must be at the same path on every node (docs/scale-out.md).",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(min=1),
    default=None,
    help="With --ray: encoding actors [default: one per GPU of the cluster, else one per CPU].",
)
@device_option()
@quiet_option
@json_option
@click.argument("paths", nargs=-1, required=True)
@_exits_2_on_error
def index(
    data_dir: Path | None,
    db_url: str | None,
    checkpoint: Path | None,
    collection_name: str,
    index_type: str | None,
    flat_threshold: int | None,
    batch_size: int,
    ray_address: str | None,
    ray_workers: int | None,
    device: str,
    quiet: bool,
    as_json: bool,
    paths: tuple[str, ...],
) -> None:
    """Index images into a collection: PATHs are folders (searched recursively), globs, image files
    or a Places-format manifest (.json).

    Finds JPEG, PNG, WebP, BMP, GIF and TIFF files, embeds new ones in batches, and stores their
    pooled vectors in the stage-1 FAISS index, their feature maps in the feature store and their
    rows in the catalog.
    """
    import torch

    from encoders import create_model
    from indexer import discover

    # A PATH that names nothing is a usage error: fail before loading the model.
    discover.discover_images(paths)
    encoder = _ray_encoder(ray_address, ray_workers, checkpoint, device) if ray_address else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(str(checkpoint) if checkpoint else None, device=device)
    library = _open_library(data_dir, db_url, create=True)
    # Ray prints its cluster's events (a worker died, a task retried) on stdout: keep them off the report.
    cluster_messages = contextlib.redirect_stdout(sys.stderr) if encoder is not None else contextlib.nullcontext()
    with cluster_messages:
        try:
            started = time.perf_counter()
            report = library.index(
                collection_name,
                paths,
                model,
                batch_size=batch_size,
                index_type=index_type,
                progress=not quiet,
                flat_threshold=flat_threshold,
                encoder=encoder,
            )
            seconds = time.perf_counter() - started
            info = next(i for i in library.list_collections() if i.name == collection_name)
        finally:
            library.close()
            if encoder is not None:
                from indexer import ray_encode

                ray_encode.shutdown()
    for path, reason in report.failed:
        click.echo(f"failed: {path}: {reason}", err=True)
    _report_copies(report.duplicates, as_json)
    rate = report.added / seconds if seconds > 0 else 0.0
    if as_json:
        document = {
            "collection": collection_name,
            "added": report.added,
            "skipped_duplicates": report.skipped_duplicates,
            "unchanged": report.unchanged,
            "duplicates": [{"path": path, "duplicate_of": original} for path, original in report.duplicates],
            "replaced": report.replaced,
            "failed": [{"path": path, "reason": reason} for path, reason in report.failed],
            "images": info.images,
            "index_type": info.index_type,
            "index_params": info.index_params,
            "seconds": round(seconds, 3),
            "images_per_second": round(rate, 2),
        }
        if encoder is not None:
            document["ray"] = {
                "workers": encoder.run.workers,
                "cluster_cpus": encoder.run.cluster_cpus,
                "cluster_gpus": encoder.run.cluster_gpus,
                "images_by_node": dict(encoder.run.nodes),
                "connect_seconds": round(encoder.run.connect_seconds, 3),
                "first_batch_seconds": round(encoder.run.first_batch_seconds, 3),
            }
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(
            f"{collection_name}: added {report.added} images ({rate:.1f} images/s), "
            f"{report.unchanged} already indexed, "
            + (f"{len(report.duplicates)} copies of indexed images skipped, " if report.duplicates else "")
            + f"{len(report.failed)} failed"
            + (f", replaced {report.replaced} changed files" if report.replaced else "")
            + f"; now {info.images} images, stage-1 index {info.index_type}, {_human_bytes(info.bytes)} on disk"
        )
    sys.exit(EXIT_SOME_FAILED if report.failed else EXIT_OK)


def _ray_encoder(address: str, workers: int | None, checkpoint: Path | None, device: str):
    """The Ray encoder for --ray ADDRESS; a usage error when Ray is missing or ADDRESS is no address."""
    from indexer import ray_encode

    try:
        encoder = ray_encode.RayEncoder(address, checkpoint.resolve() if checkpoint else None, device=device,
                                        workers=workers)
    except ray_encode.RayAddressError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise click.UsageError("--ray needs Ray: pip install 'matchmap[ray]' (or '.[ray]' in a checkout)") from None
    return encoder


COPIES_SHOWN = 10


def _report_copies(copies: list[tuple[str, str]], as_json: bool) -> None:
    """Say on stderr which files were skipped as copies of which indexed image (--json: all in the JSON)."""
    if as_json or not copies:
        return
    for path, original in copies[:COPIES_SHOWN]:
        click.echo(f"copy: {path} has the same content as {original}; not indexed again", err=True)
    if len(copies) > COPIES_SHOWN:
        click.echo(f"copy: ... and {len(copies) - COPIES_SHOWN} more (--json lists them all)", err=True)


COLLECTIONS_EPILOG = """\b
Exit codes:
  0  listed (also when there are none yet)
  2  the data dir named by --data-dir or $MATCHMAP_DATA_DIR does not exist,
     or the catalog could not be opened
"""


@click.command(epilog=COLLECTIONS_EPILOG)
@data_dir_option
@db_option
@json_option
@_exits_2_on_error
def collections(data_dir: Path | None, db_url: str | None, as_json: bool) -> None:
    """List collections: indexed and failed images, model, stage-1 index and bytes on disk.

    Bytes count the stage-1 index file, the feature store and the collection's share of the catalog.
    """
    library = _open_library(data_dir, db_url)
    try:
        infos = library.list_collections()
    finally:
        library.close()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "images": i.images,
                        "failed": i.failed,
                        "model": i.model_name,
                        "model_version": i.model_version,
                        "bytes": i.bytes,
                        "index_type": i.index_type,
                        "index_params": i.index_params,
                        "embed_dim": i.embed_dim,
                        "grid": list(i.grid),
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return
    if not infos:
        click.echo("no collections yet: create one with `matchmap index --collection NAME PATH...`")
        return
    header = ("NAME", "IMAGES", "FAILED", "MODEL", "INDEX", "SIZE")
    rows = [
        (i.name, str(i.images), str(i.failed), i.model_version, i.index_type, _human_bytes(i.bytes))
        for i in infos
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip())


REMOVE_EPILOG = """\b
Exit codes:
  0  removed
  1  some of the named images are not in the collection (the others were removed)
  2  usage or fatal error (unknown collection, missing data dir, catalog unreachable,
     collection busy)

\b
Removed images leave holes in the feature store; once holes exceed half of its slots
the store is compacted (rewritten without them) in the same command.
"""


@click.command(epilog=REMOVE_EPILOG)
@data_dir_option
@db_option
@click.option("--collection", "collection_name", required=True, help="Collection to remove from.")
@json_option
@click.argument("images", nargs=-1, metavar="[IMAGE_URI_OR_ID]...")
@_exits_2_on_error
def remove(
    data_dir: Path | None, db_url: str | None, collection_name: str, as_json: bool, images: tuple[str, ...]
) -> None:
    """Remove a whole collection (no IMAGE given), or some of its images by catalog id or file path."""
    library = _open_library(data_dir, db_url)
    try:
        if not images:
            library.remove_collection(collection_name)
            _say(
                as_json,
                {"collection": collection_name, "removed_collection": True},
                f"removed collection {collection_name}",
            )
            return
        collection = library.collection(collection_name)
        ids, not_found = _resolve_images(collection, images)
        removed = collection.remove_images(ids)
    finally:
        library.close()
    for name in not_found:
        click.echo(f"not found: {name} is not an image of collection {collection_name!r}", err=True)
    _say(
        as_json,
        {"collection": collection_name, "removed": removed, "not_found": not_found},
        f"removed {removed} images from {collection_name}"
        + (f"; {len(not_found)} not found" if not_found else ""),
    )
    sys.exit(EXIT_SOME_FAILED if not_found else EXIT_OK)


def _resolve_images(collection, names: tuple[str, ...]) -> tuple[list[int], list[str]]:
    """IMAGE arguments -> (catalog ids, arguments that match nothing). Digits are ids, anything else a path."""
    numeric = {name: int(name) for name in names if name.isdigit()}
    paths = {name: str(Path(name).expanduser().resolve()) for name in names if name not in numeric}
    known_ids = collection.known_ids(list(numeric.values()))
    by_uri = collection.ids_for_uris(list(paths.values()) + list(paths))
    ids: list[int] = []
    not_found: list[str] = []
    for name in names:
        if name in numeric:
            matched = [numeric[name]] if numeric[name] in known_ids else []
        else:
            matched = by_uri.get(paths[name], []) + by_uri.get(name, [])
        if matched:
            ids.extend(matched)
        else:
            not_found.append(name)
    return ids, not_found


def _say(as_json: bool, document: dict, line: str) -> None:
    click.echo(json.dumps(document, indent=2) if as_json else line)


def _human_bytes(count: int) -> str:
    value, units = float(count), ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.0f} B" if units[0] == "B" else f"{value:.1f} {units[0]}"
