"""The search page and JSON API (search.web) end to end: the shipped model over a small spoken corpus,
a real server (gRPC and HTTP from one servicer) on loopback ports, real HTTP and WebSocket clients,
and headless Chromium recording from a fake microphone that plays a spoken caption."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
from google.protobuf import json_format
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from encoders import create_model
from indexer import Library
from protos.matchmap.v1 import search_pb2, search_pb2_grpc
from search.auth import bearer_metadata
from search.engine import SearchEngine
from search.server import ServerOptions, ServerThread
from training.manifest import load_manifest
from training.synth import synthesize_corpus

COLLECTION = "scenes"
TOKEN = "open-sesame"
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# MATCHMAP_DOC_SCREENSHOTS=1 copies the browser test's screenshots into docs/img/ (see docs/web.md).
DOC_SCREENSHOTS = os.environ.get("MATCHMAP_DOC_SCREENSHOTS") == "1"


# ---- fixtures: the shipped model, 16 spoken scenes indexed, one server with HTTP ---------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("web_corpus")
    synthesize_corpus(out, pairs=1, val_pairs=16, seed=1616, engines=("espeak", "festival"), workers=1, progress=False)
    return load_manifest(out / "val.json")


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web_library")
    with Library.open(folder) as library:
        images = [str(corpus.image_path(e).resolve()) for e in corpus.entries]
        report = library.index(COLLECTION, images, create_model(), progress=False)
    assert report.added == 16 and not report.failed
    return folder


@pytest.fixture(scope="module")
def engine(data_dir):
    engine = SearchEngine.open(None, data_dir, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, http_port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(engine):
    """The same engine behind a token."""
    with ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, http_port=0, token=TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield search_pb2_grpc.SpokenImageSearchStub(channel)


def http_port(running: ServerThread) -> int:
    return running.server.http.port


def request(running: ServerThread, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request to ``running``'s HTTP port."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port(running), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(running, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    status, _, data = request(running, "POST", path, body, {"Content-Type": "audio/wav", **(headers or {})})
    return status, json.loads(data)


def caption(corpus, i: int = 0) -> tuple[Path, str]:
    """(the wav of caption i, the file name of the image it describes)."""
    entry = corpus.entries[i]
    return corpus.audio_path(entry), corpus.image_path(entry).name


def to_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# ---- the JSON API answers as the gRPC API does -------------------------------------------------------------


def test_http_search_answers_as_grpc_does_and_finds_the_described_image(server, stub, corpus):
    for i in (0, 5):
        wav, described = caption(corpus, i)
        status, answer = post_json(server, f"/api/search?collection={COLLECTION}&top_k=5", wav.read_bytes())
        assert status == 200, answer
        over_grpc = to_json(stub.Search(search_pb2.SearchRequest(
            audio=search_pb2.AudioInput(encoded=wav.read_bytes()), collection=COLLECTION, top_k=5)))
        assert [h["image_id"] for h in answer["hits"]] == [h["image_id"] for h in over_grpc["hits"]]
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h["score"] for h in over_grpc["hits"]], rtol=1e-5)
        assert answer["collection_size"] == "16" and answer["model_version"] == over_grpc["model_version"]
        assert described in [Path(h["uri"]).name for h in answer["hits"][:3]]
    # raw PCM with ?sample_rate= is the AudioInput.pcm of the gRPC API
    samples, rate = soundfile.read(str(wav), dtype="int16")
    status, from_pcm = post_json(server, f"/api/search?collection={COLLECTION}&top_k=5&sample_rate={rate}",
                                 samples.astype("<i2").tobytes())
    assert status == 200 and [h["image_id"] for h in from_pcm["hits"]] == [h["image_id"] for h in answer["hits"]]


def test_collections_config_and_the_openapi_document(server, stub):
    status, _, body = request(server, "GET", "/api/collections")
    assert status == 200 and json.loads(body) == to_json(stub.ListCollections(search_pb2.ListCollectionsRequest()))
    status, _, body = request(server, "GET", "/api/config")
    config = json.loads(body)
    assert status == 200 and config["token_required"] is False and config["max_upload_mb"] == 16
    status, _, body = request(server, "GET", "/openapi.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in ("/api/search", "/api/localize", "/api/collections", "/api/collections/{collection}/images/{image_id}/thumbnail"):
        assert path in paths, path
    assert "audio/wav" in paths["/api/search"]["post"]["requestBody"]["content"]
    schemas = document["components"]["schemas"]
    # every reference resolves, and the response schemas are the .proto messages field for field
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)):
        assert ref in schemas, ref
    for message in (search_pb2.SearchResponse, search_pb2.Hit, search_pb2.LocalizeResponse, search_pb2.CollectionInfo):
        fields = {f.name for f in message.DESCRIPTOR.fields}
        assert set(schemas[message.DESCRIPTOR.full_name]["properties"]) == fields
    status, _, page = request(server, "GET", "/")
    assert status == 200 and b'<button id="record"' in page and b"/static/app.js" in page
    for asset in ("app.js", "recorder-worklet.js", "style.css"):
        assert request(server, "GET", f"/static/{asset}")[0] == 200


def test_localize_over_http_equals_grpc(server, stub, corpus):
    wav, _ = caption(corpus, 0)
    status, answer = post_json(server, f"/api/localize?collection={COLLECTION}&image_id=1&start_seconds=0.5&end_seconds=1.5",
                               wav.read_bytes())
    assert status == 200, answer
    over_grpc = to_json(stub.Localize(search_pb2.LocalizeRequest(
        audio=search_pb2.AudioInput(encoded=wav.read_bytes()), image_id="1", collection=COLLECTION,
        start_seconds=0.5, end_seconds=1.5)))
    assert answer["rows"] * answer["cols"] == len(answer["heatmap"]) == len(over_grpc["heatmap"])
    np.testing.assert_allclose(answer["heatmap"], over_grpc["heatmap"], rtol=1e-5, atol=1e-6)
    assert answer["frame_best_regions"] == over_grpc["frame_best_regions"]
    assert answer["start_seconds"] <= 0.5 and answer["end_seconds"] >= 1.5 - answer["frame_seconds"]


def test_thumbnails_are_small_cached_jpegs_and_the_image_is_as_the_model_saw_it(server, engine, corpus, tmp_path):
    big = tmp_path / "big.png"  # larger than a thumbnail (the corpus's images are 256 px)
    Image.open(corpus.image_path(corpus.entries[2])).resize((800, 600)).save(big)
    engine.library.index("big", [str(big)], engine.model, progress=False)
    coll = engine.collection("big")
    (image_id,) = coll.ids_for_uris([str(big)])[str(big)]
    path = f"/api/collections/big/images/{image_id}"
    status, headers, data = request(server, "GET", f"{path}/thumbnail")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and thumb.size == (256, 192) and len(data) < 40_000
    cached = list((coll.folder / "thumbnails").glob("*-256.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
    made = cached[0].stat().st_mtime_ns
    assert request(server, "GET", f"{path}/thumbnail")[2] == data
    assert cached[0].stat().st_mtime_ns == made  # served from the cache, not made again
    status, headers, full = request(server, "GET", f"{path}/image")  # heatmap_box is in its pixels
    assert status == 200 and Image.open(io.BytesIO(full)).size == (800, 600)


def test_an_indexed_file_that_vanished_is_a_404_that_does_not_name_its_path(server, engine, corpus, tmp_path):
    copy = tmp_path / "vanishing.png"
    shutil.copy(corpus.image_path(corpus.entries[0]), copy)
    engine.library.index("scratch", [str(copy)], engine.model, progress=False)
    (image_id,) = engine.library.collection("scratch").ids_for_uris([str(copy)])[str(copy)]
    copy.unlink()
    status, _, body = request(server, "GET", f"/api/collections/scratch/images/{image_id}/image")
    error = json.loads(body)["error"]
    assert status == 404 and error["code"] == "NOT_FOUND" and "can no longer be read" in error["message"]
    assert str(tmp_path) not in body.decode() and "vanishing" not in body.decode()


# ---- bad input: 4xx, a message naming the problem, never a path, and the server keeps serving -------------


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "PNG")
    return out.getvalue()


def _silence() -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(16000, dtype=np.int16), 16000, format="WAV")
    return out.getvalue()


BAD = [
    pytest.param("POST", f"/api/search?collection={COLLECTION}", lambda: b"\0" * (40 * 2**20), 413, "RESOURCE_EXHAUSTED",
                 "40.0 MB; this server accepts at most 16 MB", id="40 MB upload"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}", _png, 400, "INVALID_ARGUMENT", "cannot decode", id="not audio"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}", lambda: b"", 400, "INVALID_ARGUMENT", "audio is empty", id="empty"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}", _silence, 400, "INVALID_ARGUMENT", "silent", id="silence"),
    pytest.param("POST", "/api/search?collection=nope", "wav", 404, "NOT_FOUND", "no collection named 'nope'",
                 id="missing collection"),
    pytest.param("POST", "/api/search", "wav", 400, "INVALID_ARGUMENT", "query collection: Field required", id="no collection"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}&top_k=many", "wav", 400, "INVALID_ARGUMENT",
                 "query top_k: Input should be a valid integer", id="top_k not a number"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}&top_k=5000", "wav", 400, "INVALID_ARGUMENT", "top_k is 5000",
                 id="top_k too large"),
    pytest.param("POST", f"/api/search?collection={COLLECTION}&sample_rate=3", "wav", 400, "INVALID_ARGUMENT",
                 "sample_rate is 3 Hz", id="bad sample rate"),
    pytest.param("POST", f"/api/localize?collection={COLLECTION}&image_id=abc", "wav", 400, "INVALID_ARGUMENT",
                 "image_id 'abc' is not an image id", id="bad image id"),
    pytest.param("POST", f"/api/localize?collection={COLLECTION}&image_id=999", "wav", 404, "NOT_FOUND",
                 "no indexed image with id 999", id="unknown image"),
    pytest.param("POST", f"/api/localize?collection={COLLECTION}&image_id=1&start_seconds=50", "wav", 400, "OUT_OF_RANGE",
                 "", id="span after the audio"),
    pytest.param("GET", f"/api/collections/{COLLECTION}/images/999/thumbnail", None, 404, "NOT_FOUND",
                 "no indexed image with id 999", id="unknown thumbnail"),
    pytest.param("GET", "/api/nothing-here", None, 404, "NOT_FOUND", "/api/nothing-here", id="unknown path"),
    pytest.param("GET", "/api/search", None, 405, "UNIMPLEMENTED", "Method Not Allowed", id="wrong method"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "words"), BAD)
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(
        server, corpus, data_dir, method, path, body, status, code, words):
    wav, described = caption(corpus, 1)
    payload = wav.read_bytes() if body == "wav" else body() if callable(body) else None
    got, _, data = request(server, method, path, payload, {"Content-Type": "audio/wav"} if payload is not None else {})
    error = json.loads(data)["error"]
    assert (got, error["status"], error["code"]) == (status, status, code), error
    assert words in error["message"]
    text = data.decode()
    assert str(data_dir) not in text and str(wav.parent) not in text and "sqlite" not in text
    ok, answer = post_json(server, f"/api/search?collection={COLLECTION}&top_k=3", wav.read_bytes())
    assert ok == 200 and described in [Path(h["uri"]).name for h in answer["hits"]]


def test_the_bearer_token_applies_to_http_as_to_grpc(guarded, corpus):
    wav, _ = caption(corpus, 0)
    status, headers, body = request(guarded, "GET", "/api/collections")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert "requires a token" in json.loads(body)["error"]["message"]
    status, _, body = request(guarded, "GET", "/api/collections", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "not valid" in json.loads(body)["error"]["message"]
    assert post_json(guarded, f"/api/search?collection={COLLECTION}", wav.read_bytes(), {"Authorization": "Bearer x"})[0] == 401
    assert request(guarded, "GET", f"/api/collections/{COLLECTION}/images/1/thumbnail")[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(guarded, "GET", "/api/collections", headers=auth)[0] == 200
    assert post_json(guarded, f"/api/search?collection={COLLECTION}", wav.read_bytes(), auth)[0] == 200
    config = json.loads(request(guarded, "GET", "/api/config")[2])  # the page must learn that it needs one
    assert config["token_required"] is True
    openapi = json.loads(request(guarded, "GET", "/openapi.json")[2])
    assert openapi["security"] == [{"bearer": []}]
    with grpc.insecure_channel(guarded.target) as channel:  # gRPC unchanged
        stub = search_pb2_grpc.SpokenImageSearchStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListCollections(search_pb2.ListCollectionsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.ListCollections(search_pb2.ListCollectionsRequest(), metadata=bearer_metadata(TOKEN))
    # the WebSocket: the token in the start message (browsers cannot set headers on a WebSocket)
    for token, expected in (("wrong", 4401), (None, 4401)):
        with ws_connect(f"ws://127.0.0.1:{http_port(guarded)}/api/highlight") as socket:
            socket.send(json.dumps({"collection": COLLECTION, "image_id": "1", "sample_rate": 16000, "token": token}))
            assert json.loads(socket.recv(10))["error"]["code"] == "UNAUTHENTICATED"
            assert_closed_with(socket, expected)
    assert len(list(highlight_frames(guarded, wav, token=TOKEN))) >= 3


def test_http_uses_the_servers_tls_certificate(engine, corpus, tls_files):
    cert, key = tls_files
    options = ServerOptions(host="localhost", port=0, http_port=0, tls_cert=cert, tls_key=key)
    with ServerThread(engine, options) as secure:
        assert secure.server.http.url == f"https://localhost:{http_port(secure)}/"
        conn = http.client.HTTPSConnection("localhost", http_port(secure), timeout=30,
                                           context=ssl.create_default_context(cafile=str(cert)))
        conn.request("POST", f"/api/search?collection={COLLECTION}&top_k=2", body=caption(corpus, 0)[0].read_bytes())
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["hits"]) == 2
        conn.close()
        plaintext = http.client.HTTPConnection("localhost", http_port(secure), timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plaintext.request("GET", "/api/config")
            plaintext.getresponse().read()


# ---- live highlighting over a WebSocket ----------------------------------------------------------------------------


def highlight_frames(running, wav: Path, *, image_id: str = "1", token: str | None = None, chunk_s: float = 0.1):
    """Stream ``wav`` as s16le chunks to /api/highlight, then {"end": true}; yields the answers."""
    samples, rate = soundfile.read(str(wav), dtype="int16")
    pcm = samples.astype("<i2").tobytes()
    step = 2 * int(rate * chunk_s)
    with ws_connect(f"ws://127.0.0.1:{http_port(running)}/api/highlight") as socket:
        socket.send(json.dumps({"collection": COLLECTION, "image_id": image_id, "sample_rate": rate, "token": token}))
        for at in range(0, len(pcm), step):
            socket.send(pcm[at:at + step])
            time.sleep(chunk_s / 4)
        socket.send(json.dumps({"end": True}))
        while True:
            try:
                yield json.loads(socket.recv(30))
            except ConnectionClosed:  # by the server, after the last answer
                assert socket.close_code == 1000
                return


def assert_closed_with(socket, code: int) -> None:
    """The server closed ``socket`` with ``code`` (4000 + the HTTP status of an error)."""
    with pytest.raises(ConnectionClosed):
        socket.recv(10)
    assert socket.close_code == code


def test_live_highlighting_streams_heatmaps_of_the_latest_speech(server, corpus):
    wav, _ = caption(corpus, 0)
    seconds = soundfile.info(str(wav)).duration
    frames = list(highlight_frames(server, wav))
    assert len(frames) >= 3 and all("error" not in f for f in frames)
    assert all(len(f["heatmap"]) == f["rows"] * f["cols"] == 64 for f in frames)
    ends = [f["end_seconds"] for f in frames]
    assert ends == sorted(ends) and ends[-1] == pytest.approx(seconds, abs=0.15)
    assert all(f["end_seconds"] - f["start_seconds"] <= 1.0 + 0.2 for f in frames)  # the latest second (whole frames)


@pytest.mark.parametrize(("start", "code", "words"), [
    ({"collection": "nope", "image_id": "1", "sample_rate": 16000}, 4404, "no collection named 'nope'"),
    ({"collection": COLLECTION, "image_id": "1", "sample_rate": 3}, 4400, "sample_rate is 3 Hz"),
    ({"collection": COLLECTION, "image_id": "1", "sample_rate": "fast"}, 4400, "sample_rate must be a whole number"),
    ("not json", 4400, "the start message is not valid"),
])
def test_a_bad_highlight_start_is_answered_and_closed(server, corpus, start, code, words):
    with ws_connect(f"ws://127.0.0.1:{http_port(server)}/api/highlight") as socket:
        socket.send(start if isinstance(start, str) else json.dumps(start))
        assert words in json.loads(socket.recv(10))["error"]["message"]
        assert_closed_with(socket, code)
    assert len(list(highlight_frames(server, caption(corpus, 0)[0]))) >= 3  # still serving


def test_stopping_the_server_finishes_in_flight_http_requests_then_refuses_new_ones(engine, corpus):
    running = ServerThread(engine, ServerOptions(host="127.0.0.1", port=0, http_port=0)).start()
    port = http_port(running)
    wav = caption(corpus, 0)[0].read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", f"/api/search?collection={COLLECTION}&top_k=3")
    conn.putheader("Content-Length", str(len(wav)))
    conn.endheaders()
    conn.send(wav[:1000])  # in flight: the rest of the body comes after the stop began
    time.sleep(0.3)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 30})
    stopper.start()
    time.sleep(0.5)
    conn.send(wav[1000:])
    response = conn.getresponse()
    assert response.status == 200 and len(json.loads(response.read())["hits"]) == 3
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/")


# ---- the serve command ---------------------------------------------------------------------------------------------------


def test_serve_command_serves_http_beside_grpc_and_stops_both_on_sigterm(data_dir, corpus):
    env = dict(os.environ, MATCHMAP_TOKEN="")
    process = subprocess.Popen(
        [sys.executable, "-m", "matchmap", "serve", "--data-dir", str(data_dir), "--port", "0", "--http", "0",
         "--host", "127.0.0.1", "--device", "cpu", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        lines, deadline = [], time.monotonic() + 120
        while not any("search page" in line for line in lines) and time.monotonic() < deadline:
            lines.append(process.stderr.readline())
            assert lines[-1] or process.poll() is None, f"the server exited: {lines}"
        grpc_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        http_url = re.search(r"search page and JSON API on (http://127\.0\.0\.1:(\d+)/)", "".join(lines))
        port = int(http_url.group(2))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", f"/api/search?collection={COLLECTION}&top_k=3", body=caption(corpus, 2)[0].read_bytes())
        answer = json.loads(conn.getresponse().read())
        assert len(answer["hits"]) == 3
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = search_pb2_grpc.SpokenImageSearchStub(channel)
            assert COLLECTION in [c.name for c in stub.ListCollections(search_pb2.ListCollectionsRequest()).collections]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "stopped" in process.stderr.read()
        with pytest.raises(OSError):
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/")
    finally:
        if process.poll() is None:
            process.kill()


# ---- the page in a real browser ----------------------------------------------------------------------------------------


def spoken_query(wav: Path, out: Path) -> Path:
    """``wav`` with 0.3 s of silence before and 1 s after, as a 16-bit WAV Chromium's fake microphone plays."""
    samples, rate = soundfile.read(str(wav), dtype="int16")
    silence = np.zeros(rate, dtype=np.int16)
    soundfile.write(str(out), np.concatenate([silence[: rate * 3 // 10], samples, silence]), rate, subtype="PCM_16")
    return out


@pytest.fixture(scope="module")
def browser(corpus, tmp_path_factory):
    """Headless Debian Chromium whose microphone plays caption 3 once (Selenium against the system
    chromedriver: Selenium Manager downloads nothing)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/system-setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    query = spoken_query(caption(corpus, 3)[0], tmp_path_factory.mktemp("mic") / "query.wav")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1300",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={query}%noloop"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition())


def screenshot(element_or_driver, name: str, out: Path) -> Path:
    path = out / name
    (element_or_driver.save_screenshot if hasattr(element_or_driver, "save_screenshot") else element_or_driver.screenshot)(str(path))
    if DOC_SCREENSHOTS:  # a 128-colour palette keeps each picture under 300 KB
        Image.open(path).convert("RGB").quantize(colors=128).save(ROOT / "docs" / "img" / name, optimize=True)
    return path


def test_the_page_records_from_the_microphone_and_finds_the_described_image(browser, server, corpus, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    by_id = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    phase = lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-phase")  # noqa: E731
    wav, described = caption(corpus, 3)
    browser.get(f"http://127.0.0.1:{http_port(server)}/")
    wait_for(browser, lambda: by_id("record").is_enabled())
    assert not by_id("token-field").is_displayed()
    Select(by_id("collection")).select_by_value(COLLECTION)

    # speak: Record (from the keyboard), the fake microphone plays the caption, Stop
    by_id("record").send_keys(Keys.SPACE)
    wait_for(browser, lambda: phase() == "recording")
    time.sleep(soundfile.info(str(wav)).duration + 1.0)
    by_id("record").click()
    wait_for(browser, lambda: phase() in ("results", "error"))
    assert phase() == "results", by_id("error").text
    hits = browser.find_elements(By.CSS_SELECTOR, ".hit")
    names = [h.get_attribute("data-name") for h in hits]
    assert described in names[:3], (described, names)
    wait_for(browser, lambda: all(i.get_attribute("data-loaded") for i in browser.find_elements(By.CSS_SELECTOR, ".hit img")))
    natural = browser.execute_script("return [...document.querySelectorAll('.hit img')].map(i => Math.max(i.naturalWidth, i.naturalHeight))")
    assert max(natural) <= 256  # the grid gets thumbnails, never full-size images
    screenshot(browser, "web-results.png", tmp_path)

    # the heatmap of the described image; move along the recording with the keyboard
    described_hit = hits[names.index(described)]
    described_hit.click()
    wait_for(browser, lambda: by_id("detail").get_attribute("data-ready") == "1")
    assert described in by_id("detail-title").text
    by_id("moment").send_keys(Keys.ARROW_RIGHT * 10)
    wait_for(browser, lambda: by_id("moment-info").text.endswith("s of the query"))
    painted = browser.execute_script(  # the share of the canvas's pixels the heatmap changed
        "const c = document.getElementById('heat-canvas'); const plain = new OffscreenCanvas(c.width, c.height);"
        "const img = new Image(); img.src = arguments[0]; await img.decode();"
        "plain.getContext('2d').drawImage(img, 0, 0, c.width, c.height);"
        "const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "const b = plain.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < a.length; i += 4) if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 2] - b[i + 2]) > 40) n++;"
        "return n / (a.length / 4);",
        f"/api/collections/{COLLECTION}/images/{described_hit.get_attribute('data-image-id')}/image")
    assert 0.05 < painted < 0.95  # a heatmap over the image: part of it coloured, not all, not none
    screenshot(by_id("detail"), "web-heatmap.png", tmp_path)

    # speaking again streams to the top hit's live highlighting while recording
    by_id("record").click()
    wait_for(browser, lambda: int(by_id("live").get_attribute("data-frames") or 0) >= 2, timeout=20)
    by_id("record").click()
    wait_for(browser, lambda: phase() in ("results", "error"))


def test_the_page_says_what_is_wrong_with_bad_input_and_keeps_working(browser, server, corpus, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    by_id = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    browser.get(f"http://127.0.0.1:{http_port(server)}/")
    wait_for(browser, lambda: by_id("record").is_enabled())
    Select(by_id("collection")).select_by_value(COLLECTION)

    def upload(path: Path) -> str:
        browser.execute_script("document.getElementById('error').hidden = true; document.body.dataset.phase = ''")
        by_id("file").send_keys(str(path))
        wait_for(browser, lambda: by_id("error").is_displayed() or browser.find_element(By.TAG_NAME, "body").get_attribute("data-phase") == "results")
        return by_id("error").text if by_id("error").is_displayed() else ""

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not audio")
    assert re.match(r"Error 400: .*cannot decode", upload(notes))
    huge = tmp_path / "huge.wav"
    with huge.open("wb") as f:
        f.truncate(40 * 2**20)
    message = upload(huge)
    assert message.startswith("Error 413:") and "40.0 MB" in message and "at most 16 MB" in message
    browser.execute_script("const s = document.getElementById('collection'); s.add(new Option('gone', 'gone')); s.value = 'gone';")
    assert upload(caption(corpus, 4)[0]).startswith("Error 404: no collection named 'gone'")
    browser.execute_script(f"document.getElementById('collection').value = '{COLLECTION}'")
    assert upload(caption(corpus, 4)[0]) == ""  # still serving: results
    assert caption(corpus, 4)[1] in [h.get_attribute("data-name") for h in browser.find_elements(By.CSS_SELECTOR, ".hit")][:3]


def test_the_page_asks_for_the_token_and_says_when_it_is_wrong(browser, guarded):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    by_id = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    browser.get(f"http://127.0.0.1:{http_port(guarded)}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(browser, lambda: by_id("error").is_displayed())
    assert by_id("token-field").is_displayed() and "Error 401" in by_id("error").text
    by_id("token").send_keys("wrong" + Keys.TAB)
    wait_for(browser, lambda: "not valid" in by_id("error").text)
    assert not by_id("record").is_enabled()
    by_id("token").clear()
    by_id("token").send_keys(TOKEN + Keys.TAB)
    wait_for(browser, lambda: by_id("record").is_enabled())
    assert not by_id("error").is_displayed()
    browser.execute_script("localStorage.clear()")
