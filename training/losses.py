"""Training objectives over the in-batch matchmap similarity matrix.

Every loss takes ``scores``: (B, B) float, scores[a, i] = similarity of caption a and image i (from
``encoders.matchmap.score_matrix``), with matching pairs on the diagonal, and optionally ``groups``:
(B,) long, the image each pair's caption describes. Where a corpus has several captions per image
(the objects world, Flickr8k, SpokenCOCO), two members of a batch may show the same image; the other
caption is then a correct match, not a negative, and is left out of the loss (``negatives_mask``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("infonce", "margin")


def negatives_mask(groups: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """(B, B) bool, True where column i is a false negative of row a: another pair of the same image.

    None when ``groups`` is None or every pair shows a different image (nothing to mask).
    """
    if groups is None:
        return None
    groups = groups.to(device)
    if groups.shape != (batch,):
        raise ValueError(f"groups must be ({batch},), got {tuple(groups.shape)}")
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


class SampledMarginRankingLoss(nn.Module):
    """The paper's loss: per pair one random imposter image and one random imposter caption.

    L = sum_j max(0, S(I_j, A_imp) - S(I_j, A_j) + eta) + max(0, S(I_imp, A_j) - S(I_j, A_j) + eta),
    averaged over the batch. Imposters are drawn uniformly from the other members of the batch.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, scores: torch.Tensor, generator: torch.Generator | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        batch = scores.shape[0]
        if batch < 2:
            raise ValueError("the margin ranking loss needs a batch of at least 2 pairs")
        index = torch.arange(batch, device=scores.device)
        # offsets in 1..B-1 guarantee an imposter differs from its anchor
        imposter_image = (index + torch.randint(1, batch, (batch,), generator=generator).to(scores.device)) % batch
        imposter_caption = (index + torch.randint(1, batch, (batch,), generator=generator).to(scores.device)) % batch
        positive = scores.diagonal()
        image_term = F.relu(self.margin + scores[index, imposter_image] - positive)  # caption j vs a wrong image
        caption_term = F.relu(self.margin + scores[imposter_caption, index] - positive)  # image j vs a wrong caption
        same = negatives_mask(groups, batch, scores.device)
        if same is not None:  # an imposter showing the same image is no imposter: its term counts 0
            image_term = image_term.masked_fill(same[index, imposter_image], 0.0)
            caption_term = caption_term.masked_fill(same[imposter_caption, index], 0.0)
        return (image_term + caption_term).mean()


class SymmetricInfoNCELoss(nn.Module):
    """Symmetric softmax cross-entropy over the full B x B matrix (every other member is a negative).

    A learnable temperature multiplies the raw scores; it is kept in [1/100, 100].
    """

    def __init__(self, initial_scale: float = 1.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(initial_scale)).log())

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(-4.6, 4.6).exp()

    @torch.no_grad()
    def calibrate(self, score_std: float, logit_std: float = 1.0) -> None:
        """Set the temperature so that scores spread by ``score_std`` give logits spread by ``logit_std``.

        Raw matchmap scores of an untrained model can spread over tens of units; at scale 1 the softmax
        is then saturated and wrong, and AdamW moves the log-scale by only about lr per step, so the
        first epochs go to shrinking the features back to the level of chance. Calibrating on the
        first batch removes that plateau.
        """
        if score_std > 0:
            self.log_scale.fill_(math.log(logit_std / score_std))

    def forward(self, scores: torch.Tensor, generator: torch.Generator | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        logits = scores * self.scale
        same = negatives_mask(groups, scores.shape[0], scores.device)
        if same is not None:  # other captions of the same image are matches: out of both softmaxes
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(scores.shape[0], device=scores.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def make_loss(name: str, **kwargs: float) -> nn.Module:
    """Build a loss by name: ``infonce`` (in-batch, default) or ``margin`` (the paper's)."""
    if name == "infonce":
        return SymmetricInfoNCELoss(**kwargs)
    if name == "margin":
        return SampledMarginRankingLoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
