"""The two-stage spoken-query search engine: a facade over the model and the indexed collections.

Per query: decode the audio (checked, limited) -> log-mel -> audio map A (T, D) from the audio
branch -> stage 1: the collection's FAISS index ranks every image by the inner product of the model's
stage-1 vectors (masked means, whose product is exactly SISA, or the heads distilled from MISA by
``matchmap distill-stage1``) -> stage 2: the best ``candidates`` images are re-scored by MISA through
``encoders.matchmap`` (on CUDA when the engine runs there, where ``paired_misa`` scores all queries
of a batch on one collection in one call; the CPU scores one query at a time): in bfloat16 from the collection's feature maps held in memory
(``search.resident``), then the best few exactly in float32 from the feature store -> the best
``top_k`` by exact MISA. The engine is synchronous and keeps no
per-request state; ``search.server`` calls it from one model thread, batching concurrent queries
through :meth:`SearchEngine.search_batch`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from encoders import create_model, load_image, trim_silence
from encoders.frontend import TRIM_MARGIN_SECONDS
from encoders.matchmap import paired_misa
from encoders.models import QUERY_FRAME_MULTIPLE
from indexer import Collection, CollectionInfo, ImageRecord, Library, Shard
from search import (
    DEFAULT_CANDIDATES,
    DEFAULT_CANDIDATES_SHARE,
    HELD_ENERGY,
    HELD_ENERGY_FLOOR,
    MAX_CANDIDATES,
    MAX_EXHAUSTIVE_CANDIDATES,
    STAGE1_WIDEN,
)
from search.audio import check_sample_rate, decode_audio
from search.centroid_prune import faiss_recall_k, prune_by_centroids
from search.errors import ImageNotFound, InvalidQuery
from search.localization import LiveHighlighter, Localization, encode_whole_image, localize
from search.resident import ResidentCodes, ResidentMaps, held_for, misa_caption_by_caption
from search.threads import team, team_size
from search.vad import MARGIN_SECONDS as VAD_MARGIN_SECONDS
from search.vad import VAD_RATES, padded_sample_counts, speech_cut, speech_probabilities

log = logging.getLogger("matchmap.engine")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# An opened collection is a snapshot; after this many seconds the next query asks the catalog
# (one small query) whether it changed. Images added meanwhile are appended to the open snapshot
# (Collection.appended: their rows, stage-1 vectors and resident maps; milliseconds); any other change
# reopens the collection in a background thread while queries go on with the old snapshot.
COLLECTION_REFRESH_SECONDS = 2.0
# Queries batched into one audio-branch pass may be padded by at most this share of their true frames.
PADDING_BUDGET = 0.2
# Stage 2 reads candidates' maps from the feature store this many at a time (float16 read + float32
# copy: 48 MB for `tiny`), so a query's memory does not grow with its candidates (10,000 at once: 983 MB).
STORE_READ_CHUNK = 512
# A collection that is not resident gets stage 2's bfloat16 pass (its maps read from the store through
# the page cache) from this many candidates on; below, exact float32 over every candidate, read once,
# is cheaper than reading the best ones twice. Measured against the exact pass on 10,000 images
# (bench/bench_stage2_batch.py --resident-mb 0): 0.82x the queries/s at K=400, 1.16x at 1,000, 1.54x at 4,000.
STORE_COARSE_AT_LEAST = 1000


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU raises ValueError saying so."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(device)


@dataclass(frozen=True)
class SearchLimits:
    """What one request may ask for. 0 in a request means the default."""

    max_audio_seconds: float = 30.0
    default_top_k: int = 10
    max_top_k: int = 1000
    # Stage-1 candidates re-ranked by MISA when a query does not say: max(default_candidates,
    # candidates_share x the collection's images), at most max_candidates (see search.DEFAULT_CANDIDATES).
    default_candidates: int = DEFAULT_CANDIDATES
    candidates_share: float = DEFAULT_CANDIDATES_SHARE
    # At most this many per query; a collection of at most max_exhaustive_candidates images may be asked
    # for up to that many (every image: exhaustive search). Stage 2 reads maps from the store in chunks
    # of STORE_READ_CHUNK, so a query's memory stays bounded whatever it asks for.
    max_candidates: int = MAX_CANDIDATES
    max_exhaustive_candidates: int = MAX_EXHAUSTIVE_CANDIDATES
    resident_maps_mb: float = 4096.0  # memory for collections' feature maps held in memory (0 = read from the store)
    # Held maps keep the fewest principal directions of their region vectors that hold this share of
    # their second moment (search.resident.region_basis; 1 = every dimension). A trained model's audio
    # frames lie where its image regions do; a model with random weights has no such relation.
    held_energy: float = HELD_ENERGY
    # ... and where even int8 maps in those do not fit, the most directions that fit, if they hold this share.
    held_energy_floor: float = HELD_ENERGY_FLOOR
    # Stage 2 scores every candidate in bfloat16 (from resident maps, or else from the store through the
    # page cache), then re-scores exactly (float32, from the store) the best
    # max(exact_rescore_at_least, exact_rescore_factor * top_k), which it ranks. 32 for a top 10: on 10,000
    # scenes, 2 KB codes keeping 32 lost at most 0.003 of top-10 agreement against keeping 64, bfloat16
    # maps keeping 16 nothing (bench_search.py --only codec --codec-keeps, docs/search.md), and at a
    # million images each re-scored map is a store read (about 4 ms cold).
    exact_rescore_at_least: int = 32
    exact_rescore_factor: int = 3
    # Stage 1 takes stage1_widen x K candidates from FAISS and keeps K of them by the centroid interaction
    # (search.centroid_prune), where the collection has region centroids; 1 = FAISS's top K as they are.
    stage1_widen: int = STAGE1_WIDEN

    def __post_init__(self) -> None:
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"need 1 <= default_top_k <= max_top_k, got {self.default_top_k}, {self.max_top_k}")
        if self.exact_rescore_at_least < 1 or self.exact_rescore_factor < 1:
            raise ValueError("exact_rescore_at_least and exact_rescore_factor must be >= 1")
        if self.stage1_widen < 1:
            raise ValueError(f"stage1_widen must be >= 1, got {self.stage1_widen}")
        if not 0 <= self.candidates_share <= 1:
            raise ValueError(f"candidates_share must lie in 0..1, got {self.candidates_share}")
        if not 0 < self.held_energy <= 1:
            raise ValueError(f"held_energy must lie in (0, 1], got {self.held_energy}")
        if not 0 < self.held_energy_floor <= 1:
            raise ValueError(f"held_energy_floor must lie in (0, 1], got {self.held_energy_floor}")
        if not self.resident_maps_mb >= 0:
            raise ValueError(f"resident_maps_mb must be >= 0, got {self.resident_maps_mb}")
        if not 1 <= self.default_candidates <= self.max_candidates <= self.max_exhaustive_candidates:
            raise ValueError(
                "need 1 <= default_candidates <= max_candidates <= max_exhaustive_candidates, got "
                f"{self.default_candidates}, {self.max_candidates}, {self.max_exhaustive_candidates}"
            )


@dataclass
class QueryAudio:
    """A decoded, checked query ready for the audio branch."""

    logmel: Tensor  # (n_mels, F) normalized log-mel of the true frames (F <= the model's max_frames)
    seconds: float  # duration of the decoded audio
    decode_ms: float


@dataclass
class TrimmedAudio:
    """A decoded query with its silence trimmed, before the VAD cuts it to its speech
    (SearchEngine.trimmed_audio, then speech_audio)."""

    waveform: Tensor  # (N,) the silence-trimmed waveform
    seconds: float  # duration of the decoded audio
    started: float  # time.perf_counter() when decoding began
    name: str  # the input's name, for errors
    audio: QueryAudio | None  # ``waveform`` prepared as a query, when asked for and scoreable: what the VAD usually keeps


@dataclass
class SearchQuery:
    """One query of a batch: audio, where to search, how many hits and stage-1 candidates."""

    audio: QueryAudio
    collection: str
    top_k: int
    candidates: int


@dataclass
class Hit:
    image_id: int
    uri: str
    score: float  # MISA
    stage1_score: float  # pooled inner product (SISA without stage-1 heads)


@dataclass
class SearchResult:
    hits: list[Hit]  # best first
    collection_size: int
    candidates: int  # re-ranked in stage 2 (capped at the collection size)
    batch_size: int  # queries encoded in the same forward pass
    audio_seconds: float
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode, queue, encode, stage1, stage2


@dataclass
class GroupAnswer:
    """One query's answer from stages 1 and 2, before the batch's timings are added (SearchResult)."""

    hits: list[Hit]
    candidates: int  # stage-1 candidates re-ranked
    collection_size: int
    stage1_ms: float
    stage2_ms: float


@dataclass
class ImageMap:
    """An image's feature map and the part of the source image it covers."""

    features: Tensor  # (H, W, D)
    box: tuple[float, float, float, float]  # [x0, y0, x1, y1] in the source image's pixels


def length_groups(lengths: Sequence[int], max_padding: float = PADDING_BUDGET) -> list[list[int]]:
    """Indices of ``lengths`` grouped for batched encoding: sorted by length, each group padded (to its
    longest member) by at most ``max_padding`` of its true frames.

    The audio branch's cost grows with the padded length, so one 1 s query batched with a 10 s query
    would cost nearly as much as a second 10 s query; similar lengths batch almost for free.
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is not None and lengths[i] * (len(group) + 1) <= (1 + max_padding) * (
            sum(lengths[j] for j in group) + lengths[i]
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


def center_crop_box(width: int, height: int, resize_size: int, input_size: int) -> tuple[float, float, float, float]:
    """The square of a width x height image that the image front end keeps: shorter side scaled to
    ``resize_size``, centre ``input_size`` crop; returned in the source image's pixels."""
    side = input_size * min(width, height) / resize_size
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


class SearchEngine:
    """Model + library + collections, loaded once; answers search, localize and highlight requests.

    ``device`` places the model and the stage-2 re-ranking ("auto": CUDA when available). The
    engine is not re-entrant: the server calls it from a single model thread.
    """

    def __init__(
        self, model, library: Library, *, device: str = "auto", limits: SearchLimits | None = None, vad: bool = True,
        shard: Shard | None = None,
    ):
        self.device = resolve_device(device)
        self.shard = shard  # only this shard of each collection (a ``serve --ray`` replica; search.ray_serve)
        if self.device.type == "cuda":
            from encoders.precision import use_exact_float32

            use_exact_float32()  # scores as the CPU's within 1e-4 (encoders/precision.py)
        self.vad = vad  # cut a query to its speech with search.vad (else only its silence is trimmed)
        self.model = model.to(self.device).eval()
        self.library = library
        self.limits = limits or SearchLimits()
        self._collections: dict[str, tuple[Collection, float]] = {}  # name -> (snapshot, last checked)
        self._resident: dict[str, ResidentMaps | ResidentCodes] = {}  # name -> maps of the snapshot in _collections
        # name -> what a background reopen produced: (snapshot, its resident maps or None) or the error
        self._reopened: dict[str, tuple[Collection, ResidentMaps | ResidentCodes | None] | Exception] = {}
        self._reopening: set[str] = set()
        # name -> (snapshot, what of it to hold) made by the background holder (warm_up(background=True))
        self._held_ready: dict[str, tuple[Collection, ResidentMaps | ResidentCodes | None]] = {}
        self._holder: threading.Thread | None = None
        self._closing = threading.Event()  # set by close(): the holder stops before its next collection
        self._reopeners: list[threading.Thread] = []  # background reopens (close() waits for them too)
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        checkpoint: str | Path | None = None,
        data_dir: str | Path | None = None,
        db_url: str | None = None,
        *,
        device: str = "auto",
        limits: SearchLimits | None = None,
        vad: bool = True,
        shard: Shard | None = None,
    ) -> SearchEngine:
        """Load the model (``checkpoint``; None = the shipped default) and open the library."""
        resolve_device(device)  # fail on a bad device before the slow loads
        model = create_model(str(checkpoint) if checkpoint is not None else None)
        return cls(model, Library.open(data_dir, db_url), device=device, limits=limits, vad=vad, shard=shard)

    def close(self) -> None:
        """Close the library, once the background holder is done with the collection it is reading and
        background reopens are done: a process that exits while such a thread still runs torch code
        aborts (``serve`` on a taken port exited -6 instead of 3)."""
        self._closing.set()
        for thread in [self._holder, *self._reopeners]:
            if thread is not None:
                thread.join()
        self.library.close()

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def sample_rate(self) -> int:
        return self.model.config.audio.sample_rate

    @property
    def longest_query_seconds(self) -> float:
        """The most speech the audio branch takes (max_frames log-mel frames): 10.24 s for ``tiny``."""
        return self.model.config.audio.max_frames * self.model.config.audio.frame_seconds

    # ---- collections -------------------------------------------------------------------------

    def collection(self, name: str) -> Collection:
        """The named collection checked against the model (CollectionNotFound, ModelMismatchError).

        Opened once and kept; re-checked against the catalog at most every COLLECTION_REFRESH_SECONDS.
        Images added since are appended to the open snapshot; any other change reopens the collection
        in a background thread, and the old snapshot answers until the new one is ready.
        """
        if not name:
            raise InvalidQuery(
                "collection is empty: name the collection to search (ListCollections lists them)", field="collection"
            )
        with self._lock:
            now = time.monotonic()
            reopened = self._reopened.pop(name, None)
            if isinstance(reopened, Exception):  # the collection went away, or changed model
                self._forget(name)
                raise reopened
            if reopened is not None:
                coll, resident = reopened
                self._forget(name)
                self._install(coll, resident, now)
                return coll
            self._adopt_held(name)
            cached = self._collections.get(name)
            if cached is None:
                coll = self._open_checked(name)
                self._install(coll, self._resident_for(coll), now)
                return coll
            coll, checked = cached
            if now - checked < COLLECTION_REFRESH_SECONDS or name in self._reopening:
                return coll
            fresh = coll.appended()
            if fresh is None:  # not only additions: reopen without making queries wait
                self._collections[name] = (coll, now)
                self._reopen_in_background(name)
                return coll
            if fresh is not coll:
                self._install(fresh, self._appended_resident(coll, fresh), now)
            else:
                self._collections[name] = (coll, now)
            return fresh

    def _open_checked(self, name: str) -> Collection:
        """``name`` opened afresh (this engine's shard of it) and checked against the model."""
        coll = self.library.collection(name, self.shard)
        coll.check_model(self.model)
        return coll

    def _install(self, coll: Collection, resident: ResidentMaps | ResidentCodes | None, now: float) -> None:
        self._collections[coll.name] = (coll, now)
        if resident is None:
            self._resident.pop(coll.name, None)
        else:
            self._resident[coll.name] = resident

    def _forget(self, name: str) -> None:
        self._collections.pop(name, None)
        self._resident.pop(name, None)

    def _room_for(self, name: str) -> float:
        """Bytes of the memory budget that other collections' held maps or codes (or those the background
        holder has made for them) leave to ``name``."""
        held = [r for other, r in self._resident.items() if other != name]
        held += [r for other, (_, r) in self._held_ready.items() if other != name and r is not None]
        return self.limits.resident_maps_mb * 2**20 - sum(r.nbytes for r in held)

    def _fits(self, name: str, nbytes: int) -> bool:
        return nbytes <= self._room_for(name)

    def _resident_for(self, coll: Collection) -> ResidentMaps | ResidentCodes | None:
        """What of ``coll`` to hold in memory beside other collections (``search.resident.held_for``):
        its maps in bfloat16, else in int8, else its 2 KB codes, else nothing."""
        return self._held_for(coll, lambda nbytes: self._fits(coll.name, nbytes))

    def _held_for(self, coll: Collection, fits: Callable[[int], bool]) -> ResidentMaps | ResidentCodes | None:
        """``search.resident.held_for`` on this engine's device, in its limits' held basis."""
        return held_for(coll, fits, self.device, self.limits.held_energy, self.limits.held_energy_floor)

    def _appended_resident(self, old: Collection, fresh: Collection) -> ResidentMaps | ResidentCodes | None:
        """What ``old`` held, with ``fresh``'s added images appended (None past the budget: the next
        reopen chooses again)."""
        resident = self._resident.get(old.name)
        if resident is None or resident.generation != old.generation:
            return self._resident_for(fresh) if old.size == 0 else None
        return self._grown(resident, fresh, old.size)

    def _grown(self, resident: ResidentMaps | ResidentCodes, fresh: Collection,
               held_size: int) -> ResidentMaps | ResidentCodes | None:
        """``resident`` (the first ``held_size`` images of ``fresh``, in id order) with the rest of
        ``fresh``'s images appended; None when that would not fit the budget."""
        if not self._fits(fresh.name, resident.bytes_with(fresh)):
            return None
        return resident.appended(fresh, fresh.ids()[held_size:])

    def _reopen_in_background(self, name: str) -> None:
        """Open ``name`` afresh (catalog rows, stage 1, resident maps) in a thread; collection() swaps it in."""
        self._reopening.add(name)

        def reopen() -> None:
            try:
                coll = self._open_checked(name)
                coll.held_region_centroid_ids()  # read here, not by the first query after the swap
                with self._lock:
                    room = self._room_for(name)
                result: tuple[Collection, ResidentMaps | ResidentCodes | None] | Exception = (
                    coll, self._held_for(coll, lambda nbytes: nbytes <= room))
            except Exception as error:  # handed to the next query of this collection
                result = error
            with self._lock:
                self._reopened[name] = result
                self._reopening.discard(name)

        thread = threading.Thread(target=reopen, name=f"matchmap-reopen-{name}", daemon=True)
        self._reopeners = [t for t in self._reopeners if t.is_alive()] + [thread]
        thread.start()

    def warm_up(self, background: bool = False, query_shapes: bool = True, model_team: int | None = None,
                decode_team: int | None = None) -> list[str]:
        """Open every collection this model can search (catalog rows, stage 1) and load what of its maps
        to hold in memory, so first queries are not slow; returns their names. ``query_shapes``: also
        warm_query_shapes (an engine that never encodes a query, a shard replica, has no use for it), at
        the team sizes ``model_team`` and ``decode_team`` (see there).

        ``background``: return once the collections are open, and hold their maps (or codes) in a thread:
        until a collection's are held, its queries read candidates' maps from the store (same results,
        slower). A million images' codes take seconds to read (docs/search.md); a server can listen
        meanwhile. :meth:`wait_held` waits for the holder."""
        names = [info.name for info, searchable in self.list_collections() if searchable]
        if not background:
            if query_shapes:
                self.warm_query_shapes(model_team, decode_team)
            for name in names:
                self.collection(name).held_region_centroid_ids()
            return names
        if query_shapes:
            shapes = threading.Thread(target=self.warm_query_shapes, args=(model_team, decode_team),
                                      name="matchmap-shapes", daemon=True)
            self._reopeners.append(shapes)  # close() waits for it as for a reopen
            shapes.start()
        opened = []
        with self._lock:
            for name in names:
                if name not in self._collections:
                    coll = self._open_checked(name)
                    self._install(coll, None, time.monotonic())
                    opened.append(coll)
        if opened:
            self._holder = threading.Thread(target=self._hold, args=(opened,), name="matchmap-hold", daemon=True)
            self._holder.start()
        return names

    @torch.inference_mode()
    def warm_query_shapes(self, model_team: int | None = None, decode_team: int | None = None) -> tuple[int, int]:
        """Run the audio branch on every padded length a query can have (multiples of QUERY_FRAME_MULTIPLE
        up to the model's max_frames) and the VAD on every padded length of audio the server takes (up
        to ``limits.max_audio_seconds``), once each on noise, so that no query pays for oneDNN's new
        primitives (about 4-8 ms per new shape; docs/search.md, "Queries in a few shapes"); then the
        image branch once on a sent image (every one is resized to the same square, and encoded with its
        mirror), so the first Localize or Highlight with image bytes does not pay either. Queries that
        arrive together are encoded as one batch, whose shapes are not warmed. Returns how many audio
        and VAD shapes were met; stops early when the engine closes.

        oneDNN keeps a primitive per shape *and team size*: a shape met on two cores is new again on one.
        So the branches run on ``model_team`` cores (the server's model thread's team) and the VAD on
        ``decode_team`` (its decode threads'); None: the calling thread's own team."""
        with team(model_team or team_size()):
            audio_shapes = self._warm_audio_shapes()
        vad_shapes = 0
        if self.vad and self.sample_rate in VAD_RATES:
            with team(decode_team or team_size()):
                vad_shapes = self._warm_vad_shapes()
        if not self._closing.is_set():
            with team(model_team or team_size()):
                encode_whole_image(self.model, Image.new("RGB", (64, 64), "gray"))
        return audio_shapes, vad_shapes

    def _warm_audio_shapes(self) -> int:
        audio = self.model.config.audio
        generator = torch.Generator().manual_seed(0)
        audio_shapes = 0
        for frames in range(QUERY_FRAME_MULTIPLE, audio.max_frames + QUERY_FRAME_MULTIPLE, QUERY_FRAME_MULTIPLE):
            if self._closing.is_set():
                return audio_shapes
            self.encode([torch.randn(audio.n_mels, min(frames, audio.max_frames), generator=generator)])
            audio_shapes += 1
        return audio_shapes

    def _warm_vad_shapes(self) -> int:
        generator = torch.Generator().manual_seed(1)
        vad_shapes = 0
        for samples in padded_sample_counts(self.limits.max_audio_seconds, self.sample_rate):
            if self._closing.is_set():
                break
            speech_probabilities(1e-3 * torch.randn(samples, generator=generator), self.sample_rate)
            vad_shapes += 1
        return vad_shapes

    def _hold(self, snapshots: list[Collection]) -> None:
        """The background holder: what of each snapshot to hold, handed to collection() to adopt."""
        for coll in snapshots:
            if self._closing.is_set():
                return
            with self._lock:
                room = self._room_for(coll.name)
            try:
                coll.held_region_centroid_ids()
                resident = self._held_for(coll, lambda nbytes, room=room: nbytes <= room)
            except Exception as error:  # noqa: BLE001 - queries go on reading the store (and say what is wrong)
                log.warning("collection %r: its maps are not held in memory: %s", coll.name, error)
                continue
            with self._lock:
                self._held_ready[coll.name] = (coll, resident)

    def wait_held(self, timeout: float | None = None) -> bool:
        """Wait until the background holder (warm_up(background=True)) is done and adopt what it made;
        True when nothing is left to hold."""
        holder = self._holder
        if holder is not None:
            holder.join(timeout)
            if holder.is_alive():
                return False
        with self._lock:
            for name in list(self._held_ready):
                self._adopt_held(name)
        return True

    def _adopt_held(self, name: str) -> None:
        """Install what the background holder made for ``name`` (under the lock). Its snapshot may be
        older than the open one: images appended since are appended to it too; after any other change
        it is dropped (the reopen that follows such a change holds anew), as it is when the grown
        snapshot would not fit the budget."""
        made = self._held_ready.pop(name, None)
        cached = self._collections.get(name)
        if made is None or cached is None:
            return
        snapshot, resident = made
        if resident is None or self._resident.get(name) is not None:
            return
        current, _ = cached
        if current.generation != snapshot.generation:
            if not np.array_equal(current.ids()[: snapshot.size], snapshot.ids()):
                return
            resident = self._grown(resident, current, snapshot.size)
            if resident is None:
                return
        self._resident[name] = resident

    def resident_bytes(self) -> dict[str, int]:
        """Collection name -> bytes of its feature maps held in memory."""
        return {name: r.nbytes for name, r in self._resident.items()}

    def list_collections(self) -> list[tuple[CollectionInfo, bool]]:
        """Every collection in the library, each with whether this engine's model can search it."""
        return [(info, info.model_version == self.model_version) for info in self.library.list_collections()]

    # ---- search ------------------------------------------------------------------------------

    def decode(self, data: bytes, *, sample_rate: int | None = None, name: str = "audio") -> Tensor:
        """A query's audio (encoded file bytes, or raw s16le PCM at ``sample_rate``) -> checked (N,)
        waveform at the model's rate, within the engine's duration limit."""
        return decode_audio(
            data,
            sample_rate=sample_rate,
            target_rate=self.sample_rate,
            max_seconds=self.limits.max_audio_seconds,
            name=name,
        )

    def prepare_audio(self, data: bytes, *, sample_rate: int | None = None, name: str = "audio") -> QueryAudio:
        """Decode and check a query's audio, cut it to its speech (``search.vad.keep_speech``: 11 s of
        faint noise before a caption cost every hit; without the VAD, ``trim_silence``: one second of
        silence each side cost 0.07 of R@10), and compute its log-mel (see decode).

        InvalidQuery when the speech is longer than the audio branch takes (longest_query_seconds):
        the model would see only its beginning, so the query is refused rather than silently cut.
        """
        return self.speech_audio(self.trimmed_audio(data, sample_rate=sample_rate, name=name, prepare=False))

    def trimmed_audio(self, data: bytes, *, sample_rate: int | None = None, name: str = "audio",
                      prepare: bool = True) -> TrimmedAudio:
        """prepare_audio's first half: decode and trim the silence around the speech. ``prepare``: also
        the trimmed waveform as a query (its log-mel), when it is short enough to score. The VAD keeps
        all of a trimmed caption for most queries (178 of 200 clean captions), so a server can start
        scoring that while the VAD runs (search.server), and speech_audio then returns it as it is."""
        started = time.perf_counter()
        waveform = self.decode(data, sample_rate=sample_rate, name=name)
        seconds = waveform.numel() / self.sample_rate
        trimmed = trim_silence(waveform, self.sample_rate, VAD_MARGIN_SECONDS if self.vad else TRIM_MARGIN_SECONDS)
        audio = None
        if prepare and trimmed.numel() / self.sample_rate <= self.longest_query_seconds:
            audio = QueryAudio(self.model.audio_frontend.logmel(trimmed), seconds, _ms_since(started))
        return TrimmedAudio(trimmed, seconds, started, name, audio)

    def speech_audio(self, trimmed: TrimmedAudio) -> QueryAudio:
        """prepare_audio's second half: ``trimmed`` cut to its speech by the VAD, checked, as a query;
        ``trimmed.audio`` itself (the same object) when the cut keeps all of it (and always without the VAD)."""
        speech = speech_cut(trimmed.waveform, self.sample_rate) if self.vad else trimmed.waveform
        if speech is trimmed.waveform and trimmed.audio is not None:
            return trimmed.audio
        self._check_scoreable(speech.numel() / self.sample_rate, trimmed.name,
                              "once silence and noise around the speech are cut")
        return QueryAudio(self.model.audio_frontend.logmel(speech), trimmed.seconds, _ms_since(trimmed.started))

    def _check_scoreable(self, seconds: float, name: str, what: str) -> None:
        longest = self.longest_query_seconds
        if seconds > longest:
            raise InvalidQuery(
                f"{name} holds {seconds:.2f} s {what}; this model scores at most {longest:g} s of speech: "
                "send a shorter query",
                field=name,
            )

    def default_candidates_for(self, collection_size: int | None) -> int:
        """K for a query that does not say, on a collection of ``collection_size`` images (None: unknown)."""
        limits = self.limits
        if collection_size is None:
            return limits.default_candidates
        return min(limits.max_candidates, max(limits.default_candidates,
                                              math.ceil(limits.candidates_share * collection_size)))

    def resolve_counts(self, top_k: int, candidates: int, collection_size: int | None = None) -> tuple[int, int]:
        """Apply defaults (0) and limits to a request's top_k and candidates; InvalidQuery if outside.
        A default K depends on the collection's size: resolve with it (a call without it only checks).

        candidates may exceed ``max_candidates`` (up to ``max_exhaustive_candidates``) only on a
        collection of at most ``max_exhaustive_candidates`` images; without ``collection_size`` that
        part is left to a second call once the collection is known.
        """
        limits = self.limits
        top_k = top_k or limits.default_top_k
        if not 1 <= top_k <= limits.max_top_k:
            raise InvalidQuery(
                f"top_k is {top_k}; it must lie in 1..{limits.max_top_k} (0 = {limits.default_top_k})", field="top_k"
            )
        candidates = candidates or max(self.default_candidates_for(collection_size), top_k)
        small = collection_size is None or collection_size <= limits.max_exhaustive_candidates
        ceiling = limits.max_exhaustive_candidates if small else limits.max_candidates
        if not top_k <= candidates <= ceiling:
            exhaustive = (
                f"; a collection of at most {limits.max_exhaustive_candidates} images also takes up to "
                f"{limits.max_exhaustive_candidates} (every image: an exhaustive search)"
            )
            if collection_size is not None and not small:
                exhaustive += f", and this one holds {collection_size}"
            raise InvalidQuery(
                f"candidates is {candidates}; it must lie in top_k..{limits.max_candidates} "
                f"(here {top_k}..{limits.max_candidates}; 0 = the default, "
                f"{self.default_candidates_for(collection_size)} here){exhaustive}",
                field="candidates",
            )
        return top_k, candidates

    def search(
        self, data: bytes, collection: str, top_k: int = 0, candidates: int = 0, *, sample_rate: int | None = None
    ) -> SearchResult:
        """One query end to end (the server batches instead; see search_batch)."""
        self.resolve_counts(top_k, candidates)  # bad counts are refused before the collection is opened
        top_k, candidates = self.resolve_counts(top_k, candidates, self.collection(collection).size)
        query = SearchQuery(self.prepare_audio(data, sample_rate=sample_rate), collection, top_k, candidates)
        result = self.search_batch([query])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    @torch.inference_mode()
    def encode(self, logmels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """logmels: B x (n_mels, F_b) -> audio maps (B, T', D) on the engine's device, lengths (B,) long.

        Queries of similar length share a forward pass (see length_groups); frames past a query's
        length are zero, as encode_audio leaves them.
        """
        lengths = [m.shape[1] for m in logmels]
        out_lengths = self.model.output_lengths(torch.tensor(lengths)).to(self.device)
        audio = torch.zeros(len(logmels), int(out_lengths.max()), self.model.embed_dim, device=self.device)
        for group in length_groups(lengths):
            batch = torch.zeros(len(group), logmels[0].shape[0], max(lengths[i] for i in group))
            for row, i in enumerate(group):
                batch[row, :, : lengths[i]] = logmels[i]
            group_lengths = torch.tensor([lengths[i] for i in group], device=self.device)
            encoded, _ = self.model.encode_audio(batch.to(self.device), group_lengths,
                                                 frame_multiple=QUERY_FRAME_MULTIPLE)
            audio[group, : encoded.shape[1]] = encoded
        return audio, out_lengths

    @torch.inference_mode()
    def search_batch(
        self, queries: Sequence[SearchQuery], queue_seconds: Sequence[float] | None = None
    ) -> list[SearchResult | Exception]:
        """Answer several queries, encoding their audio in one forward pass.

        Each query's top_k / candidates must already be resolved (resolve_counts). Returns one entry
        per query: its SearchResult, or the exception that query alone raised (e.g. an unknown
        collection), so one bad query never fails the others.
        """
        started = time.perf_counter()
        audio, lengths = self.encode([q.audio.logmel for q in queries])
        pooled = self.model.stage1_audio_vectors(audio, lengths).cpu().numpy()  # (B, D)
        encode_ms = _ms_since(started)

        results: list[SearchResult | Exception | None] = [None] * len(queries)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)  # one stage-1 search per group
        for i, q in enumerate(queries):
            groups[(q.collection, q.candidates)].append(i)
        for (name, candidates), members in groups.items():
            for i, outcome in zip(members, self._answer_group(name, candidates, audio, lengths, pooled, members,
                                                              queries), strict=True):
                if isinstance(outcome, Exception):
                    results[i] = outcome
                    continue
                q = queries[i]
                results[i] = SearchResult(
                    hits=outcome.hits,
                    collection_size=outcome.collection_size,
                    candidates=outcome.candidates,
                    batch_size=len(queries),
                    audio_seconds=q.audio.seconds,
                    timings_ms={
                        "decode": q.audio.decode_ms,
                        "queue": 1000 * queue_seconds[i] if queue_seconds is not None else 0.0,
                        "encode": encode_ms,
                        "stage1": outcome.stage1_ms,
                        "stage2": outcome.stage2_ms,
                    },
                )
        return results  # type: ignore[return-value]

    def _answer_group(self, name: str, candidates: int, audio: Tensor, lengths: Tensor, pooled: np.ndarray,
                      members: list[int], queries: Sequence[SearchQuery]) -> list[GroupAnswer | Exception]:
        """Stages 1 and 2 for the queries ``members`` (rows of ``audio``, ``pooled``) that search
        collection ``name`` with the same K: per member its answer, or the exception it alone raised
        (``search.ray_serve.ShardedEngine`` answers the same on shards)."""
        try:
            coll = self.collection(name)
            stage1_started = time.perf_counter()
            wide = self._stage1_width(coll, candidates)
            stage1_scores, stage1_ids = coll.search_stage1(np.ascontiguousarray(pooled[members]), wide,
                                                           recall_k=faiss_recall_k(candidates, wide))
            if wide > candidates:
                longest = int(lengths[members].max())
                stage1_scores, stage1_ids = prune_by_centroids(coll, audio[members, :longest], lengths[members],
                                                               stage1_scores, stage1_ids, candidates)
            stage1_ms = _ms_since(stage1_started)
        except (LookupError, ValueError) as error:
            return [error] * len(members)
        return [outcome if isinstance(outcome, Exception) else GroupAnswer(outcome[0], outcome[1], coll.size,
                                                                            stage1_ms, outcome[2])
                for outcome in self._rerank_isolated(coll, audio, lengths, members, stage1_ids, stage1_scores,
                                                     queries)]

    def _stage1_width(self, coll: Collection, candidates: int) -> int:
        """How many candidates stage 1 takes from FAISS for K = ``candidates`` (see SearchLimits.stage1_widen):
        K itself when that is every image, when widening is off, or when ``coll`` has no region centroids
        (or another thread is still reading them: queries do not wait for that)."""
        widen = self.limits.stage1_widen
        if widen <= 1 or candidates >= coll.size or coll.held_region_centroid_ids(wait=False) is None:
            return candidates
        return min(coll.size, widen * candidates)

    def _rerank_isolated(self, coll: Collection, audio: Tensor, lengths: Tensor, members: list[int],
                         ids: np.ndarray, stage1_scores: np.ndarray, queries: Sequence[SearchQuery]) -> list:
        """Stage 2 for the queries ``members`` of one collection, as one batch; when the batch fails,
        each query alone, so one query's error (its own exception in the list) never fails the others.
        Returns per member (hits, candidates scored, stage-2 milliseconds) or the exception."""
        top_ks = [queries[i].top_k for i in members]
        longest = int(lengths[members].max())
        try:
            batch, stage2_ms = self._rerank(coll, audio[members, :longest], lengths[members], ids, stage1_scores,
                                            top_ks)
            return [(hits, scored, stage2_ms) for hits, scored in batch]
        except (LookupError, ValueError) as error:
            if len(members) == 1:
                return [error]
        return [outcome for row, i in enumerate(members)
                for outcome in self._rerank_isolated(coll, audio, lengths, [i], ids[row : row + 1],
                                                     stage1_scores[row : row + 1], queries)]

    def _rerank(self, coll: Collection, audio: Tensor, lengths: Tensor, ids: np.ndarray, stage1_scores: np.ndarray,
                top_ks: Sequence[int]) -> tuple[list[tuple[list[Hit], int]], float]:
        """Stage 2 for B queries of one collection at once (one scoring call per step, no loop over queries).

        audio: (B, T, D), lengths: (B,); ids, stage1_scores: (B, K) stage-1 candidates with -1 pads.
        Above max(exact_rescore_at_least, exact_rescore_factor * top_k) candidates, every candidate is
        scored in bfloat16 (from the resident maps, or from the store through the page cache when the
        collection is not resident) and that many of each query are kept; those
        are scored exactly (float32, from the store, each map read once for the batch) and ranked.
        Returns per query (its top_k hits by exact MISA, how many candidates it scored), and the
        stage's milliseconds.
        """
        started = time.perf_counter()
        ids = np.asarray(ids, dtype=np.int64)
        stage1_scores = np.asarray(stage1_scores)
        valid = ids >= 0
        scored = valid.sum(axis=1).tolist()
        audio = audio.float()
        resident = self._resident.get(coll.name)
        refine = max(self.limits.exact_rescore_at_least, self.limits.exact_rescore_factor * max(top_ks))
        coarse = None
        if ids.shape[1] > refine:
            if resident is not None and resident.generation == coll.generation:
                positions = np.zeros_like(ids)
                positions[valid] = coll.positions_of(ids[valid])
                coarse = resident.paired_misa(audio, lengths, positions, torch.from_numpy(valid))
            elif ids.shape[1] >= STORE_COARSE_AT_LEAST:
                # Maps read from the memory-mapped store a chunk per caption (the page cache keeps the hot ones).
                coarse = misa_caption_by_caption(
                    audio, lengths, lambda b, cols: torch.from_numpy(coll.feature_maps(ids[b, cols].tolist())),
                    valid)
        if coarse is not None:
            keep = torch.topk(coarse, refine, dim=1).indices.cpu().numpy()  # invalid entries (-inf) last
            ids, stage1_scores, valid = (np.take_along_axis(a, keep, axis=1) for a in (ids, stage1_scores, valid))
        misa = self._exact_misa(coll, audio, lengths, ids, valid).cpu()
        order = torch.argsort(misa, dim=1, descending=True, stable=True)[:, : max(top_ks)].numpy()
        misa = misa.numpy()
        stage2_ms = _ms_since(started)
        picked = [[int(k) for k in order[b, : top_ks[b]] if valid[b, k]] for b in range(len(top_ks))]
        uris = coll.uris(sorted({int(ids[b, k]) for b, row in enumerate(picked) for k in row}))
        out = []
        for b, row in enumerate(picked):  # an image removed since this snapshot (reopening) is left out
            hits = [Hit(int(ids[b, k]), uris[int(ids[b, k])], float(misa[b, k]), float(stage1_scores[b, k]))
                    for k in row if int(ids[b, k]) in uris]
            out.append((hits, int(scored[b])))
        return out, stage2_ms

    def _exact_misa(self, coll: Collection, audio: Tensor, lengths: Tensor, ids: np.ndarray,
                    valid: np.ndarray) -> Tensor:
        """Exact float32 MISA of each query against its candidates ids (B, K) -> (B, K), -inf where not
        ``valid``. Maps are read from the store for about STORE_READ_CHUNK candidates at a time (each
        distinct image once per read), so memory stays bounded whatever K and B are."""
        b, k = ids.shape
        columns = max(1, STORE_READ_CHUNK // max(1, b))
        parts = []
        for c0 in range(0, k, columns):
            sub, sub_valid = ids[:, c0 : c0 + columns], valid[:, c0 : c0 + columns]
            union = np.unique(sub[sub_valid])
            if union.size == 0:
                parts.append(torch.full(sub.shape, float("-inf"), device=self.device))
                continue
            maps = torch.from_numpy(coll.feature_maps(union.tolist())).to(self.device).float()  # (U, R, D)
            where = torch.from_numpy(np.minimum(np.searchsorted(union, sub), union.size - 1)).to(self.device)
            parts.append(paired_misa(audio, lengths, maps[where], valid=torch.from_numpy(sub_valid)))
        return torch.cat(parts, dim=1) if parts else torch.zeros((b, 0), device=self.device)

    # ---- localization ------------------------------------------------------------------------

    def indexed_image(self, collection: str, image_id: str | int) -> tuple[Collection, ImageRecord]:
        """The collection and catalog row of an indexed image (ImageNotFound, CollectionNotFound, InvalidQuery)."""
        key = image_key(collection, image_id)
        coll = self.collection(collection)
        try:
            record = coll.images([key])[0]
        except KeyError:
            record = None
        if record is None or record.status != "indexed":
            raise ImageNotFound(f"collection {collection!r} holds no indexed image with id {key}")
        return coll, record

    def indexed_image_map(self, collection: str, image_id: str | int) -> ImageMap:
        """The stored feature map of an indexed image (ImageNotFound, CollectionNotFound, InvalidQuery)."""
        coll, record = self.indexed_image(collection, image_id)
        return self._stored_image_map(coll.feature_maps([record.id])[0], coll.grid, record)

    def _stored_image_map(self, features: np.ndarray, grid: tuple[int, int], record: ImageRecord) -> ImageMap:
        """An indexed image's map as the store holds it (R, D) -> the ImageMap localization takes,
        placed where the image branch saw the image (its centre crop)."""
        cfg = self.model.config.image
        return ImageMap(torch.from_numpy(np.asarray(features)).float().reshape(*grid, -1).to(self.device),
                        center_crop_box(record.width, record.height, cfg.resize_size, cfg.input_size))

    def sent_image_map(self, image_bytes: bytes) -> ImageMap:
        """The feature map of an image sent with a request, spanning the whole image (ImageDecodeError)."""
        image = load_image(image_bytes, name="image_bytes")
        return ImageMap(encode_whole_image(self.model, image), (0.0, 0.0, float(image.width), float(image.height)))

    def localize(
        self,
        data: bytes,
        image: ImageMap,
        span: tuple[float, float] | None = None,
        *,
        sample_rate: int | None = None,
    ) -> Localization:
        """Heatmap of where the query's speech (or its ``span``, seconds) lands on ``image``.

        The recording keeps its timing (spans are in its seconds), so all of it must fit the model."""
        waveform = self.decode(data, sample_rate=sample_rate)
        self._check_scoreable(waveform.numel() / self.sample_rate, "audio", "in all")
        return localize(self.model, image.features, waveform, span)

    def highlighter(self, image: ImageMap, sample_rate: int, window_seconds: float = 0.0) -> LiveHighlighter:
        """A live highlighter over ``image`` for a PCM stream at ``sample_rate``; window 0 = 1 s."""
        check_sample_rate(sample_rate, "sample_rate", self.sample_rate)
        window = window_seconds or 1.0
        longest = self.longest_query_seconds
        if not 0 < window <= longest:
            raise InvalidQuery(
                f"window_seconds is {window}; it must lie in (0, {longest:g}] seconds", field="start.window_seconds"
            )
        context = max(0.0, min(3.0, longest - window))
        return LiveHighlighter(self.model, image.features, sample_rate, window_seconds=window, context_seconds=context)


def image_key(collection: str, image_id: str | int) -> int:
    """A request's image_id as a catalog id: InvalidQuery if it is no integer, ImageNotFound if no
    64-bit id (the catalog's) can be it."""
    try:
        key = int(image_id)
    except (TypeError, ValueError):
        raise InvalidQuery(
            f"image_id {image_id!r} is not an image id (ids are integers, as Search returns)", field="image_id"
        ) from None
    if not -(2**63) <= key < 2**63:
        raise ImageNotFound(f"collection {collection!r} holds no indexed image with id {key}")
    return key


def _ms_since(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


__all__ = [
    "DEVICE_CHOICES",
    "Hit",
    "ImageMap",
    "QueryAudio",
    "SearchEngine",
    "SearchLimits",
    "SearchQuery",
    "SearchResult",
    "center_crop_box",
    "length_groups",
    "resolve_device",
]
