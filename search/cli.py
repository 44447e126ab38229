"""``matchmap serve`` (run the search service) and ``matchmap query`` (search it by speaking)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from search import DEFAULT_PORT
from search.client import SearchClient, SearchHits, SearchServiceError, ServerUnreachable

DEFAULT_SERVER = f"localhost:{DEFAULT_PORT}"

# Exit codes of `matchmap query`.
EXIT_OK, EXIT_QUERY_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Library folder (catalog, stage-1 indexes, feature store). [default: $MATCHMAP_DATA_DIR or ~/.local/share/matchmap]")
@click.option("--db", "db_url", default=None, envvar="MATCHMAP_DB_URL",
              help="Catalog database URL (e.g. postgresql+psycopg2://user:pw@host/db) instead of the SQLite file in --data-dir. [env MATCHMAP_DB_URL]")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Model checkpoint; must be the one the collections were indexed with. [default: the shipped model]")
@click.option("--host", default="[::]", help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, help="Port to listen on (0 = any free port).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where the model and stage-2 re-ranking run (auto = CUDA when available).")
@click.option("--token", default=None, envvar="MATCHMAP_TOKEN",
              help="Require 'authorization: Bearer TOKEN' on every call (health stays open). [env MATCHMAP_TOKEN]")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM certificate chain: serve over TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--max-audio-seconds", type=click.FloatRange(min=0.1), default=30.0,
              help="Longest query audio accepted (longer: OUT_OF_RANGE).")
@click.option("--max-message-mb", type=click.FloatRange(min=0.1), default=16.0, help="Largest request accepted.")
@click.option("--candidates", "default_candidates", type=click.IntRange(min=1), default=100,
              help="Stage-1 candidates re-ranked by MISA when a query does not say.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, help="Most queries encoded in one forward pass.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def serve(
    data_dir: Path | None,
    db_url: str | None,
    checkpoint: Path | None,
    host: str,
    port: int,
    device: str,
    token: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_audio_seconds: float,
    max_message_mb: float,
    default_candidates: int,
    max_batch: int,
    log_level: str,
) -> None:
    """Run the gRPC spoken-query search service until SIGTERM / SIGINT.

    Loads the model and the library once, serves matchmap.v1.SpokenImageSearch (Search, Localize,
    Highlight, ListCollections) plus grpc.health.v1.Health and server reflection. On SIGTERM or
    SIGINT, health turns NOT_SERVING, in-flight calls finish, then the server stops.
    """
    import asyncio

    from search.engine import SearchEngine, SearchLimits
    from search.server import ServerOptions, serve_until_signalled

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        options = ServerOptions(
            host=host, port=port, token=token, tls_cert=tls_cert, tls_key=tls_key,
            max_message_mb=max_message_mb, max_batch=max_batch,
        )
        limits = SearchLimits(
            max_audio_seconds=max_audio_seconds,
            default_candidates=default_candidates,
            max_candidates=max(default_candidates, SearchLimits.max_candidates),
        )
        engine = SearchEngine.open(checkpoint, data_dir, db_url, device=device, limits=limits)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise click.ClickException(str(error)) from error

    def ready(bound_port: int) -> None:
        names = [info.name for info, searchable in engine.list_collections() if searchable]
        click.echo(
            f"matchmap serve: listening on {host}:{bound_port} ({'TLS' if tls_cert else 'plaintext'}"
            f"{', token required' if token else ''}); model {engine.model_version} on {engine.device}; "
            f"collections: {', '.join(names) if names else 'none yet'}",
            err=True,
        )

    try:
        asyncio.run(serve_until_signalled(engine, options, on_ready=ready))
    except OSError as error:
        raise click.ClickException(str(error)) from error
    finally:
        engine.close()
    click.echo("matchmap serve: stopped", err=True)


def _hits_json(audio: str, hits: SearchHits) -> dict:
    return {
        "audio": audio,
        "hits": [
            {"rank": h.rank, "image_id": h.image_id, "uri": h.uri, "score": h.score, "stage1_score": h.stage1_score}
            for h in hits
        ],
        "timings_ms": hits.timings_ms,
        "model_version": hits.model_version,
        "collection_size": hits.collection_size,
        "candidates": hits.candidates,
        "audio_seconds": hits.audio_seconds,
    }


def _print_table(audio: str, collection: str, hits: SearchHits) -> None:
    click.echo(
        f"{audio}: {len(hits)} hits in {collection!r} ({hits.collection_size} images, "
        f"{hits.candidates} re-ranked, model {hits.model_version})"
    )
    click.echo(f"{'rank':>4}  {'score':>8}  {'stage-1':>8}  {'image id':>8}  uri")
    for h in hits:
        click.echo(f"{h.rank:>4}  {h.score:>8.4f}  {h.stage1_score:>8.4f}  {h.image_id:>8}  {h.uri}")
    t = hits.timings_ms
    click.echo(
        f"timings: decode {t['decode']:.1f} ms, queue {t['queue']:.1f}, encode {t['encode']:.1f}, "
        f"stage 1 {t['stage1']:.1f}, stage 2 {t['stage2']:.1f}, total {t['total']:.1f} ms"
    )


def _only_searchable_collection(client: SearchClient) -> str:
    listing = client.list_collections()
    names = [c.name for c in listing.collections if c.searchable]
    if len(names) != 1:
        raise click.UsageError(
            f"--collection is needed: the server has {len(names)} searchable collections"
            + (f" ({', '.join(names)})" if names else "")
        )
    return names[0]


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Exit codes: 0 every query answered; 1 the server returned an error for some query; "
    "2 usage error; 3 server unreachable.",
)
@click.argument("audio", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--server", default=DEFAULT_SERVER, envvar="MATCHMAP_SERVER", help="HOST:PORT of the service. [env MATCHMAP_SERVER]")
@click.option("--collection", default=None, help="Collection to search. [default: the server's only searchable one]")
@click.option("--top-k", type=click.IntRange(min=1), default=10, help="Hits per query.")
@click.option("--candidates", type=click.IntRange(min=0), default=0,
              help="Stage-1 candidates re-ranked by MISA (0 = the server's default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--token", default=None, envvar="MATCHMAP_TOKEN", help="Bearer token, if the server needs one. [env MATCHMAP_TOKEN]")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA certificate of a TLS server (switches to TLS).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, help="Seconds per query.")
def query(
    audio: tuple[Path, ...],
    server: str,
    collection: str | None,
    top_k: int,
    candidates: int,
    as_json: bool,
    token: str | None,
    tls_ca: Path | None,
    timeout: float,
) -> None:
    """Search a collection by speaking: send each AUDIO file (WAV, FLAC, OGG) and print ranked images.

    Each query prints a table (rank, MISA score, stage-1 SISA score, image id, uri) and the
    server's timings; --json prints {"server", "collection", "queries": [{"audio", "hits",
    "timings_ms", ...} or {"audio", "error": {"code", "message"}}]}.
    """
    answers: list[dict] = []
    failed = False
    try:
        with SearchClient(server, token=token, tls_ca=tls_ca, timeout=timeout) as client:
            collection = collection or _only_searchable_collection(client)
            for path in audio:
                try:
                    hits = client.search(path, collection, top_k=top_k, candidates=candidates)
                except ServerUnreachable:
                    raise
                except SearchServiceError as error:
                    failed = True
                    answers.append({"audio": str(path), "error": {"code": error.code.name, "message": error.details}})
                    if not as_json:
                        click.echo(f"{path}: {error.code.name}: {error.details}", err=True)
                    continue
                answers.append(_hits_json(str(path), hits))
                if not as_json:
                    _print_table(str(path), collection, hits)
    except ServerUnreachable as error:
        click.echo(f"matchmap query: cannot reach a server at {server}: {error.details}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except SearchServiceError as error:  # listing collections failed (e.g. UNAUTHENTICATED)
        click.echo(f"matchmap query: {error.code.name}: {error.details}", err=True)
        sys.exit(EXIT_QUERY_FAILED)
    if as_json:
        click.echo(json.dumps({"server": server, "collection": collection, "queries": answers}, indent=2))
    sys.exit(EXIT_QUERY_FAILED if failed else EXIT_OK)
