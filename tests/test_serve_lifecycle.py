"""The server's life as an operator sees it: starting where the port is taken, a readiness line for
scripts, clients that wait for it, backpressure, draining on stop, mutual TLS and token warnings."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer import Library
from search.cli import query
from search.client import SearchClient, SearchServiceError
from search.engine import SearchEngine
from search.server import ServerOptions, ServerThread
from training.manifest import load_manifest

COLLECTION = "few"


@pytest.fixture(scope="module")
def val(tiny_corpus):
    return load_manifest(tiny_corpus / "val.json")


@pytest.fixture(scope="module")
def data_dir(val, checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle_library")
    from encoders import create_model

    with Library.open(folder) as library:
        library.index(COLLECTION, [str(val.image_path(e)) for e in val.entries[:6]], create_model(str(checkpoint)),
                      progress=False)
    return folder


@pytest.fixture(scope="module")
def engine(checkpoint, data_dir):
    engine = SearchEngine.open(checkpoint, data_dir, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def caption(val):
    return val.audio_path(val.entries[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(data_dir, checkpoint, port: int, *extra: str, http: int = 0) -> list[str]:
    return [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(data_dir), "--checkpoint", str(checkpoint),
            "--host", "127.0.0.1", "--port", str(port), "--http", str(http), "--device", "cpu", *extra]


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_serve_on_a_taken_port_says_so_in_one_line_and_exits_3(checkpoint, data_dir, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = serve_command(data_dir, checkpoint, port) if which == "grpc" else \
            serve_command(data_dir, checkpoint, free_port(), http=port)
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, MATCHMAP_TOKEN=""))
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "alembic" not in done.stderr  # no library chatter from opening the catalog
    problem = [line for line in done.stderr.splitlines() if "matchmap serve" in line]
    assert len(problem) == 1 and f"127.0.0.1:{port}" in problem[0] and "in use" in problem[0], done.stderr


def test_serve_json_readiness_line_and_query_wait(checkpoint, data_dir, caption):
    port = free_port()
    process = subprocess.Popen(serve_command(data_dir, checkpoint, port, "--json"), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, MATCHMAP_TOKEN=""))
    try:
        # Sent right after start, as `matchmap serve & matchmap query ...` does: --wait bridges the load.
        result = CliRunner().invoke(query, [str(caption), "--server", f"127.0.0.1:{port}", "--collection", COLLECTION,
                                            "--wait", "120", "--json", "--top-k", "2"])
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.output)["queries"][0]["hits"]) == 2
        ready = json.loads(process.stdout.readline())
        assert ready["event"] == "ready" and ready["port"] == port and ready["collections"] == [COLLECTION]
        assert ready["security"] == "plaintext" and ready["token_required"] is False
        assert ready["http_url"].startswith("http://127.0.0.1:")
        held = json.loads(process.stdout.readline())  # the maps, held in the background after listening
        assert held["event"] == "held" and held["resident_maps_bytes"] > 0 and held["seconds"] > 0
        process.terminate()
        assert process.wait(60) == 0
        assert json.loads(process.stdout.readline()) == {"event": "stopped"}
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_held_energy_1_holds_every_dimension(checkpoint, data_dir, engine):
    """--held-energy reaches the engine: 1 holds every dimension of every map (bfloat16)."""
    size = engine.collection(COLLECTION).size
    rows, cols = engine.model.image_grid
    process = subprocess.Popen(serve_command(data_dir, checkpoint, free_port(), "--json", "--no-http",
                                             "--held-energy", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, MATCHMAP_TOKEN=""))
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        held = json.loads(process.stdout.readline())
        assert held["event"] == "held"
        assert held["resident_maps_bytes"] == size * rows * cols * engine.model.embed_dim * 2
        process.terminate()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_sigterm_right_after_the_ready_line_stops_the_server_gracefully(checkpoint, data_dir):
    """The ready line means the server can be stopped: a SIGTERM sent at once ends it cleanly (exit 0, the
    stopped line), several times over (the signal handlers are in place before the line is printed)."""
    for _ in range(3):
        process = subprocess.Popen(serve_command(data_dir, checkpoint, free_port(), "--json", "--no-http"),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, MATCHMAP_TOKEN=""))
        try:
            assert json.loads(process.stdout.readline())["event"] == "ready"
            process.terminate()
            assert process.wait(60) == 0
            assert {"event": "stopped"} in [json.loads(line) for line in process.stdout.read().splitlines()]
        finally:
            if process.poll() is None:
                process.kill()


def test_query_wait_gives_up_on_a_server_that_never_comes(caption):
    started = time.monotonic()
    result = CliRunner().invoke(query, [str(caption), "--server", f"127.0.0.1:{free_port()}", "--wait", "1.5"])
    assert result.exit_code == 3 and "not serving after 1.5 s" in result.output
    assert time.monotonic() - started < 20


def test_a_full_server_refuses_at_once_without_decoding(engine, caption, monkeypatch):
    release, busy = threading.Event(), threading.Event()
    decoded = []
    real_search_batch, real_decode = engine.search_batch, engine.trimmed_audio  # the server's first decoding step

    def slow_search_batch(*args):
        busy.set()
        release.wait(30)
        return real_search_batch(*args)

    def counting_decode(*args, **kwargs):
        decoded.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine, "search_batch", slow_search_batch)
    monkeypatch.setattr(engine, "trimmed_audio", counting_decode)
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, max_queue=1)) as server:
        with SearchClient(server.target, timeout=30) as client:
            first = threading.Thread(target=lambda: client.search(caption, COLLECTION, top_k=2))
            first.start()
            assert busy.wait(30)
            started = time.perf_counter()
            with pytest.raises(SearchServiceError) as refused:
                client.search(caption, COLLECTION, top_k=2)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert time.perf_counter() - started < 2 and len(decoded) == 1  # refused before decoding
            release.set()
            first.join(30)
            assert len(client.search(caption, COLLECTION, top_k=2)) == 2  # serving again


def test_stop_drains_not_serving_but_answering_then_refuses(engine, caption):
    running = ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, drain_seconds=3.0)).start()
    with SearchClient(running.target, timeout=10) as client, grpc.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(client.search(caption, COLLECTION, top_k=2)) == 2  # draining: still answered
        stopper.join(30)
        with pytest.raises(SearchServiceError) as refused:
            SearchClient(running.target, timeout=3).search(caption, COLLECTION)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(engine, caption, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl is not installed")
    ca_key, ca = tmp_path / "ca.key", tmp_path / "ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
            "-keyout", str(ca_key), "-out", str(ca))
    for name, cn in (("server", "localhost"), ("client", "a client"), ("stranger", "a stranger")):
        key, csr, cert = (tmp_path / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr))
        signer = ["-CA", str(ca), "-CAkey", str(ca_key)] if name != "stranger" else ["-signkey", str(key)]
        ext = tmp_path / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost\n")
        openssl("x509", "-req", "-in", str(csr), *signer, "-days", "1", "-out", str(cert), "-extfile", str(ext))
    options = ServerOptions(host="localhost", port=0, tls_cert=tmp_path / "server.pem",
                            tls_key=tmp_path / "server.key", tls_client_ca=ca)
    with ServerThread(engine, options) as secure:
        target = f"localhost:{secure.port}"
        with SearchClient(target, tls_ca=ca, tls_cert=tmp_path / "client.pem", tls_key=tmp_path / "client.key") as c:
            assert len(c.search(caption, COLLECTION, top_k=2)) == 2
        for cert in (None, "stranger"):
            kwargs = {} if cert is None else {"tls_cert": tmp_path / "stranger.pem", "tls_key": tmp_path / "stranger.key"}
            with SearchClient(target, tls_ca=ca, timeout=5, **kwargs) as c, pytest.raises(SearchServiceError):
                c.search(caption, COLLECTION, top_k=2)


def test_a_token_over_plaintext_off_loopback_is_warned_about(engine, caplog):
    caplog.set_level(logging.WARNING, logger="matchmap.server")
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, token="t")):
        pass
    assert not [r for r in caplog.records if "plaintext" in r.getMessage()]
    with ServerThread(engine, ServerOptions(host="0.0.0.0", port=0, token="t")):
        pass
    assert [r for r in caplog.records if "plaintext" in r.getMessage() and "0.0.0.0" in r.getMessage()]
