"""Grounding: where in an image a span of speech lands, and when in the speech an image region is named.

Pure functions over an image map ``I`` (H, W, D) and an audio map ``A`` (T, D) of true frames, built on
the one matchmap ``M[h, w, t] = I[h, w] . A[t]`` (:func:`encoders.matchmap.matchmap`):

- the heatmap of a span of frames [first, last): for each region its best frame of the span
  (max over t of M, or the mean), less SPAN_CONTRAST x its best frame elsewhere in the utterance,
  rescaled so the span's best region is 1 and its worst 0;
- per-frame grounding: for each frame its best region's value and index (what MISA averages);
- the peak of a heatmap in the pixels of the image it spans.

Also the encoders that feed them: an image encoded WHOLE (resized square rather than centre-cropped,
so a heatmap covers the image as given) and a waveform encoded to its true frames. Training-side
tools (pointing game, concept discovery) and the search service (Localize, Highlight) share these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2 as T

from encoders.matchmap import matchmap
from encoders.models import QUERY_FRAME_MULTIPLE

# A whole image is localized at 1.5x the scale the model trained on (``localization_side``): the heatmap's
# grid is finer (14 x 14 for ``tiny``, not 10 x 10) and small objects are larger in its pixels. The pointing
# game, the same model at 1.0x against 1.5x (bench/bench_pointing.py --scales, docs/grounding.md): objects
# world 0.596 -> 0.644 (small objects 0.43 -> 0.55), shapes world 0.935 -> 0.950 with the shipped model;
# 2x gave 0.632 on the objects world.
LOCALIZATION_SCALE = 1.5

# A span's heatmap is contrasted with the rest of its utterance: a region's heat is its best match within
# the span less SPAN_CONTRAST x its best match among the utterance's other frames, so a region that another
# word of the caption names ("a cat next to a CAR") does not outshine the one the span names. Chosen on
# the objects world's own-voices val split (0.2-0.4 within 0.005 of each other; 0.75 loses), then measured
# on unheard voices: pointing 0.730 -> 0.771 (objects world, long4) and 0.950 -> 0.961 (shapes world, the
# shipped model); docs/grounding.md. 0 gives the plain matchmap's heatmap; a span that is the whole
# utterance has no other frames and is never contrasted.
SPAN_CONTRAST = 0.3

# A whole image is encoded twice, as given and mirrored; the mirrored pass's map is mirrored back and the
# two averaged. Scenes mirror their objects in training, so either view is as good as the other, and their
# mean is steadier than one (docs/grounding.md: +0.005-0.011 pointing with the contrast above, for twice
# the image branch's time on a sent image). Indexed images keep their stored maps (one view).
MIRROR_AVERAGE = True

SPAN_REDUCTIONS = ("max", "mean")


class SpanOutOfRange(ValueError):
    """A speech span (seconds) that is negative, reversed, not finite, or starts after the audio ends."""


@dataclass
class Localization:
    """A heatmap of one speech span over one image map, plus per-frame grounding of the whole utterance."""

    heatmap: Tensor  # (H, W) float32 in 0..1, 1 = the region the span matches best
    heat_min: float  # the raw heat values that 0 and 1 stand for (matchmap values, less the contrast)
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


# ---- spans and heatmaps ---------------------------------------------------------------------------


def span_frames(span: tuple[float, float] | None, frames: int, frame_seconds: float) -> tuple[int, int]:
    """(start, end) seconds -> [first, last) audio frames covering it, clipped to ``frames``.

    Frame t stands for [t, t + 1) * frame_seconds. None or (0, 0) is the whole utterance; end 0
    means "to the end". Raises SpanOutOfRange for a negative or reversed span, or one starting
    after the audio ends.
    """
    start, end = span if span is not None else (0.0, 0.0)
    duration = frames * frame_seconds
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < 0:
        raise SpanOutOfRange(f"span ({start}, {end}) s: start and end must be finite and >= 0")
    if start >= duration:
        raise SpanOutOfRange(
            f"span starts at {start:.2f} s but the audio the model hears lasts only {duration:.2f} s"
        )
    if end == 0:
        end = duration
    if end <= start:
        raise SpanOutOfRange(f"span ({start}, {end}) s: end must come after start (or be 0 for 'to the end')")
    first = min(int(start / frame_seconds), frames - 1)
    last = min(max(math.ceil(end / frame_seconds - 1e-9), first + 1), frames)
    return first, last


def _check_maps(image_map: Tensor, audio: Tensor) -> None:
    if image_map.dim() != 3:
        raise ValueError(f"image_map must be (H, W, D), got {tuple(image_map.shape)}")
    if audio.dim() != 2 or audio.shape[0] == 0 or audio.shape[1] != image_map.shape[2]:
        raise ValueError(
            f"audio must be (T, D) with T >= 1 and the image map's D = {image_map.shape[2]}, got {tuple(audio.shape)}"
        )


def span_heatmap(image_map: Tensor, audio: Tensor, first: int, last: int, reduce: str = "max",
                 contrast: float = SPAN_CONTRAST) -> Tensor:
    """image_map: (H, W, D), audio: (T, D), frames [first, last) -> (H, W) raw heat.

    reduce "max": each region's best similarity to any frame of the span (max over t of M);
    "mean": its mean similarity over the span. Then, when the utterance has frames outside the span,
    ``contrast`` x each region's best similarity to those frames is subtracted (see SPAN_CONTRAST).
    """
    if reduce not in SPAN_REDUCTIONS:
        raise ValueError(f"reduce must be one of {SPAN_REDUCTIONS}, got {reduce!r}")
    if not (math.isfinite(contrast) and contrast >= 0):
        raise ValueError(f"contrast must be a finite number >= 0, got {contrast}")
    _check_maps(image_map, audio)
    if not 0 <= first < last <= audio.shape[0]:
        raise ValueError(f"frames [{first}, {last}) are not a non-empty range within the {audio.shape[0]} audio frames")
    m = matchmap(image_map.to(audio.dtype), audio)  # (H, W, T)
    inside = m[:, :, first:last]
    heat = inside.amax(dim=2) if reduce == "max" else inside.mean(dim=2)
    if contrast > 0 and last - first < audio.shape[0]:  # frames outside the span: contrast with them
        heat = heat - contrast * torch.cat([m[:, :, :first], m[:, :, last:]], dim=2).amax(dim=2)
    return heat


def normalize_heatmap(heat: Tensor) -> tuple[Tensor, float, float]:
    """heat: (H, W) raw -> ((H, W) float32 rescaled to 0..1, raw min, raw max).

    The best region becomes 1 and the worst 0; a flat heatmap (max == min) becomes all zeros.
    """
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    return scaled.float(), low, high


def frame_grounding(image_map: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
    """image_map: (H, W, D), audio: (T, D) -> ((T,) best region's similarity per frame, (T,) int64 its
    row-major index h * W + w). The mean of the first is MISA of the pair."""
    _check_maps(image_map, audio)
    h, w, d = image_map.shape
    best = matchmap(image_map.reshape(h * w, d).to(audio.dtype), audio).max(dim=0)  # over (R, T) regions
    return best.values, best.indices


@torch.inference_mode()
def localize_audio_map(
    image_map: Tensor,
    audio: Tensor,
    frame_seconds: float,
    span: tuple[float, float] | None = None,
    *,
    reduce: str = "max",
    contrast: float = SPAN_CONTRAST,
) -> Localization:
    """image_map: (H, W, D), audio: (T, D) true frames, frame_seconds per audio frame -> Localization.

    span: (start, end) seconds, None / (0, 0) = all (see span_frames; SpanOutOfRange); reduce:
    "max" or "mean" over the span's frames; contrast: see span_heatmap.
    """
    _check_maps(image_map, audio)
    image_map = image_map.to(audio.device, audio.dtype)
    first, last = span_frames(span, audio.shape[0], frame_seconds)
    heatmap, low, high = normalize_heatmap(span_heatmap(image_map, audio, first, last, reduce, contrast))
    frame_scores, frame_regions = frame_grounding(image_map, audio)
    return Localization(
        heatmap=heatmap.cpu(),
        heat_min=low,
        heat_max=high,
        start_seconds=first * frame_seconds,
        end_seconds=last * frame_seconds,
        frame_seconds=frame_seconds,
        frame_scores=frame_scores.float().cpu(),
        frame_best_regions=frame_regions.cpu(),
        score=float(frame_scores.mean()),  # = pair_score(image_map, audio, "misa")
    )


def region_center(index: int, rows: int, cols: int, box: Sequence[float]) -> tuple[float, float]:
    """Row-major region ``index`` of a rows x cols heatmap spanning ``box`` [x0, y0, x1, y1] (pixels)
    -> (x, y) pixel coordinates of that region's cell centre."""
    if not 0 <= index < rows * cols:
        raise ValueError(f"region index {index} is outside a {rows} x {cols} heatmap")
    row, col = divmod(int(index), cols)
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 + (col + 0.5) * (x1 - x0) / cols, y0 + (row + 0.5) * (y1 - y0) / rows


def heatmap_peak(heatmap: Tensor, box: Sequence[float]) -> tuple[float, float]:
    """heatmap: (H, W) spanning ``box`` [x0, y0, x1, y1] in image pixels -> (x, y) of its best cell's
    centre (the first one in row-major order on ties)."""
    if heatmap.dim() != 2 or heatmap.numel() == 0:
        raise ValueError(f"heatmap must be a non-empty (H, W) tensor, got {tuple(heatmap.shape)}")
    rows, cols = heatmap.shape
    return region_center(int(heatmap.reshape(-1).argmax()), rows, cols, box)


# ---- encoding for grounding -------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    """The device holding ``model``'s weights."""
    return next(model.parameters()).device


def localization_side(model) -> int:
    """Pixels of each side of the square a whole image is resized to for localization:
    ``LOCALIZATION_SCALE`` x the model's resize_size (219 for ``tiny``, whose grid is then 14 x 14)."""
    return round(model.config.image.resize_size * LOCALIZATION_SCALE)


def whole_image_transform(model) -> T.Compose:
    """PIL image -> (3, S, S) normalized float tensor of the WHOLE image, S = :func:`localization_side`.

    The indexer's front end centre-crops (as in training); a heatmap over the image as given needs
    the whole image, resized square, so the map's grid differs from the stored maps' (14 x 14 rather
    than 8 x 8 for ``tiny``). The branch is convolutional, so a larger image gives a finer grid.
    """
    side = localization_side(model)
    cfg = model.config.image
    return T.Compose(
        [
            T.Resize((side, side), antialias=True),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )


@torch.inference_mode()
def encode_whole_images(model, images: Sequence[Image.Image], *, mirror: bool = MIRROR_AVERAGE) -> Tensor:
    """images: N PIL images (any sizes) -> (N, H, W, D) feature maps, each spanning its whole image.

    mirror: average each map with the map of the mirrored image, mirrored back (see MIRROR_AVERAGE), so
    a mirrored image's map is exactly its map mirrored.
    """
    if not images:
        raise ValueError("encode_whole_images needs at least one image")
    to_tensor = whole_image_transform(model)
    pixels = torch.stack([to_tensor(image.convert("RGB")) for image in images]).to(model_device(model))
    if not mirror:
        return model.encode_images(pixels)
    maps = model.encode_images(torch.cat([pixels, pixels.flip(3)]))  # (2N, H, W, D); pixels are (N, 3, S, S)
    return (maps[: len(images)] + maps[len(images) :].flip(2)) / 2


def encode_whole_image(model, image: Image.Image) -> Tensor:
    """image: a PIL image -> (H, W, D) feature map spanning the WHOLE image (see whole_image_transform)."""
    return encode_whole_images(model, [image])[0]


@torch.inference_mode()
def encode_audio_maps(model, waveforms: Sequence[Tensor], sample_rate: int | None = None) -> list[Tensor]:
    """waveforms: B x (N_b,) float at ``sample_rate`` (default: the model's) -> B x (T_b, D) audio maps
    of true frames, encoded in one padded batch (padding never changes a caption's frames), padded to
    a multiple of QUERY_FRAME_MULTIPLE frames so that queries of every length reuse a few shapes."""
    if not waveforms:
        raise ValueError("encode_audio_maps needs at least one waveform")
    logmels = [model.audio_frontend.logmel(w, sample_rate) for w in waveforms]  # (n_mels, F_b) each
    lengths = torch.tensor([m.shape[1] for m in logmels])
    batch = torch.stack([F.pad(m, (0, int(lengths.max()) - m.shape[1])) for m in logmels])
    device = model_device(model)
    audio, out_lengths = model.encode_audio(batch.to(device), lengths.to(device), frame_multiple=QUERY_FRAME_MULTIPLE)
    return [audio[i, : int(n)] for i, n in enumerate(out_lengths)]


def encode_audio_map(model, waveform: Tensor, sample_rate: int | None = None) -> Tensor:
    """waveform: (N,) float at ``sample_rate`` (default: the model's) -> (T, D) audio map, true frames only."""
    return encode_audio_maps(model, [waveform], sample_rate)[0]


__all__ = [
    "LOCALIZATION_SCALE",
    "MIRROR_AVERAGE",
    "SPAN_CONTRAST",
    "SPAN_REDUCTIONS",
    "Localization",
    "SpanOutOfRange",
    "encode_audio_map",
    "encode_audio_maps",
    "encode_whole_image",
    "encode_whole_images",
    "frame_grounding",
    "heatmap_peak",
    "localization_side",
    "localize_audio_map",
    "model_device",
    "normalize_heatmap",
    "region_center",
    "span_frames",
    "span_heatmap",
    "whole_image_transform",
]
