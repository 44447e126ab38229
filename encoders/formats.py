"""The audio formats a query or caption may come in, named once for help texts and error messages.

``encoders.load_audio`` decodes through libsndfile (bundled with soundfile >= 0.12, libsndfile
>= 1.1, which reads MP3). tests/test_frontend.py decodes a real file of every format listed here,
and tests/test_search.py sends an MP3 query to the service, so the list says what works.
"""

from __future__ import annotations

# (name, soundfile format, soundfile subtype) of each format checked to decode.
TESTED_AUDIO_FORMATS: tuple[tuple[str, str, str | None], ...] = (
    ("WAV", "WAV", "PCM_16"),
    ("FLAC", "FLAC", None),
    ("OGG Vorbis", "OGG", "VORBIS"),
    ("OGG Opus", "OGG", "OPUS"),
    ("MP3", "MP3", None),
    ("AIFF", "AIFF", None),
)

# For messages: "cannot decode as {AUDIO_FORMATS_TEXT}", "send {AUDIO_FORMATS_TEXT} or raw PCM".
AUDIO_FORMATS_TEXT = "WAV, FLAC, OGG (Vorbis or Opus), MP3 or AIFF"
