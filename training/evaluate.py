"""Recall@k evaluation of a matchmap model on a manifest, for SISA, MISA and SIMA in both directions."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from encoders.matchmap import score_matrix
from training.data import CaptionedImages, collate, image_groups
from training.manifest import Manifest

KINDS = ("MISA", "SISA", "SIMA")
KS = (1, 5, 10)
# captions of a batch encoded as this many groups of similar length (encoders.models.length_sorted_split):
# the same maps, a fraction of the padding
EVAL_LENGTH_GROUPS = 4


@dataclass
class Embeddings:
    """image_maps: (N, H, W, D); audio: (N, T, D) padded; lengths: (N,) true frames of each caption."""

    image_maps: torch.Tensor
    audio: torch.Tensor
    lengths: torch.Tensor


@torch.no_grad()
def embed_pairs(model, dataset: CaptionedImages, *, batch_size: int = 64, device: str | torch.device = "cpu",
                progress: bool = True) -> Embeddings:
    """Run both branches over every pair of ``dataset`` (eval front ends) in batches."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    image_maps, audio_maps, lengths = [], [], []
    for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        image_maps.append(model.encode_images(batch.images).float().cpu())
        audio, out_lengths = model.encode_audio(batch.logmel, batch.lengths, length_groups=EVAL_LENGTH_GROUPS)
        audio_maps.append(audio.float().cpu())
        lengths.append(out_lengths.cpu())
    longest = max(a.shape[1] for a in audio_maps)
    audio = torch.cat([F.pad(a, (0, 0, 0, longest - a.shape[1])) for a in audio_maps])
    return Embeddings(torch.cat(image_maps), audio, torch.cat(lengths))


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = KS,
                caption_image: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """scores: (N captions, M images) float; caption_image: (N,) long, the column of each caption's own
    image (default: a square matrix with pair i on the diagonal) -> recall fractions.

    The multi-caption protocol of Flickr8k and SpokenCOCO: speech_to_image ranks the M unique images
    for each caption (a hit: its own image within the top k), averaged over the N captions;
    image_to_speech ranks all N captions for each image (a hit: any of its own captions within the
    top k), averaged over the M images. With one caption per image both are the classic protocol.
    Ties count against the model (an imposter scoring as high as the true item ranks above it), a NaN
    imposter outranks everything, and a NaN true score is never a hit.
    """
    n, m = scores.shape
    if caption_image is None:
        if n != m:
            raise ValueError(f"a non-square score matrix ({n}x{m}) needs caption_image")
        caption_image = torch.arange(n)
    caption_image = caption_image.to(scores.device)
    own = torch.zeros(n, m, dtype=torch.bool, device=scores.device)
    own[torch.arange(n, device=scores.device), caption_image] = True
    nan = scores.isnan()
    against = scores.masked_fill(nan, math.inf)  # what imposters score: NaN counts as the highest
    positive = scores[torch.arange(n, device=scores.device), caption_image]  # (N,)
    # rank = how many imposters score at least as high as the true item
    rank_s2i = ((against >= positive[:, None]) & ~own).sum(dim=1)
    hit_s2i = ~positive.isnan()
    # each image's best own caption (NaN own scores never help), ranked among the other images' captions
    best = scores.masked_fill(~own | nan, -math.inf).amax(dim=0)  # (M,)
    rank_i2s = ((against >= best[None, :]) & ~own).sum(dim=0)
    hit_i2s = (own & ~nan).any(dim=0)
    return {
        "speech_to_image": {f"R@{k}": int(((rank_s2i < k) & hit_s2i).sum()) / n for k in ks},
        "image_to_speech": {f"R@{k}": int(((rank_i2s < k) & hit_i2s).sum()) / m for k in ks},
    }


def evaluate_embeddings(emb: Embeddings, *, images: Sequence[Hashable] | None = None,
                        compute_dtype: torch.dtype | None = None) -> dict:
    """All-pairs SISA/MISA/SIMA scores of the embedded pairs -> the ``eval --json`` object.

    images: each pair's image (e.g. its path); pairs that share an image are several captions of one
    image, scored against the unique images only (``recall_at_k``'s multi-caption protocol). None:
    every pair has an image of its own. The result counts ``pairs`` (captions) and ``images``.
    """
    representatives, caption_image = image_groups(range(len(emb.lengths)) if images is None else images)
    if len(caption_image) != len(emb.lengths):
        raise ValueError(f"{len(caption_image)} images given for {len(emb.lengths)} pairs")
    scores = score_matrix(emb.audio, emb.lengths, emb.image_maps[representatives],
                          kinds=("misa", "sisa", "sima"), compute_dtype=compute_dtype)
    result: dict = {kind: recall_at_k(scores[kind.lower()], caption_image=caption_image) for kind in KINDS}
    result["pairs"] = int(emb.lengths.shape[0])
    result["images"] = len(representatives)
    return result


def evaluate(model, manifest: Manifest, *, batch_size: int = 64, device: str | torch.device = "cpu",
             progress: bool = True) -> dict:
    """Recall@1/5/10 of ``model`` on every caption of ``manifest``, captions grouped by image file
    (see ``evaluate_embeddings``); a model with stage-1 heads adds "STAGE1", the recall of their vectors."""
    dataset = CaptionedImages(manifest, model, train=False, progress=progress)
    emb = embed_pairs(model, dataset, batch_size=batch_size, device=device, progress=progress)
    images = manifest_images(manifest)
    result = evaluate_embeddings(emb, images=images)
    if model.stage1 is not None:
        # What the service's stage 1 ranks by when the model has distilled heads (without them, SISA).
        representatives, caption_image = image_groups(images)
        with torch.no_grad():
            maps = emb.image_maps[representatives].to(device)
            scores = model.stage1_audio_vectors(emb.audio.to(device), emb.lengths) @ model.stage1_image_vectors(maps).T
        result["STAGE1"] = recall_at_k(scores.cpu(), caption_image=caption_image)
    return result


def manifest_images(manifest: Manifest) -> list[str]:
    """Each entry's image file: entries that share one are several captions of the same image."""
    return [str(manifest.image_path(entry)) for entry in manifest.entries]


def mean_r10(result: dict, kind: str = "MISA") -> float:
    """Mean of R@10 over both directions: the model-selection criterion."""
    return 0.5 * (result[kind]["speech_to_image"]["R@10"] + result[kind]["image_to_speech"]["R@10"])


def format_table(result: dict) -> str:
    """A plain-text recall table: one row per score kind and direction."""
    lines = [f"{'score':<6} {'direction':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6}"]
    for kind in [*KINDS, "STAGE1"] if "STAGE1" in result else KINDS:
        for direction in ("speech_to_image", "image_to_speech"):
            r = result[kind][direction]
            lines.append(f"{kind:<6} {direction:<16} {r['R@1']:>6.3f} {r['R@5']:>6.3f} {r['R@10']:>6.3f}")
    images = result.get("images", result["pairs"])
    lines.append(f"({result['pairs']} pairs)" if images == result["pairs"] else
                 f"({result['pairs']} captions of {images} images)")
    return "\n".join(lines)
