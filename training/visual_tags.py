"""Visually grounded keyword targets for the audio branch (Kamper et al., "Visually grounded learning
of keyword prediction from untranscribed speech", Interspeech 2017).

An image tagger (the image branch and region classifier that ``matchmap pretrain-images`` trains on
the generator's image labels, the stand-in for the paper's ImageNet VGG16) says which categories each
training image shows. The audio branch then learns to predict that distribution from the caption's
speech alone: a linear head over its frames, pooled by log-sum-exp over the caption's true frames as
the image pretraining pools over regions. No transcript is read anywhere: the targets come from the
picture, and a caption that names only some of its image's objects is still asked for all of them.

The head is a training aid only (like the pretraining classifier): it is kept in the run's checkpoint
so that ``--resume`` continues exactly, and never becomes part of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from encoders import load_checkpoint, model_from_checkpoint
from encoders.matchmap import frame_mask
from training.pretrain_images import LSE_SHARPNESS, RegionClassifier


class SpeechTagHead(nn.Module):
    """(B, T, D) audio frames and (B,) true lengths -> (B, C) caption logits (log-sum-exp over true frames)."""

    def __init__(self, embed_dim: int, categories: int, sharpness: float = LSE_SHARPNESS) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, categories)
        self.sharpness = sharpness

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        r = self.sharpness
        logits = self.linear(audio) * r  # (B, T, C)
        valid = frame_mask(lengths.to(audio.device), audio.shape[1])  # (B, T)
        logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
        return (torch.logsumexp(logits, dim=1) - lengths.to(audio.device).float().log()[:, None]) / r


def soft_tag_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over captions of the cross-entropy between (B, C) logits and (B, C) target distributions."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class ImageTagger:
    """A ``matchmap pretrain-images`` run's ``last.pt`` (image branch + region classifier) as a tagger."""

    def __init__(self, path: str) -> None:
        state = load_checkpoint(path)
        classifier_state = (state.get("extra") or {}).get("classifier")
        if classifier_state is None:
            raise ValueError(f"{path} holds no region classifier: give the last.pt of a `matchmap "
                             "pretrain-images` run (its model.pt keeps only the image branch)")
        self.model = model_from_checkpoint(state).eval()
        categories, embed_dim = classifier_state["linear.weight"].shape
        self.classifier = RegionClassifier(embed_dim, categories).eval()
        self.classifier.load_state_dict(classifier_state)
        self.categories = categories

    @torch.no_grad()
    def tag(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        """(N, C) float: each image's category distribution (softmax of the pooled scene logits)."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.model.image_frontend(image) for image in images[start: start + batch_size]])
            scene_logits, _ = self.classifier(self.model.encode_images(batch))
            out.append(scene_logits.softmax(dim=1))
        return torch.cat(out) if out else torch.zeros(0, self.categories)


def entropy_bits(distributions: torch.Tensor) -> float:
    """Mean entropy in bits of (N, C) distributions: how sure the tagger is (log2 of 1-4 objects: 0-2 bits)."""
    p = distributions.clamp_min(1e-12)
    return float(-(p * p.log()).sum(dim=1).mean() / math.log(2))
