"""indexer.region_codec: the fixed-rate transform codec of feature maps, against the obvious slow paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.region_codec import WIDTHS, RegionCodec


def scene_like_maps(n: int, regions: int = 16, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Maps with what real ones have: a shared mean, a steep spectrum over dims, alike neighbours."""
    rng = np.random.default_rng(seed)
    scales = 4.0 / (1 + np.arange(dim)) ** 0.7
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    image = rng.standard_normal((n, 1, dim)) * scales  # what all regions of an image share
    local = rng.standard_normal((n, regions, dim)) * scales * 0.5
    return ((image + local) @ basis.T + 1.0).astype(np.float32)


def unpack_reference(codec: RegionCodec, codes: np.ndarray) -> np.ndarray:
    """The slow path: read each coefficient's bits one by one, dequantize, invert both transforms."""
    flat_bits, low, step = codec.bits.reshape(-1), codec.low.reshape(-1), codec.step.reshape(-1)
    out = []
    for row in codes:
        coefficients = np.zeros(flat_bits.size, np.float64)
        offset = 0
        for b in WIDTHS[1:]:
            where = np.flatnonzero(flat_bits == b)
            for k, j in enumerate(where):
                bit = offset * 8 + k * b
                value = (int(row[bit // 8]) >> (bit % 8)) & (2**b - 1)
                coefficients[j] = low[j] + (value + 0.5) * step[j]
            offset += -(-len(where) * b // 8)
        z = coefficients.reshape(codec.shape)
        out.append(codec.regions @ z @ codec.dims.T + codec.mean)
    return np.stack(out)


@pytest.mark.parametrize("budget", [37, 256, 500])
def test_codes_fit_the_budget_and_decode_like_the_bitwise_reference(budget):
    maps = scene_like_maps(40)
    codec = RegionCodec.train(maps, budget)
    codes = codec.encode(maps)
    assert codes.dtype == np.uint8 and codes.shape == (40, codec.bytes_per_image)
    assert budget - 1 <= codec.bytes_per_image <= budget  # the allocation uses (nearly) all it may
    decoded = codec.decode(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(decoded[:3], unpack_reference(codec, codes[:3]), rtol=1e-4, atol=1e-4)


def test_more_bytes_give_less_error_and_eight_bits_a_value_is_nearly_exact():
    maps = scene_like_maps(60, seed=1)
    energy = float((maps**2).sum())
    errors = []
    for budget in (64, 128, 256, 512, 16 * 32):
        codec = RegionCodec.train(maps[:40], budget)
        decoded = codec.decode(torch.from_numpy(codec.encode(maps))).numpy()
        errors.append(float(((decoded - maps) ** 2).sum()) / energy)
    assert all(a > b for a, b in zip(errors, errors[1:-1], strict=False)), errors
    full = RegionCodec.train(maps[:40], 16 * 32)  # every coefficient 8 bits
    assert (full.bits == 8).all()
    assert errors[-1] < 1e-3


def test_training_is_deterministic_and_a_saved_codec_decodes_the_same(tmp_path):
    maps = scene_like_maps(30, seed=2)
    codec = RegionCodec.train(maps, 200)
    again = RegionCodec.train(maps, 200)
    codes = codec.encode(maps)
    np.testing.assert_array_equal(codes, again.encode(maps))
    codec.save(tmp_path / "codec.npz")
    loaded = RegionCodec.load(tmp_path / "codec.npz")
    torch.testing.assert_close(loaded.decode(torch.from_numpy(codes)), codec.decode(torch.from_numpy(codes)))
    assert codec.decode(torch.from_numpy(codes), torch.bfloat16).dtype == torch.bfloat16


def test_bad_input_is_named():
    maps = scene_like_maps(10)
    with pytest.raises(ValueError, match="training maps must be"):
        RegionCodec.train(maps[:1], 100)
    with pytest.raises(ValueError, match="bytes_per_image must lie in"):
        RegionCodec.train(maps, 0)
    codec = RegionCodec.train(maps, 100)
    with pytest.raises(ValueError, match=r"maps must be \(N, 16, 32\)"):
        codec.encode(maps[:, :8])
    with pytest.raises(ValueError, match="codes must be"):
        codec.decode(torch.zeros(2, 5, dtype=torch.uint8))


@pytest.mark.parametrize("budget", [37, 256])
def test_misa_in_the_codec_basis_equals_misa_of_the_decoded_maps(budget):
    from encoders.matchmap import paired_misa

    maps = scene_like_maps(60)
    trained = RegionCodec.train(maps, budget)
    bits, low, step = trained.bits.copy(), trained.low.copy(), trained.step.copy()
    bits[:, -5:], low[:, -5:], step[:, -5:] = 0, 0, 0  # the last 5 dims carry no bits: skipped in scoring
    codec = RegionCodec(trained.mean, trained.dims, trained.regions, bits, low, step)
    codes = torch.from_numpy(codec.encode(maps)).view(3, 20, -1)  # 3 captions, 20 images each
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(3, 9, maps.shape[2], generator=generator)
    lengths = torch.tensor([9, 4, 1])
    expected = paired_misa(audio, lengths, codec.decode(codes.reshape(60, -1)).view(3, 20, *codec.shape))
    np.testing.assert_allclose(codec.paired_misa(audio, lengths, codes, chunk=7).numpy(), expected.numpy(),
                               rtol=1e-4, atol=1e-4)
