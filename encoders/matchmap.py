"""The one matchmap scoring module: matchmaps, SISA / MISA / SIMA, pooled embeddings, all-pairs scores.

An image is a map of R regions (R = H * W) of D dims, a caption a sequence of T frames of D dims, of
which the first ``length`` are true frames and the rest padding. The matchmap is
``M[r, t] = image[r] . audio[t]``; over the true frames and valid regions:

- SISA = mean over r, t of M
- MISA = mean over t of (max over r of M)   -- each frame's best region
- SIMA = mean over r of (max over t of M)   -- each region's best frame

Padded frames never count: they are excluded from means and set to -inf before maxima, and
``region_mask`` does the same for padded regions. :func:`pair_score` is the plain reference for one
pair; :func:`score_matrix` computes all pairs of a batch of captions and a set of images with batched
matrix products, chunked to bound memory, and is what training, evaluation, indexing and search use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCORE_KINDS = ("sisa", "misa", "sima")
# Default bound on the (captions x frames, images x regions) similarity block of one chunk. On CPU a
# block that stays in cache is reduced at nearly the speed of the product itself (a 64 MiB block ran
# at half the speed of an 8 MiB one on 2 cores, bench/bench_matchmap.py); accelerators want big blocks.
CPU_CHUNK_BYTES = 8 * 2**20
ACCELERATOR_CHUNK_BYTES = 256 * 2**20


def frame_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths: (B,) int -> (B, max_len) bool, True for positions t < lengths[b]."""
    return torch.arange(max_len, device=lengths.device) < lengths.reshape(-1, 1)


def matchmap(image: Tensor, audio: Tensor) -> Tensor:
    """image: (H, W, D) or (R, D), audio: (T, D) -> (H, W, T) or (R, T) with M[..., t] = image[...] . audio[t]."""
    if image.shape[-1] != audio.shape[-1] or audio.dim() != 2 or image.dim() not in (2, 3):
        raise ValueError(
            f"matchmap needs image (H, W, D) or (R, D) and audio (T, D) with the same D; "
            f"got image {tuple(image.shape)}, audio {tuple(audio.shape)}"
        )
    return image @ audio.T


def pair_score(image_regions: Tensor, audio: Tensor, kind: str) -> Tensor:
    """Reference score of one pair. image_regions: (R, D) or (H, W, D); audio: (T, D), true frames only.

    kind: "sisa" | "misa" | "sima" -> scalar tensor.
    """
    m = matchmap(image_regions.reshape(-1, image_regions.shape[-1]), audio)  # (R, T)
    if kind == "sisa":
        return m.mean()
    if kind == "misa":
        return m.max(dim=0).values.mean()
    if kind == "sima":
        return m.max(dim=1).values.mean()
    raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")


def _as_regions(images: Tensor) -> Tensor:
    if images.dim() == 4:
        n, h, w, d = images.shape
        return images.reshape(n, h * w, d)
    if images.dim() != 3:
        raise ValueError(f"images must be (N, R, D) or (N, H, W, D), got {tuple(images.shape)}")
    return images


def _check_lengths(lengths: Tensor, batch: int, max_len: int, what: str) -> Tensor:
    if lengths.shape != (batch,):
        raise ValueError(f"{what}: lengths must be ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(
            f"{what}: lengths must lie in 1..{max_len} (the padded length), "
            f"got min {int(lengths.min())}, max {int(lengths.max())}"
        )
    return lengths


def _check_region_mask(region_mask: Tensor | None, n: int, r: int) -> Tensor | None:
    if region_mask is None:
        return None
    if region_mask.shape != (n, r) or region_mask.dtype != torch.bool:
        raise ValueError(
            f"region_mask must be a ({n}, {r}) bool tensor, got {tuple(region_mask.shape)} {region_mask.dtype}"
        )
    if n and not bool(region_mask.any(dim=1).all()):
        raise ValueError("region_mask: every image needs at least one valid region")
    return region_mask


def _masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of x over ``dim`` counting only positions where mask (broadcast to x) is True."""
    mask = mask.expand_as(x)
    return torch.where(mask, x, 0).sum(dim) / mask.sum(dim).to(x.dtype)


def pool_images(image_maps: Tensor, region_mask: Tensor | None = None) -> Tensor:
    """image_maps: (N, R, D) or (N, H, W, D), region_mask: (N, R) bool or None -> (N, D) mean over valid regions."""
    regions = _as_regions(image_maps)
    mask = _check_region_mask(region_mask, regions.shape[0], regions.shape[1])
    if mask is None:
        return regions.mean(dim=1)
    return _masked_mean(regions, mask.unsqueeze(-1), dim=1)


def pool_audio(audio: Tensor, lengths: Tensor) -> Tensor:
    """audio: (B, T, D), lengths: (B,) int -> (B, D) mean over each caption's true frames.

    pool_audio(A) @ pool_images(I).T is exactly SISA, so SISA search is a dot product of pooled vectors.
    """
    if audio.dim() != 3:
        raise ValueError(f"audio must be (B, T, D), got {tuple(audio.shape)}")
    _check_lengths(lengths, audio.shape[0], audio.shape[1], "pool_audio")
    return _masked_mean(audio, frame_mask(lengths, audio.shape[1]).unsqueeze(-1), dim=1)


def chunk_sizes(
    captions: int,
    frames: int,
    images: int,
    regions: int,
    element_bytes: int,
    chunk_size: int | None = None,
    chunk_bytes: int = CPU_CHUNK_BYTES,
) -> tuple[int, int]:
    """(captions per chunk, images per chunk) keeping each similarity block near ``chunk_bytes``.

    chunk_size fixes the images per chunk. Otherwise the block is kept roughly square (as many frame
    rows as region columns), so both operands of each matrix product stay large.
    """
    budget = max(1, chunk_bytes // element_bytes)
    if chunk_size is None:
        side = math.isqrt(budget)
        caption_chunk = max(1, min(captions, side // frames))
        image_chunk = max(1, min(images, budget // (caption_chunk * frames * regions)))
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of images, got {chunk_size}")
        image_chunk = max(1, min(images, chunk_size))
        caption_chunk = max(1, min(captions, budget // (image_chunk * regions * frames)))
    return caption_chunk, image_chunk


def score_matrix(
    audio: Tensor,
    lengths: Tensor,
    images: Tensor,
    kinds: tuple[str, ...] | list[str] = ("misa",),
    *,
    region_mask: Tensor | None = None,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
) -> dict[str, Tensor]:
    """All-pairs scores of B captions against N images.

    audio: (B, T, D) float, lengths: (B,) int (true frames), images: (N, R, D) or (N, H, W, D) float,
    kinds: any of "sisa", "misa", "sima"; region_mask: (N, R) bool, True for valid regions.
    Returns {kind: (B, N) float32 (or the inputs' dtype if wider)}.

    MISA and SIMA come from one (Bc*Tc, D) @ (D, Nc*R) product per chunk, reshaped (Bc, Tc, Nc, R) and
    reduced, where chunks take captions in order of length and Tc is the chunk's longest caption; SISA from pooled vectors (exactly equal, see pool_audio). chunk_size: images per chunk;
    by default chunks are chosen so each similarity block stays near chunk_bytes (default
    CPU_CHUNK_BYTES on CPU, ACCELERATOR_CHUNK_BYTES elsewhere). compute_dtype (e.g.
    torch.bfloat16) runs the products in that dtype, with reductions in float32. Differentiable.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in SCORE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {SCORE_KINDS}, got {kinds}")
    if audio.dim() != 3:
        raise ValueError(f"audio must be (B, T, D), got {tuple(audio.shape)}")
    regions = _as_regions(images)
    b, t, d = audio.shape
    n, r, image_d = regions.shape
    if image_d != d:
        raise ValueError(f"audio has {d} dims per frame but images have {image_d} per region")
    _check_lengths(lengths, b, t, "score_matrix")
    region_mask = _check_region_mask(region_mask, n, r)
    lengths = lengths.to(audio.device)
    out_dtype = torch.promote_types(audio.dtype, torch.float32)

    scores: dict[str, Tensor] = {}
    if "sisa" in kinds:
        scores["sisa"] = (pool_audio(audio, lengths) @ pool_images(regions, region_mask).T).to(out_dtype)
    fine_kinds = [k for k in kinds if k != "sisa"]
    if not fine_kinds:
        return scores
    if b == 0 or n == 0:
        return {k: scores.get(k, audio.new_zeros((b, n), dtype=out_dtype)) for k in kinds}

    mm_dtype = compute_dtype or audio.dtype
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if audio.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    element_bytes = torch.finfo(mm_dtype).bits // 8
    caption_chunk, image_chunk = chunk_sizes(b, t, n, r, element_bytes, chunk_size, chunk_bytes)
    # Captions go through in order of length, each chunk cut to its own longest caption, so that
    # padding costs little even when one long caption pads all the others.
    sorted_lengths, order = lengths.sort(descending=True)
    chunk_longest = sorted_lengths[::caption_chunk].tolist()
    audio_sorted = audio.to(mm_dtype)[order]
    regions_mm = regions.to(mm_dtype)
    rows: dict[str, list[Tensor]] = {k: [] for k in fine_kinds}
    for b0, tc in zip(range(0, b, caption_chunk), chunk_longest, strict=True):
        a = audio_sorted[b0 : b0 + caption_chunk, :tc]
        bc = a.shape[0]
        fv = frame_mask(sorted_lengths[b0 : b0 + bc], tc)  # (Bc, Tc)
        a = a.reshape(bc * tc, d)
        cols: dict[str, list[Tensor]] = {k: [] for k in fine_kinds}
        for n0 in range(0, n, image_chunk):
            im = regions_mm[n0 : n0 + image_chunk]
            nc = im.shape[0]
            sim = (a @ im.reshape(nc * r, d).T).view(bc, tc, nc, r)
            rm = None if region_mask is None else region_mask[n0 : n0 + nc]  # (Nc, R)
            if rm is not None:
                sim = sim.masked_fill(~rm.view(1, 1, nc, r), float("-inf"))
            if "misa" in cols:
                best_region = sim.amax(dim=3).to(out_dtype)  # (Bc, Tc, Nc)
                cols["misa"].append(_masked_mean(best_region, fv.unsqueeze(-1), dim=1))
            if "sima" in cols:
                best_frame = sim.masked_fill(~fv.view(bc, tc, 1, 1), float("-inf")).amax(dim=1).to(out_dtype)
                if rm is None:
                    cols["sima"].append(best_frame.mean(dim=2))  # (Bc, Nc)
                else:
                    cols["sima"].append(_masked_mean(best_frame, rm.unsqueeze(0), dim=2))
        for k in fine_kinds:
            rows[k].append(torch.cat(cols[k], dim=1))
    restore = torch.empty_like(order)
    restore[order] = torch.arange(b, device=order.device)
    for k in fine_kinds:
        scores[k] = torch.cat(rows[k], dim=0)[restore]
    return {k: scores[k] for k in kinds}


def paired_misa(
    audio: Tensor,
    lengths: Tensor,
    candidates: Tensor,
    *,
    valid: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """MISA of each caption against its own candidate images: stage 2 for a batch of queries at once.

    audio: (B, T, D), lengths: (B,) int, candidates: (B, K, R, D) -> (B, K) float32 (or wider), where
    entry [b, k] is MISA(caption b, image candidates[b, k]), equal to ``score_matrix`` of that pair.
    Unlike ``score_matrix`` (every caption against every image), each caption meets only its own K
    images: one batched product (B, T, D) @ (B, D, Kc * R) per chunk of Kc candidates, no loop over
    captions. valid: (B, K) bool, False entries (padding of a shorter candidate list) score -inf.
    compute_dtype runs the products in that dtype (e.g. bfloat16), reductions in float32.
    """
    if audio.dim() != 3 or candidates.dim() != 4:
        raise ValueError(f"paired_misa needs audio (B, T, D) and candidates (B, K, R, D), got "
                         f"{tuple(audio.shape)} and {tuple(candidates.shape)}")
    b, t, d = audio.shape
    cb, k, r, cd = candidates.shape
    if cb != b or cd != d:
        raise ValueError(f"paired_misa: audio {tuple(audio.shape)} and candidates {tuple(candidates.shape)} "
                         "disagree on the batch or the dims")
    _check_lengths(lengths, b, t, "paired_misa")
    if valid is not None and (valid.shape != (b, k) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a ({b}, {k}) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    out_dtype = torch.promote_types(audio.dtype, torch.float32)
    if b == 0 or k == 0:
        return audio.new_zeros((b, k), dtype=out_dtype)
    mm_dtype = compute_dtype or audio.dtype
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if audio.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    per_candidate = b * t * r * (torch.finfo(mm_dtype).bits // 8)
    chunk = max(1, min(k, chunk_bytes // per_candidate))
    frames = frame_mask(lengths.to(audio.device), t).unsqueeze(-1)  # (B, T, 1)
    a = audio.to(mm_dtype)
    parts = []
    for k0 in range(0, k, chunk):
        block = candidates[:, k0 : k0 + chunk].to(mm_dtype)
        kc = block.shape[1]
        sim = torch.bmm(a, block.reshape(b, kc * r, d).transpose(1, 2)).view(b, t, kc, r)
        parts.append(misa_of_similarities(sim, frames, out_dtype))  # (B, Kc)
    scores = torch.cat(parts, dim=1)
    return scores if valid is None else scores.masked_fill(~valid.to(scores.device), float("-inf"))


def misa_of_similarities(sim: Tensor, frames: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """MISA from a batch of matchmaps: sim (B, T, K, R) holds caption b's frame t against region r of
    its candidate k; frames (B, T, 1) bool marks true frames -> (B, K): per frame the best region,
    averaged over true frames. Shared by ``paired_misa`` and scoring from compressed maps
    (``indexer.region_codec.RegionCodec.paired_misa``)."""
    return _masked_mean(sim.amax(dim=3).to(out_dtype), frames, dim=1)
