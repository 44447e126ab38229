"""Units of the search service that need no model or collection: audio checks, spans, heatmaps, batching."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile
import torch

from encoders import AudioDecodeError, create_model
from indexer import Library
from search.audio import decode_audio
from search.batcher import MicroBatcher
from search.engine import SearchEngine, center_crop_box, length_groups
from search.errors import InvalidQuery, Overloaded, QueryOutOfRange, ShuttingDown
from search.localization import LiveHighlighter, localize_audio_map, span_frames

RATE = 16000


def wav_bytes(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int = RATE, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# ---- decode_audio ---------------------------------------------------------------------------------


def test_decode_accepts_wav_and_pcm_and_resamples():
    wave = decode_audio(wav_bytes(tone(1.0, rate=22050), rate=22050))
    assert wave.dtype == torch.float32 and abs(wave.numel() - RATE) <= 2
    pcm = (tone(0.5, rate=8000) * 32767).astype("<i2").tobytes()
    wave = decode_audio(pcm, sample_rate=8000)
    assert abs(wave.numel() - RATE // 2) <= 2


@pytest.mark.parametrize(
    "data, sample_rate, error, words",
    [
        (b"", None, InvalidQuery, "empty"),
        (b"\x00\x01garbage that is not audio" * 10, None, AudioDecodeError, "cannot decode"),
        (wav_bytes(tone(1.0))[:3000], None, AudioDecodeError, "truncated"),
        (b"\x01\x02\x03", 16000, AudioDecodeError, "16-bit"),
        (b"\x01\x02\x03\x04", 0, InvalidQuery, "sample_rate is 0"),
        (b"\x01\x02\x03\x04", 10**9, InvalidQuery, "between"),
        (b"\x01\x02\x03\x04", 191_999, InvalidQuery, "common rate"),
        (wav_bytes(tone(0.1, rate=12_347), rate=12_347), None, InvalidQuery, "common rate"),
        (wav_bytes(np.zeros(RATE, np.float32)), None, InvalidQuery, "silent"),
        (np.zeros(RATE, "<i2").tobytes(), 16000, InvalidQuery, "silent"),
        (wav_bytes(np.full(RATE, np.nan, np.float32), subtype="FLOAT"), None, AudioDecodeError, "NaN"),
        (wav_bytes(tone(31.0, rate=8000), rate=8000), None, InvalidQuery, "limit of 30"),
        ((tone(31.0) * 32767).astype("<i2").tobytes(), 16000, InvalidQuery, "limit of 30"),
    ],
    ids=["empty", "garbage", "truncated-wav", "odd-pcm", "zero-rate", "absurd-rate", "coprime-rate-pcm",
         "coprime-rate-wav", "silent-wav",
         "silent-pcm", "nan-samples", "too-long-wav", "too-long-pcm"],
)
def test_decode_rejects_bad_audio_with_a_message_naming_the_problem(data, sample_rate, error, words):
    with pytest.raises(error, match=words):
        decode_audio(data, sample_rate=sample_rate, max_seconds=30.0, name="query")


def test_too_long_audio_is_refused_from_its_header_without_decoding(monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("a file over the limit was decoded")

    monkeypatch.setattr("search.audio.load_audio", must_not_decode)
    with pytest.raises(InvalidQuery, match="lasts 40.00 s"):
        decode_audio(wav_bytes(tone(40.0, rate=4000), rate=4000), max_seconds=30.0)


# ---- spans and heatmaps --------------------------------------------------------------------------


def test_span_frames_cover_the_span_and_refuse_impossible_ones():
    assert span_frames(None, 10, 0.16) == (0, 10)
    assert span_frames((0.0, 0.0), 10, 0.16) == (0, 10)
    assert span_frames((0.2, 0.5), 10, 0.16) == (1, 4)
    assert span_frames((0.5, 0.0), 10, 0.16) == (3, 10)  # end 0 = to the end
    assert span_frames((1.0, 99.0), 10, 0.16) == (6, 10)  # clipped to the audio
    for bad in [(-1.0, 1.0), (0.5, 0.2), (2.0, 3.0), (float("nan"), 1.0), (0.0, float("inf"))]:
        with pytest.raises(QueryOutOfRange):
            span_frames(bad, 10, 0.16)


def test_heatmap_peaks_where_the_spans_frames_match():
    # Four regions with orthogonal features; frame t of the audio is region (t % 4)'s feature.
    d = 8
    basis = torch.eye(d)[:4]
    image_map = basis.reshape(2, 2, d)
    audio = torch.stack([basis[t % 4] for t in range(8)])
    frame = 0.16
    for t in range(8):
        result = localize_audio_map(image_map, audio, frame, (t * frame, (t + 1) * frame))
        assert (result.start_seconds, result.end_seconds) == pytest.approx((t * frame, (t + 1) * frame))
        row, col = divmod(t % 4, 2)
        assert result.heatmap[row, col] == 1.0
        assert float(result.heatmap.sum()) == 1.0  # the other regions are at the minimum
    whole = localize_audio_map(image_map, audio, frame)
    assert torch.equal(whole.frame_best_regions, torch.tensor([t % 4 for t in range(8)]))
    assert whole.frame_scores.tolist() == [1.0] * 8
    assert whole.score == pytest.approx(1.0)  # MISA: every frame finds a perfect region
    assert (whole.heat_min, whole.heat_max) == (1.0, 1.0) and float(whole.heatmap.max()) == 0.0


def test_center_crop_box_is_the_square_the_front_end_keeps():
    assert center_crop_box(256, 256, 146, 128) == pytest.approx((15.78, 15.78, 240.22, 240.22), abs=0.01)
    x0, y0, x1, y1 = center_crop_box(400, 200, 146, 128)
    assert (x1 - x0, y1 - y0) == pytest.approx((200 * 128 / 146,) * 2)
    assert (x0 + x1) / 2 == pytest.approx(200) and (y0 + y1) / 2 == pytest.approx(100)


# ---- micro-batching ------------------------------------------------------------------------------


def test_batcher_groups_what_queued_while_busy_and_isolates_failures():
    batches: list[list[int]] = []

    def process(items, waits):
        batches.append(list(items))
        time.sleep(0.05)  # the model is busy: later submissions queue up
        return [ValueError(f"bad item {i}") if i == 3 else i * 10 for i in items]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(process, pool, max_batch=8)
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.01)  # item 0 is being processed alone
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
            results = await asyncio.gather(first, *rest, return_exceptions=True)
            await batcher.close()
            with pytest.raises(ShuttingDown):
                await batcher.submit(7)
            return results

    results = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], ValueError) and "bad item 3" in str(results[3])


def test_batcher_drops_items_whose_caller_gave_up_before_their_batch():
    seen: list[int] = []

    def process(items, waits):
        seen.extend(items)
        time.sleep(0.05)
        return list(items)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(process, pool)
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.01)  # item 0 is running
            impatient = asyncio.ensure_future(asyncio.wait_for(batcher.submit(1), timeout=0.01))
            patient = asyncio.ensure_future(batcher.submit(2))
            with pytest.raises(asyncio.TimeoutError):
                await impatient  # its deadline passes while item 0 runs
            assert await first == 0 and await patient == 2
            await batcher.close()

    asyncio.run(scenario())
    assert seen == [0, 2]


def test_batcher_refuses_beyond_its_queue_and_close_finishes_queued_items():
    started, release = threading.Event(), threading.Event()

    def process(items, waits):
        started.set()
        release.wait(5)
        return list(items)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(process, pool, max_batch=1, max_queue=2)
            accepted = [asyncio.ensure_future(batcher.submit(0))]
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)  # item 0 is running
            accepted += [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
            await asyncio.sleep(0.01)  # items 1 and 2 are queued
            with pytest.raises(Overloaded, match="2 queries are already queued"):
                await batcher.submit(99)
            release.set()
            await batcher.close()  # returns only after the queued items ran
            assert all(f.done() for f in accepted)
            return [f.result() for f in accepted]

    assert asyncio.run(scenario()) == [0, 1, 2]


# ---- batched encoding ----------------------------------------------------------------------------


def test_length_groups_bound_the_padding_and_cover_every_query():
    lengths = [300, 100, 290, 310, 120, 1000, 95]
    groups = length_groups(lengths, max_padding=0.2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        true = sum(lengths[i] for i in g)
        assert max(lengths[i] for i in g) * len(g) <= 1.2 * true
    assert [sorted(g) for g in groups] == [[1, 4, 6], [0, 2, 3], [5]]
    assert length_groups([200] * 8) == [list(range(8))]


def test_batched_encoding_equals_encoding_each_query_alone(tmp_path):
    torch.manual_seed(0)
    with Library.open(tmp_path) as library:
        engine = SearchEngine(create_model("tiny"), library, device="cpu")
        rng = np.random.default_rng(0)
        waveforms = [tone(s) + 0.05 * rng.standard_normal(int(s * RATE)).astype(np.float32) for s in (0.7, 2.9, 3.0, 1.1, 3.2)]
        logmels = [engine.model.audio_frontend.logmel(torch.from_numpy(w)) for w in waveforms]
        audio, lengths = engine.encode(logmels)
        for i, m in enumerate(logmels):
            alone, alone_length = engine.model.encode_audio(m.unsqueeze(0), torch.tensor([m.shape[1]]))
            assert int(lengths[i]) == int(alone_length[0])
            torch.testing.assert_close(audio[i, : lengths[i]], alone[0, : lengths[i]], rtol=1e-4, atol=1e-5)
            assert not audio[i, lengths[i] :].any()


def test_live_highlighter_localizes_the_latest_window_timed_from_the_stream_start():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    image_map = torch.randn(*model.image_grid, model.embed_dim)
    highlighter = LiveHighlighter(model, image_map, 8000, window_seconds=1.0, context_seconds=1.0)
    assert highlighter.localize_latest() is None
    pcm = (tone(6.0, rate=8000) * 32767).astype("<i2").tobytes()
    for i in range(0, len(pcm), 1001):  # odd-sized chunks split samples in half
        highlighter.push(pcm[i : i + 1001])
    assert highlighter.received_samples == 6 * 8000
    latest = highlighter.localize_latest()
    assert latest.end_seconds == pytest.approx(6.0, abs=0.01)
    assert 4.8 <= latest.start_seconds <= 5.0 + 1e-6  # the last second, in whole audio frames
    assert latest.heatmap.shape == model.image_grid and float(latest.heatmap.max()) == 1.0
    with pytest.raises(InvalidQuery):
        LiveHighlighter(model, image_map, 8000, window_seconds=0.0)


def test_the_held_basis_keeps_the_directions_the_region_vectors_use():
    """Region vectors in a 3-dim subspace of 48 dims, plus faint noise: the basis spans that subspace,
    rounded up to 16 directions; asked for every last bit of energy, it keeps every dimension (None)."""
    from search.resident import region_basis

    rng = np.random.default_rng(0)
    subspace = np.linalg.qr(rng.standard_normal((48, 3)))[0]  # (48, 3) orthonormal
    maps = (rng.standard_normal((40, 16, 3)) @ subspace.T + 1e-3 * rng.standard_normal((40, 16, 48)))
    basis = region_basis(maps.astype(np.float32), energy=0.99)
    assert basis.shape == (48, 16)
    in_basis = subspace.T @ basis.double().numpy()  # how much of each true direction the basis holds
    np.testing.assert_allclose(np.linalg.norm(in_basis, axis=1), 1.0, atol=1e-4)
    assert region_basis(maps.astype(np.float32), energy=1.0) is None


class HeldCollection:
    """What search.resident.held_for reads of a collection: its size, grid, ids and maps."""

    def __init__(self, maps: np.ndarray, grid: tuple[int, int]):
        self.maps, self.grid, self.name, self.generation = maps, grid, "c", 1
        self.size, self.embed_dim = len(maps), maps.shape[-1]

    def ids(self) -> np.ndarray:
        return np.arange(self.size)

    def feature_maps(self, ids) -> np.ndarray:
        return self.maps[np.asarray(ids)]

    def iter_feature_maps(self):
        yield self.ids(), self.maps


def test_held_maps_take_bfloat16_then_int8_then_the_most_directions_that_hold_the_floor():
    """As the budget shrinks: bfloat16 in the held basis, int8 in it, int8 in fewer principal directions
    while they hold energy_floor, then nothing (this collection's codes would not fit either); int8 maps
    score as the float maps in their basis do, to int8's precision."""
    from encoders.matchmap import paired_misa
    from search.resident import held_for, held_share, region_basis

    rng = np.random.default_rng(1)
    spread = 0.9 ** np.arange(64)  # a decaying spectrum over 64 dims
    directions = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    maps = ((rng.standard_normal((300, 16, 64)) * spread) @ directions.T).astype(np.float16)
    coll = HeldCollection(maps, (4, 4))
    assert region_basis(maps, energy=0.995).shape[1] == 32  # rounded up from about 26 directions
    per_dim = coll.size * 16  # int8 bytes per held dim

    def held(budget: float, floor: float = 0.99):
        return held_for(coll, lambda nbytes: nbytes <= budget, "cpu", energy=0.9999, energy_floor=floor)

    every = region_basis(maps, energy=0.9999).shape[1]
    assert every == 48
    assert held(2 * per_dim * every).maps.dtype == torch.bfloat16
    int8 = held(2 * per_dim * every - 1)
    assert int8.maps.dtype == torch.int8 and int8.maps.shape[-1] == every
    fewer = held(per_dim * 40)  # room for 32 directions in int8: they hold more than 0.99
    assert fewer.maps.dtype == torch.int8 and fewer.maps.shape[-1] == 32
    assert held_share(maps, region_basis(maps, dims=32)) > 0.99
    assert held(per_dim * 40, floor=0.99999) is None
    assert held(per_dim * 16 + 1) is None  # 16 directions hold less than 0.99

    audio = torch.randn(2, 7, 64)
    lengths = torch.tensor([7, 4])
    positions = np.stack([np.arange(0, 300, 3), np.arange(1, 301, 3)])
    valid = torch.ones(positions.shape, dtype=torch.bool)
    got = int8.paired_misa(audio, lengths, positions, valid)
    in_basis = torch.from_numpy(maps).float() @ int8.basis
    want = torch.stack([paired_misa(audio[b : b + 1] @ int8.basis, lengths[b : b + 1],
                                    in_basis[torch.from_numpy(positions[b])][None])[0] for b in range(2)])
    scale = float(want.abs().max())
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=0.02 * scale)
    assert not np.allclose(got.numpy(), want.numpy(), atol=1e-4 * scale)  # int8 is not free
