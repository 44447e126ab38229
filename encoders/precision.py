"""The float32 precision policy on CUDA, and when two rankings of the same query agree.

PyTorch runs float32 convolutions on CUDA in TF32 by default (``torch.backends.cudnn.allow_tf32``
is True: inputs rounded to a 10-bit mantissa, a relative error near 5e-4 per product). Both
branches of a matchmap model are convolutions, so on CUDA its embeddings, and the scores made from
them, can move away from the CPU's by that order. ``bench/gpu_check.py``'s old gate (reorders
allowed only among items closer than 1e-4 in absolute score) failed on every H200 run, on score
differences of 3e-4 to 5e-4 and on candidates near the stage-1 cut that got into one device's
stage 2 only (docs/search.md, "GPU").

Policy:

- **Search and evaluation on CUDA compute in exact float32**: TF32 off for convolutions and for
  matrix products (:func:`use_exact_float32`). Whoever puts a model on a CUDA device to serve or
  evaluate it calls it once: ``matchmap eval --device cuda``, ``bench/gpu_check.py``, the CUDA
  tests, and the search engine when it opens a CUDA device. It costs little:
  the service's work on the GPU is one caption's encoder pass and a few hundred MISA scores.
- **Deliberately approximate steps stay approximate and are named**: stage 2's coarse pass over the
  resident maps is bfloat16 by design, and its best few are re-scored exactly in float32
  (``search/resident.py``); training may run under bfloat16 autocast (``--precision bf16``) and
  keeps PyTorch's TF32 default for its fp32 convolutions, its per-epoch validation included (speed;
  its results are judged by recall, which ``bench/gpu_check.py`` re-checks on the CPU).
- **Two exact float32 computations of a score agree within** ``SCORE_RTOL`` **of the scale of the
  scores compared** (:func:`score_tolerance`). Float32 rounds at 2**-24 (6e-8); a score is a mean
  of dot products of D = 256 (tiny) to 1024 dims, whose summation error, in whatever order a device
  sums, is at most about D * 6e-8 = 6e-5 of the products' magnitude and typically sqrt(D) * 6e-8
  (1e-6 to 2e-6); the embeddings themselves, outputs of a few convolution layers computed in
  different orders (cuDNN and oneDNN algorithms), differ by about as much again. 1e-4 covers the
  worst case with room and is 5x below TF32's per-product error, so TF32 left on is likely to show.

Two rankings of one query then agree (:func:`compare_rankings`) when every item in both has the
same score within the tolerance, and every difference of order or membership is among items whose
scores lie within the tolerance of each other (ties), or an item tied at a cut (the top-k's last
score, or the stage-1 cut of a two-stage search). A reordering of items further apart is a real
divergence: the release gate (``bench/gpu_check.py``) fails on it, and on nothing less.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

SCORE_RTOL = 1e-4


def use_exact_float32() -> dict[str, bool]:
    """Turn TF32 off for CUDA convolutions (cuDNN) and matrix products (cuBLAS), process-wide.

    Returns the previous settings (as :func:`float32_settings`), for a caller that wants them back.
    Harmless without CUDA: the flags only steer CUDA kernels.
    """
    previous = float32_settings()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return previous


def float32_settings() -> dict[str, bool]:
    """The TF32 switches now in force: {"cudnn_allow_tf32": ..., "matmul_allow_tf32": ...}."""
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def restore_float32_settings(settings: dict[str, bool]) -> None:
    """Put back settings returned by :func:`use_exact_float32` or :func:`float32_settings`."""
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul_allow_tf32"]


def score_tolerance(*score_lists: Sequence[float], rtol: float = SCORE_RTOL) -> float:
    """The largest difference two exact float32 computations of these scores may show: ``rtol``
    times the largest magnitude among them (and at least ``rtol`` * 1e-3, for lists of zeros)."""
    scale = max((abs(float(s)) for scores in score_lists for s in scores), default=0.0)
    return rtol * max(scale, 1e-3)


@dataclass
class RankingComparison:
    """How a ranking compares with a reference ranking of the same query."""

    identical: bool  # same items in the same order
    tolerance: float  # the score difference allowed (see score_tolerance)
    max_score_difference: float  # over items in both rankings (0.0 when there are none)
    problems: list[str] = field(default_factory=list)  # real divergences, described

    @property
    def agree(self) -> bool:
        """Identical up to ties within the tolerance and score noise within it."""
        return not self.problems


@dataclass
class Ranking:
    """One top-k answer to a query: best-first ``items`` with their ``scores``; for a two-stage
    search, optionally each item's stage-1 score and ``stage1_cut``, the lowest stage-1 score that
    was admitted to stage 2 (an item below it was never scored)."""

    items: Sequence[Hashable]
    scores: Sequence[float]
    stage1_scores: Sequence[float] | None = None
    stage1_cut: float | None = None

    @classmethod
    def of(cls, ranking: Ranking | Sequence[tuple[Hashable, float]]) -> Ranking:
        """A Ranking as is, or one from a best-first list of (item, score)."""
        if isinstance(ranking, Ranking):
            return ranking
        return cls([i for i, _ in ranking], [float(s) for _, s in ranking])


def compare_rankings(
    reference: Ranking | Sequence[tuple[Hashable, float]],
    other: Ranking | Sequence[tuple[Hashable, float]],
    *,
    rtol: float = SCORE_RTOL,
) -> RankingComparison:
    """Compare two top-k rankings of one query (Rankings, or best-first lists of (item, score)).

    They agree when (1) they have the same length; (2) each item in both has scores within the
    tolerance; (3) two items ordered differently have scores within the tolerance of each other;
    and (4) an item in one list only is a tie at a cut: its score is within the tolerance of the
    other list's last score, or (both given their stage-1 scores) its stage-1 score is within the
    stage-1 tolerance of the other side's stage-1 cut, so the other side never scored it. The
    tolerances are ``score_tolerance`` of the scores, and of the stage-1 scores and cuts.
    """
    ref, oth = Ranking.of(reference), Ranking.of(other)
    tol = score_tolerance(ref.scores, oth.scores, rtol=rtol)
    problems: list[str] = []
    if len(ref.items) != len(oth.items):
        problems.append(f"{len(oth.items)} items against the reference's {len(ref.items)}")
    ref_score, score = dict(zip(ref.items, ref.scores, strict=True)), dict(zip(oth.items, oth.scores, strict=True))
    common = [i for i in ref.items if i in score]
    differences = [abs(ref_score[i] - score[i]) for i in common]
    for i, d in zip(common, differences, strict=True):
        if d > tol:
            problems.append(f"item {i!r}: score {score[i]:.6g} against the reference's {ref_score[i]:.6g} "
                            f"(tolerance {tol:.2g})")
    position = {i: p for p, i in enumerate(oth.items)}
    for x_at, x in enumerate(common):
        for y in common[x_at + 1 :]:
            gap = ref_score[x] - ref_score[y]
            if position[y] < position[x] and gap > tol:
                problems.append(f"items {x!r} and {y!r} swapped, {gap:.3g} apart (tolerance {tol:.2g})")
    stage1_tol = None
    if None not in (ref.stage1_scores, oth.stage1_scores, ref.stage1_cut, oth.stage1_cut):
        stage1_tol = score_tolerance(ref.stage1_scores, oth.stage1_scores, [ref.stage1_cut, oth.stage1_cut], rtol=rtol)
    problems += _one_sided(ref, oth, tol, stage1_tol, "the reference")
    problems += _one_sided(oth, ref, tol, stage1_tol, "this ranking")
    return RankingComparison(
        identical=list(ref.items) == list(oth.items),
        tolerance=tol,
        max_score_difference=max(differences, default=0.0),
        problems=problems,
    )


def _one_sided(own: Ranking, other: Ranking, tol: float, stage1_tol: float | None, side: str) -> list[str]:
    """Items of ``own`` missing from ``other`` that are no tie at either cut, described."""
    problems = []
    present = set(other.items)
    for at, (i, s) in enumerate(zip(own.items, own.scores, strict=True)):
        if i in present or (other.scores and s <= other.scores[-1] + tol):
            continue  # in both, or tied with the other's last item
        if stage1_tol is not None and abs(own.stage1_scores[at] - other.stage1_cut) <= stage1_tol:
            continue  # tied at the other's stage-1 cut: the other side never scored it
        last = f"{other.scores[-1]:.6g}" if other.scores else "none"
        problems.append(f"item {i!r} (score {s:.6g}) only in {side}, above the other's last score {last} "
                        f"by more than {tol:.2g}, and no tie at the stage-1 cut")
    return problems


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16, AMX), as oneDNN reports it.

    Without it, bfloat16 convolutions fall back to slow paths: on an AMD EPYC with AVX2 only, a
    training step of the tiny model (batch 32) took 23 s under bfloat16 autocast against 1.4 s in float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bfloat16 either
        return False


def bf16_training_warning(precision: str, device: str) -> str | None:
    """The warning for ``--precision bf16`` on a CPU that lacks native bfloat16, else None."""
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if precision != "bf16" or not on_cpu or cpu_has_native_bf16():
        return None
    return ("warning: --precision bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX) is much slower "
            "than fp32 (16x for a tiny-model step on an AVX2 CPU); use --precision fp32 here")
