"""Stage-1 pooling: one vector per image and one per caption, whose inner product ranks like MISA.

Stage 1 of search is an inner-product index over one pooled vector per image. The masked means
(:func:`encoders.matchmap.pool_images` / ``pool_audio``) make that inner product exactly SISA, a mean
over every region and frame, which ranks differently from MISA (each frame's *best* region): the
background weighs as much as the objects a caption names. :class:`Stage1Pooling` is a pair of small
learned heads, trained on frozen encoder maps to rank images as MISA does (``matchmap distill-stage1``,
``training/distill.py``). Each head is an attention pooling: H learned queries each take a softmax-
weighted mean of the positions, and a linear map mixes the H means into one D-dim vector.

Both heads start as exactly the masked mean (queries zero, the mix the mean of H identities), so an
untrained head is SISA and training only moves away from it where MISA's ranking says so.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AttentionPool(nn.Module):
    """x: (N, L, D) float, mask: (N, L) bool (True = a real position) -> (N, D).

    ``heads`` learned queries q_h give weights softmax_l(q_h . x_l) over the masked positions; the H
    weighted means are concatenated and mixed to D dims by a linear map (with bias).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if heads < 1:
            raise ValueError(f"an attention pooling needs at least one head, got {heads}")
        self.heads = heads
        self.queries = nn.Parameter(torch.zeros(heads, dim))
        self.mix = nn.Linear(heads * dim, dim)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(dim).repeat(1, heads) / heads)
            self.mix.bias.zero_()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n, length, dim = x.shape
        if mask.shape != (n, length):
            raise ValueError(f"mask must be ({n}, {length}), got {tuple(mask.shape)}")
        x = x.to(self.queries.dtype)
        logits = torch.einsum("nld,hd->nhl", x, self.queries)
        weights = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)  # (N, H, L)
        means = torch.einsum("nhl,nld->nhd", weights, x).reshape(n, self.heads * dim)
        return self.mix(means)


class Stage1Pooling(nn.Module):
    """The two heads: ``image`` over an image's regions, ``audio`` over a caption's true frames."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.image = AttentionPool(dim, heads)
        self.audio = AttentionPool(dim, heads)
