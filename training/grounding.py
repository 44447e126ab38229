"""What the matchmap grounds, measured against the spoken-scenes ground truth: the pointing game and
audio-visual concept discovery (Harwath et al., ECCV 2018, sections 5.2-5.3).

Every pair is encoded for grounding (:func:`embed_for_grounding`): the image WHOLE (resized square,
so the heatmap spans the image as given and the peak maps straight to image pixels, no centre-crop
bookkeeping) and the caption to its true frames.

Pointing game: each object mention of a caption (from its color word's start to its shape word's
end, found through the manifest's word timings) is localized (``encoders.grounding``: max over the
span's frames of the matchmap); a hit when the heatmap's peak cell centre lies inside the object's
box. Baselines: a uniform random point (its expected accuracy, box area / image area, computed
exactly) and the image centre. The literature's pointing game (Zhang et al., 2016) forgives a peak
within 15 pixels of the object; that share is reported beside the strict one ("model_within_15px"),
so figures compare with papers, but the strict hit is the measure kept.

Concept discovery: speech segments that ground strongly (local peaks over time of the per-frame
grounding score, the best region's similarity, kept when among the strongest ``keep`` share of
all peaks) are pooled (audio frames of the segment, optionally beside the image region they ground
in), clustered with faiss k-means, and each cluster is named by the transcript word its segments
overlap most. Audio alone is the default: on the val split it gave purer clusters at every k tried
(docs/grounding.md).
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from encoders import load_audio, load_image
from encoders.grounding import (
    MIRROR_AVERAGE,
    SPAN_CONTRAST,
    encode_audio_maps,
    encode_whole_images,
    frame_grounding,
    heatmap_peak,
    region_center,
    span_frames,
    span_heatmap,
)
from training.manifest import Entry, Manifest, SceneObject, Word
from training.scenes import COLORS, SHAPES

NO_WORD = "(none)"  # label of a segment that overlaps no transcript word (silence)
PATCH_SIZE = 64  # pixels of an example patch in the discovery report
PATCH_CELLS = 3.0  # an example patch spans this many heatmap cells around the peak region
EXAMPLES_PER_CLUSTER = 8


# ---- encoding ------------------------------------------------------------------------------------


@dataclass
class GroundingPair:
    """One manifest entry encoded for grounding."""

    index: int  # position in the manifest
    image_map: Tensor  # (H, W, D) float32 on the CPU, spanning the whole image
    audio: Tensor  # (T, D) float32 on the CPU, true frames
    width: int  # the source image's size in pixels
    height: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (0.0, 0.0, float(self.width), float(self.height))


def embed_for_grounding(
    model,
    manifest: Manifest,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = True,
    mirror: bool = MIRROR_AVERAGE,
) -> Iterator[GroundingPair]:
    """Encode the first ``limit`` (default all) pairs of ``manifest`` on the model's device, in batches
    (mirror: see encoders.grounding.encode_whole_images)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    entries = manifest.entries[:limit] if limit is not None else manifest.entries
    rate = model.config.audio.sample_rate
    with tqdm(total=len(entries), desc="grounding", unit="pair", disable=not progress, leave=False) as bar:
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            images = [load_image(manifest.image_path(e)) for e in batch]
            waveforms = [load_audio(manifest.audio_path(e), rate) for e in batch]
            image_maps = encode_whole_images(model, images, mirror=mirror).float().cpu()
            audio_maps = encode_audio_maps(model, waveforms)
            for i, (image, audio) in enumerate(zip(images, audio_maps, strict=True)):
                yield GroundingPair(start + i, image_maps[i], audio.float().cpu(), image.width, image.height)
            bar.update(len(batch))


# ---- pointing game -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """An object as the caption names it: the object and the span from its color word to its shape word."""

    object: SceneObject
    start: float  # seconds: the color word's start
    end: float  # seconds: the shape word's end


def _spoken(word: Word) -> str:
    return word.word.strip(" ,.;:!?").lower()


def object_mentions(entry: Entry) -> tuple[list[Mention], int]:
    """The mentions of ``entry``'s objects found in its word timings, and how many objects had none.

    Objects-world objects say which words name them (``SceneObject.mention``; None in a count or when
    the caption leaves them out). Otherwise (the shapes world) a mention is a color word directly
    followed by the object's shape word; that corpus gives every object of an image a distinct
    (color, shape), so each object has at most one.
    """
    words = entry.words or []
    spoken = [_spoken(w) for w in words]
    mentions, missing = [], 0
    for obj in entry.objects or []:
        if obj.category is not None:
            span = obj.mention if obj.mention is not None and obj.mention[1] < len(words) else None
        else:
            at = next((i for i in range(len(words) - 1) if spoken[i] == obj.color and spoken[i + 1] == obj.shape), None)
            span = None if at is None else (at, at + 1)
        if span is None:
            missing += 1
        else:
            mentions.append(Mention(obj, words[span[0]].start, words[span[1]].end))
    return mentions, missing


def point_in_box(x: float, y: float, bbox: Sequence[float]) -> bool:
    """Whether pixel point (x, y) lies in ``bbox`` [x0, y0, x1, y1] (x1, y1 exclusive)."""
    x0, y0, x1, y1 = bbox
    return x0 <= x < x1 and y0 <= y < y1


POINTING_TOLERANCE_PX = 15.0  # Zhang et al. (2016): a peak this close to the object counts in their game


def distance_to_box(x: float, y: float, bbox: Sequence[float]) -> float:
    """Pixels from point (x, y) to the nearest point of ``bbox`` [x0, y0, x1, y1]; 0 inside it."""
    x0, y0, x1, y1 = bbox
    dx = max(x0 - x, 0.0, x - x1)
    dy = max(y0 - y, 0.0, y - y1)
    return math.hypot(dx, dy)


def random_point_hit_rate(bbox: Sequence[float], width: int, height: int) -> float:
    """Chance that a uniform random point of a width x height image falls in ``bbox``: its (clipped) area share."""
    x0, y0, x1, y1 = bbox
    w = max(0.0, min(x1, width) - max(x0, 0))
    h = max(0.0, min(y1, height) - max(y0, 0))
    return w * h / (width * height)


@dataclass
class PointingTrial:
    """One mention localized: where the heatmap peaked and whether the model and the baselines hit."""

    uttid: str
    color: str
    shape: str
    size: str
    bbox: tuple[float, float, float, float]
    start_seconds: float
    end_seconds: float
    peak_x: float
    peak_y: float
    hit: bool
    center_hit: bool
    random_hit_rate: float
    miss_px: float  # how far the peak fell outside the box (0 for a hit)


def point_mentions(pair: GroundingPair, entry: Entry, frame_seconds: float,
                   reduce: str = "max", contrast: float = SPAN_CONTRAST) -> tuple[list[PointingTrial], int]:
    """Localize every mention of ``entry`` in ``pair``'s maps -> (trials, objects with no mention found).

    reduce: how a region's heat gathers the mention's frames, "max" (the service's heatmap) or "mean";
    contrast: how much of a region's best match elsewhere in the caption is subtracted (span_heatmap)."""
    mentions, missing = object_mentions(entry)
    trials = []
    frames = pair.audio.shape[0]
    for m in mentions:
        if m.start >= frames * frame_seconds:  # the model heard less than the whole caption (max_frames)
            missing += 1
            continue
        first, last = span_frames((m.start, m.end), frames, frame_seconds)
        x, y = heatmap_peak(span_heatmap(pair.image_map, pair.audio, first, last, reduce, contrast), pair.box)
        hit = point_in_box(x, y, m.object.bbox)
        trials.append(
            PointingTrial(
                uttid=entry.uttid,
                color=m.object.color or "",  # objects world: things have no color word
                shape=m.object.shape or m.object.category,
                size=m.object.size,
                bbox=tuple(float(v) for v in m.object.bbox),
                start_seconds=m.start,
                end_seconds=m.end,
                peak_x=x,
                peak_y=y,
                hit=hit,
                center_hit=point_in_box(pair.width / 2, pair.height / 2, m.object.bbox),
                random_hit_rate=random_point_hit_rate(m.object.bbox, pair.width, pair.height),
                miss_px=0.0 if hit else distance_to_box(x, y, m.object.bbox),
            )
        )
    return trials, missing


def _accuracies(trials: Sequence[PointingTrial]) -> dict[str, float | int]:
    n = len(trials)
    return {
        "mentions": n,
        "model": sum(t.hit for t in trials) / n,
        "model_within_15px": sum(t.hit or t.miss_px <= POINTING_TOLERANCE_PX for t in trials) / n,
        "random": sum(t.random_hit_rate for t in trials) / n,
        "center": sum(t.center_hit for t in trials) / n,
    }


def summarize_pointing(trials: Sequence[PointingTrial], *, pairs: int, unmatched: int) -> dict:
    """Accuracy of the model and both baselines, overall and per shape, color and size, as JSON-ready data.

    ``{"pairs", "mentions", "unmatched_objects", "accuracy": {"model", "model_within_15px", "random", "center"},
    "by_shape": {shape: {"mentions", "model", "model_within_15px", "random", "center"}}, "by_color": ..., "by_size": ...}``
    """
    if not trials:
        raise ValueError("no object mentions were localized: the manifest needs 'words' and 'objects' ground truth")
    overall = _accuracies(trials)
    summary: dict = {
        "pairs": pairs,
        "mentions": overall.pop("mentions"),
        "unmatched_objects": unmatched,
        "accuracy": overall,
    }
    for attribute in ("shape", "color", "size"):
        groups: dict[str, list[PointingTrial]] = {}
        for t in trials:
            groups.setdefault(getattr(t, attribute), []).append(t)
        summary[f"by_{attribute}"] = {key: _accuracies(groups[key]) for key in sorted(groups)}
    return summary


@dataclass
class PointingReport:
    summary: dict  # see summarize_pointing
    trials: list[PointingTrial]


def pointing_game(model, manifest: Manifest, *, reduce: str = "max", batch_size: int = 32, limit: int | None = None,
                  progress: bool = True, contrast: float = SPAN_CONTRAST, mirror: bool = MIRROR_AVERAGE) -> PointingReport:
    """Play the pointing game on every object mention of ``manifest`` (first ``limit`` pairs) with ``model``;
    reduce, contrast: see point_mentions; mirror: see encoders.grounding.encode_whole_images. The defaults
    are the service's heatmaps."""
    trials: list[PointingTrial] = []
    pairs = unmatched = 0
    for pair in embed_for_grounding(model, manifest, batch_size=batch_size, limit=limit, progress=progress, mirror=mirror):
        found, missing = point_mentions(pair, manifest.entries[pair.index], model.audio_frame_seconds, reduce, contrast)
        trials += found
        unmatched += missing
        pairs += 1
    return PointingReport(summarize_pointing(trials, pairs=pairs, unmatched=unmatched), trials)


# ---- concept discovery ---------------------------------------------------------------------------


def grounding_peaks(frame_scores: Tensor) -> list[int]:
    """frame_scores: (T,) -> frames that are local maxima (>= the previous frame, > the next one;
    the ends compare with their one neighbour). One frame alone is a peak."""
    s = frame_scores.tolist()
    return [t for t in range(len(s)) if (t == 0 or s[t] >= s[t - 1]) and (t == len(s) - 1 or s[t] > s[t + 1])]


def segment_frames(peak: int, frames: int, half_width: int) -> tuple[int, int]:
    """The segment [first, last) of ``half_width`` frames either side of ``peak``, clipped to the audio."""
    return max(0, peak - half_width), min(frames, peak + half_width + 1)


def overlapping_word(words: Sequence[Word], start: float, end: float) -> tuple[str, float]:
    """(the word overlapping [start, end) seconds the most, its overlap in seconds); (NO_WORD, 0) if none."""
    best, overlap = NO_WORD, 0.0
    for w in words:
        o = min(end, w.end) - max(start, w.start)
        if o > overlap:
            best, overlap = _spoken(w), o
    return best, overlap


@dataclass
class Segment:
    """A strongly grounded speech segment: where it lies, what it grounds in, which word it covers."""

    entry_index: int
    uttid: str
    first_frame: int  # [first_frame, last_frame) audio frames
    last_frame: int
    start_seconds: float
    end_seconds: float
    peak_frame: int
    region: int  # row-major index of the region the peak frame grounds in
    score: float  # the peak frame's grounding score (its best region's matchmap value)
    word: str  # transcript word overlapping the segment most (NO_WORD: none)
    region_box: tuple[float, float, float, float]  # the patch around the region, in image pixels
    cluster: int = -1


@dataclass
class Cluster:
    id: int
    word: str  # most common word of its segments
    purity: float  # share of its segments with that word
    size: int
    word_counts: dict[str, int]  # every word of its segments, most common first
    examples: list[int] = field(default_factory=list)  # indices into Discovery.segments, best grounded first


@dataclass
class Discovery:
    segments: list[Segment]
    clusters: list[Cluster]
    summary: dict


def _patch_box(region: int, rows: int, cols: int, box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y = region_center(region, rows, cols, box)
    half_w = PATCH_CELLS / 2 * (box[2] - box[0]) / cols
    half_h = PATCH_CELLS / 2 * (box[3] - box[1]) / rows
    return (max(box[0], x - half_w), max(box[1], y - half_h), min(box[2], x + half_w), min(box[3], y + half_h))


def pair_segments(pair: GroundingPair, entry: Entry, frame_seconds: float, half_width: int) -> tuple[list[Segment], Tensor]:
    """Every grounding peak of ``pair`` as a Segment, and its (S, 2D) features: the L2-normalized mean
    of the segment's audio frames, then the L2-normalized image region the peak grounds in."""
    scores, regions = frame_grounding(pair.image_map, pair.audio)
    rows, cols, d = pair.image_map.shape
    image_regions = pair.image_map.reshape(rows * cols, d)
    segments, features = [], []
    for peak in grounding_peaks(scores):
        first, last = segment_frames(peak, pair.audio.shape[0], half_width)
        start, end = first * frame_seconds, last * frame_seconds
        word, _ = overlapping_word(entry.words or [], start, end)
        region = int(regions[peak])
        segments.append(Segment(pair.index, entry.uttid, first, last, start, end, peak, region,
                                float(scores[peak]), word, _patch_box(region, rows, cols, pair.box)))
        features.append(torch.cat([F.normalize(pair.audio[first:last].mean(0), dim=0),
                                   F.normalize(image_regions[region], dim=0)]))
    return segments, torch.stack(features) if features else pair.audio.new_zeros((0, 2 * d))


def cluster_features(features: np.ndarray, clusters: int, *, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """features: (S, D) float32 -> (S,) int64 cluster of each row, by spherical faiss k-means."""
    import faiss

    if features.ndim != 2 or features.shape[0] < clusters:
        raise ValueError(f"k-means into {clusters} clusters needs at least {clusters} segments, got {features.shape[0]}")
    x = np.ascontiguousarray(features, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], clusters, niter=iterations, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return assignment[:, 0].astype(np.int64)


def describe_clusters(segments: Sequence[Segment], clusters: int) -> list[Cluster]:
    """Each cluster's most common word, purity, size, word counts and best-grounded examples."""
    members: list[list[int]] = [[] for _ in range(clusters)]
    for i, s in enumerate(segments):
        members[s.cluster].append(i)
    described = []
    for c, idx in enumerate(members):
        if not idx:
            continue
        counts = Counter(segments[i].word for i in idx)
        word, top = counts.most_common(1)[0]
        best = sorted(idx, key=lambda i: -segments[i].score)[:EXAMPLES_PER_CLUSTER]
        described.append(Cluster(c, word, top / len(idx), len(idx), dict(counts.most_common()), best))
    return sorted(described, key=lambda c: (-c.purity, -c.size, c.id))


def summarize_discovery(clusters: Sequence[Cluster], *, pairs: int, peaks: int, segments: int) -> dict:
    """JSON-ready summary: purities and which of the 8 shapes and 8 colors some cluster is named by."""
    named = {c.word for c in clusters}
    shapes = [s for s in SHAPES if s in named]
    colors = [c for c in COLORS if c in named]
    total = sum(c.size for c in clusters)
    return {
        "pairs": pairs,
        "peaks": peaks,
        "segments": segments,
        "clusters": len(clusters),
        "mean_purity": sum(c.purity for c in clusters) / len(clusters),
        "weighted_purity": sum(c.purity * c.size for c in clusters) / total,
        "shapes_found": len(shapes),
        "colors_found": len(colors),
        "shapes": shapes,
        "colors": colors,
        "cluster_words": [{"id": c.id, "word": c.word, "purity": c.purity, "size": c.size} for c in clusters],
    }


@dataclass
class SegmentPool:
    """Every grounding peak of a manifest as a Segment, with its features (see pair_segments)."""

    segments: list[Segment]
    features: Tensor  # (S, 2D) float32
    pairs: int
    half_width: int


def collect_segments(model, manifest: Manifest, *, half_width: int = 0, batch_size: int = 32,
                     limit: int | None = None, progress: bool = True) -> SegmentPool:
    """The segments around every grounding peak of ``manifest``'s first ``limit`` pairs (default all);
    half_width: audio frames either side of a peak in its segment."""
    if half_width < 0:
        raise ValueError(f"half_width must be >= 0, got {half_width}")
    segments: list[Segment] = []
    features: list[Tensor] = []
    pairs = 0
    for pair in embed_for_grounding(model, manifest, batch_size=batch_size, limit=limit, progress=progress):
        found, feats = pair_segments(pair, manifest.entries[pair.index], model.audio_frame_seconds, half_width)
        segments += found
        features.append(feats)
        pairs += 1
    if not segments:
        raise ValueError("no speech segments found: the manifest is empty")
    return SegmentPool(segments, torch.cat(features), pairs, half_width)


def cluster_segments(pool: SegmentPool, clusters: int, *, keep: float = 0.5, image_weight: float = 0.0,
                     seed: int = 0) -> Discovery:
    """Keep the strongest ``keep`` share (0 < keep <= 1) of the pool's segments by grounding score and
    cluster them into ``clusters`` with k-means on [audio, image_weight * image] features (0 = the
    audio alone); returns copies, the pool is left as it was."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    if image_weight < 0:
        raise ValueError(f"image_weight must be >= 0, got {image_weight}")
    scores = np.array([s.score for s in pool.segments])
    threshold = np.quantile(scores, 1 - keep) if keep < 1 else -np.inf
    kept = np.flatnonzero(scores >= threshold)
    d = pool.features.shape[1] // 2
    features = pool.features[kept]
    features = features[:, :d] if image_weight == 0 else torch.cat([features[:, :d], image_weight * features[:, d:]], 1)
    assignment = cluster_features(features.numpy(), clusters, seed=seed)
    segments = [replace(pool.segments[i], cluster=int(c)) for i, c in zip(kept, assignment, strict=True)]
    described = describe_clusters(segments, clusters)
    summary = summarize_discovery(described, pairs=pool.pairs, peaks=len(pool.segments), segments=len(segments))
    summary.update(keep=keep, half_width=pool.half_width, image_weight=image_weight, seed=seed)
    return Discovery(segments, described, summary)


def discover_concepts(
    model,
    manifest: Manifest,
    clusters: int,
    *,
    keep: float = 0.5,
    half_width: int = 0,
    image_weight: float = 0.0,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Discovery:
    """Find strongly grounded speech segments in ``manifest`` (first ``limit`` pairs) and cluster them
    (collect_segments, then cluster_segments)."""
    pool = collect_segments(model, manifest, half_width=half_width, batch_size=batch_size, limit=limit,
                            progress=progress)
    return cluster_segments(pool, clusters, keep=keep, image_weight=image_weight, seed=seed)


def example_patches(discovery: Discovery, cluster: Cluster, manifest: Manifest) -> Image.Image:
    """A strip of the cluster's example patches (crops around the grounded region), PATCH_SIZE px each."""
    tiles = []
    for i in cluster.examples:
        s = discovery.segments[i]
        image = load_image(manifest.image_path(manifest.entries[s.entry_index]))
        tiles.append(image.crop(tuple(round(v) for v in s.region_box)).resize((PATCH_SIZE, PATCH_SIZE)))
    strip = Image.new("RGB", (max(1, len(tiles)) * (PATCH_SIZE + 2), PATCH_SIZE), "white")
    for k, tile in enumerate(tiles):
        strip.paste(tile, (k * (PATCH_SIZE + 2), 0))
    return strip


def write_report(discovery: Discovery, manifest: Manifest, out_dir: str | Path) -> Path:
    """Write ``out_dir``/index.html, summary.json, segments.json and one cluster_<id>.png strip of example
    patches per cluster; returns the index.html path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in discovery.clusters:
        name = f"cluster_{c.id:03d}.png"
        example_patches(discovery, c, manifest).save(out / name)
        words = ", ".join(f"{html.escape(w)} {n}" for w, n in list(c.word_counts.items())[:5])
        examples = "; ".join(
            f"{html.escape(discovery.segments[i].uttid)} {discovery.segments[i].start_seconds:.2f}-"
            f"{discovery.segments[i].end_seconds:.2f} s" for i in c.examples[:3]
        )
        rows.append(
            f"<tr><td>{c.id}</td><td><b>{html.escape(c.word)}</b></td><td>{c.purity:.2f}</td><td>{c.size}</td>"
            f"<td>{words}</td><td><img src='{name}' alt='patches of cluster {c.id}'><br><small>{examples}</small></td></tr>"
        )
    s = discovery.summary
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>matchmap concept discovery</title>
<style>body{{font-family:sans-serif}} td,th{{border-bottom:1px solid #ccc;padding:4px;vertical-align:top}}</style>
</head><body>
<h1>Concept discovery</h1>
<p>{html.escape(str(manifest.path or ''))}: {s['pairs']} pairs, {s['peaks']} grounding peaks, {s['segments']} kept
(strongest {s['keep']:.0%}), {s['clusters']} clusters. Mean purity {s['mean_purity']:.3f}
(size-weighted {s['weighted_purity']:.3f}). Shapes named by a cluster: {s['shapes_found']}/8
({html.escape(', '.join(s['shapes']))}); colors: {s['colors_found']}/8 ({html.escape(', '.join(s['colors']))}).</p>
<table><tr><th>cluster</th><th>word</th><th>purity</th><th>segments</th><th>words (count)</th>
<th>example patches (best grounded first)</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(s, indent=2), encoding="utf-8")
    segments = [{**asdict(seg), "region_box": list(seg.region_box)} for seg in discovery.segments]
    (out / "segments.json").write_text(json.dumps(segments), encoding="utf-8")
    return out / "index.html"

