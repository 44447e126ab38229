"""Front ends: decode audio and images, and turn them into the tensors the networks take.

Audio: any soundfile-readable file (WAV, FLAC, OGG, MP3) or raw 16-bit PCM -> mono float waveform at the
model's rate -> 40-bin log-mel, per-utterance normalized, zero-padded to a fixed number of frames.
Images: any Pillow-readable file -> RGB -> shorter side resized, cropped square, mean/std normalized.
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2 as T

from encoders.config import AudioConfig, ImageConfig
from encoders.formats import AUDIO_FORMATS_TEXT

# Frames whose energy is this far below the utterance's loudest frame are left out of the
# normalization statistics, so leading/trailing silence cannot dominate the mean and variance.
ACTIVE_FRAME_RANGE_DB = 50.0
# Mel energies are floored this far below the utterance's maximum before the log: a floor relative
# to the signal (not absolute) keeps the features independent of loudness, and bounds digital silence.
LOG_FLOOR_DB = 80.0
# WAV writers that stream (espeak-ng --stdout, ffmpeg pipes) cannot know the data size up front and
# write a placeholder; sizes from here up are not trusted for the truncation check.
_WAV_STREAMING_SIZE = 0x7FFF0000
# Frames read at a time from a file whose length is unknown or over the caller's limit.
_READ_BLOCK_FRAMES = 1 << 16


class AudioDecodeError(ValueError):
    """Audio input that cannot be turned into a waveform; the message names the input and the problem."""


class AudioTooLong(AudioDecodeError):
    """Audio longer than the caller's limit; ``seconds`` is how much was read before stopping."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class ImageDecodeError(ValueError):
    """Image input that cannot be decoded; the message names the input and the problem."""


def _read_source(source: str | Path | bytes, label: str, kind: str, error: type[ValueError]) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        raise TypeError(f"{kind} {label}: expected a path or bytes, got {type(source).__name__}")
    if not data:
        raise error(f"{kind} {label}: empty input (0 bytes)")
    return data


def _label(source: str | Path | bytes, name: str | None) -> str:
    if name is not None:
        return repr(name)
    if isinstance(source, (str, Path)):
        return repr(str(source))
    return f"<{len(source)} bytes>"


def _check_wav_complete(data: bytes, label: str) -> None:
    """libsndfile silently decodes a cut-off WAV; compare the header's data size with what is there."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        body = offset + 8
        if chunk_id == b"data":
            available = len(data) - body
            if 0 < size < _WAV_STREAMING_SIZE and available < size:
                raise AudioDecodeError(
                    f"audio {label}: truncated WAV: header declares {size} bytes of samples, "
                    f"only {available} present"
                )
            return
        offset = body + size + (size & 1)  # chunks are padded to even sizes


def load_audio(
    source: str | Path | bytes, sample_rate: int = 16000, name: str | None = None, max_seconds: float | None = None
) -> torch.Tensor:
    """Decode an audio file (WAV, FLAC, OGG, MP3, ... anything libsndfile reads) to a mono waveform.

    source: a path or the file's bytes; name: how error messages call the input (default: the path);
    max_seconds: refuse (AudioTooLong) input longer than this, found while reading, so a file that
    does not declare its length (a streaming FLAC: libsndfile then reports 2**63 frames) costs no
    more than the limit. Returns (N,) float32 at ``sample_rate``, channels averaged. Raises
    AudioDecodeError when the input is empty, undecodable, truncated, or holds NaN/inf samples.
    """
    label = _label(source, name)
    data = _read_source(source, label, "audio", AudioDecodeError)
    _check_wav_complete(data, label)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            declared_frames, native_rate = f.frames, f.samplerate
            samples = _read_frames(f, label, max_seconds)
    except (soundfile.SoundFileError, RuntimeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioDecodeError(f"audio {label}: cannot decode as {AUDIO_FORMATS_TEXT}: {reason}") from e
    if samples.shape[0] == 0:
        raise AudioDecodeError(f"audio {label}: decodes to no samples (the input is empty or truncated)")
    if 0 < declared_frames < _WAV_STREAMING_SIZE and samples.shape[0] < declared_frames:
        raise AudioDecodeError(
            f"audio {label}: truncated: header declares {declared_frames} frames, decoded {samples.shape[0]}"
        )
    waveform = torch.from_numpy(samples.mean(axis=1))
    return _finite_at_rate(waveform, native_rate, sample_rate, label)


def _read_frames(f: soundfile.SoundFile, label: str, max_seconds: float | None) -> np.ndarray:
    """All frames of ``f`` as (N, channels) float32, read in blocks: the declared length is not trusted
    (unknown-length streams declare 2**63 frames), and reading stops once past ``max_seconds``."""
    limit = None if max_seconds is None else int(max_seconds * f.samplerate) + 1
    if 0 <= f.frames < _WAV_STREAMING_SIZE and (limit is None or f.frames <= limit):
        return f.read(dtype="float32", always_2d=True)  # an honest, small enough length: one read
    blocks, total = [], 0
    while True:
        block = _read_block(f)
        blocks.append(block)
        total += block.shape[0]
        if limit is not None and total > limit:
            raise AudioTooLong(
                f"audio {label} lasts more than {max_seconds:g} s, the longest accepted; send a shorter recording",
                seconds=total / f.samplerate,
            )
        if block.shape[0] < _READ_BLOCK_FRAMES:
            return np.concatenate(blocks)


def _read_block(f: soundfile.SoundFile) -> np.ndarray:
    """Up to _READ_BLOCK_FRAMES frames. In a stream of unknown length, libsndfile decodes the last
    block but then fails to move its position past the end ("psf_fseek() failed"), so soundfile
    raises after filling the block: the frames it filled (decoded samples are never NaN) are kept."""
    out = np.full((_READ_BLOCK_FRAMES, f.channels), np.nan, dtype=np.float32)
    try:
        return f.read(out=out)
    except soundfile.LibsndfileError:
        filled = int(np.flatnonzero(np.isnan(out[:, 0]))[0]) if np.isnan(out[:, 0]).any() else out.shape[0]
        if filled == 0 and f.tell() == 0:
            raise
        return out[:filled]


def waveform_from_pcm(samples_s16le: bytes, sample_rate: int, target_rate: int = 16000) -> torch.Tensor:
    """Raw mono signed 16-bit little-endian PCM -> (N,) float32 in [-1, 1) at ``target_rate``."""
    if not samples_s16le:
        raise AudioDecodeError("raw PCM audio: empty input (0 bytes)")
    if len(samples_s16le) % 2:
        raise AudioDecodeError(
            f"raw PCM audio: {len(samples_s16le)} bytes is not a whole number of 16-bit samples"
        )
    samples = np.frombuffer(samples_s16le, dtype="<i2").astype(np.float32) / 32768.0
    return _finite_at_rate(torch.from_numpy(samples), sample_rate, target_rate, "raw PCM audio")


def _finite_at_rate(waveform: torch.Tensor, rate: int, target_rate: int, label: str) -> torch.Tensor:
    if rate <= 0 or target_rate <= 0:
        raise AudioDecodeError(f"{label}: sample rates must be positive, got {rate} -> {target_rate}")
    if not torch.isfinite(waveform).all():
        raise AudioDecodeError(f"{label}: contains NaN or infinite samples")
    if rate != target_rate:
        waveform = AF.resample(waveform, int(rate), int(target_rate))
    return waveform.to(torch.float32).contiguous()


# Query trimming: 10 ms frames more than this far below the loudest are silence, and this much of
# it is kept on each side of the speech (the training captions have 0.09-0.31 s).
TRIM_RANGE_DB = 40.0
TRIM_MARGIN_SECONDS = 0.25


def trim_silence(waveform: torch.Tensor, sample_rate: int, margin_seconds: float = TRIM_MARGIN_SECONDS,
                 range_db: float = TRIM_RANGE_DB) -> torch.Tensor:
    """waveform (N,) -> the stretch from the first to the last 10 ms frame within ``range_db`` of the
    loudest frame, with up to ``margin_seconds`` kept on each side. All-silent input comes back as is.

    Leading and trailing silence (a push-to-talk button pressed early) otherwise adds frames the
    model averages over: one second each side cost the shipped model 0.07 of R@10
    (bench/bench_robustness.py). Used on search queries; localization keeps the original timing.
    """
    frame = max(1, round(0.01 * sample_rate))
    n_frames = waveform.numel() // frame
    if n_frames == 0:
        return waveform
    power = waveform[: n_frames * frame].double().reshape(n_frames, frame).pow(2).mean(dim=1)
    level_db = 10 * torch.log10(power + 1e-20)
    active = torch.nonzero(level_db >= level_db.max() - range_db).flatten()
    if power.max() <= 1e-20 or active.numel() == 0:
        return waveform
    margin = round(margin_seconds * sample_rate)
    start = max(0, int(active[0]) * frame - margin)
    stop = min(waveform.numel(), (int(active[-1]) + 1) * frame + margin)
    return waveform[start:stop]


class AudioFrontEnd:
    """Waveform -> per-utterance normalized log-mel, padded with zeros (or cut) to ``max_frames``.

    Hamming windows of ``window_ms`` every ``hop_ms`` over the pre-emphasized signal, power spectrum,
    ``n_mels`` HTK mel bands, log. Normalization: per-band mean and one overall standard deviation,
    both measured on the true frames whose energy is within ACTIVE_FRAME_RANGE_DB of the loudest
    frame. Scaling the waveform only shifts the log-mel, which the mean removes, so the features do
    not depend on loudness.
    """

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg
        self.window_length = round(cfg.sample_rate * cfg.window_ms / 1000)
        self.hop_length = round(cfg.sample_rate * cfg.hop_ms / 1000)
        self.n_fft = 2 ** math.ceil(math.log2(self.window_length))
        self.window = torch.hamming_window(self.window_length, periodic=False)
        # (n_fft // 2 + 1, n_mels)
        self.mel_filters = AF.melscale_fbanks(
            self.n_fft // 2 + 1, 20.0, cfg.sample_rate / 2, cfg.n_mels, cfg.sample_rate, None, "htk"
        )

    @property
    def frame_seconds(self) -> float:
        """Seconds between log-mel frames."""
        return self.cfg.frame_seconds

    def num_frames(self, num_samples: int) -> int:
        """Log-mel frames for a waveform of ``num_samples`` samples (at least 1), before the max_frames cut."""
        return 1 + max(0, num_samples - self.window_length) // self.hop_length

    def logmel(self, waveform: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """waveform: (N,) float at ``sample_rate`` (default: the config's) -> (n_mels, F) normalized log-mel.

        F = num_frames(N) at the config's rate, cut to max_frames; no padding.
        """
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1 or not waveform.is_floating_point():
            shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
            raise ValueError(f"waveform must be a 1-D float tensor (N,), got {shape}")
        if waveform.numel() == 0:
            raise ValueError("waveform is empty")
        if not torch.isfinite(waveform).all():
            raise ValueError("waveform contains NaN or infinite samples")
        rate = self.cfg.sample_rate if sample_rate is None else int(sample_rate)
        waveform = waveform.detach().to("cpu", torch.float32)
        if rate != self.cfg.sample_rate:
            waveform = AF.resample(waveform, rate, self.cfg.sample_rate)
        # Only the samples that reach the first max_frames frames matter.
        keep = (self.cfg.max_frames - 1) * self.hop_length + self.window_length
        waveform = waveform[:keep]
        if waveform.numel() < self.window_length:
            waveform = torch.nn.functional.pad(waveform, (0, self.window_length - waveform.numel()))
        emphasized = torch.cat([waveform[:1], waveform[1:] - self.cfg.preemphasis * waveform[:-1]])
        frames = emphasized.unfold(0, self.window_length, self.hop_length) * self.window  # (F, win)
        power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)  # (F, n_fft // 2 + 1)
        mel = power @ self.mel_filters  # (F, n_mels)
        floor = max(mel.max().item() * 10 ** (-LOG_FLOOR_DB / 10), 1e-20)
        log_mel = mel.clamp_min(floor).log()
        frame_db = 10 * torch.log10(mel.sum(dim=1).clamp_min(1e-20))
        active = frame_db >= frame_db.max() - ACTIVE_FRAME_RANGE_DB
        reference = log_mel[active]
        centered = log_mel - reference.mean(dim=0)
        std = centered[active].std(unbiased=False).clamp_min(1e-5)
        return (centered / std).T.contiguous()

    def __call__(self, waveform: torch.Tensor, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
        """waveform: (N,) float -> ((n_mels, max_frames) float32 log-mel zero-padded, true length in frames)."""
        features = self.logmel(waveform, sample_rate)
        length = features.shape[1]
        padded = torch.zeros(self.cfg.n_mels, self.cfg.max_frames, dtype=torch.float32)
        padded[:, :length] = features
        return padded, length


class ImageFrontEnd:
    """PIL image -> (3, S, S) float32: shorter side to resize_size, S = input_size crop, mean/std normalized.

    The crop is random when ``train`` (augmentation) and centered otherwise, as in the paper.
    """

    def __init__(self, cfg: ImageConfig, train: bool = False):
        self.cfg = cfg
        self.train = train
        crop = T.RandomCrop(cfg.input_size) if train else T.CenterCrop(cfg.input_size)
        self.transform = T.Compose(
            [
                T.Resize(cfg.resize_size, antialias=True),
                crop,
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(cfg.mean), list(cfg.std)),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image front end takes a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = _to_rgb(image)
        return self.transform(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels land on white rather than on whatever color they hide."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (anything Pillow reads) from a path or bytes to an RGB PIL image.

    EXIF orientation is applied. Raises ImageDecodeError naming the input when it is empty,
    not an image, truncated or corrupt.
    """
    label = _label(source, name)
    data = _read_source(source, label, "image", ImageDecodeError)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image)
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"image {label}: not a recognized image format") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"image {label}: cannot decode (truncated or corrupt?): {e}") from e
