"""Recall@k evaluation of a matchmap model on a manifest, for SISA, MISA and SIMA in both directions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from encoders.matchmap import score_matrix
from training.data import CaptionedImages, collate
from training.manifest import Manifest

KINDS = ("MISA", "SISA", "SIMA")
KS = (1, 5, 10)


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
        audio, out_lengths = model.encode_audio(batch.logmel, batch.lengths)
        audio_maps.append(audio.float().cpu())
        lengths.append(out_lengths.cpu())
    longest = max(a.shape[1] for a in audio_maps)
    audio = torch.cat([F.pad(a, (0, 0, 0, longest - a.shape[1])) for a in audio_maps])
    return Embeddings(torch.cat(image_maps), audio, torch.cat(lengths))


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """scores: (N, N) float, caption a vs image i, pair i on the diagonal -> recall fractions.

    speech_to_image: caption a's own image ranks within the top k of its row;
    image_to_speech: image i's own caption ranks within the top k of its column.
    Ties count against the model (a tie with the true item ranks it below).
    """
    n = scores.shape[0]
    positive = scores.diagonal()
    # rank = number of items scoring at least as high as the true one, minus the true one itself
    rank_s2i = (scores >= positive[:, None]).sum(dim=1) - 1
    rank_i2s = (scores >= positive[None, :]).sum(dim=0) - 1
    return {
        "speech_to_image": {f"R@{k}": int((rank_s2i < k).sum()) / n for k in ks},
        "image_to_speech": {f"R@{k}": int((rank_i2s < k).sum()) / n for k in ks},
    }


def evaluate_embeddings(emb: Embeddings, *, compute_dtype: torch.dtype | None = None) -> dict:
    """All-pairs SISA/MISA/SIMA scores of the embedded pairs -> the ``eval --json`` object."""
    scores = score_matrix(emb.audio, emb.lengths, emb.image_maps, kinds=("misa", "sisa", "sima"),
                          compute_dtype=compute_dtype)
    result: dict = {kind: recall_at_k(scores[kind.lower()]) for kind in KINDS}
    result["pairs"] = int(emb.lengths.shape[0])
    return result


def evaluate(model, manifest: Manifest, *, batch_size: int = 64, device: str | torch.device = "cpu",
             progress: bool = True) -> dict:
    """Recall@1/5/10 of ``model`` on every pair of ``manifest`` (see ``evaluate_embeddings``)."""
    dataset = CaptionedImages(manifest, model, train=False, progress=progress)
    return evaluate_embeddings(embed_pairs(model, dataset, batch_size=batch_size, device=device, progress=progress))


def mean_r10(result: dict, kind: str = "MISA") -> float:
    """Mean of R@10 over both directions: the model-selection criterion."""
    return 0.5 * (result[kind]["speech_to_image"]["R@10"] + result[kind]["image_to_speech"]["R@10"])


def format_table(result: dict) -> str:
    """A plain-text recall table: one row per score kind and direction."""
    lines = [f"{'score':<6} {'direction':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6}"]
    for kind in KINDS:
        for direction in ("speech_to_image", "image_to_speech"):
            r = result[kind][direction]
            lines.append(f"{kind:<6} {direction:<16} {r['R@1']:>6.3f} {r['R@5']:>6.3f} {r['R@10']:>6.3f}")
    lines.append(f"({result['pairs']} pairs)")
    return "\n".join(lines)
