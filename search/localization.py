"""Where speech lands in an image: matchmap heatmaps for a span of a spoken caption.

Plain functions of (model, image map, waveform, span), shared by the server's Localize and
Highlight calls and usable offline (e.g. a ``matchmap localize`` command that paints the heatmap).
The heatmap of a span is, for each image region, its best similarity to any audio frame of the
span (max over the span's frames of the matchmap M[r, c, t]), rescaled to 0..1.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2 as T

from encoders import waveform_from_pcm
from encoders.matchmap import matchmap, pair_score
from search.errors import QueryOutOfRange

SPAN_REDUCTIONS = ("max", "mean")


@dataclass
class Localization:
    """A heatmap of one speech span over one image map, plus per-frame grounding of the whole utterance."""

    heatmap: Tensor  # (H, W) float32 in 0..1, 1 = the region the span matches best
    heat_min: float  # the raw matchmap values that 0 and 1 stand for
    heat_max: float
    start_seconds: float  # the span used: whole audio frames covering the requested span
    end_seconds: float
    frame_seconds: float  # seconds per audio frame of the model
    frame_scores: Tensor  # (T,) float32: per frame of the utterance, max over regions of M (what MISA averages)
    frame_best_regions: Tensor  # (T,) int64: that region's row-major index
    score: float  # MISA of the whole utterance against the image

    @property
    def rows(self) -> int:
        return int(self.heatmap.shape[0])

    @property
    def cols(self) -> int:
        return int(self.heatmap.shape[1])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device holding ``model``'s weights."""
    return next(model.parameters()).device


@torch.inference_mode()
def encode_audio_map(model, waveform: Tensor, sample_rate: int | None = None) -> Tensor:
    """waveform: (N,) float at ``sample_rate`` (default: the model's) -> (T, D) audio map, true frames only."""
    logmel = model.audio_frontend.logmel(waveform, sample_rate)  # (n_mels, F), no padding
    lengths = torch.tensor([logmel.shape[1]])
    audio, out_lengths = model.encode_audio(logmel.unsqueeze(0).to(model_device(model)), lengths)
    return audio[0, : int(out_lengths[0])]


@torch.inference_mode()
def encode_whole_image(model, image: Image.Image) -> Tensor:
    """image: a PIL image -> (H, W, D) feature map spanning the WHOLE image.

    The indexer's front end centre-crops (as in training); for a heatmap over an image as given,
    the whole image is resized to ``resize_size`` square instead (the scale objects had in training),
    so the map's grid may differ from the stored maps' (e.g. 10 x 10 rather than 8 x 8 for ``tiny``).
    """
    cfg = model.config.image
    to_tensor = T.Compose(
        [
            T.Resize((cfg.resize_size, cfg.resize_size), antialias=True),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
    pixels = to_tensor(image.convert("RGB")).unsqueeze(0).to(model_device(model))
    return model.encode_images(pixels)[0]


def span_frames(span: tuple[float, float] | None, frames: int, frame_seconds: float) -> tuple[int, int]:
    """(start, end) seconds -> [first, last) audio frames covering it, clipped to ``frames``.

    None or (0, 0) is the whole utterance; end 0 means "to the end". Raises QueryOutOfRange for a
    negative or reversed span, or one starting after the audio ends.
    """
    start, end = span if span is not None else (0.0, 0.0)
    duration = frames * frame_seconds
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < 0:
        raise QueryOutOfRange(f"span ({start}, {end}) s: start and end must be finite and >= 0")
    if start >= duration:
        raise QueryOutOfRange(
            f"span starts at {start:.2f} s but the audio the model hears lasts only {duration:.2f} s"
        )
    if end == 0:
        end = duration
    if end <= start:
        raise QueryOutOfRange(f"span ({start}, {end}) s: end must come after start (or be 0 for 'to the end')")
    first = min(int(start / frame_seconds), frames - 1)
    last = min(max(math.ceil(end / frame_seconds - 1e-9), first + 1), frames)
    return first, last


def localize(
    model,
    image_map: Tensor,
    waveform: Tensor,
    span: tuple[float, float] | None = None,
    *,
    sample_rate: int | None = None,
    reduce: str = "max",
) -> Localization:
    """Heatmap of where the speech in ``span`` lands in the image.

    image_map: (H, W, D) feature map (stored by the indexer, or from encode_whole_image);
    waveform: (N,) float at ``sample_rate`` (default: the model's); span: (start, end) seconds,
    None / (0, 0) = all; reduce: "max" or "mean" over the span's frames.
    """
    audio = encode_audio_map(model, waveform, sample_rate)
    return localize_audio_map(image_map, audio, model.audio_frame_seconds, span, reduce=reduce)


@torch.inference_mode()
def localize_audio_map(
    image_map: Tensor,
    audio: Tensor,
    frame_seconds: float,
    span: tuple[float, float] | None = None,
    *,
    reduce: str = "max",
) -> Localization:
    """image_map: (H, W, D), audio: (T, D) true frames, frame_seconds per audio frame -> Localization."""
    if reduce not in SPAN_REDUCTIONS:
        raise ValueError(f"reduce must be one of {SPAN_REDUCTIONS}, got {reduce!r}")
    if image_map.dim() != 3:
        raise ValueError(f"image_map must be (H, W, D), got {tuple(image_map.shape)}")
    image_map = image_map.to(audio.device, audio.dtype)
    h, w, _ = image_map.shape
    first, last = span_frames(span, audio.shape[0], frame_seconds)
    m = matchmap(image_map, audio)  # (H, W, T)
    span_m = m[:, :, first:last]
    heat = span_m.amax(dim=2) if reduce == "max" else span_m.mean(dim=2)
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    per_frame = m.reshape(h * w, -1).max(dim=0)
    return Localization(
        heatmap=scaled.float().cpu(),
        heat_min=low,
        heat_max=high,
        start_seconds=first * frame_seconds,
        end_seconds=last * frame_seconds,
        frame_seconds=frame_seconds,
        frame_scores=per_frame.values.float().cpu(),
        frame_best_regions=per_frame.indices.cpu(),
        score=float(pair_score(image_map, audio, "misa")),
    )


class LiveHighlighter:
    """Live highlighting of a PCM stream: keep the latest audio, localize its last ``window_seconds``.

    Only the last ``window_seconds + context_seconds`` of audio are kept (the context lets the
    audio branch see the speech leading into the window), so a stream may run indefinitely.
    """

    def __init__(
        self,
        model,
        image_map: Tensor,
        sample_rate: int,
        *,
        window_seconds: float = 1.0,
        context_seconds: float = 3.0,
    ):
        if not window_seconds > 0 or not context_seconds >= 0:
            raise QueryOutOfRange(
                f"window_seconds must be > 0 and context_seconds >= 0, got {window_seconds}, {context_seconds}"
            )
        self.model = model
        self.image_map = image_map
        self.sample_rate = sample_rate
        self.window_seconds = window_seconds
        self._keep_bytes = 2 * math.ceil((window_seconds + context_seconds) * sample_rate)
        self._tail = bytearray()
        self._partial = b""  # a chunk may end in the middle of a 16-bit sample
        self.received_samples = 0
        self._lock = threading.Lock()  # chunks may arrive while a heatmap is computed

    @property
    def received_seconds(self) -> float:
        return self.received_samples / self.sample_rate

    def push(self, samples_s16le: bytes) -> None:
        """Append a chunk of mono signed 16-bit little-endian samples at ``sample_rate``."""
        with self._lock:
            data = self._partial + bytes(samples_s16le)
            whole = len(data) - len(data) % 2
            self._partial = data[whole:]
            self._tail += data[:whole]
            self.received_samples += whole // 2
            if len(self._tail) > self._keep_bytes:
                del self._tail[: len(self._tail) - self._keep_bytes]

    def localize_latest(self) -> Localization | None:
        """Heatmap of the latest ``window_seconds`` (times from the stream's start); None before any audio."""
        with self._lock:
            tail, received_seconds = bytes(self._tail), self.received_seconds
        if not tail:
            return None
        waveform = waveform_from_pcm(tail, self.sample_rate, self.model.config.audio.sample_rate)
        tail_seconds = len(tail) / 2 / self.sample_rate
        offset = received_seconds - tail_seconds
        start = max(0.0, tail_seconds - self.window_seconds)
        result = localize(self.model, self.image_map, waveform, (start, 0.0))
        result.start_seconds += offset
        result.end_seconds = min(result.end_seconds + offset, received_seconds)
        return result
