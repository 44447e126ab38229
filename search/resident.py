"""A collection's feature maps held in memory, so stage 2 can afford thousands of candidates.

Reading K candidates' maps from the memory-mapped store costs more than scoring them (a GPU run of
``bench/gpu_check.py`` measured 15 ms to read 1,000 maps against 0.4 ms to score them). The engine
therefore loads each collection's maps once, as one (N, R, D) tensor in a compact compute dtype
(bfloat16: 2 bytes per value, as the store), on the engine's device, within a memory budget
(``SearchLimits.resident_maps_mb``). Stage 2 then gathers the candidates' rows from it, scores
them in bfloat16 (every query of a batch against its own candidates in one call), and re-scores
the best few exactly in float32 from the store (see ``SearchEngine._rerank``), so the scores it
returns are exact.

The held maps keep only the region vectors' principal directions (``held_basis``): the fewest that
hold HELD_ENERGY of their second moment, found on maps spread over the collection. For ``tiny`` that
is 112 of 256 dims: the rough pass reads and multiplies 2.3x less, and the same memory holds 2.3x the
images. It only has to keep exact MISA's top 10 among the few it hands on, and on 100,000 scene
images 96 dims already kept all of it (docs/search.md, "A hundred thousand images in 20 ms").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from encoders.matchmap import paired_misa, score_matrix
from indexer.code_store import CODE_BYTES, spread  # compressed maps, written by the indexer beside the store
from search import (  # shares of the region vectors' second moment held maps keep
    HELD_ENERGY,
    HELD_ENERGY_FLOOR,
)

BASIS_MAPS = 1024  # maps, spread over the collection, whose region vectors give the held basis
BASIS_MULTIPLE = 16  # the held dims are rounded up to a multiple of this (whole vector registers)


def region_basis(maps: np.ndarray | Tensor, energy: float = HELD_ENERGY, dims: int | None = None) -> Tensor | None:
    """maps (N, R, D) -> (D, d) float32: the principal directions of their region vectors (of the
    uncentred second moment, as scores are uncentred inner products), the fewest holding ``energy``
    of it, rounded up to a multiple of BASIS_MULTIPLE, or the first ``dims`` when given; None when
    that is every dimension."""
    maps = torch.as_tensor(maps)
    dim = maps.shape[-1]
    regions = maps.reshape(-1, dim).double()
    if len(regions) == 0:
        return None
    values, directions = torch.linalg.eigh(regions.T @ regions)  # ascending
    values, directions = values.flip(0).clamp(min=0), directions.flip(1)
    if dims is None:
        held = torch.cumsum(values, 0) / values.sum().clamp(min=1e-300)
        keep = int(torch.searchsorted(held, torch.tensor([energy], dtype=held.dtype))[0]) + 1
        dims = -(-keep // BASIS_MULTIPLE) * BASIS_MULTIPLE
    return None if dims >= dim else directions[:, :dims].float().contiguous()


def held_share(maps: np.ndarray | Tensor, basis: Tensor | None) -> float:
    """The share of the second moment of ``maps``' region vectors that ``basis`` (D, d) holds (1 for None)."""
    maps = torch.as_tensor(maps).double()
    if basis is None or maps.numel() == 0:
        return 1.0
    return float((maps @ basis.double()).square().sum() / maps.square().sum().clamp(min=1e-300))


def basis_sample(coll) -> np.ndarray:
    """Up to BASIS_MAPS maps (n, R, D) of ``coll``, spread evenly over it: what its held basis and int8
    scales are found on."""
    ids = coll.ids()
    return coll.feature_maps(ids[spread(len(ids), BASIS_MAPS)]) if len(ids) else np.zeros((0, 1, coll.embed_dim))


def held_basis(coll, energy: float = HELD_ENERGY, sample: np.ndarray | None = None) -> Tensor | None:
    """The basis ``coll``'s held maps are kept in (``region_basis`` of ``sample``, by default
    ``basis_sample(coll)``), None for every dimension."""
    if coll.size == 0 or energy >= 1:
        return None
    return region_basis(basis_sample(coll) if sample is None else sample, energy)


def int8_scale(sample: np.ndarray | Tensor, basis: Tensor | None) -> Tensor:
    """(d,) float32: per held dimension, the step of its int8 values, so that the largest magnitude
    of ``sample`` (n, R, D) in ``basis`` is 127 (values beyond are clamped)."""
    held = _in_basis(torch.as_tensor(sample), basis, torch.float32)
    peak = held.reshape(-1, held.shape[-1]).abs().amax(dim=0) if held.numel() else torch.ones(held.shape[-1])
    return (peak / 127).clamp(min=1e-12)


@dataclass
class ResidentMaps:
    """Feature maps of one collection snapshot, in the collection's id order: ``maps[p]`` belongs to
    the image at position p of ``Collection.positions_of`` (the order ``iter_feature_maps`` yields).

    Held in bfloat16, or in int8 (``scale`` set: a value v stands for v * scale[dim]), half the memory
    for the same dims; the rough pass multiplies the query's frames by ``scale`` instead of the maps,
    and int8 values are exact in bfloat16, so it runs the same bfloat16 products."""

    collection: str
    generation: int
    maps: Tensor  # (N, R, d) in ``maps.dtype``, on the engine's device: the maps times ``basis`` (/ ``scale``)
    # ``maps`` is the first N rows of this (capacity, R, d) tensor: room for images added later.
    _buffer: Tensor | None = field(default=None, repr=False)
    basis: Tensor | None = None  # (D, d) float32 on the maps' device (region_basis); None: d = D, as stored
    scale: Tensor | None = None  # (d,) float32 for int8 maps (int8_scale); None for bfloat16

    @classmethod
    def load(cls, coll, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
             basis: Tensor | None = None, scale: Tensor | None = None) -> ResidentMaps:
        """Read every map of ``coll`` (an indexer Collection) into one tensor, a batch at a time, each
        turned into ``basis`` (D, d) when one is given, and for an int8 ``dtype`` into steps of ``scale``
        (``int8_scale``), which it needs."""
        if (dtype == torch.int8) != (scale is not None):
            raise ValueError(f"int8 maps need a scale (int8_scale), and only they take one; got {dtype}")
        basis = None if basis is None else basis.to(device=device, dtype=torch.float32)
        scale = None if scale is None else scale.to(device=device, dtype=torch.float32)
        rows = coll.grid[0] * coll.grid[1]
        dim = coll.embed_dim if basis is None else basis.shape[1]
        maps = torch.empty(coll.size, rows, dim, dtype=dtype, device=device)
        filled = 0
        for batch_ids, batch_maps in coll.iter_feature_maps():
            n = len(batch_ids)
            maps[filled : filled + n] = _in_basis(torch.from_numpy(batch_maps).to(device), basis, dtype, scale)
            filled += n
        if filled != coll.size:
            raise ValueError(f"collection {coll.name!r}: read {filled} feature maps, expected {coll.size}")
        return cls(coll.name, coll.generation, maps, basis=basis, scale=scale)

    def appended(self, coll, new_ids: np.ndarray) -> ResidentMaps:
        """These maps plus those of ``new_ids`` (images of the snapshot ``coll`` whose ids follow every
        id held here), for ``coll``. The new maps go into spare room past the held ones (this object's
        view does not change); when there is none, everything moves to a tensor with a quarter more
        room, so adding a batch costs copying the batch, not the collection (amortized)."""
        n, added = len(self.maps), len(new_ids)
        buffer = self._buffer if self._buffer is not None else self.maps
        if n + added > len(buffer):
            grown = torch.empty((n + added + max(n // 4, 256), *self.maps.shape[1:]), dtype=self.maps.dtype,
                                device=self.maps.device)
            grown[:n] = self.maps
            buffer = grown
        if added:
            buffer[n : n + added] = _in_basis(torch.from_numpy(coll.feature_maps(new_ids)).to(buffer.device),
                                              self.basis, buffer.dtype, self.scale)
        return ResidentMaps(coll.name, coll.generation, buffer[: n + added], buffer, self.basis, self.scale)

    @staticmethod
    def bytes_for(coll, dtype: torch.dtype = torch.bfloat16, basis: Tensor | None = None) -> int:
        """Memory the maps of ``coll`` would take in ``dtype``, in ``basis`` (None: every dimension)."""
        dim = coll.embed_dim if basis is None else basis.shape[1]
        return coll.size * coll.grid[0] * coll.grid[1] * dim * torch.empty((), dtype=dtype).element_size()

    def bytes_with(self, coll) -> int:
        """Memory these maps would take grown to every image of ``coll``."""
        return self.bytes_for(coll, self.maps.dtype, self.basis)

    @property
    def nbytes(self) -> int:
        held = self._buffer if self._buffer is not None else self.maps
        return held.numel() * held.element_size()

    def paired_misa(self, audio: Tensor, lengths: Tensor, positions: np.ndarray, valid: Tensor,
                    cpu_chunk: int = 128, one_call: bool | None = None) -> Tensor:
        """MISA of each caption ``audio[b]`` (B, T, D) against its own held maps at ``positions[b]``
        (B, K) -> (B, K), in bfloat16 products; entries where ``valid`` (B, K) is False score -inf.

        On an accelerator, one gather of all B x K maps and one ``paired_misa`` call (no loop over
        queries). On the CPU, one caption at a time against ``cpu_chunk`` gathered maps per product,
        so each block stays in cache: arithmetic bounds the CPU, and batched products measured 1.6-2.2x
        slower, 20x when a slice left the batch stride irregular (bench/bench_stage2_batch.py, docs/search.md).
        """
        if self.basis is not None:
            audio = audio.to(self.basis.device, torch.float32) @ self.basis  # padding frames stay zero
        if self.scale is not None:
            audio = audio.to(self.scale.device, torch.float32) * self.scale
        compute_dtype = torch.bfloat16 if self.scale is not None else self.maps.dtype
        n, r, d = self.maps.shape
        flat = self.maps.view(n, r * d)
        rows = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(self.maps.device)
        b, k = rows.shape
        if not (one_call if one_call is not None else self.maps.device.type != "cpu"):
            return misa_caption_by_caption(
                audio, lengths, lambda i, cols: flat.index_select(0, rows[i, cols]).view(-1, r, d),
                valid.cpu().numpy(), chunk=cpu_chunk, compute_dtype=compute_dtype)
        gathered = flat.index_select(0, rows.reshape(-1)).view(b, k, r, d)
        scores = paired_misa(audio, lengths, gathered, compute_dtype=compute_dtype)
        return scores.masked_fill(~valid.to(scores.device), float("-inf"))


@dataclass
class ResidentCodes:
    """A collection's maps held as transform codes (``indexer.region_codec``, CODE_BYTES per image, 16x
    less than bfloat16), for collections whose bfloat16 maps do not fit the budget: stage 2's coarse
    pass scores the codes in the codec's basis (``RegionCodec.paired_misa``) and exact float32 maps
    from the store rank the best few it keeps, so the returned scores stay exact. As a coarse pass,
    2 KB codes kept the float16 top-10 agreement at K=100/400/1000 (docs/search.md). Same interface
    as ResidentMaps; rows in the collection's id order."""

    collection: str
    generation: int
    codec: object  # indexer.region_codec.RegionCodec, trained on the collection's first maps
    codes: Tensor  # (N, CODE_BYTES) uint8

    @classmethod
    def load(cls, coll, *, device: torch.device | str = "cpu") -> ResidentCodes:
        """``coll``'s codes as the indexer wrote them (``Collection.region_codes``; images indexed since
        are coded in memory)."""
        codec, codes = coll.region_codes()
        if len(codes) != coll.size:
            raise ValueError(f"collection {coll.name!r}: {len(codes)} region codes, expected {coll.size}")
        return cls(coll.name, coll.generation, codec, torch.from_numpy(codes).to(device))

    def appended(self, coll, new_ids: np.ndarray) -> ResidentCodes:
        """These codes plus those of ``new_ids`` (coded with this codec), for the snapshot ``coll``."""
        added = self.codec.encode(coll.feature_maps(new_ids)) if len(new_ids) else np.zeros((0, CODE_BYTES), np.uint8)
        codes = torch.cat([self.codes, torch.from_numpy(added).to(self.codes.device)])
        return ResidentCodes(coll.name, coll.generation, self.codec, codes)

    @staticmethod
    def bytes_for(coll) -> int:
        return coll.size * CODE_BYTES

    def bytes_with(self, coll) -> int:
        return self.bytes_for(coll)

    @property
    def nbytes(self) -> int:
        return self.codes.numel()

    def paired_misa(self, audio: Tensor, lengths: Tensor, positions: np.ndarray, valid: Tensor) -> Tensor:
        """As ResidentMaps.paired_misa: (B, K) MISA of each caption against its own held images, -inf
        where not ``valid``; one caption at a time (only its true frames)."""
        rows = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(self.codes.device)
        scores = torch.cat([
            self.codec.paired_misa(audio[b : b + 1, : int(lengths[b])], lengths[b : b + 1],
                                   self.codes.index_select(0, rows[b])[None])
            for b in range(len(rows))])
        return scores.masked_fill(~valid.to(scores.device), float("-inf"))


def held_for(coll, fits: Callable[[int], bool], device: torch.device | str, energy: float = HELD_ENERGY,
             energy_floor: float = HELD_ENERGY_FLOOR) -> ResidentMaps | ResidentCodes | None:
    """What of ``coll`` to hold in memory, the first that ``fits``: its maps in their held basis (the
    principal directions holding ``energy``) in bfloat16; the same in int8 (half the memory); in int8,
    in the most principal directions that fit, so long as they hold at least ``energy_floor``; its 2 KB
    codes (when it has at least 2 images to train a codec on); else nothing (stage 2 reads the store)."""
    if coll.size > 0:
        int8_per_dim = ResidentMaps.bytes_for(coll, torch.int8) // coll.embed_dim
        # The basis costs BASIS_MAPS store reads: not worth making when even its fewest dims would not fit.
        if fits(int8_per_dim * min(BASIS_MULTIPLE, coll.embed_dim)):
            sample = basis_sample(coll)
            basis = held_basis(coll, energy, sample)
            if fits(ResidentMaps.bytes_for(coll, torch.bfloat16, basis)):
                return ResidentMaps.load(coll, device=device, basis=basis)
            held_dims = coll.embed_dim if basis is None else basis.shape[1]
            dims = next((d for d in range(held_dims, 0, -BASIS_MULTIPLE) if fits(int8_per_dim * d)), 0)
            if 0 < dims < held_dims:
                basis = region_basis(sample, dims=dims)
                dims = dims if held_share(sample, basis) >= energy_floor else 0
            if dims:
                return ResidentMaps.load(coll, dtype=torch.int8, device=device, basis=basis,
                                         scale=int8_scale(sample, basis))
    if coll.size >= 2 and fits(ResidentCodes.bytes_for(coll)):
        return ResidentCodes.load(coll, device=device)
    return None


def _in_basis(maps: Tensor, basis: Tensor | None, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """maps (n, R, D) -> (n, R, d) in ``dtype``: times ``basis`` (D, d), or as they are when None; with
    ``scale`` (d,), divided by it, rounded and clamped to int8's range (for an int8 ``dtype``)."""
    if basis is None and scale is None:
        return maps.to(dtype)
    held = maps.float() if basis is None else maps.float() @ basis
    if scale is not None:
        held = (held / scale).round_().clamp_(-127, 127)
    return held.to(dtype)


def misa_caption_by_caption(audio: Tensor, lengths: Tensor, read_maps: Callable[[int, np.ndarray], Tensor],
                            valid: np.ndarray, chunk: int = 128,
                            compute_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """MISA of each caption ``audio[b]`` (B, T, D) against its own candidates -> (B, K) on audio's device,
    -inf where ``valid`` (B, K numpy) is False: the CPU's way, one caption at a time against ``chunk``
    maps per product, so each block stays in cache. ``read_maps(b, columns)`` returns the maps
    (len(columns), R, D) of caption b's candidates at those columns: gathered from resident maps, or
    read from the memory-mapped store (the page cache keeps the hot ones; memory stays at one chunk)."""
    out = torch.full(valid.shape, float("-inf"), device=audio.device)
    for b in range(valid.shape[0]):
        length = int(lengths[b])
        columns = np.flatnonzero(valid[b])
        for c0 in range(0, len(columns), chunk):
            cols = columns[c0 : c0 + chunk]
            maps = read_maps(b, cols).to(audio.device)
            out[b, torch.from_numpy(cols).to(audio.device)] = score_matrix(
                audio[b : b + 1, :length], lengths[b : b + 1], maps, kinds=("misa",),
                compute_dtype=compute_dtype)["misa"][0].float()
    return out
