"""Front ends on real files: espeak-ng speech written as WAV/FLAC/OGG at several rates, drawn images."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

from encoders.config import get_config
from encoders.formats import AUDIO_FORMATS_TEXT, TESTED_AUDIO_FORMATS
from encoders.frontend import (
    TRIM_MARGIN_SECONDS,
    AudioDecodeError,
    AudioFrontEnd,
    ImageDecodeError,
    ImageFrontEnd,
    load_audio,
    load_image,
    trim_silence,
    waveform_from_pcm,
)

AUDIO_CFG = get_config("tiny").audio
IMAGE_CFG = get_config("tiny").image


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    """A spoken caption from espeak-ng: (samples float32, sample rate)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system installs it)")
    path = tmp_path_factory.mktemp("speech") / "caption.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(path), "a big red circle and a small blue star on the grass"], check=True
    )
    samples, rate = soundfile.read(path, dtype="float32")
    return samples, rate


def _encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    subtype = "PCM_16" if fmt == "WAV" else None
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _at_duration(samples: np.ndarray, seconds: float, rate: int, native_rate: int) -> np.ndarray:
    """Speech resampled to ``rate`` and tiled or cut to ``seconds``."""
    resampled = np.interp(
        np.arange(0, len(samples), native_rate / rate), np.arange(len(samples)), samples
    ).astype(np.float32)
    n = round(seconds * rate)
    return np.resize(resampled, n)


@pytest.mark.parametrize("seconds", [0.3, 1.0, 4.0, 12.0])
@pytest.mark.parametrize(
    ("rate", "channels", "fmt"),
    [(8000, 1, "WAV"), (16000, 1, "FLAC"), (22050, 1, "OGG"), (44100, 2, "WAV")],
)
def test_logmel_shape_and_true_length(speech, tmp_path, seconds, rate, channels, fmt):
    samples = _at_duration(*speech[:1], seconds, rate, speech[1])
    if channels == 2:
        samples = np.stack([samples, 0.5 * samples], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(_encode(samples, rate, fmt))

    waveform = load_audio(path)
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert abs(waveform.numel() - seconds * 16000) <= 16000 * 0.002 + 2

    front = AudioFrontEnd(AUDIO_CFG)
    logmel, length = front(waveform)
    assert logmel.shape == (40, 1024) and logmel.dtype == torch.float32
    expected = min(1024, int((seconds * 16000 - 400) // 160) + 1)
    assert abs(length - expected) <= 1
    assert torch.all(logmel[:, length:] == 0), "padding must be zeros"
    assert torch.isfinite(logmel).all()
    assert logmel[:, :length].std() > 0.5


@pytest.mark.parametrize(("name", "container", "subtype"), TESTED_AUDIO_FORMATS)
def test_every_listed_audio_format_decodes_to_the_same_speech(speech, tmp_path, name, container, subtype):
    samples = _at_duration(speech[0], len(speech[0]) / speech[1], 16000, speech[1])
    path = tmp_path / f"caption.{container.lower()}"
    soundfile.write(path, samples, 16000, format=container, subtype=subtype)
    decoded = load_audio(path).numpy()
    assert abs(len(decoded) - len(samples)) <= 16000 * 0.01, name  # gapless: no codec delay left in
    n = min(len(decoded), len(samples))
    assert np.corrcoef(decoded[:n], samples[:n])[0, 1] > 0.98, name
    assert name.split()[0] in AUDIO_FORMATS_TEXT


def test_passing_the_native_rate_resamples(speech):
    samples, rate = speech
    front = AudioFrontEnd(AUDIO_CFG)
    direct, n_direct = front(torch.from_numpy(samples), sample_rate=rate)
    via_loader, n_loader = front(load_audio(_encode(samples, rate, "FLAC")))
    assert n_direct == n_loader
    torch.testing.assert_close(direct, via_loader, rtol=0, atol=1e-3)


def test_features_do_not_depend_on_loudness(speech):
    samples, rate = speech
    front = AudioFrontEnd(AUDIO_CFG)
    waveform = torch.from_numpy(samples)
    loud, n = front(waveform, rate)
    quiet, n_quiet = front(0.1 * waveform, rate)
    assert n == n_quiet
    assert (loud - quiet).abs().max() < 1e-3


@pytest.mark.parametrize("silence_level", [0.0, 1e-4])
def test_leading_and_trailing_silence_do_not_dominate_normalization(speech, silence_level):
    samples, rate = speech
    front = AudioFrontEnd(AUDIO_CFG)
    plain, n = front(torch.from_numpy(samples), rate)
    pad = round(2.0 * rate)  # 2 s of silence (or faint noise) on each side, longer than the speech
    noise = silence_level * np.random.default_rng(0).standard_normal(pad).astype(np.float32)
    padded_wave = np.concatenate([noise, samples, noise])
    padded, n_padded = front(torch.from_numpy(padded_wave), rate)
    offset = 200  # 2 s of 10 ms frames
    assert n_padded > n + 2 * offset - 5
    speech_part = padded[:, offset : offset + n - 2]
    assert (speech_part - plain[:, : n - 2]).abs().mean() < 0.05


@pytest.mark.parametrize("silence_level", [0.0, 1e-4])
def test_trim_silence_keeps_the_speech_and_a_margin_of_silence(speech, silence_level):
    samples, rate = speech
    wave = torch.from_numpy(samples)
    pad = round(1.5 * rate)
    noise = torch.from_numpy(silence_level * np.random.default_rng(1).standard_normal(pad).astype(np.float32))
    padded = torch.cat([noise, wave, noise])
    trimmed = trim_silence(padded, rate)
    plain = trim_silence(wave, rate)
    # all the speech comes out (as much as from the unpadded recording, whose own margins are shorter),
    # with at most TRIM_MARGIN_SECONDS of silence (plus a frame) per side
    assert trimmed.numel() >= plain.numel() - round(0.02 * rate)
    assert trimmed.numel() <= wave.numel() + 2 * round((TRIM_MARGIN_SECONDS + 0.01) * rate)
    assert trimmed.abs().max() == wave.abs().max()
    assert trimmed.numel() < padded.numel() - 2 * rate  # most of the 3 s of silence is gone


def test_trim_silence_leaves_silent_and_tiny_input_alone():
    silent = torch.zeros(16000)
    assert torch.equal(trim_silence(silent, 16000), silent)
    tiny = torch.ones(50)
    assert torch.equal(trim_silence(tiny, 16000), tiny)


def test_long_audio_is_cut_to_max_frames(speech):
    samples, rate = speech
    front = AudioFrontEnd(AUDIO_CFG)
    long_wave = torch.from_numpy(np.tile(samples, 10))  # ~30 s
    logmel, length = front(long_wave, rate)
    assert length == 1024 and logmel.shape == (40, 1024)
    assert front.frame_seconds == pytest.approx(0.01)


def test_very_short_audio_gives_one_frame():
    logmel, length = AudioFrontEnd(AUDIO_CFG)(torch.randn(100))
    assert length == 1 and torch.all(logmel[:, 1:] == 0)


def test_front_end_rejects_bad_waveforms():
    front = AudioFrontEnd(AUDIO_CFG)
    with pytest.raises(ValueError, match="1-D float"):
        front(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="empty"):
        front(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        front(torch.tensor([0.0, float("nan")] * 300))


def test_decode_errors_name_the_input(speech):
    samples, rate = speech
    wav = _encode(samples, rate, "WAV")
    flac = _encode(samples, rate, "FLAC")
    with pytest.raises(AudioDecodeError, match=r"'query\.wav'.*empty"):
        load_audio(b"", name="query.wav")
    with pytest.raises(AudioDecodeError, match=r"'noise\.bin'.*cannot decode"):
        load_audio(b"this is not audio at all" * 20, name="noise.bin")
    with pytest.raises(AudioDecodeError, match=r"'cut\.wav'.*truncated"):
        load_audio(wav[: len(wav) // 2], name="cut.wav")
    with pytest.raises(AudioDecodeError, match=r"'cut\.flac'"):
        load_audio(flac[: len(flac) // 2], name="cut.flac")
    with pytest.raises(AudioDecodeError, match=r"'header\.wav'.*truncated WAV"):
        load_audio(wav[:44], name="header.wav")
    with pytest.raises(AudioDecodeError, match=r"'silent\.wav'.*no samples"):
        load_audio(_encode(np.zeros(0, dtype=np.float32), rate, "WAV"), name="silent.wav")
    bad = samples.copy()
    bad[100] = np.nan
    buf = io.BytesIO()
    soundfile.write(buf, bad, rate, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match=r"'nan\.wav'.*NaN"):
        load_audio(buf.getvalue(), name="nan.wav")


def test_decode_error_names_a_path(tmp_path):
    path = tmp_path / "broken.ogg"
    path.write_bytes(b"OggS" + bytes(200))
    with pytest.raises(AudioDecodeError, match="broken.ogg"):
        load_audio(path)


def test_raw_pcm_matches_the_same_samples_as_a_wav(speech):
    samples, rate = speech
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    from_pcm = waveform_from_pcm(pcm.tobytes(), rate)
    buf = io.BytesIO()
    soundfile.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    from_wav = load_audio(buf.getvalue())
    torch.testing.assert_close(from_pcm, from_wav, rtol=0, atol=1e-6)
    with pytest.raises(AudioDecodeError, match="not a whole number of 16-bit samples"):
        waveform_from_pcm(b"\x00\x01\x02", 16000)
    with pytest.raises(AudioDecodeError, match="empty"):
        waveform_from_pcm(b"", 16000)


def _scene(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 170, 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.2, height * 0.2, width * 0.6, height * 0.6], fill=(220, 30, 30))
    draw.rectangle([width * 0.6, height * 0.5, width * 0.9, height * 0.9], fill=(40, 80, 220))
    return image.convert(mode)


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "mode", "fmt"), [((300, 200), "RGB", "JPEG"), ((90, 160), "L", "PNG"), ((256, 256), "P", "GIF")]
)
def test_image_front_end_output(tmp_path, size, mode, fmt):
    path = tmp_path / f"scene.{fmt.lower()}"
    path.write_bytes(_image_bytes(_scene(*size, mode), fmt))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == size
    eval_front = ImageFrontEnd(IMAGE_CFG, train=False)
    x = eval_front(image)
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32
    torch.testing.assert_close(x, eval_front(image))  # center crop is deterministic
    train_front = ImageFrontEnd(IMAGE_CFG, train=True)
    assert train_front(image).shape == (3, 128, 128)


def test_random_crops_vary_and_normalization_uses_mean_and_std():
    image = _scene(300, 300)
    train_front = ImageFrontEnd(IMAGE_CFG, train=True)
    torch.manual_seed(0)
    crops = torch.stack([train_front(image) for _ in range(6)])
    assert (crops - crops[0]).abs().amax() > 0.1
    mean_color = tuple(round(255 * m) for m in IMAGE_CFG.mean)
    flat = ImageFrontEnd(IMAGE_CFG)(Image.new("RGB", (200, 150), mean_color))
    assert flat.abs().max() < 0.02


@pytest.mark.parametrize("size", [(400, 200), (200, 400), (300, 300)])
def test_eval_crop_is_the_centre_square(tmp_path, size):
    # Red everywhere except the square the eval front end should keep (shorter side scaled to
    # resize_size, centre input_size crop): green, with a blue mark in its top-left corner. A crop
    # taken elsewhere (a corner) shows red, and misplaces every heatmap drawn on the image.
    width, height = size
    side = IMAGE_CFG.input_size * min(width, height) / IMAGE_CFG.resize_size
    x0, y0 = (width - side) / 2, (height - side) / 2
    image = Image.new("RGB", size, (255, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x0 + side, y0 + side], fill=(0, 255, 0))
    draw.rectangle([x0 + 0.1 * side, y0 + 0.1 * side, x0 + 0.3 * side, y0 + 0.3 * side], fill=(0, 0, 255))
    path = tmp_path / "regions.png"
    image.save(path)
    x = ImageFrontEnd(IMAGE_CFG)(load_image(path))
    rgb = x * torch.tensor(IMAGE_CFG.std).view(3, 1, 1) + torch.tensor(IMAGE_CFG.mean).view(3, 1, 1)
    s = IMAGE_CFG.input_size
    mark = slice(round(0.1 * s) + 2, round(0.3 * s) - 2)
    expected = torch.zeros(3, s, s)
    expected[1] = 1.0
    expected[:, mark, mark] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    inside = slice(2, s - 2)  # the resize blurs the box's edges by a pixel or so
    blurred = torch.zeros(s, s, dtype=torch.bool)
    blurred[round(0.1 * s) - 2 : round(0.3 * s) + 3, round(0.1 * s) - 2 : round(0.3 * s) + 3] = True
    blurred[mark, mark] = False
    keep = ~blurred[inside, inside]
    torch.testing.assert_close(rgb[:, inside, inside][:, keep], expected[:, inside, inside][:, keep],
                               rtol=0, atol=0.02)
    assert rgb[0].amax() < 0.3, "no red: nothing outside the centre square"


def test_transparent_pixels_land_on_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image = load_image(_image_bytes(rgba, "PNG"))
    assert image.getpixel((10, 10)) == (255, 255, 255)


def test_image_decode_errors_name_the_input():
    jpeg = _image_bytes(_scene(200, 200), "JPEG")
    with pytest.raises(ImageDecodeError, match=r"'empty\.jpg'.*empty"):
        load_image(b"", name="empty.jpg")
    with pytest.raises(ImageDecodeError, match=r"'notes\.txt'.*not a recognized image"):
        load_image(b"hello, not an image" * 10, name="notes.txt")
    with pytest.raises(ImageDecodeError, match=r"'cut\.jpg'.*truncated"):
        load_image(jpeg[: len(jpeg) // 2], name="cut.jpg")
    with pytest.raises(TypeError, match="PIL image"):
        ImageFrontEnd(IMAGE_CFG)(np.zeros((3, 8, 8)))
