"""The matchmap scoring module: the batched all-pairs path against the plain per-pair reference."""

from __future__ import annotations

import pytest
import torch

from encoders.matchmap import (
    SCORE_KINDS,
    frame_mask,
    matchmap,
    pair_score,
    paired_misa,
    pool_audio,
    pool_images,
    score_matrix,
)


def _batch(b=5, t=13, n=7, h=3, w=4, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, t, d, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t  # one caption fills the whole padded length
    images = torch.randn(n, h, w, d, generator=g, dtype=dtype)
    return audio, lengths, images


def test_frame_mask_marks_true_frames():
    mask = frame_mask(torch.tensor([1, 3, 0]), 4)
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [False, False, False, False],
    ]


def test_matchmap_is_region_by_frame_dot_products():
    image = torch.randn(2, 3, 8, dtype=torch.float64)
    audio = torch.randn(5, 8, dtype=torch.float64)
    m = matchmap(image, audio)
    assert m.shape == (2, 3, 5)
    assert torch.isclose(m[1, 2, 4], image[1, 2] @ audio[4])
    assert matchmap(image.reshape(6, 8), audio).shape == (6, 5)
    with pytest.raises(ValueError, match="same D"):
        matchmap(image, torch.randn(5, 7))


def test_pair_score_kinds_follow_their_definitions():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # 2 regions
    audio = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # 3 frames
    # M = [[2, 0, 1], [0, 3, 1]]
    assert pair_score(image, audio, "sisa").item() == pytest.approx(7 / 6)
    assert pair_score(image, audio, "misa").item() == pytest.approx((2 + 3 + 1) / 3)
    assert pair_score(image, audio, "sima").item() == pytest.approx((2 + 3) / 2)
    with pytest.raises(ValueError, match="unknown score kind 'max'"):
        pair_score(image, audio, "max")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_matrix_equals_per_pair_reference(dtype):
    audio, lengths, images = _batch(dtype=dtype)
    scores = score_matrix(audio, lengths, images, SCORE_KINDS)
    assert set(scores) == set(SCORE_KINDS)
    for kind in SCORE_KINDS:
        expected = torch.tensor(
            [
                [pair_score(images[j], audio[i, : lengths[i]], kind).item() for j in range(images.shape[0])]
                for i in range(audio.shape[0])
            ],
            dtype=dtype,
        )
        assert scores[kind].shape == (audio.shape[0], images.shape[0])
        torch.testing.assert_close(scores[kind], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooled_dot_product_is_sisa(dtype):
    audio, lengths, images = _batch(dtype=dtype, seed=1)
    pooled = pool_audio(audio, lengths) @ pool_images(images).T
    for i in range(audio.shape[0]):
        for j in range(images.shape[0]):
            torch.testing.assert_close(pooled[i, j], pair_score(images[j], audio[i, : lengths[i]], "sisa"))
    torch.testing.assert_close(score_matrix(audio, lengths, images, ("sisa",))["sisa"], pooled)


def test_frames_past_a_captions_length_change_no_score():
    audio, lengths, images = _batch(seed=2)
    before = score_matrix(audio, lengths, images, SCORE_KINDS)
    # Append padding frames: zeros, then large junk; neither may count.
    for filler in (
        torch.zeros(audio.shape[0], 6, audio.shape[2], dtype=audio.dtype),
        1e3 * torch.randn(5, 6, 16),
    ):
        longer = torch.cat([audio, filler.to(audio.dtype)], dim=1)
        after = score_matrix(longer, lengths, images, SCORE_KINDS)
        for kind in SCORE_KINDS:
            torch.testing.assert_close(after[kind], before[kind])
    # Junk written into the existing padding of the short captions does not count either.
    junk = audio.clone()
    for i, n in enumerate(lengths.tolist()):
        junk[i, n:] = 50.0
    after = score_matrix(junk, lengths, images, SCORE_KINDS)
    for kind in SCORE_KINDS:
        torch.testing.assert_close(after[kind], before[kind])


def test_region_mask_ignores_padded_regions():
    audio, lengths, images = _batch(seed=3)
    n, h, w, d = images.shape
    regions = images.reshape(n, h * w, d)
    valid_counts = torch.randint(1, h * w + 1, (n,), generator=torch.Generator().manual_seed(3))
    region_mask = frame_mask(valid_counts, h * w)
    padded = torch.where(region_mask.unsqueeze(-1), regions, torch.full_like(regions, 99.0))
    scores = score_matrix(audio, lengths, padded, SCORE_KINDS, region_mask=region_mask)
    for kind in SCORE_KINDS:
        for i in range(audio.shape[0]):
            for j in range(n):
                ref = pair_score(regions[j, : valid_counts[j]], audio[i, : lengths[i]], kind)
                torch.testing.assert_close(scores[kind][i, j], ref)
    torch.testing.assert_close(pool_images(padded, region_mask)[0], regions[0, : valid_counts[0]].mean(dim=0))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_equals_unchunked(chunk_size):
    audio, lengths, images = _batch(b=9, n=11, seed=4)
    whole = score_matrix(audio, lengths, images, SCORE_KINDS, chunk_bytes=2**30)
    # A tiny memory budget also forces chunking over captions.
    chunked = score_matrix(audio, lengths, images, SCORE_KINDS, chunk_size=chunk_size, chunk_bytes=1024)
    auto = score_matrix(audio, lengths, images, SCORE_KINDS, chunk_bytes=1024)
    for kind in SCORE_KINDS:
        torch.testing.assert_close(chunked[kind], whole[kind], rtol=0, atol=1e-12)
        torch.testing.assert_close(auto[kind], whole[kind], rtol=0, atol=1e-12)


def test_no_images_or_no_captions_give_empty_score_matrices():
    audio, lengths, images = _batch()
    no_images = score_matrix(audio, lengths, images[:0], SCORE_KINDS)
    no_captions = score_matrix(audio[:0], lengths[:0], images, SCORE_KINDS)
    for kind in SCORE_KINDS:
        assert no_images[kind].shape == (5, 0) and no_captions[kind].shape == (0, 7)


def test_gradients_flow_to_both_branches_and_skip_padding():
    audio, lengths, images = _batch(dtype=torch.float32, seed=5)
    lengths[1] = 4
    audio.requires_grad_(True)
    images.requires_grad_(True)
    scores = score_matrix(audio, lengths, images, SCORE_KINDS)
    loss = sum(s.sum() for s in scores.values())
    loss.backward()
    assert audio.grad is not None and images.grad is not None
    assert audio.grad[1, :4].abs().sum() > 0 and images.grad.abs().sum() > 0
    assert torch.all(audio.grad[1, 4:] == 0), "padded frames must get no gradient"
    # torch.autograd.gradcheck on a small double-precision case (MISA and SIMA are piecewise linear).
    a, ln, im = _batch(b=2, t=4, n=2, h=2, w=2, d=3, seed=6)
    a.requires_grad_(True)
    im.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: score_matrix(x, ln, y, SCORE_KINDS)["misa"], (a, im))
    assert torch.autograd.gradcheck(lambda x, y: score_matrix(x, ln, y, SCORE_KINDS)["sima"], (a, im))


def test_bfloat16_compute_stays_close_and_returns_float32():
    audio, lengths, images = _batch(b=6, t=20, n=30, d=32, dtype=torch.float32, seed=7)
    exact = score_matrix(audio, lengths, images, ("misa", "sima"))
    fast = score_matrix(audio, lengths, images, ("misa", "sima"), compute_dtype=torch.bfloat16)
    for kind in ("misa", "sima"):
        assert fast[kind].dtype == torch.float32
        # bf16 keeps 8 significant bits; scores are sums of 32 products of unit normals (~6 in size).
        torch.testing.assert_close(fast[kind], exact[kind], rtol=0.02, atol=0.1)


def test_inputs_are_checked_with_clear_messages():
    audio, lengths, images = _batch()
    with pytest.raises(ValueError, match="kinds"):
        score_matrix(audio, lengths, images, ("best",))
    with pytest.raises(ValueError, match="lengths must lie in 1..13"):
        score_matrix(audio, torch.tensor([0, 1, 2, 3, 4]), images)
    with pytest.raises(ValueError, match="lengths must be"):
        score_matrix(audio, lengths[:2], images)
    with pytest.raises(ValueError, match="16 dims per frame but images have 8"):
        score_matrix(audio, lengths, images[..., :8])
    with pytest.raises(ValueError, match="at least one valid region"):
        score_matrix(audio, lengths, images, region_mask=torch.zeros(7, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        score_matrix(audio, lengths, images, chunk_size=0)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-block", "one-candidate-per-block"])
def test_paired_misa_scores_each_caption_against_its_own_candidates(chunk_bytes):
    audio, lengths, images = _batch(b=4, n=9)
    pick = torch.tensor([[0, 3, 8], [8, 8, 1], [2, 5, 7], [6, 0, 4]])  # (B, K): each caption's own images
    candidates = images.reshape(9, 12, 16)[pick]  # (B, K, R, D)
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[1, 2] = False  # a shorter candidate list, padded
    scores = paired_misa(audio, lengths, candidates, valid=valid, chunk_bytes=chunk_bytes)
    for b in range(4):
        for k in range(3):
            expected = pair_score(images[pick[b, k]], audio[b, : lengths[b]], "misa")
            if valid[b, k]:
                torch.testing.assert_close(scores[b, k], expected, rtol=1e-6, atol=1e-6)
            else:
                assert scores[b, k] == float("-inf")
    low = paired_misa(audio.float(), lengths, candidates.float(), compute_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low[valid], scores[valid].float(), rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="disagree"):
        paired_misa(audio, lengths, candidates[:3])
