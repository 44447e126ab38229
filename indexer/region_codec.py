"""A fixed-rate codec for feature maps: transform coding of an image's regions x dims, in a byte budget.

An image's map X (R regions x D dims) is coded as Z = P^T (X - mu) V: ``V`` (D x D) are the principal
directions of the region vectors, ``P`` (R x R) those of the regions' layout (neighbouring regions of
a scene look alike), both learnt from training maps. Each of the R x D coefficients gets 0, 1, 2, 4 or
8 bits (greedily, where a bit removes the most squared error, from the coefficient's variance), and a
uniform quantizer clipped at a few standard deviations. Every image takes exactly ``bytes_per_image``
or fewer bytes, the same layout for all, so codes are fixed-width records that a memory map can gather.

Why not product quantization: on 800 scene maps of the shipped ``tiny`` model, PQ with 64
sub-quantizers x 8 bits (the same 4 KB per image) kept 0.83 of the exhaustive MISA top-10; this codec
keeps 0.96 (``bench/bench_search.py --only codec`` has the figures). MISA takes a max over regions, so
its ranking is very sensitive to the error of every region.

Decoding is a few shifts, masks and one affine map per coefficient, then two matrix products; it runs
on any torch device (:meth:`RegionCodec.decode`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

WIDTHS = (0, 1, 2, 4, 8)  # bits per coefficient; each packs whole codes into bytes
# Clipping range of a b-bit uniform quantizer, in standard deviations (near optimal for Gaussian data).
CLIP_SIGMAS = {1: 1.6, 2: 2.0, 4: 3.0, 8: 5.0}
# Mean squared error of a b-bit quantizer of a unit Gaussian (Lloyd-Max), for the bit allocation.
GAUSSIAN_MSE = {0: 1.0, 1: 0.3634, 2: 0.1175, 4: 0.0095, 8: 0.000043}


@dataclass
class RegionCodec:
    """A trained codec. Arrays are float32 numpy; shapes: mean (D,), dims V (D, D), regions P (R, R),
    bits (R, D) int in WIDTHS, low / step (R, D) (a code c decodes to low + (c + 0.5) * step)."""

    mean: np.ndarray
    dims: np.ndarray
    regions: np.ndarray
    bits: np.ndarray
    low: np.ndarray
    step: np.ndarray

    def __post_init__(self) -> None:
        r, d = self.bits.shape
        if self.mean.shape != (d,) or self.dims.shape != (d, d) or self.regions.shape != (r, r):
            raise ValueError(
                f"region codec arrays disagree: bits {self.bits.shape}, mean {self.mean.shape}, "
                f"dims {self.dims.shape}, regions {self.regions.shape}"
            )
        if not np.isin(self.bits, WIDTHS).all():
            raise ValueError(f"region codec bits must be among {WIDTHS}")
        flat = self.bits.reshape(-1)
        # Per width: which coefficients (flat indices, ascending) and how many bytes they pack into.
        self._groups = [
            (b, np.flatnonzero(flat == b), -(-int((flat == b).sum()) * b // 8)) for b in WIDTHS[1:] if (flat == b).any()
        ]
        self._device_cache: dict[str, dict[str, Tensor]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(R, D) of the maps it codes."""
        return self.bits.shape  # type: ignore[return-value]

    @property
    def bytes_per_image(self) -> int:
        """Bytes of one image's code."""
        return sum(nbytes for _, _, nbytes in self._groups)

    # ---- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, maps: np.ndarray, bytes_per_image: int) -> RegionCodec:
        """Learn the transforms and bit allocation from ``maps`` (N, R, D) float (N >= 2), for codes of
        at most ``bytes_per_image`` bytes. Deterministic: the same maps give the same codec."""
        maps = np.asarray(maps, dtype=np.float64)
        if maps.ndim != 3 or maps.shape[0] < 2:
            raise ValueError(f"training maps must be (N >= 2, R, D), got {maps.shape}")
        n, r, d = maps.shape
        if not 1 <= bytes_per_image <= r * d:
            raise ValueError(f"bytes_per_image must lie in 1..{r * d} (8 bits per value), got {bytes_per_image}")
        # every product as one 2-D matrix product (numpy's stacked 3-D matmul and einsum are far slower)
        centred = maps.reshape(-1, d)
        mean = centred.mean(0)
        centred = centred - mean
        dims = _principal_axes(centred.T @ centred)
        by_region = (centred @ dims).reshape(n, r, d).transpose(1, 0, 2).reshape(r, n * d)  # (R, N*D)
        regions = _principal_axes(by_region @ by_region.T)
        coefficients = (regions.T @ by_region).reshape(r, n, d)  # P^T (X - mu) V, region-major
        variance = (coefficients**2).mean(1)
        bits = _allocate(variance.reshape(-1), 8 * bytes_per_image).reshape(r, d)
        std = np.sqrt(variance)
        clip = np.vectorize(lambda b: CLIP_SIGMAS.get(int(b), 0.0))(bits)
        low = -clip * std
        step = np.where(bits > 0, 2 * clip * std / np.power(2.0, bits), 0.0)
        # the mean of a coefficient given no bits is 0 (low + 0.5 * step = 0 needs step = 0, low = 0)
        return cls(*(a.astype(np.float32) for a in (mean, dims, regions)), bits.astype(np.int64),
                   low.astype(np.float32), step.astype(np.float32))

    # ---- coding -------------------------------------------------------------------------------

    def encode(self, maps: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """maps (N, R, D) float -> codes (N, bytes_per_image) uint8 (torch on the CPU, ``chunk`` maps at a time)."""
        maps = np.asarray(maps)
        if maps.ndim != 3 or maps.shape[1:] != self.shape:
            raise ValueError(f"maps must be (N, {self.shape[0]}, {self.shape[1]}), got {maps.shape}")
        n, r, d = maps.shape
        t = self._tensors(torch.device("cpu"))
        out = np.empty((n, self.bytes_per_image), np.uint8)
        for start in range(0, n, chunk):
            x = torch.from_numpy(np.ascontiguousarray(maps[start : start + chunk])).float()
            m = len(x)
            rotated = ((x.reshape(-1, d) - t["mean"]) @ t["dims"]).reshape(m, r, d)
            coefficients = torch.matmul(t["regions"].T, rotated).reshape(m, -1)  # P^T (X - mu) V
            column = 0
            for (b, where, nbytes), (index, low, step) in zip(self._groups, t["encode_groups"], strict=True):
                levels = ((coefficients[:, index] - low) / step).floor_().clamp_(0, 2**b - 1).to(torch.uint8)
                per = 8 // b
                padded = torch.zeros((m, nbytes * per), dtype=torch.int32)
                padded[:, : len(where)] = levels
                shifts = torch.arange(per, dtype=torch.int32) * b
                packed = (padded.reshape(m, nbytes, per) << shifts).sum(dim=2).to(torch.uint8)
                out[start : start + m, column : column + nbytes] = packed.numpy()
                column += nbytes
        return out

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """codes (N, bytes_per_image) uint8 on any device -> maps (N, R, D) in ``dtype`` on that device."""
        if codes.dim() != 2 or codes.shape[1] != self.bytes_per_image or codes.dtype != torch.uint8:
            raise ValueError(
                f"codes must be (N, {self.bytes_per_image}) uint8, got {tuple(codes.shape)} {codes.dtype}"
            )
        t = self._tensors(codes.device)
        # the dims that carry no bits are 0 in every Z: leaving them out of Z V^T changes nothing
        maps = torch.matmul(t["regions"], self._kept_coefficients(codes)) @ t["dims_kept"].T + t["mean"]
        return maps.to(dtype)

    def _kept_coefficients(self, codes: Tensor) -> Tensor:
        """codes (N, bytes_per_image) uint8 -> Z (N, R, Dk) float32 over the dims that carry any bits:
        each byte looked up in a per-width table of its values, then one gather into place (zeros where
        a coefficient has no bits)."""
        t = self._tensors(codes.device)
        n = codes.shape[0]
        parts, offset = [], 0
        for b, where, nbytes in self._groups:
            values = t[f"table{b}"][codes[:, offset : offset + nbytes].long()]  # (N, nbytes, 8 // b)
            parts.append(values.reshape(n, -1)[:, : len(where)])
            offset += nbytes
        parts.append(codes.new_zeros((n, 1), dtype=torch.float32))  # where uncoded coefficients point
        grouped = torch.cat(parts, dim=1) * t["grouped_step"] + t["grouped_low"]
        return grouped[:, t["kept_layout"]].view(n, self.shape[0], -1)

    def paired_misa(self, audio: Tensor, lengths: Tensor, codes: Tensor, chunk: int = 256) -> Tensor:
        """MISA of each caption against its own coded images, scored in the codec's basis.

        audio (B, T, D) float, lengths (B,), codes (B, K, bytes_per_image) uint8 -> (B, K) float32,
        ``encoders.matchmap.paired_misa`` of the decoded maps up to float rounding, without decoding:
        a map is X = P Z V^T + mu, so each frame a meets the regions as P (Z (V^T a)) + mu . a. The
        frames are turned by V once per query; per image that leaves Z's product with them (only the
        dims that got any bits) and P's: about the arithmetic of plain MISA, none of decoding's.
        """
        from encoders.matchmap import frame_mask, misa_of_similarities

        b, k, _ = codes.shape
        r, _ = self.shape
        t = self._tensors(audio.device)
        audio = audio.float()
        turned = audio @ t["dims_kept"]  # (B, T, Dk): V^T a, the dims that carry bits
        offset = (audio @ t["mean"])[:, :, None, None]  # (B, T, 1, 1): mu . a
        frames = frame_mask(lengths.to(audio.device), audio.shape[1]).unsqueeze(-1)
        parts = []
        for k0 in range(0, k, chunk):
            block = codes[:, k0 : k0 + chunk]
            kc = block.shape[1]
            z = self._kept_coefficients(block.reshape(b * kc, -1)).view(b, kc * r, -1)  # (B, Kc * R, Dk)
            inner = torch.bmm(turned, z.transpose(1, 2)).view(b, -1, kc, r)  # (B, T, Kc, R): Z V^T a per region
            parts.append(misa_of_similarities(torch.matmul(inner, t["regions_t"]) + offset, frames))
        return torch.cat(parts, dim=1) if parts else audio.new_zeros((b, 0))

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is None:
            kept = np.flatnonzero(self.bits.any(axis=0))  # dims that carry bits in some region
            cached = {
                "mean": torch.from_numpy(self.mean).to(device),
                "dims": torch.from_numpy(self.dims).to(device),
                # encode: per width, its coefficients (flat indices) with their quantizers' low and step
                "encode_groups": [(torch.from_numpy(where).to(device),
                                   torch.from_numpy(self.low.reshape(-1)[where]).to(device),
                                   torch.from_numpy(self.step.reshape(-1)[where]).to(device))
                                  for _, where, _ in self._groups],
                "dims_kept": torch.from_numpy(np.ascontiguousarray(self.dims[:, kept])).to(device),  # V, (D, Dk)
                "regions": torch.from_numpy(self.regions).to(device),
                "regions_t": torch.from_numpy(np.ascontiguousarray(self.regions.T)).to(device),
            }
            for b, _, _ in self._groups:
                # byte -> the values of the codes it packs, each + 0.5 (the level's centre)
                table = (np.arange(256)[:, None] >> (np.arange(8 // b) * b)) & (2**b - 1)
                cached[f"table{b}"] = torch.from_numpy(table.astype(np.float32) + 0.5).to(device)
            # _kept_coefficients: coefficients in group order, then where each (region, kept dim) is in it
            order = np.concatenate([where for _, where, _ in self._groups] + [np.zeros(0, np.int64)])
            cached["grouped_low"] = torch.from_numpy(np.append(self.low.reshape(-1)[order], 0).astype(np.float32)).to(device)
            cached["grouped_step"] = torch.from_numpy(np.append(self.step.reshape(-1)[order], 0).astype(np.float32)).to(device)
            position = np.full(self.bits.size, order.size)  # uncoded: the zero column
            position[order] = np.arange(order.size)
            cached["kept_layout"] = torch.from_numpy(position.reshape(self.shape)[:, kept].reshape(-1)).to(device)
            self._device_cache[key] = cached
        return cached

    # ---- files --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the codec to ``path`` (.npz)."""
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, dims=self.dims, regions=self.regions, bits=self.bits, low=self.low,
                     step=self.step)

    @classmethod
    def load(cls, path: str | Path) -> RegionCodec:
        """Read a codec written by :meth:`save`."""
        with np.load(path) as f:
            return cls(*(f[k] for k in ("mean", "dims", "regions", "bits", "low", "step")))


def _principal_axes(scatter: np.ndarray) -> np.ndarray:
    """Orthonormal eigenvectors of a symmetric matrix, by decreasing eigenvalue."""
    return np.ascontiguousarray(np.linalg.eigh(scatter)[1][:, ::-1])


def _allocate(variance: np.ndarray, budget_bits: int) -> np.ndarray:
    """Bits per coefficient from WIDTHS, greedily where a bit removes the most expected squared error,
    such that the packed codes (each width padded to whole bytes) fit ``budget_bits``."""
    bits = np.zeros(variance.size, np.int64)
    counts = dict.fromkeys(WIDTHS[1:], 0)

    def packed(counts: dict[int, int]) -> int:
        return sum(8 * -(-c * b // 8) for b, c in counts.items())

    def gain(j: int) -> tuple[float, int]:
        now = int(bits[j])
        nxt = WIDTHS[WIDTHS.index(now) + 1]
        return variance[j] * (GAUSSIAN_MSE[now] - GAUSSIAN_MSE[nxt]) / (nxt - now), nxt

    heap = [(-gain(j)[0], j) for j in range(variance.size) if variance[j] > 0]
    heapq.heapify(heap)
    while heap:
        _, j = heapq.heappop(heap)
        now = int(bits[j])
        _, nxt = gain(j)
        trial = dict(counts)
        if now:
            trial[now] -= 1
        trial[nxt] += 1
        if packed(trial) > budget_bits:
            continue  # a smaller step elsewhere may still fit
        counts, bits[j] = trial, nxt
        if nxt != WIDTHS[-1]:
            heapq.heappush(heap, (-gain(j)[0], j))
    return bits
