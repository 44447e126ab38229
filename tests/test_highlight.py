"""Live highlighting and the Localize call against a real gRPC server on a loopback port: the same
heatmap offline and through the service, and `matchmap highlight` streaming a caption into a GIF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from PIL import Image

from encoders import create_model
from search.cli import highlight, latency_summary, localize, pcm_chunks
from search.client import SearchClient
from search.engine import SearchEngine
from search.localization import LiveHighlighter
from search.server import ServerThread
from training.manifest import load_manifest


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """A server with an empty library: highlighting and localizing sent images needs no collection."""
    engine = SearchEngine.open(checkpoint, tmp_path_factory.mktemp("library"), device="cpu")
    with ServerThread(engine) as running:
        yield running
    engine.close()


@pytest.fixture(scope="module")
def caption(tiny_corpus) -> tuple[Path, Path]:
    val = load_manifest(tiny_corpus / "val.json")
    entry = val.entries[1]
    return val.image_path(entry), val.audio_path(entry)


def test_offline_heatmaps_equal_the_localize_call(server, checkpoint, caption, tmp_path):
    image, audio = caption
    result = CliRunner().invoke(localize, [str(image), str(audio), "--checkpoint", str(checkpoint), "--out",
                                           str(tmp_path / "heat.png"), "--span", "0.4:1.1", "--json"])
    assert result.exit_code == 0, result.output
    offline = json.loads(result.stdout)
    with SearchClient(server.target) as client:
        whole = client.localize(audio, image=image.read_bytes())
        span = client.localize(audio, image=image.read_bytes(), start_seconds=0.4, end_seconds=1.1)
    for panel, remote in zip(offline["panels"], [whole, span], strict=True):
        assert remote.values.shape == (offline["rows"], offline["cols"])
        np.testing.assert_allclose(np.asarray(panel["values"]), remote.values, atol=1e-5)
        assert (panel["start_seconds"], panel["end_seconds"]) == pytest.approx((remote.start_seconds, remote.end_seconds))
        assert (panel["heat_min"], panel["heat_max"]) == pytest.approx((remote.heat_min, remote.heat_max), rel=1e-5)
    assert list(whole.box) == offline["box"]
    assert whole.score == pytest.approx(offline["score"], rel=1e-5)


def test_highlight_streams_a_caption_into_a_gif(server, caption, tmp_path):
    image, audio = caption
    out = tmp_path / "live.gif"
    result = CliRunner().invoke(highlight, [str(image), str(audio), "--out", str(out), "--server", server.target,
                                            "--chunk-ms", "100", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    seconds = soundfile.info(str(audio)).duration
    chunks = int(np.ceil(seconds / 0.1 - 1e-9))
    assert summary["audio_seconds"] == pytest.approx(seconds, abs=1e-3)
    assert summary["latency"]["chunks"] == chunks  # every chunk was covered by some heatmap
    assert 0 < summary["latency"]["p50_ms"] <= summary["latency"]["p95_ms"] <= summary["latency"]["max_ms"]
    spans = summary["spans"]
    assert 1 <= summary["frames"] == len(spans) <= chunks
    assert spans[-1][1] == pytest.approx(seconds, abs=0.01)
    assert all(end - start <= 1.0 + 0.17 for start, end in spans)  # the default 1 s window, whole frames
    assert [end for _, end in spans] == sorted(end for _, end in spans)
    gif = Image.open(out)
    assert gif.format == "GIF" and gif.n_frames == summary["frames"]
    assert gif.width == 256 and gif.height > 256  # the image and the caption strip below it


def test_highlight_needs_an_image_and_reports_an_unreachable_server(caption, tmp_path):
    image, audio = caption
    alone = CliRunner().invoke(highlight, [str(audio), "--out", str(tmp_path / "x.gif")])
    assert alone.exit_code == 2 and "--image-id" in alone.output
    gone = CliRunner().invoke(highlight, [str(image), str(audio), "--out", str(tmp_path / "x.gif"),
                                          "--server", "127.0.0.1:1", "--fast"])
    assert gone.exit_code == 3 and "cannot reach" in gone.output


def test_chunks_and_latency_summary():
    pcm = bytes(range(256)) * 25  # 3200 samples
    chunks = pcm_chunks(pcm, 16000, 100.0)
    assert [len(c) for c in chunks] == [3200, 3200]
    assert b"".join(pcm_chunks(pcm, 8000, 30.0)) == pcm
    summary = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert summary == {"chunks": 5, "p50_ms": 3.0, "p95_ms": pytest.approx(4.8), "max_ms": 5.0}


def test_live_heatmaps_reach_the_last_sample_received():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    image_map = torch.randn(*model.image_grid, model.embed_dim)
    highlighter = LiveHighlighter(model, image_map, 16000, window_seconds=1.0, context_seconds=1.0)
    rng = np.random.default_rng(0)
    received = 0
    for samples in (1000, 2345, 7001, 16000, 24011):  # ends that fall inside an audio frame
        highlighter.push((rng.normal(0, 3000, samples)).astype("<i2").tobytes())
        received += samples
        latest = highlighter.localize_latest()
        assert latest.end_seconds == pytest.approx(received / 16000, abs=1e-9)
        assert latest.end_seconds - latest.start_seconds <= 1.0 + model.audio_frame_seconds
        assert latest.heatmap.shape == model.image_grid


def test_highlight_over_an_indexed_image_by_id(checkpoint, tiny_corpus, caption, tmp_path):
    from indexer import Library

    image, audio = caption
    library_dir = tmp_path / "library"
    with Library.open(library_dir, create=True) as library:
        library.index("scenes", [str(image)], create_model(checkpoint), progress=False)
        [[image_id]] = library.collection("scenes").ids_for_uris([str(image)]).values()
    engine = SearchEngine.open(checkpoint, library_dir, device="cpu")
    try:
        with ServerThread(engine) as running:
            runner = CliRunner()
            with_picture = runner.invoke(highlight, [str(image), str(audio), "--out", str(tmp_path / "a.gif"),
                                                     "--server", running.target, "--collection", "scenes",
                                                     "--image-id", str(image_id), "--fast", "--json"])
            assert with_picture.exit_code == 0, with_picture.output
            assert json.loads(with_picture.stdout)["frames"] >= 1
            assert Image.open(tmp_path / "a.gif").n_frames == json.loads(with_picture.stdout)["frames"]
            unknown = runner.invoke(highlight, [str(audio), "--out", str(tmp_path / "b.gif"), "--server",
                                                running.target, "--collection", "scenes", "--image-id", "999999",
                                                "--fast"])
            assert unknown.exit_code == 1
            assert "NOT_FOUND" in unknown.output
    finally:
        engine.close()
