"""The spoken-scenes corpus generator behind ``matchmap synth``.

Layout of a corpus directory OUT::

    OUT/train.json  OUT/val.json            Places-format manifests with ground truth
    OUT/images/{train,val}/<uttid>.png      256x256 RGB scenes
    OUT/audio/{train,val}/<uttid>.wav       16 kHz mono PCM_16 spoken captions

Two worlds: ``shapes`` (the default, ``training.scenes``: one caption per image) and ``objects``
(``training.objects_world``: emoji and shapes, 2-5 captions per image by different voices; an
image's captions are consecutive entries sharing its ``image``, uttids ``<split>_<index>_<k>``).

Every pair (objects world: every image and its captions) is a pure function of (seed, split, index):
its random generator is seeded with exactly those three numbers, so a corpus does not depend on the number of worker processes, and a second
run with the same seed writes byte-identical files. Train pairs are spoken by train voices only and
val pairs by val voices only (``speech.train_val_voices``: the same split for every seed).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from training.manifest import Entry, Manifest, Word, write_manifest
from training.objects_world import describe_object_scene, random_object_scene, with_mentions
from training.scenes import describe_scene, random_scene
from training.speech import SAMPLE_RATE, SpeechEngine, Voice, finish_utterance, get_engine, train_val_voices

SPLITS = ("train", "val")
RATE_WPM = (130, 200)  # espeak words per minute, drawn per utterance
PITCH = (30, 70)  # 0-100, 50 = the voice's own
SILENCE_SECONDS = (0.1, 0.3)  # before the first word and after the last, drawn per utterance
LEVEL_DBFS = (-24.0, -14.0)  # loudness of the speech, drawn per utterance
# zlib level 3: on these textures as small as the default 6 and about 2.5x faster to write.
PNG_COMPRESS_LEVEL = 3
# Files and folders of a corpus: what --force replaces and what counts as "a corpus is already here".
CORPUS_PARTS = ("train.json", "val.json", "images/train", "images/val", "audio/train", "audio/val")
WORLDS = ("shapes", "objects")


class CorpusExistsError(FileExistsError):
    """The output directory already holds (part of) a corpus and overwriting was not asked for."""


@dataclass(frozen=True)
class PairJob:
    """What one worker needs to make pair ``index`` of ``split``."""

    out_dir: str
    split: str
    index: int
    seed: int
    engines: tuple[str, ...]
    digits: int
    world: str = "shapes"
    captions: tuple[int, int] = (1, 1)  # objects world: captions per image (min, max)
    objects: tuple[int, int] = (1, 4)  # objects world: objects per image (min, max)


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one pair, derived from (seed, split, index) only."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


@cache
def _engine_voices(engine_name: str, split: str) -> tuple[SpeechEngine, list[Voice]]:
    # Per process: engines initialize lazily in each worker.
    engine = get_engine(engine_name)
    train, val = train_val_voices(engine)
    return engine, train if split == "train" else val


def _speak(text: str, rng: np.random.Generator, job: PairJob, path: Path, avoid: set[str]) -> tuple:
    """Speak ``text`` with a voice drawn for this split (not one of ``avoid``'s ids, while others are
    left), write the wav; returns (engine, voice, words, extra)."""
    engine, voices = _engine_voices(job.engines[int(rng.integers(len(job.engines)))], job.split)
    fresh = [v for v in voices if v.id not in avoid] or voices
    voice = fresh[int(rng.integers(len(fresh)))]
    rate, pitch = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)), int(rng.integers(PITCH[0], PITCH[1] + 1))
    utterance = finish_utterance(
        engine.synthesize(text, voice, rate, pitch),
        lead_seconds=float(rng.uniform(*SILENCE_SECONDS)),
        trail_seconds=float(rng.uniform(*SILENCE_SECONDS)),
        level_dbfs=float(rng.uniform(*LEVEL_DBFS)),
    )
    pcm = np.clip(np.rint(utterance.waveform * 32767.0), -32768, 32767).astype(np.int16)
    soundfile.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return engine, voice, [Word(w.word, w.start, w.end) for w in utterance.words], {"rate": rate, "pitch": pitch}


def make_pair(job: PairJob) -> list[Entry]:
    """Draw, render, speak and write pair ``job.index`` of ``job.split`` (objects world: one image and
    all its captions); returns its manifest entries."""
    rng = pair_rng(job.seed, job.split, job.index)
    out = Path(job.out_dir)
    stem = f"{job.split}_{job.index:0{job.digits}d}"
    if job.world == "objects":
        scene = random_object_scene(rng, objects=job.objects)
        captions = [describe_object_scene(scene, rng) for _ in range(int(rng.integers(job.captions[0],
                                                                                       job.captions[1] + 1)))]
        texts, uttids = [c.text for c in captions], [f"{stem}_{k}" for k in range(len(captions))]
    else:
        scene = random_scene(rng)
        captions, texts, uttids = None, [describe_scene(scene, rng)], [stem]
    entries, voices_used = [], set()
    for k, (text, uttid) in enumerate(zip(texts, uttids, strict=True)):
        engine, voice, words, extra = _speak(text, rng, job, out / "audio" / job.split / f"{uttid}.wav", voices_used)
        voices_used.add(voice.id)
        entries.append(Entry(
            wav=f"{uttid}.wav",
            image=f"{stem}.png",
            uttid=uttid,
            speaker=voice.id,
            asr_text=" ".join(w.word for w in words),
            words=words,
            objects=with_mentions(scene.objects, captions[k]) if captions else scene.objects,
            background=scene.background,
            engine=engine.name,
            voice=voice.name,
            extra=extra,
        ))
    scene.image.save(out / "images" / job.split / f"{stem}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return entries


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [part for part in CORPUS_PARTS if (out_dir / part).exists()
                and (not (out_dir / part).is_dir() or any((out_dir / part).iterdir()))]
    if existing and not overwrite:
        raise CorpusExistsError(f"{out_dir} already holds a corpus ({', '.join(existing)}); choose another "
                                "directory or pass --force (overwrite=True) to replace it")
    for part in CORPUS_PARTS:
        path = out_dir / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "audio" / split).mkdir(parents=True, exist_ok=True)


def default_workers() -> int:
    """All the CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthesize_corpus(out_dir: str | Path, *, pairs: int, val_pairs: int = 1000, seed: int = 0,
                      engines: Sequence[str] = ("espeak",), workers: int | None = None, progress: bool = True,
                      overwrite: bool = False, world: str = "shapes", captions: tuple[int, int] = (2, 5),
                      objects: tuple[int, int] = (1, 4)) -> tuple[Path, Path]:
    """Generate a spoken-scenes corpus in ``out_dir``; returns the paths of (train.json, val.json).

    pairs / val_pairs: how many image-caption pairs each split gets. seed: >= 0; the same seed gives
    byte-identical files. engines: speech engine names (see ``speech.ENGINES``), one drawn per pair.
    workers: processes (default: all cores; 1 = in this process). progress: a tqdm bar (pairs/s) on
    stderr. overwrite: replace an existing corpus in ``out_dir`` (otherwise CorpusExistsError).
    world: "shapes" (one caption per image) or "objects", where pairs / val_pairs count images, each
    with ``captions`` (min, max) captions and ``objects`` (min, max) objects, e.g. (1, 1) for the
    one-object scenes of a curriculum.
    """
    if pairs < 1 or val_pairs < 0:
        raise ValueError(f"need pairs >= 1 and val_pairs >= 0, got pairs={pairs}, val_pairs={val_pairs}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    engines = tuple(engines)
    if not engines:
        raise ValueError("no speech engine given")
    for name in engines:
        train_val_voices(get_engine(name))  # fail early: unknown engine, library missing, too few voices
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    if world == "objects" and not (1 <= captions[0] <= captions[1] and 1 <= objects[0] <= objects[1] <= 4):
        raise ValueError(f"need 1 <= min <= max captions and 1 <= min <= max <= 4 objects, got {captions}, {objects}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    out_dir = Path(out_dir).absolute()
    _prepare_out_dir(out_dir, overwrite)
    digits = max(6, len(str(max(pairs, val_pairs) - 1)))
    shape = {"world": world, "captions": tuple(captions), "objects": tuple(objects)} if world == "objects" else {}
    jobs = [PairJob(str(out_dir), split, index, seed, engines, digits, **shape)
            for split, count in (("train", pairs), ("val", val_pairs)) for index in range(count)]

    entries: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    with tqdm(total=len(jobs), unit="pair", desc="synth", disable=not progress, smoothing=0.1) as bar:
        if workers == 1:
            results = map(make_pair, jobs)
            for job, made in zip(jobs, results, strict=True):
                entries[job.split] += made
                bar.update()
        else:
            # spawn, not fork: callers may hold threads (torch, gRPC) that a fork would copy mid-flight.
            # (So a script calling this needs the usual `if __name__ == "__main__":` guard.)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunksize = max(1, min(16, len(jobs) // (8 * workers)))
                for job, made in zip(jobs, pool.map(make_pair, jobs, chunksize=chunksize), strict=True):
                    entries[job.split] += made
                    bar.update()

    paths = []
    for split in SPLITS:
        manifest = Manifest(
            path=None,
            image_base_path=out_dir / "images" / split,
            audio_base_path=out_dir / "audio" / split,
            entries=entries[split],
            extra={"corpus": {"generator": "matchmap synth", "split": split, "seed": seed, "engines": list(engines),
                              **({"world": world, "captions": list(captions), "objects": list(objects)} if shape else {})}},
        )
        path = out_dir / f"{split}.json"
        write_manifest(manifest, path)
        paths.append(path)
    return paths[0], paths[1]
