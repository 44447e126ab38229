"""``matchmap serve`` (run the search service), ``matchmap query`` (search it by speaking),
``matchmap localize`` (offline heatmaps of where words land in an image) and ``matchmap highlight``
(stream speech to the service and render its live heatmaps as a GIF)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image

from search import (
    DEFAULT_CANDIDATES,
    DEFAULT_CANDIDATES_SHARE,
    DEFAULT_HTTP_PORT,
    DEFAULT_MODEL_THREADS,
    DEFAULT_PORT,
    HELD_ENERGY,
    MAX_CANDIDATES,
    MAX_EXHAUSTIVE_CANDIDATES,
    STAGE1_WIDEN,
)
from search.client import Heatmap, SearchClient, SearchHits, SearchServiceError, ServerUnreachable

DEFAULT_SERVER = f"localhost:{DEFAULT_PORT}"

# Exit codes of `matchmap query`.
EXIT_OK, EXIT_QUERY_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CANNOT_LISTEN = 3  # serve


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Exit codes: 0 stopped by SIGTERM/SIGINT after draining; 1 could not start (model, data dir, "
    "catalog, TLS files, options: the message says which); 2 usage error; 3 cannot listen on --port or --http "
    "(port in use, address not local).",
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Library folder (catalog, stage-1 indexes, feature store); must exist unless it is the default. [default: $MATCHMAP_DATA_DIR or ~/.local/share/matchmap]")
@click.option("--db", "db_url", default=None, envvar="MATCHMAP_DB_URL",
              help="Catalog database URL (e.g. postgresql+psycopg2://user:pw@host/db) instead of the SQLite file in --data-dir. [env MATCHMAP_DB_URL]")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Model checkpoint; must be the one the collections were indexed with. [default: the shipped model]")
@click.option("--host", default="[::]", help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, help="Port to listen on (0 = any free port).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where the model and stage-2 re-ranking run (auto = CUDA when available).")
@click.option("--http", "http_port", type=click.IntRange(0, 65535), default=DEFAULT_HTTP_PORT,
              help="Port of the search page and JSON API, served beside gRPC by the same engine (0 = any free port).")
@click.option("--no-http", is_flag=True, help="Serve gRPC only, no page or JSON API.")
@click.option("--token", default=None, envvar="MATCHMAP_TOKEN",
              help="Require 'authorization: Bearer TOKEN' on every call (health stays open). [env MATCHMAP_TOKEN]")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM certificate chain: serve over TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA certificate: require every client to present a certificate it signed (mTLS; needs --tls-cert).")
@click.option("--max-audio-seconds", type=click.FloatRange(min=0.1), default=30.0,
              help="Longest query recording accepted (longer: INVALID_ARGUMENT). The speech in it may last "
                   "at most what the model takes (10.24 s for tiny).")
@click.option("--max-message-mb", type=click.FloatRange(min=0.1), default=16.0, help="Largest request accepted.")
@click.option("--candidates-share", type=click.FloatRange(0, 1), default=DEFAULT_CANDIDATES_SHARE, show_default=True,
              help="A query that does not say how many candidates gets max(--candidates, this share of the "
                   f"collection's images), at most {MAX_CANDIDATES}: near-alike images crowd MISA's top 10 as a "
                   "collection grows (docs/search.md). 0: always --candidates.")
@click.option("--candidates", "default_candidates", type=click.IntRange(min=1), default=DEFAULT_CANDIDATES,
              show_default=True,
              help="Stage-1 candidates re-ranked by MISA when a query does not say, at least (see docs/search.md for "
                   f"agreement with exhaustive MISA and cost per value). A query may ask for up to {MAX_CANDIDATES}, "
                   f"or up to {MAX_EXHAUSTIVE_CANDIDATES} (every image) on a collection of at most that many.")
@click.option("--stage1-widen", type=click.IntRange(min=1), default=STAGE1_WIDEN, show_default=True,
              help="Stage 1 takes this many times K candidates from the pooled vectors and keeps the K whose "
                   "pooled score plus centroid interaction (each region as its nearest centroid) is best: "
                   "MISA's top 10 is then held at a smaller K (docs/search.md). 1: the pooled vectors' top K.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, help="Most queries encoded in one forward pass.")
@click.option("--model-threads", type=click.IntRange(min=1), default=DEFAULT_MODEL_THREADS, show_default=True,
              help="Cores the model thread uses for a batch of queries (encoding, stage 1, stage 2). On a "
                   "2-core machine one core answered faster and more queries per second than two, whose every "
                   "step waited for the core that decoding, gRPC or the client held (docs/search.md).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64,
              help="Calls holding work at once (decoding, queued, scoring); more get RESOURCE_EXHAUSTED at once.")
@click.option("--max-concurrent-rpcs", type=click.IntRange(min=1), default=256,
              help="Calls open at once, streams included (gRPC refuses more with RESOURCE_EXHAUSTED).")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=0.0,
              help="After SIGTERM: report NOT_SERVING but keep answering this long, so load balancers move away.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=30.0,
              help="Then: refuse new calls (UNAVAILABLE) and let in-flight ones finish for at most this long.")
@click.option("--vad/--no-vad", default=True,
              help="Cut each query to its speech with a voice activity detector (Silero VAD) before scoring; "
                   "--no-vad trims only silence.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON line on stdout when ready ({\"event\": \"ready\", \"port\", \"http_url\", ...}), "
                   "one when the maps to hold are held ({\"event\": \"held\", \"resident_maps_bytes\", "
                   "\"seconds\"}) and one when stopped.")
@click.option("--resident-maps-mb", type=click.FloatRange(min=0), default=4096.0, show_default=True,
              help="Memory for holding collections' feature maps (about 14 KB per image with the tiny model, "
                   "its region vectors' 112 principal directions, in bfloat16; 7 KB in int8 where that does "
                   "not fit; else 2 KB codes) so stage 2 can re-rank thousands of candidates; a collection "
                   "that does not fit is read from its store per query. 0 = never hold them.")
@click.option("--held-energy", type=click.FloatRange(min=0, max=1, min_open=True), default=HELD_ENERGY,
              show_default=True,
              help="Held maps keep the fewest principal directions of their region vectors that hold this share "
                   "of their second moment (112 of 256 dims for the tiny model): stage 2's rough pass then reads "
                   "and multiplies less, and the exact pass ranks what it keeps. It needs a trained model, whose "
                   "speech frames lie where its image regions do. 1 = every dimension.")
@click.option("--hold-first", is_flag=True,
              help="Load the maps (or codes) to hold before listening. By default the server listens once the "
                   "collections are open and holds their maps in the background: until then stage 2 reads "
                   "candidates' maps from the store (same answers, slower). A million images' codes take "
                   "seconds to read.")
@click.option("--heap-trim-interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between handing the C heap's free pages back to the OS (malloc_trim), which keeps "
                   "the server's memory under sustained load lower and flat (see search/memory.py). 0 = never.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="Least severe log messages written to stderr.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Serve each collection as shards on a Ray cluster (pip install '.[ray]'; docs/scale-out.md): "
                   "local (a Ray on this machine, the value when ADDRESS is left out), auto, HOST:PORT or "
                   "ray://HOST:PORT. This process stays the gRPC and HTTP front; every shard is a Ray Serve "
                   "replica holding its share of the images' stage-1 vectors and maps.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="With --ray: shards per collection [default: one per node of the cluster].")
@click.option("--shard-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: CPUs each shard replica reserves (a GPU too when --device cuda).")
def serve(
    data_dir: Path | None,
    db_url: str | None,
    checkpoint: Path | None,
    host: str,
    port: int,
    device: str,
    http_port: int,
    no_http: bool,
    token: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_audio_seconds: float,
    max_message_mb: float,
    default_candidates: int,
    candidates_share: float,
    stage1_widen: int,
    max_batch: int,
    model_threads: int,
    max_queue: int,
    max_concurrent_rpcs: int,
    drain_seconds: float,
    grace_seconds: float,
    vad: bool,
    as_json: bool,
    resident_maps_mb: float,
    held_energy: float,
    hold_first: bool,
    heap_trim_interval: float,
    log_level: str,
    tls_client_ca: Path | None,
    ray_address: str | None,
    shards: int | None,
    shard_cpus: float,
) -> None:
    """Run the gRPC spoken-query search service until SIGTERM / SIGINT.

    Loads the model and the library once, serves matchmap.v1.SpokenImageSearch (Search, Localize,
    Highlight, ListCollections) plus grpc.health.v1.Health and server reflection, and (unless --no-http)
    a web page to search by speaking and a JSON API on --http's port (/openapi.json). On SIGTERM or
    SIGINT, health turns NOT_SERVING, in-flight calls finish, then the server stops.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from search.threads import quiet_idle_teams, single_core_thread

    quiet_idle_teams()  # before torch loads: idle OpenMP threads of one step must not spin beside the next
    from search.engine import SearchEngine, SearchLimits
    from search.errors import PortUnavailable
    from search.memory import HeapTrimmer
    from search.server import ServerOptions, serve_until_signalled

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        options = ServerOptions(
            host=host, port=port, token=token, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
            max_message_mb=max_message_mb, max_batch=max_batch, model_threads=model_threads, max_queue=max_queue,
            max_concurrent_rpcs=max_concurrent_rpcs, drain_seconds=drain_seconds, shutdown_grace_s=grace_seconds,
            http_port=None if no_http else http_port,
        )
        limits = SearchLimits(
            max_audio_seconds=max_audio_seconds,
            default_candidates=default_candidates,
            candidates_share=candidates_share,
            stage1_widen=stage1_widen,
            max_candidates=max(default_candidates, SearchLimits.max_candidates),
            max_exhaustive_candidates=max(default_candidates, SearchLimits.max_exhaustive_candidates),
            resident_maps_mb=resident_maps_mb,
            held_energy=held_energy,
        )
        if ray_address is None and shards is not None:
            raise click.UsageError("--shards needs --ray (shards live on a Ray cluster)")

        def start_engine():  # -> the engine, and when its warm-up began
            if ray_address is None:
                opened = SearchEngine.open(checkpoint, data_dir, db_url, device=device, limits=limits, vad=vad)
                warming = time.perf_counter()
                opened.warm_up(background=not hold_first, model_team=model_threads, decode_team=1)
            else:
                opened = _sharded_engine(ray_address, shards, shard_cpus, checkpoint, data_dir, db_url, device,
                                         limits, vad)
                warming = time.perf_counter()
                opened.warm_up()  # each shard replica holds its maps before it answers
            return opened, warming

        # Loading runs on both cores in a thread that then ends (its OpenMP helper goes with it); the main
        # thread stays on one, so no team but the model thread's (--model-threads) may be larger (search.threads).
        single_core_thread()
        with ThreadPoolExecutor(1, thread_name_prefix="matchmap-start") as starter:
            engine, started = starter.submit(start_engine).result()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise click.ClickException(str(error)) from error

    def ready(bound_port: int, http_url: str | None) -> None:
        names = [info.name for info, searchable in engine.list_collections() if searchable]
        resident = engine.resident_bytes()
        security = ("mTLS" if tls_client_ca else "TLS") if tls_cert else "plaintext"
        click.echo(
            f"matchmap serve: listening on {host}:{bound_port} ({security}"
            f"{', token required' if token else ''}); model {engine.model_version} on {engine.device}; "
            f"collections: {', '.join(names) if names else 'none yet'}; feature maps in memory: "
            f"{sum(resident.values()) / 2**20:.0f} MB ({len(resident)} of {len(names)} collections)",
            err=True,
        )
        if ray_address is not None:
            click.echo(f"matchmap serve: every collection in {engine.shards} shards on the Ray cluster "
                       f"({ray_address})", err=True)
        if http_url is not None:
            click.echo(f"matchmap serve: search page and JSON API on {http_url} (/openapi.json)", err=True)
        if as_json:
            click.echo(json.dumps({
                "event": "ready", "host": host, "port": bound_port, "http_url": http_url, "security": security,
                "token_required": bool(token), "model_version": engine.model_version, "device": str(engine.device),
                "collections": names, "resident_maps_bytes": sum(resident.values()),
                "shards": getattr(engine, "shards", 1),
            }))
            sys.stdout.flush()
        if ray_address is None:
            reporter.append(threading.Thread(target=report_held, name="matchmap-report-held", daemon=True))
            reporter[0].start()

    reporter: list[threading.Thread] = []  # joined before exit: a daemon thread still writing to stdout at
    # interpreter shutdown aborts the process (exit -6), as a SIGTERM right after the ready line could

    def report_held() -> None:  # one line once the background holder is done (at once with --hold-first)
        engine.wait_held()
        resident = engine.resident_bytes()
        seconds = time.perf_counter() - started
        click.echo(f"matchmap serve: feature maps held in memory after {seconds:.1f} s: "
                   f"{sum(resident.values()) / 2**20:.0f} MB ({len(resident)} collections)", err=True)
        if as_json:
            click.echo(json.dumps({"event": "held", "resident_maps_bytes": sum(resident.values()),
                                   "seconds": round(seconds, 3)}))
            sys.stdout.flush()

    trimmer = HeapTrimmer(heap_trim_interval).start() if heap_trim_interval > 0 else None
    try:
        asyncio.run(serve_until_signalled(engine, options, on_ready=ready))
    except PortUnavailable as error:
        click.echo(f"matchmap serve: {error}", err=True)
        sys.exit(EXIT_CANNOT_LISTEN)
    except OSError as error:
        raise click.ClickException(str(error)) from error
    finally:
        if trimmer is not None:
            trimmer.stop()
        engine.close()  # waits for the holder, so the reporter's wait ends
        for thread in reporter:
            thread.join(30)
        if ray_address is not None:
            from search.ray_serve import remove_shards

            remove_shards(engine.shards)
    click.echo("matchmap serve: stopped", err=True)
    if as_json:
        click.echo(json.dumps({"event": "stopped"}))


def _sharded_engine(address: str, shards: int | None, shard_cpus: float, checkpoint: Path | None,
                    data_dir: Path | None, db_url: str | None, device: str, limits, vad: bool):
    """``serve --ray``: join the cluster, start the shard replicas, and the front's engine over them."""
    from encoders import create_model
    from indexer import Library, default_data_dir

    try:
        from indexer.ray_encode import RayAddressError, check_address, connect
        from search.ray_serve import ShardedEngine, ShardSpec, deploy_shards
    except ImportError:
        raise click.UsageError("--ray needs Ray Serve: pip install 'matchmap[ray]' (or '.[ray]' in a checkout)") from None
    try:
        check_address(address)
    except RayAddressError:
        raise click.UsageError(
            f"--ray {address!r} is not a Ray cluster address (local, auto, HOST:PORT or ray://HOST:PORT)") from None
    library = Library.open(data_dir, db_url)  # fails fast, before any cluster work, on a missing data dir
    model = create_model(str(checkpoint) if checkpoint is not None else None)
    connect(address)
    import ray

    count = shards or len([node for node in ray.nodes() if node["Alive"]])
    # Replicas may run on other machines: they get absolute paths (shared storage) and the catalog URL.
    spec = ShardSpec(str(checkpoint.resolve()) if checkpoint else None,
                     str((data_dir or default_data_dir()).resolve()), db_url, device=device, limits=limits, vad=vad)
    handles = deploy_shards(spec, count, cpus_per_shard=shard_cpus, gpus_per_shard=1.0 if device == "cuda" else 0.0)
    return ShardedEngine(model, library, handles, device=device, limits=limits, vad=vad)


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
    "2 usage error; 3 server unreachable (or, with --wait, not serving in time).",
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
@click.option("--tls-cert", "client_cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM client certificate, for a server that requires one (mTLS; with --tls-key and --tls-ca).")
@click.option("--tls-key", "client_key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, help="Seconds per query.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=0.0,
              help="Wait up to this many seconds for the server to report SERVING first (e.g. right after `serve &`).")
def query(
    audio: tuple[Path, ...],
    server: str,
    collection: str | None,
    top_k: int,
    candidates: int,
    as_json: bool,
    token: str | None,
    tls_ca: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    timeout: float,
    wait_seconds: float,
) -> None:
    """Search a collection by speaking: send each AUDIO file (WAV, FLAC, OGG, MP3, AIFF); print ranked images.

    Each query prints a table (rank, MISA score, stage-1 score, image id, uri) and the
    server's timings; --json prints {"server", "collection", "queries": [{"audio", "hits",
    "timings_ms", ...} or {"audio", "error": {"code", "message"}}]}.
    """
    answers: list[dict] = []
    failed = False
    try:
        if (client_cert is None) != (client_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        with SearchClient(server, token=token, tls_ca=tls_ca, timeout=timeout, tls_cert=client_cert,
                          tls_key=client_key) as client:
            if wait_seconds > 0:
                client.wait_until_serving(wait_seconds)
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


# ---- localize (offline) and highlight (live) ----------------------------------------------------


def _parse_span(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not START:END in seconds (e.g. 1.2:1.8)", param_hint="--span") from None
    return start, end


def _words_of(manifest_path: Path, uttid: str | None, audio: Path):
    """The manifest entry for ``uttid`` (default: the entry whose wav is ``audio``), with its word timings."""
    # Manifests are the training package's format; the CLI (not the search library) reads them, and
    # only when --words asks for it.
    from training.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(manifest_path, check_files=False)
    except (ManifestError, OSError) as error:
        raise click.ClickException(str(error)) from error
    for entry in manifest.entries:
        if entry.uttid == uttid or (uttid is None and manifest.audio_path(entry).resolve() == audio.resolve()):
            if not entry.words:
                raise click.ClickException(f"{manifest_path}: entry {entry.uttid} has no word timings ('words')")
            return entry
    wanted = f"uttid {uttid!r}" if uttid else f"an entry whose wav is {audio} (give --uttid)"
    raise click.ClickException(f"{manifest_path} holds no {wanted}")


def _panel_spans(spans: tuple[tuple[float, float], ...], entry, panels: str) -> list[tuple[str, tuple[float, float]]]:
    """(title, (start, end) seconds) of each panel after the whole caption's."""
    rows = [(f"{start:.2f}-{end:.2f} s", (start, end)) for start, end in spans]
    if entry is None:
        return rows
    if panels == "objects":
        from training.grounding import object_mentions  # the corpus's ground truth, read by the CLI only

        mentions, _ = object_mentions(entry)
        rows += [(f"{m.object.color} {m.object.shape} ({m.object.size})\n{m.start:.2f}-{m.end:.2f} s", (m.start, m.end))
                 for m in sorted(mentions, key=lambda m: m.start)]
    else:
        rows += [(f"'{w.word}'\n{w.start:.2f}-{w.end:.2f} s", (w.start, w.end)) for w in entry.words if w.end > w.start]
    return rows


def _heatmap_json(title: str, requested: tuple[float, float] | None, result, box: tuple[float, ...]) -> dict:
    from encoders.grounding import heatmap_peak

    x, y = heatmap_peak(result.heatmap, box)
    return {
        "label": title,
        "requested": list(requested) if requested else None,
        "start_seconds": result.start_seconds,
        "end_seconds": result.end_seconds,
        "heat_min": result.heat_min,
        "heat_max": result.heat_max,
        "peak": {"x": x, "y": y},
        "values": result.heatmap.tolist(),
    }


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Exit codes: 0 written; 1 IMAGE, AUDIO, the checkpoint or a span could not be used (the message "
    "says which); 2 usage error (a missing file, a bad option).",
)
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("audio", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write: the whole caption's heatmap, then one panel per span / word / object.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Model checkpoint. [default: the shipped model]")
@click.option("--span", "spans", multiple=True, metavar="START:END", help="A span of the speech in seconds (repeatable).")
@click.option("--words", "words_manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A manifest with word timings: one panel per word (or object, see --panels) of the caption.")
@click.option("--uttid", default=None, help="With --words: the caption's uttid. [default: the entry whose wav is AUDIO]")
@click.option("--panels", type=click.Choice(["words", "objects"]), default="words",
              help="With --words: a panel per spoken word, or per object mention (color word to shape word).")
@click.option("--columns", type=click.IntRange(min=1), default=4, help="Panels per row of the picture.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where the model runs (auto = CUDA when available).")
@click.option("--json", "as_json", is_flag=True, help="Print the heatmaps (rows, cols, values, spans) as JSON.")
def localize(image: Path, audio: Path, out: Path, checkpoint: Path | None, spans: tuple[str, ...],
             words_manifest: Path | None, uttid: str | None, panels: str, columns: int, device: str,
             as_json: bool) -> None:
    """Paint where the speech of AUDIO lands in IMAGE (offline: no server needed).

    The heatmap of a span is the matchmap's max over the span's audio frames for every image region,
    rescaled to 0..1 and drawn over the whole image (encoded whole, as the Localize call does for a
    sent image). The first panel is the whole caption; then one per --span, or per word / object
    of --words. --json prints {"rows", "cols", "box", "frame_seconds", "score", "panels": [{"label",
    "start_seconds", "end_seconds", "values" (rows x cols, 0..1), "peak": {"x", "y"}, ...}]}.
    """
    from encoders import AudioDecodeError, ImageDecodeError, create_model, load_audio, load_image
    from encoders.grounding import encode_audio_map, encode_whole_image
    from search.engine import resolve_device
    from search.errors import QueryOutOfRange
    from search.localization import image_grid, localize_audio_map, overlay_heatmap, titled

    requested = tuple(_parse_span(s) for s in spans)
    if uttid is not None and words_manifest is None:
        raise click.UsageError("--uttid needs --words MANIFEST")
    entry = _words_of(words_manifest, uttid, audio) if words_manifest is not None else None
    try:
        model = create_model(str(checkpoint) if checkpoint else None, device=resolve_device(device))
        picture = load_image(image)
        image_map = encode_whole_image(model, picture)
        audio_map = encode_audio_map(model, load_audio(audio, model.config.audio.sample_rate))
    except (FileNotFoundError, ValueError, AudioDecodeError, ImageDecodeError) as error:
        raise click.ClickException(str(error)) from error
    box = (0.0, 0.0, float(picture.width), float(picture.height))
    fs = model.audio_frame_seconds
    whole_title = "whole caption" + (f": {entry.asr_text}" if entry is not None else "")
    rows: list[tuple[str, tuple[float, float] | None]] = [(whole_title, None), *_panel_spans(requested, entry, panels)]
    tiles, data, results = [], [], []
    for title, span in rows:
        try:
            result = localize_audio_map(image_map, audio_map, fs, span)
        except QueryOutOfRange as error:
            raise click.ClickException(f"{title.splitlines()[0]}: {error}") from error
        tiles.append(titled(overlay_heatmap(picture, result.heatmap, box), title))
        data.append(_heatmap_json(title, span, result, box))
        results.append(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, columns).save(out)
    if as_json:
        whole = results[0]  # the first panel is the whole caption
        click.echo(json.dumps({
            "image": str(image), "audio": str(audio), "out": str(out), "model_version": model.version,
            "rows": whole.rows, "cols": whole.cols, "box": list(box), "frame_seconds": fs, "score": whole.score,
            "panels": data,
        }, indent=2))
    else:
        click.echo(f"wrote {out}: {len(tiles)} panel(s) over a {image_map.shape[0]} x {image_map.shape[1]} heatmap")


@dataclass
class TimedHeatmap:
    """A Highlight answer and when it came: ``latency_ms`` from sending the newest chunk it covers."""

    heatmap: Heatmap
    received_s: float  # seconds since the stream started
    latency_ms: float


@dataclass
class HighlightStream:
    """What one streamed file gave: the heatmaps in order and the latency of every chunk."""

    frames: list[TimedHeatmap]
    chunk_latencies_ms: list[float]  # per chunk sent: until the first heatmap covering it arrived
    chunks: int
    audio_seconds: float


def pcm_chunks(samples_s16le: bytes, sample_rate: int, chunk_ms: float) -> list[bytes]:
    """Cut mono s16le PCM into chunks of ``chunk_ms`` milliseconds (the last one may be shorter)."""
    step = 2 * max(1, round(sample_rate * chunk_ms / 1000))
    return [samples_s16le[i : i + step] for i in range(0, len(samples_s16le), step)]


def stream_highlights(
    client: SearchClient,
    samples_s16le: bytes,
    sample_rate: int,
    *,
    chunk_ms: float = 100.0,
    realtime: bool = True,
    image: Path | bytes | None = None,
    image_id: str | None = None,
    collection: str = "",
    window_seconds: float = 0.0,
) -> HighlightStream:
    """Stream PCM to the Highlight call in ``chunk_ms`` chunks, at the pace of speech when ``realtime``
    (chunk i leaves i * chunk_ms after the start), and time each chunk until a heatmap covers it."""
    chunks = pcm_chunks(samples_s16le, sample_rate, chunk_ms)
    chunk_ends = np.cumsum([len(c) // 2 for c in chunks]) / sample_rate  # seconds of audio after each chunk
    sent_at: list[float] = []
    started = time.perf_counter()

    def paced() -> Iterator[bytes]:
        for i, chunk in enumerate(chunks):
            if realtime:
                time.sleep(max(0.0, started + i * chunk_ms / 1000 - time.perf_counter()))
            sent_at.append(time.perf_counter())
            yield chunk

    frames: list[TimedHeatmap] = []
    latencies: list[float | None] = [None] * len(chunks)
    covered = 0  # chunks covered by a heatmap so far
    for heatmap in client.highlight(paced(), sample_rate, image=image, image_id=image_id, collection=collection,
                                    window_seconds=window_seconds):
        now = time.perf_counter()
        newest = int(np.searchsorted(chunk_ends, heatmap.end_seconds + 1e-6, side="right"))  # chunks it covers
        for i in range(covered, min(newest, len(sent_at))):
            latencies[i] = 1000 * (now - sent_at[i])
        covered = max(covered, newest)
        newest_sent = sent_at[min(newest, len(sent_at)) - 1] if newest else started
        frames.append(TimedHeatmap(heatmap, now - started, 1000 * (now - newest_sent)))
    return HighlightStream(frames, [x for x in latencies if x is not None], len(chunks), float(chunk_ends[-1]))


def highlight_frames(picture: Image.Image | None, frames: list[TimedHeatmap]) -> list[Image.Image]:
    """One picture per heatmap: the image (or a grey canvas the size of the heatmap's box) with the
    heatmap painted over its box and the time it covers written below."""
    from search.localization import overlay_heatmap, titled

    pictures = []
    for f in frames:
        h = f.heatmap
        if picture is None:
            x0, y0, x1, y1 = h.box
            picture = Image.new("RGB", (max(1, round(x0 + x1)), max(1, round(y0 + y1))), (128, 128, 128))
        caption = f"heard {h.start_seconds:.2f}-{h.end_seconds:.2f} s (+{f.latency_ms:.0f} ms)"
        pictures.append(titled(overlay_heatmap(picture, h.values, h.box), caption))
    return pictures


def save_gif(pictures: list[Image.Image], frames: list[TimedHeatmap], out: Path) -> None:
    """An animated GIF that shows each picture for as long as the speech it covers lasted."""
    ends = [f.heatmap.end_seconds for f in frames]
    durations = [max(20, round(1000 * (b - a))) for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(out, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def latency_summary(latencies_ms: list[float]) -> dict:
    """{"chunks", "p50_ms", "p95_ms", "max_ms"} of per-chunk latencies."""
    ordered = np.asarray(sorted(latencies_ms))
    return {
        "chunks": len(ordered),
        "p50_ms": float(np.percentile(ordered, 50)) if len(ordered) else None,
        "p95_ms": float(np.percentile(ordered, 95)) if len(ordered) else None,
        "max_ms": float(ordered[-1]) if len(ordered) else None,
    }


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Exit codes: 0 done; 1 the server returned an error; 2 usage error; 3 server unreachable.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                metavar="[IMAGE] AUDIO")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Animated GIF to write.")
@click.option("--server", default=DEFAULT_SERVER, envvar="MATCHMAP_SERVER", help="HOST:PORT of the service. [env MATCHMAP_SERVER]")
@click.option("--collection", default="", help="With --image-id: the collection holding the image.")
@click.option("--image-id", default=None, help="Highlight over an indexed image instead of sending IMAGE.")
@click.option("--chunk-ms", type=click.FloatRange(min=10), default=100.0, help="Audio per streamed chunk.")
@click.option("--window", "window_seconds", type=click.FloatRange(min=0), default=0.0,
              help="Seconds of the latest speech each heatmap covers (0 = the server's default, 1 s).")
@click.option("--fast", is_flag=True, help="Send as fast as possible instead of at the pace of speech.")
@click.option("--token", default=None, envvar="MATCHMAP_TOKEN", help="Bearer token, if the server needs one. [env MATCHMAP_TOKEN]")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA certificate of a TLS server (switches to TLS).")
@click.option("--json", "as_json", is_flag=True, help="Print the latency summary and the frames' spans as JSON.")
def highlight(paths: tuple[Path, ...], out: Path, server: str, collection: str, image_id: str | None,
              chunk_ms: float, window_seconds: float, fast: bool, token: str | None, tls_ca: Path | None,
              as_json: bool) -> None:
    """Stream AUDIO to the server at the pace of speech and render its live heatmaps as a GIF.

    Give IMAGE (sent with the call) or --collection C --image-id ID (an indexed image; IMAGE, if also
    given, is only the picture drawn under the heatmaps). Each GIF frame shows the heatmap of the
    latest speech over the image and the time it covers. Prints per-chunk latency (from sending a
    chunk to receiving the first heatmap that covers it): p50 / p95 / max.
    """
    from encoders import AudioDecodeError, ImageDecodeError, load_audio, load_image

    if len(paths) not in (1, 2) or (len(paths) == 1 and image_id is None):
        raise click.UsageError("give IMAGE AUDIO, or AUDIO with --collection C --image-id ID")
    if image_id is not None and not collection:
        raise click.UsageError("--image-id needs --collection")
    audio_path = paths[-1]
    picture_path = paths[0] if len(paths) == 2 else None
    try:
        waveform = load_audio(audio_path, 16000)  # the service resamples any rate; 16 kHz keeps chunks small
        picture = load_image(picture_path) if picture_path else None
    except (AudioDecodeError, ImageDecodeError) as error:
        raise click.ClickException(str(error)) from error
    pcm = np.clip(np.rint(waveform.numpy() * 32767), -32768, 32767).astype("<i2").tobytes()
    send_image = None if image_id is not None else picture_path
    try:
        with SearchClient(server, token=token, tls_ca=tls_ca) as client:
            stream = stream_highlights(client, pcm, 16000, chunk_ms=chunk_ms, realtime=not fast, image=send_image,
                                       image_id=image_id, collection=collection, window_seconds=window_seconds)
    except ServerUnreachable as error:
        click.echo(f"matchmap highlight: cannot reach a server at {server}: {error.details}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except SearchServiceError as error:
        click.echo(f"matchmap highlight: {error.code.name}: {error.details}", err=True)
        sys.exit(EXIT_QUERY_FAILED)
    if not stream.frames:
        raise click.ClickException("the server sent no heatmap (was the audio empty?)")
    save_gif(highlight_frames(picture, stream.frames), stream.frames, out)
    summary = {"out": str(out), "frames": len(stream.frames), "chunk_ms": chunk_ms, "audio_seconds": stream.audio_seconds,
               "latency": latency_summary(stream.chunk_latencies_ms)}
    if as_json:
        summary["spans"] = [[f.heatmap.start_seconds, f.heatmap.end_seconds] for f in stream.frames]
        click.echo(json.dumps(summary, indent=2))
    else:
        lat = summary["latency"]
        click.echo(f"wrote {out}: {len(stream.frames)} frames for {stream.chunks} chunks of {chunk_ms:g} ms; "
                   f"chunk latency p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, max {lat['max_ms']:.1f} ms")
