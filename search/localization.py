"""Where speech lands in an image: matchmap heatmaps for a span of a spoken caption, live and offline.

The heatmap math is ``encoders.grounding`` (shared with the training-side pointing game and concept
discovery); this module adds what the service and the CLI need on top: model-level ``localize``
(waveform in, Localization out) with span errors as ``QueryOutOfRange`` (OUT_OF_RANGE), the live
highlighter of a PCM stream, and pictures: a heatmap painted over its image, and a grid of them.
The heatmap of a span is, for each image region, its best similarity to any audio frame of the
span (max over the span's frames of the matchmap M[r, c, t]), rescaled to 0..1.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from encoders import grounding, waveform_from_pcm
from encoders.grounding import (
    SPAN_REDUCTIONS,
    Localization,
    SpanOutOfRange,
    encode_audio_map,
    encode_whole_image,
    model_device,
)
from search.errors import InvalidQuery, QueryOutOfRange


@contextlib.contextmanager
def _span_errors_out_of_range() -> Iterator[None]:
    """A span the audio cannot honour is the client's OUT_OF_RANGE, not a server fault."""
    try:
        yield
    except SpanOutOfRange as error:
        raise QueryOutOfRange(str(error), field="start_seconds") from None


def span_frames(span: tuple[float, float] | None, frames: int, frame_seconds: float) -> tuple[int, int]:
    """(start, end) seconds -> [first, last) audio frames covering it (encoders.grounding.span_frames);
    QueryOutOfRange for a negative or reversed span, or one starting after the audio ends."""
    with _span_errors_out_of_range():
        return grounding.span_frames(span, frames, frame_seconds)


def localize_audio_map(
    image_map: Tensor,
    audio: Tensor,
    frame_seconds: float,
    span: tuple[float, float] | None = None,
    *,
    reduce: str = "max",
) -> Localization:
    """image_map: (H, W, D), audio: (T, D) true frames -> Localization (encoders.grounding.localize_audio_map);
    QueryOutOfRange for a span the audio cannot honour."""
    with _span_errors_out_of_range():
        return grounding.localize_audio_map(image_map, audio, frame_seconds, span, reduce=reduce)


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


def pad_to_whole_frames(waveform: Tensor, frontend) -> Tensor:
    """waveform: (N,) -> (N',) zero-padded so that the front end's log-mel frames reach its last sample.

    Framing otherwise drops the samples after the last whole window; in a live stream those are the
    newest speech, which would show up in a heatmap only once later audio completes their frame.
    """
    frames = max(1, math.ceil(waveform.numel() / frontend.hop_length))
    needed = (frames - 1) * frontend.hop_length + frontend.window_length
    return F.pad(waveform, (0, max(0, needed - waveform.numel())))


class LiveHighlighter:
    """Live highlighting of a PCM stream: keep the latest audio, localize its last ``window_seconds``.

    Every sample received counts: the audio is padded to whole log-mel frames (pad_to_whole_frames),
    so a heatmap's span ends where the received audio ends.

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
            raise InvalidQuery(
                f"window_seconds must be > 0 and context_seconds >= 0, got {window_seconds}, {context_seconds}",
                field="start.window_seconds",
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
        waveform = pad_to_whole_frames(
            waveform_from_pcm(tail, self.sample_rate, self.model.config.audio.sample_rate), self.model.audio_frontend
        )
        tail_seconds = len(tail) / 2 / self.sample_rate
        offset = received_seconds - tail_seconds
        start = max(0.0, tail_seconds - self.window_seconds)
        result = localize(self.model, self.image_map, waveform, (start, 0.0))
        result.start_seconds += offset
        result.end_seconds = min(result.end_seconds + offset, received_seconds)
        return result


# ---- pictures -----------------------------------------------------------------------------------

HEATMAP_COLORMAP = "jet"
TITLE_FONT_SIZE = 13


def overlay_heatmap(
    image: Image.Image,
    heatmap: Tensor | np.ndarray,
    box: Sequence[float] | None = None,
    *,
    max_alpha: float = 0.6,
    colormap: str = HEATMAP_COLORMAP,
) -> Image.Image:
    """Paint ``heatmap`` (rows, cols) in 0..1 over the part ``box`` [x0, y0, x1, y1] (default: all) of
    ``image``: upsampled smoothly (bicubic) to the box's pixels, coloured by ``colormap`` and blended
    with an opacity growing with the heat (0 = the image shows through, 1 = ``max_alpha``). Returns RGB.
    """
    from matplotlib import colormaps  # only pictures need matplotlib; the server never imports it

    values = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"heatmap must be a non-empty (rows, cols) array, got shape {tuple(values.shape)}")
    if not 0 <= max_alpha <= 1:
        raise ValueError(f"max_alpha must lie in 0..1, got {max_alpha}")
    picture = image.convert("RGB")
    x0, y0, x1, y1 = box if box is not None else (0, 0, picture.width, picture.height)
    left, top = max(0, round(x0)), max(0, round(y0))
    right, bottom = min(picture.width, round(x1)), min(picture.height, round(y1))
    if right <= left or bottom <= top:
        raise ValueError(f"box {tuple(box)} covers no pixel of the {picture.width} x {picture.height} image")
    smooth = F.interpolate(values[None, None], size=(bottom - top, right - left), mode="bicubic", align_corners=False)
    heat = smooth[0, 0].clamp(0, 1).numpy()
    colours = colormaps[colormap](heat)[..., :3]  # (h, w, 3) in 0..1
    alpha = (max_alpha * heat)[..., None]
    region = np.asarray(picture.crop((left, top, right, bottom)), dtype=np.float32) / 255
    blended = (1 - alpha) * region + alpha * colours
    picture.paste(Image.fromarray(np.rint(blended * 255).astype(np.uint8)), (left, top))
    return picture


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def titled(image: Image.Image, title: str, *, font_size: int = TITLE_FONT_SIZE) -> Image.Image:
    """``image`` with ``title`` (wrapped to its width; newlines kept) on a white strip below it."""
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(measure, title, font, image.width - 8)
    line_height = font_size + 4
    out = Image.new("RGB", (image.width, image.height + line_height * len(lines) + 6), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 3 + i * line_height), line, fill="black", font=font)
    return out


def image_grid(tiles: Sequence[Image.Image], columns: int = 4, *, gap: int = 6) -> Image.Image:
    """Tiles laid out row by row, ``columns`` to a row, each cell as large as the largest tile."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), "white")
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        grid.paste(tile.convert("RGB"), (gap + col * (cell_w + gap), gap + row * (cell_h + gap)))
    return grid


__all__ = [  # the heatmap math lives in encoders.grounding; re-exported where the service always had it
    "HEATMAP_COLORMAP",
    "SPAN_REDUCTIONS",
    "LiveHighlighter",
    "Localization",
    "encode_audio_map",
    "encode_whole_image",
    "image_grid",
    "localize",
    "localize_audio_map",
    "model_device",
    "overlay_heatmap",
    "pad_to_whole_frames",
    "span_frames",
    "titled",
]
