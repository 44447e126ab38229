"""Places / DAVEnet manifests: read, validate and write the JSON that pairs images with spoken captions.

The format is the one of the Places Audio Captions release::

    {"image_base_path": "...", "audio_base_path": "...",
     "data": [{"wav": "...", "image": "...", "uttid": "...", "speaker": "...", "asr_text": "..."}, ...]}

The spoken-scenes corpus extends each entry with ground truth: ``"words"`` (``[{"word", "start",
"end"}]``, seconds), ``"objects"`` (``[{"color", "shape", "size", "bbox": [x0, y0, x1, y1]}]``,
pixels, x1/y1 exclusive; in the objects world ``{"category", "codepoint", "size", "bbox", "mention"}``,
see ``SceneObject``), ``"background"``, ``"engine"`` and ``"voice"``. Several entries may share one
image: they are several captions of it. Real Places JSON without
the extras loads as well; keys this module does not know are kept in ``Entry.extra`` (and top-level
ones in ``Manifest.extra``) so that a manifest round-trips exactly.

Base paths may be relative: they are resolved against the directory of the manifest file.

Validation happens up front and reports every problem at once (entry index, uttid, path, reason):

- always: the JSON structure (required keys and their types);
- ``check_files=True`` (default): each wav and image exists, is not empty, and its header parses
  (``soundfile.info`` reports at least one frame; ``PIL.Image.open`` identifies the image). This
  reads a few bytes per file, cheap enough to do on every load;
- ``deep_check=True``: additionally decodes every wav and image in full (catches truncated files).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import soundfile
from PIL import Image

ENTRY_KEYS = ("wav", "image", "uttid", "speaker", "asr_text")
GROUND_TRUTH_KEYS = ("words", "objects", "background", "engine", "voice")
BASE_PATH_KEYS = ("image_base_path", "audio_base_path")
# How many individual problems skip_bad prints to stderr besides the per-reason counts.
SKIP_REPORT_EXAMPLES = 10


@dataclass(frozen=True)
class Word:
    """One spoken word of a caption and where it lies in the wav, in seconds."""

    word: str
    start: float
    end: float

    def to_json(self) -> dict[str, Any]:
        return {"word": self.word, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class SceneObject:
    """One object of a spoken-scenes image: its attributes and its box ``(x0, y0, x1, y1)`` in pixels.

    The shapes world gives ``color`` and ``shape``; the objects world gives ``category`` (the
    vocabulary's first name, e.g. "dog"; a shape's is its shape), ``codepoint`` (the emoji's, None for
    a shape) and ``mention``: the first and last index into its caption's ``words`` of the words that
    name this object alone (None when the caption names it only in a count, "two dogs", or not at all).
    """

    color: str | None
    shape: str | None
    size: str
    bbox: tuple[int, int, int, int]
    category: str | None = None
    codepoint: str | None = None
    mention: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key) for key in ("color", "shape") if getattr(self, key) is not None}
        out.update(size=self.size, bbox=list(self.bbox))
        for key in ("category", "codepoint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.category is not None:
            out["mention"] = None if self.mention is None else list(self.mention)
        return out


@dataclass
class Entry:
    """One image / spoken-caption pair. ``wav`` and ``image`` are relative to the manifest's base paths."""

    wav: str
    image: str
    uttid: str
    speaker: str
    asr_text: str
    words: list[Word] | None = None
    objects: list[SceneObject] | None = None
    background: str | None = None
    engine: str | None = None
    voice: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The entry as the JSON object of a manifest's ``data`` list (absent ground truth is left out)."""
        out: dict[str, Any] = {key: getattr(self, key) for key in ENTRY_KEYS}
        if self.words is not None:
            out["words"] = [w.to_json() for w in self.words]
        if self.objects is not None:
            out["objects"] = [o.to_json() for o in self.objects]
        for key in ("background", "engine", "voice"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, item: Any) -> Entry:
        """Parse one ``data`` item; raises ``ValueError`` naming every malformed or missing field."""
        if not isinstance(item, dict):
            raise ValueError(f"expected a JSON object, got {type(item).__name__}")
        problems = [f"missing key {key!r}" for key in ENTRY_KEYS if key not in item]
        problems += [f"{key!r} must be a string, got {type(item[key]).__name__}"
                     for key in ENTRY_KEYS if key in item and not isinstance(item[key], str)]
        problems += [f"{key!r} must be a non-empty path" for key in ("wav", "image") if item.get(key) == ""]
        for key in ("background", "engine", "voice"):
            if item.get(key) is not None and not isinstance(item[key], str):
                problems.append(f"{key!r} must be a string, got {type(item[key]).__name__}")
        words = _parse_list(item.get("words"), "words", _parse_word, problems)
        objects = _parse_list(item.get("objects"), "objects", _parse_object, problems)
        if problems:
            raise ValueError("; ".join(problems))
        known = set(ENTRY_KEYS) | set(GROUND_TRUTH_KEYS)
        return cls(
            **{key: item[key] for key in ENTRY_KEYS},
            words=words,
            objects=objects,
            background=item.get("background"),
            engine=item.get("engine"),
            voice=item.get("voice"),
            extra={key: value for key, value in item.items() if key not in known},
        )


def _parse_list(value: Any, name: str, parse_item, problems: list[str]) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list):
        problems.append(f"{name!r} must be a list, got {type(value).__name__}")
        return None
    parsed = []
    for i, item in enumerate(value):
        try:
            parsed.append(parse_item(item))
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"{name}[{i}]: {exc}")
    return parsed


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_word(item: Any) -> Word:
    if not isinstance(item, dict) or not isinstance(item.get("word"), str):
        raise ValueError("expected {'word': str, 'start': seconds, 'end': seconds}")
    if not (_is_number(item.get("start")) and _is_number(item.get("end"))):
        raise ValueError(f"word {item['word']!r}: 'start' and 'end' must be numbers (seconds)")
    if item["end"] < item["start"]:
        raise ValueError(f"word {item['word']!r} ends ({item['end']}) before it starts ({item['start']})")
    return Word(item["word"], item["start"], item["end"])


def _parse_object(item: Any) -> SceneObject:
    if not isinstance(item, dict):
        raise ValueError("expected {'color', 'shape', 'size', 'bbox'} or {'category', 'size', 'bbox'}")
    needed = ("size", "bbox") if "category" in item else ("color", "shape", "size", "bbox")
    missing = [key for key in needed if key not in item]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    bbox = item["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise ValueError(f"'bbox' must be [x0, y0, x1, y1] numbers, got {bbox!r}")
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise ValueError(f"'bbox' {bbox!r} has x1 < x0 or y1 < y0")
    mention = item.get("mention")
    if mention is not None and not (isinstance(mention, list) and len(mention) == 2
                                    and all(isinstance(i, int) for i in mention) and 0 <= mention[0] <= mention[1]):
        raise ValueError(f"'mention' must be [first, last] word indices or null, got {mention!r}")
    return SceneObject(item.get("color"), item.get("shape"), item["size"], tuple(bbox), category=item.get("category"),
                       codepoint=item.get("codepoint"), mention=None if mention is None else tuple(mention))


@dataclass
class Manifest:
    """A loaded manifest: base paths resolved to absolute paths, entries in file order."""

    path: Path | None
    image_base_path: Path
    audio_base_path: Path
    entries: list[Entry]
    extra: dict[str, Any] = field(default_factory=dict)

    def audio_path(self, entry: Entry) -> Path:
        """Where the wav of ``entry`` lives."""
        return self.audio_base_path / entry.wav

    def image_path(self, entry: Entry) -> Path:
        """Where the image of ``entry`` lives."""
        return self.image_base_path / entry.image

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest: which entry (``index`` None = the file itself), which file, why."""

    index: int | None
    uttid: str | None
    path: str | None
    reason: str

    def __str__(self) -> str:
        where = "manifest" if self.index is None else f"entry {self.index}"
        if self.uttid:
            where += f" (uttid {self.uttid})"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


def _reason_counts(problems: list[ManifestProblem]) -> str:
    # "2 x file does not exist, 1 x undecodable image": the kind of reason, without its details.
    counts = Counter(p.reason.split(":")[0] for p in problems)
    return ", ".join(f"{n} x {reason}" for reason, n in counts.most_common())


class ManifestError(ValueError):
    """A manifest that cannot be used as it is; ``problems`` lists every problem found."""

    def __init__(self, manifest_path: str | Path, problems: list[ManifestProblem]):
        self.manifest_path = str(manifest_path)
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in manifest {manifest_path} ({_reason_counts(problems)}):"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def load_manifest(path: str | Path, *, check_files: bool = True, deep_check: bool = False,
                  skip_bad: bool = False) -> Manifest:
    """Read and validate a Places-format manifest.

    check_files: check that every wav and image exists, is not empty and has a readable header.
    deep_check: also decode every wav and image completely (slow: reads all the data).
    skip_bad: drop the entries that have problems instead of raising, printing to stderr how many
        were skipped and why. Problems with the file as a whole always raise.
    Raises ``ManifestError`` listing every problem (entry index, uttid, path, reason).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, [ManifestProblem(None, None, str(path), "file does not exist")]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(path, [ManifestProblem(None, None, str(path), f"not readable JSON: {exc}")]) from exc

    file_problems = _document_problems(document)
    if file_problems:
        raise ManifestError(path, [ManifestProblem(None, None, str(path), p) for p in file_problems])

    root = path.parent
    manifest = Manifest(
        path=path,
        image_base_path=(root / document["image_base_path"]).absolute(),
        audio_base_path=(root / document["audio_base_path"]).absolute(),
        entries=[],
        extra={key: value for key, value in document.items() if key not in (*BASE_PATH_KEYS, "data")},
    )
    problems: list[ManifestProblem] = []
    for index, item in enumerate(document["data"]):
        uttid = item.get("uttid") if isinstance(item, dict) and isinstance(item.get("uttid"), str) else None
        try:
            entry = Entry.from_json(item)
        except ValueError as exc:
            problems.append(ManifestProblem(index, uttid, None, str(exc)))
            continue
        entry_problems = _file_problems(manifest, index, entry, deep_check) if check_files or deep_check else []
        problems += entry_problems
        if not entry_problems:
            manifest.entries.append(entry)

    if problems and not skip_bad:
        raise ManifestError(path, problems)
    if problems:
        _report_skipped(path, problems, total=len(document["data"]))
    return manifest


def _document_problems(document: Any) -> list[str]:
    if not isinstance(document, dict):
        return [f"the top level must be a JSON object, got {type(document).__name__}"]
    problems = [f"missing key {key!r}" for key in (*BASE_PATH_KEYS, "data") if key not in document]
    problems += [f"{key!r} must be a string" for key in BASE_PATH_KEYS
                 if key in document and not isinstance(document[key], str)]
    if "data" in document and not isinstance(document["data"], list):
        problems.append(f"'data' must be a list of entries, got {type(document['data']).__name__}")
    return problems


def _file_problems(manifest: Manifest, index: int, entry: Entry, deep_check: bool) -> list[ManifestProblem]:
    problems = []
    for path, check in ((manifest.audio_path(entry), _audio_problem), (manifest.image_path(entry), _image_problem)):
        reason = _existence_problem(path) or check(path, deep_check)
        if reason:
            problems.append(ManifestProblem(index, entry.uttid, str(path), reason))
    return problems


def _existence_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file does not exist"
    except OSError as exc:
        return f"cannot stat file: {exc.strerror}"
    if not path.is_file():
        return "not a regular file"
    return "empty file (0 bytes)" if size == 0 else None


def _audio_problem(path: Path, deep_check: bool) -> str | None:
    try:
        if deep_check:
            samples, _ = soundfile.read(path, dtype="float32", always_2d=True)
            frames = len(samples)
        else:
            frames = soundfile.info(path).frames
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        return f"unreadable audio: {exc}"
    return "empty audio (0 samples)" if frames == 0 else None


def _image_problem(path: Path, deep_check: bool) -> str | None:
    try:
        with Image.open(path) as image:
            if deep_check:
                image.load()
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"undecodable image: {exc}"
    return f"image has no pixels ({width}x{height})" if width == 0 or height == 0 else None


def _report_skipped(path: Path, problems: list[ManifestProblem], *, total: int) -> None:
    skipped = len({p.index for p in problems})
    print(f"load_manifest: skipped {skipped} of {total} entries of {path} ({_reason_counts(problems)})",
          file=sys.stderr)
    for problem in problems[:SKIP_REPORT_EXAMPLES]:
        print(f"  {problem}", file=sys.stderr)
    if len(problems) > SKIP_REPORT_EXAMPLES:
        print(f"  ... and {len(problems) - SKIP_REPORT_EXAMPLES} more", file=sys.stderr)


def combine_manifests(manifests: list[Manifest]) -> Manifest:
    """One manifest holding every entry of ``manifests``, in order: several corpora trained as one.

    The base paths become the deepest directory the corpora share, and each entry's ``wav`` and
    ``image`` are rewritten relative to it, so every file stays the same file. A uttid that occurs in
    more than one manifest (two corpora made by the same generator both start at ``train_000000``)
    is prefixed with its manifest's position, ``"1/train_000000_0"``, so uttids stay unique.
    One manifest comes back unchanged.
    """
    if not manifests:
        raise ValueError("combine_manifests: no manifests")
    if len(manifests) == 1:
        return manifests[0]
    image_base = Path(os.path.commonpath([m.image_base_path for m in manifests]))
    audio_base = Path(os.path.commonpath([m.audio_base_path for m in manifests]))
    seen = Counter(uttid for m in manifests for uttid in {e.uttid for e in m.entries})  # in how many manifests
    entries = []
    for position, manifest in enumerate(manifests):
        for entry in manifest.entries:
            uttid = entry.uttid if seen[entry.uttid] == 1 else f"{position}/{entry.uttid}"
            entries.append(replace(
                entry, uttid=uttid,
                wav=os.path.relpath(manifest.audio_path(entry), audio_base),
                image=os.path.relpath(manifest.image_path(entry), image_base)))
    return Manifest(path=None, image_base_path=image_base, audio_base_path=audio_base, entries=entries)


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write ``manifest`` to ``path`` atomically, one entry per line.

    Base paths inside the manifest's directory are written relative to it (the corpus can be moved
    as a whole); others are written absolute. ``load_manifest`` of the result gives back an equal
    Manifest (apart from ``path``), and writing a loaded manifest reproduces the same JSON values.
    """
    path = Path(path)
    root = path.parent.absolute()
    header = {key: _relative_if_inside(getattr(manifest, key), root) for key in BASE_PATH_KEYS}
    header.update(manifest.extra)
    lines = [json.dumps(entry.to_json(), ensure_ascii=False) for entry in manifest.entries]
    head = json.dumps(header, ensure_ascii=False)[:-1]  # reopen the object to append "data"
    text = head + ', "data": [\n' + ",\n".join(lines) + "\n]}\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _relative_if_inside(base: Path, root: Path) -> str:
    base = Path(os.path.normpath(base.absolute()))
    if base.is_relative_to(root):
        return base.relative_to(root).as_posix() or "."
    return str(base)
