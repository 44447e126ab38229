"""Emoji glyphs from Noto Color Emoji (Debian's fonts-noto-color-emoji), drawn by Pillow.

Noto Color Emoji is a CBDT bitmap font: it loads at size 109 only and draws in color with
``embedded_color=True``. Each glyph is drawn once per process and kept as an RGBA image cropped to
its visible pixels; scenes scale, rotate and mirror that copy.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size of the font's bitmaps
_CANVAS = 160  # a glyph is 136x128 px; margin for wide ones


@cache
def _font(path: Path) -> ImageFont.FreeTypeFont:
    if not path.exists():
        raise FileNotFoundError(f"emoji font {path} is missing: apt-get install fonts-noto-color-emoji")
    return ImageFont.truetype(str(path), FONT_SIZE)


@cache
def glyph(codepoint: str, font_path: Path = EMOJI_FONT) -> Image.Image:
    """The emoji of ``codepoint`` (hex) as an RGBA image cropped to its visible pixels (may be empty)."""
    canvas = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    text = chr(int(codepoint, 16)) + "\ufe0f"
    ImageDraw.Draw(canvas).text((8, 8), text, font=_font(font_path), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else Image.new("RGBA", (0, 0))


def draws_glyph(codepoint: str, font_path: Path = EMOJI_FONT) -> bool:
    """Whether the font draws something for ``codepoint`` (a missing glyph leaves no pixel)."""
    image = glyph(codepoint, font_path)
    return image.width > 8 and image.height > 8
