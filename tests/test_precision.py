"""The precision policy and the ranking comparison the GPU release gate (bench/gpu_check.py) uses."""

from __future__ import annotations

import pytest
import torch

from encoders import create_model
from encoders.precision import (
    SCORE_RTOL,
    Ranking,
    compare_rankings,
    float32_settings,
    restore_float32_settings,
    score_tolerance,
    use_exact_float32,
)

TOP = [("a", 5.0), ("b", 4.0), ("c", 3.5), ("d", 3.49999), ("e", 2.0)]


def test_identical_rankings_agree():
    result = compare_rankings(TOP, TOP)
    assert result.identical and result.agree and result.max_score_difference == 0.0
    assert result.tolerance == pytest.approx(SCORE_RTOL * 5.0)


def test_a_near_tie_reordered_with_float32_noise_agrees():
    noisy = [("a", 5.000001), ("b", 3.999999), ("d", 3.500002), ("c", 3.499998), ("e", 2.0000003)]
    result = compare_rankings(TOP, noisy)
    assert not result.identical
    assert result.agree, result.problems
    assert result.max_score_difference == pytest.approx(1.2e-5, rel=0.1)


def test_a_real_reordering_fails():
    swapped = [("a", 5.0), ("c", 3.5), ("b", 4.0), ("d", 3.49999), ("e", 2.0)]
    result = compare_rankings(TOP, swapped)
    assert not result.agree
    assert any("'b' and 'c' swapped" in p for p in result.problems)


def test_scores_that_differ_beyond_the_tolerance_fail_even_in_the_same_order():
    tf32_like = [(i, s * (1 + 1e-3)) for i, s in TOP]  # TF32's error: same order, scores off by 1e-3
    result = compare_rankings(TOP, tf32_like)
    assert result.identical and not result.agree
    assert any(p.startswith("item 'a': score 5.005") for p in result.problems)


def test_an_item_missing_at_the_cut_agrees_only_when_it_ties_the_cut():
    tie_at_cut = TOP[:4] + [("f", 2.0000001)]  # another item tied with the last one
    assert compare_rankings(TOP, tie_at_cut).agree
    lost = [("a", 5.0), ("c", 3.5), ("d", 3.49999), ("e", 2.0), ("f", 1.5)]  # 'b' (4.0) fell out
    result = compare_rankings(TOP, lost)
    assert not result.agree
    assert any("item 'b' (score 4) only in the reference" in p for p in result.problems)
    assert not any("'f'" in p for p in result.problems)  # f is below the reference's cut
    assert not compare_rankings(TOP, TOP[:4]).agree  # a shorter list


def test_an_item_one_side_never_scored_agrees_only_when_it_tied_the_stage1_cut():
    # Two-stage search: 'b' reached stage 2 on the reference side only. If its stage-1 score ties
    # the other side's stage-1 cut (float noise decided it), that is no divergence; if it was far
    # above the cut, the other side lost a candidate it should have scored.
    items, scores = [i for i, _ in TOP], [s for _, s in TOP]
    stage1 = [0.9, 0.61, 0.7, 0.8, 0.65]
    reference = Ranking(items, scores, stage1, stage1_cut=0.6100001)
    rest = [0, 2, 3, 4]
    other = Ranking([items[j] for j in rest] + ["f"], [scores[j] for j in rest] + [1.5],
                    [stage1[j] for j in rest] + [0.62], stage1_cut=0.6100002)
    assert compare_rankings(reference, other).agree
    far_below = Ranking(other.items, other.scores, other.stage1_scores, stage1_cut=0.64)
    result = compare_rankings(reference, far_below)
    assert not result.agree and "item 'b' (score 4) only in the reference" in result.problems[0]
    assert not compare_rankings(Ranking(items, scores), Ranking(other.items, other.scores)).agree


def test_tolerance_scales_with_the_scores():
    assert score_tolerance([100.0, -250.0], [1.0]) == pytest.approx(SCORE_RTOL * 250)
    assert score_tolerance([0.0], []) == pytest.approx(SCORE_RTOL * 1e-3)
    small = [(i, s * 1e-3) for i, s in TOP]
    assert compare_rankings(small, [(i, s * (1 + 5e-5)) for i, s in small]).agree
    assert not compare_rankings(small, [(i, s * (1 + 5e-4)) for i, s in small]).agree


def test_use_exact_float32_turns_tf32_off_and_can_be_undone():
    before = float32_settings()
    try:
        torch.backends.cudnn.allow_tf32 = True
        previous = use_exact_float32()
        assert previous["cudnn_allow_tf32"] is True
        assert float32_settings() == {"cudnn_allow_tf32": False, "matmul_allow_tf32": False}
        restore_float32_settings(previous)
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        restore_float32_settings(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_in_exact_float32_embeds_like_cpu():
    # Both branches (convolutions) on CUDA under the policy: maps within the gate's tolerance of the CPU's.
    before = use_exact_float32()
    try:
        torch.manual_seed(0)
        model = create_model("tiny").eval()
        g = torch.Generator().manual_seed(0)
        images = torch.randn(4, 3, 128, 128, generator=g)
        logmel = torch.randn(4, 40, 300, generator=g)
        lengths = torch.tensor([300, 250, 120, 64])
        with torch.no_grad():
            cpu_images = model.encode_images(images)
            cpu_audio, _ = model.encode_audio(logmel, lengths)
            model.cuda()
            gpu_images = model.encode_images(images.cuda()).cpu()
            gpu_audio, _ = model.encode_audio(logmel.cuda(), lengths.cuda())
        for cpu, gpu in ((cpu_images, gpu_images), (cpu_audio, gpu_audio.cpu())):
            assert (cpu - gpu).abs().max() <= SCORE_RTOL * cpu.abs().max()
    finally:
        restore_float32_settings(before)


def test_bf16_training_on_a_cpu_without_native_bfloat16_is_warned_about(monkeypatch):
    import encoders.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warning = precision.bf16_training_warning("bf16", "auto")
    assert warning is not None and "--precision fp32" in warning
    assert precision.bf16_training_warning("bf16", "cpu") == warning
    assert precision.bf16_training_warning("fp32", "cpu") is None
    assert precision.bf16_training_warning("bf16", "cuda") is None  # GPUs have bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.bf16_training_warning("bf16", "cpu") is None
    assert isinstance(precision.cpu_has_native_bf16(), bool)
