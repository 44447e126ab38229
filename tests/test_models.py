"""Every registered model config at small sizes (timm-style), checkpoints, the factory and `matchmap models`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import encoders.config as config_module
from encoders import (
    ModelConfig,
    create_model,
    get_config,
    list_models,
    load_checkpoint,
    register_config,
    save_checkpoint,
    score_matrix,
)
from encoders.matchmap import frame_mask
from encoders.models import (
    AudioBranch,
    ImageBranch,
    MatchmapModel,
    count_parameters,
    image_grid_size,
    length_sorted_split,
    masked_instance_norm,
)
from matchmap.cli import main as cli_main

SMALL_IMAGE = 64
SMALL_FRAMES = 160


def small(name: str) -> ModelConfig:
    """The registered config with a 64 px image input and 160 log-mel frames, to keep tests fast."""
    cfg = get_config(name)
    return dataclasses.replace(
        cfg,
        image=dataclasses.replace(cfg.image, input_size=SMALL_IMAGE, resize_size=SMALL_IMAGE + 8),
        audio=dataclasses.replace(cfg.audio, max_frames=SMALL_FRAMES),
    )


@pytest.fixture(scope="module", params=list_models())
def model(request) -> MatchmapModel:
    torch.manual_seed(0)
    return MatchmapModel(small(request.param)).eval()


def _logmel(b: int, t: int, n_mels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n_mels, t, generator=torch.Generator().manual_seed(seed))


def test_configs_round_trip_through_dicts_and_json():
    for name in list_models():
        cfg = get_config(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name", list_models())
def test_image_grid_matches_the_network_at_full_size(name):
    cfg = get_config(name)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        out = ImageBranch(cfg.image, cfg.embed_dim)(
            torch.empty(1, 3, cfg.image.input_size, cfg.image.input_size)
        )
        audio, lengths = AudioBranch(cfg.audio, cfg.embed_dim)(
            torch.empty(1, cfg.audio.n_mels, cfg.audio.max_frames), torch.tensor([cfg.audio.max_frames])
        )
    assert tuple(out.shape) == (1, cfg.embed_dim, *image_grid_size(cfg.image))
    assert audio.shape == (1, cfg.embed_dim, cfg.audio.max_frames // 2**cfg.audio.pools)


def test_paper_model_has_the_papers_shapes():
    cfg = get_config("davenet-vgg16")
    assert cfg.embed_dim == 1024 and image_grid_size(cfg.image) == (14, 14)
    assert cfg.audio.channels == (128, 256, 512, 512) and cfg.audio.kernel_widths == (11, 17, 17, 17)
    assert cfg.audio.output_frame_seconds == pytest.approx(0.16)
    params = count_parameters(cfg)
    assert params["image"] == 14_714_688 + 512 * 1024 * 9 + 1024  # VGG16 conv layers + the 3x3 conv to 1024


def test_tiny_is_small():
    params = count_parameters(get_config("tiny"))
    assert 1_000_000 <= params["total"] <= 3_500_000
    assert image_grid_size(get_config("tiny").image) == (8, 8)


def test_output_shapes_and_lengths(model):
    cfg = model.config
    images = torch.randn(2, 3, SMALL_IMAGE, SMALL_IMAGE)
    maps = model.encode_images(images)
    assert maps.shape == (2, *model.image_grid, cfg.embed_dim)
    lengths = torch.tensor([SMALL_FRAMES, 37, 1])
    with torch.no_grad():
        audio, out_lengths = model.encode_audio(_logmel(3, SMALL_FRAMES, cfg.audio.n_mels), lengths)
    assert audio.shape == (3, -(-SMALL_FRAMES // 2**cfg.audio.pools), cfg.embed_dim)
    assert out_lengths.tolist() == model.output_lengths(lengths).tolist()
    assert out_lengths.tolist() == [-(-n // 2**cfg.audio.pools) for n in lengths.tolist()]
    for i, n in enumerate(out_lengths.tolist()):
        assert torch.all(audio[i, n:] == 0), "output frames past a caption's length must be zero"
    assert model.audio_frame_seconds == pytest.approx(cfg.audio.hop_ms / 1000 * 2**cfg.audio.pools)


def test_frames_are_trimmed_to_the_longest_caption(model):
    n_mels = model.config.audio.n_mels
    with torch.no_grad():
        audio, out_lengths = model.encode_audio(_logmel(2, SMALL_FRAMES, n_mels), torch.tensor([40, 33]))
    assert audio.shape[1] == int(out_lengths.max()) == model.output_lengths(torch.tensor(40)).item()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_never_leaks_into_a_captions_frames_or_scores(model, mode):
    """A caption's output frames and scores are the same alone, batched with longer ones, and padded with junk."""
    model.train(mode == "train")
    n_mels = model.config.audio.n_mels
    lengths = torch.tensor([53, SMALL_FRAMES, 70])
    batch = _logmel(3, SMALL_FRAMES, n_mels, seed=1)
    junk = batch.clone()
    for i, n in enumerate(lengths.tolist()):
        batch[i, :, n:] = 0.0
        junk[i, :, n:] = 7.0 * torch.randn(n_mels, SMALL_FRAMES - n)
    images = torch.randn(4, 3, SMALL_IMAGE, SMALL_IMAGE)
    with torch.no_grad():
        maps = model.eval().encode_images(images)
        model.train(mode == "train")
        a_zero, out_len = model.encode_audio(batch, lengths)
        a_junk, _ = model.encode_audio(junk, lengths)
        # More padding frames appended after the longest caption.
        a_longer, _ = model.encode_audio(torch.cat([junk, torch.randn(3, n_mels, 50)], dim=2), lengths)
    torch.testing.assert_close(a_junk, a_zero)
    torch.testing.assert_close(a_longer[:, : a_zero.shape[1]], a_zero)
    scores = score_matrix(a_zero, out_len, maps, ("sisa", "misa", "sima"))
    scores_junk = score_matrix(a_longer, out_len, maps, ("sisa", "misa", "sima"))
    for kind in scores:
        torch.testing.assert_close(scores_junk[kind], scores[kind])
    if mode == "eval":  # batch statistics differ in train mode, so only eval mode compares with solo runs
        with torch.no_grad():
            alone, alone_len = model.encode_audio(batch[:1, :, :53], lengths[:1])
        torch.testing.assert_close(alone[0, : alone_len[0]], a_zero[0, : alone_len[0]], rtol=1e-4, atol=1e-5)
    model.eval()


def test_padding_to_a_frame_multiple_feeds_few_shapes_and_changes_no_frame(model):
    """Queries come in every length; with ``frame_multiple`` the branch sees a multiple of it (a few
    shapes, whose oneDNN primitives are made once), and each caption's frames and T' are unchanged."""
    n_mels = model.config.audio.n_mels
    seen: list[int] = []
    hook = model.audio_net.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[-1]))
    try:
        with torch.no_grad():
            for length in range(41, SMALL_FRAMES, 7):
                logmel = _logmel(1, length, n_mels, seed=length)
                exact, exact_lengths = model.encode_audio(logmel, torch.tensor([length]))
                padded, padded_lengths = model.encode_audio(logmel, torch.tensor([length]), frame_multiple=32)
                assert padded.shape == exact.shape and torch.equal(padded_lengths, exact_lengths)
                torch.testing.assert_close(padded, exact, rtol=1e-4, atol=1e-5)
    finally:
        hook.remove()
    assert len(set(seen[0::2])) == 17 and set(seen[1::2]) == {64, 96, 128, 160}


@pytest.mark.parametrize("global_context", [False, True])
def test_global_context_lets_far_away_input_reach_a_region_and_a_frame(global_context):
    """With global_context a region (frame) sees what lies beyond its receptive field; without, it does not."""
    cfg = small("tiny")
    cfg = dataclasses.replace(
        cfg,
        image=dataclasses.replace(cfg.image, global_context=global_context),
        # instance norm also spreads a caption's statistics over all its frames: off, to isolate the context
        audio=dataclasses.replace(cfg.audio, global_context=global_context, instance_norm_layers=0),
    )
    torch.manual_seed(0)
    model = MatchmapModel(cfg).eval()
    images = torch.randn(1, 3, SMALL_IMAGE, SMALL_IMAGE)
    changed = images.clone()
    changed[:, :, SMALL_IMAGE // 2 :, SMALL_IMAGE // 2 :] = 3.0  # the bottom-right quarter only
    logmel = _logmel(1, SMALL_FRAMES, cfg.audio.n_mels)
    later = logmel.clone()
    later[:, :, 120:] = 5.0  # the last 40 frames only
    lengths = torch.tensor([SMALL_FRAMES])
    with torch.no_grad():
        top_left = model.encode_images(images)[0, 0, 0]
        top_left_changed = model.encode_images(changed)[0, 0, 0]
        first_frame = model.encode_audio(logmel, lengths)[0][0, 0]
        first_frame_changed = model.encode_audio(later, lengths)[0][0, 0]
    assert torch.equal(top_left, top_left_changed) is not global_context
    assert torch.equal(first_frame, first_frame_changed) is not global_context


def test_instance_norm_standardizes_each_caption_over_its_own_frames_only():
    x = torch.randn(3, 5, 40) * 4 + 7
    mask = frame_mask(torch.tensor([40, 25, 9]), 40)
    out = masked_instance_norm(x, mask)
    for i, n in enumerate([40, 25, 9]):
        torch.testing.assert_close(out[i, :, :n].mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[i, :, :n].var(dim=1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
        assert torch.equal(out[i, :, n:], torch.zeros(5, 40 - n))
    # a caption's own gain and offset (a voice's loudness or timbre per channel) are removed
    scaled = x.clone()
    scaled[1] = 3.0 * x[1] - 2.0
    torch.testing.assert_close(masked_instance_norm(scaled, mask), out, atol=1e-4, rtol=1e-4)


def test_batch_norm_statistics_ignore_padding():
    cfg = small("tiny")
    assert cfg.audio.batch_norm
    lengths = torch.tensor([30, 90])
    clean = _logmel(2, 120, cfg.audio.n_mels, seed=2)
    for i, n in enumerate(lengths.tolist()):
        clean[i, :, n:] = 0
    junk = clean.clone()
    junk[:, :, 95:] = 100.0
    stats = []
    for logmel in (clean, junk):
        torch.manual_seed(0)
        m = MatchmapModel(cfg).train()
        m.encode_audio(logmel, lengths)
        stats.append({k: v for k, v in m.audio_net.state_dict().items() if "running" in k})
    for key in stats[0]:
        torch.testing.assert_close(stats[1][key], stats[0][key])


def test_backward_reaches_every_parameter(model):
    model.train()
    cfg = model.config
    images = torch.randn(3, 3, SMALL_IMAGE, SMALL_IMAGE)
    lengths = torch.tensor([SMALL_FRAMES, 90, 41])
    maps = model.encode_images(images)
    audio, out_len = model.encode_audio(_logmel(3, SMALL_FRAMES, cfg.audio.n_mels), lengths)
    scores = score_matrix(audio, out_len, maps, ("misa", "sisa"))
    loss = (
        torch.nn.functional.cross_entropy(scores["misa"], torch.arange(3)) + scores["sisa"].diagonal().mean()
    )
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
    model.eval()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_length_groups_give_the_padded_batchs_maps_gradients_and_statistics(mode):
    """Captions run as groups of similar length (encoders.models.length_sorted_split) give the padded batch's
    maps, lengths, gradients and BatchNorm running statistics: the statistics span every group."""
    cfg = small("tiny")
    lengths = torch.tensor([41, SMALL_FRAMES, 17, 90, 64, 33, 120, 58, 25])  # unsorted, odd count
    logmel = _logmel(len(lengths), SMALL_FRAMES, cfg.audio.n_mels, seed=3)
    results = []
    for groups in (1, 4):
        torch.manual_seed(0)
        model = MatchmapModel(cfg).train(mode == "train")
        audio, out_lengths = model.encode_audio(logmel, lengths, length_groups=groups)
        weights = torch.randn(audio.shape, generator=torch.Generator().manual_seed(5))
        (audio * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.audio_net.named_parameters()}
        stats = {name: b.clone() for name, b in model.audio_net.named_buffers()}
        results.append((audio.detach(), out_lengths, grads, stats))
    (padded, padded_lengths, padded_grads, padded_stats), (grouped, grouped_lengths, grouped_grads, grouped_stats) = results
    assert torch.equal(grouped_lengths, padded_lengths) and grouped.shape == padded.shape
    torch.testing.assert_close(grouped, padded, rtol=1e-4, atol=1e-5)
    for name, grad in padded_grads.items():  # summed over many frames: rounding is relative to the whole
        assert (grouped_grads[name] - grad).norm() <= 1e-4 * grad.norm(), name
    for name, stat in padded_stats.items():
        torch.testing.assert_close(grouped_stats[name].float(), stat.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_length_groups_split_by_length_with_equal_counts():
    parts = length_sorted_split(torch.tensor([5, 1, 4, 2, 3, 6, 0, 7]), 4)
    assert [p.tolist() for p in parts] == [[6, 1], [3, 4], [2, 0], [5, 7]]
    assert length_sorted_split(torch.tensor([3, 1, 2]), 4) is None  # under 2 captions a group: one group
    assert length_sorted_split(torch.tensor([3, 1, 2, 4]), 1) is None


def test_encode_rejects_malformed_inputs(model):
    n_mels = model.config.audio.n_mels
    with pytest.raises(ValueError, match=rf"\(B, {n_mels}, T\)"):
        model.encode_audio(torch.randn(2, n_mels + 1, 50), torch.tensor([50, 50]))
    with pytest.raises(ValueError, match="lengths must lie in 1..50"):
        model.encode_audio(torch.randn(2, n_mels, 50), torch.tensor([51, 10]))
    with pytest.raises(ValueError, match="lengths must be"):
        model.encode_audio(torch.randn(2, n_mels, 50), torch.tensor([50]))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        model.encode_images(torch.randn(2, 1, 32, 32))


def test_checkpoint_round_trip(tmp_path):
    model = MatchmapModel(small("tiny"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    images = torch.randn(2, 3, SMALL_IMAGE, SMALL_IMAGE)
    audio, out_len = model.encode_audio(_logmel(2, 80, 40), torch.tensor([80, 60]))
    score_matrix(audio, out_len, model.encode_images(images))["misa"].sum().backward()
    optimizer.step()
    model.eval()
    version_before_save = model.version

    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, model, optimizer=optimizer, step=12, epoch=3, extra={"recall@10": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "no temporary files may be left"
    assert model.version != version_before_save, "training changed the weights, so the version changes"

    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 12 and ckpt["epoch"] == 3 and ckpt["extra"] == {"recall@10": 0.5}
    assert ckpt["optimizer"]["state"], "optimizer state is kept"
    loaded = create_model(path)
    assert loaded.config == model.config and loaded.version == model.version
    assert not loaded.training
    logmel = _logmel(1, 80, 40, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_audio(logmel, torch.tensor([80]))[0],
            model.encode_audio(logmel, torch.tensor([80]))[0],
        )
        torch.testing.assert_close(loaded.encode_images(images), model.encode_images(images))
    fresh_optimizer = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(ckpt["optimizer"])

    # The version is a function of the weights: stable on reload, different for other weights.
    save_checkpoint(tmp_path / "again.pt", loaded)
    assert load_checkpoint(tmp_path / "again.pt")["version"] == model.version
    assert MatchmapModel(small("tiny")).version != model.version
    assert model.version.startswith("tiny-") and len(model.version) == len("tiny-") + 12


def test_create_model_by_name_and_its_errors(tmp_path, monkeypatch):
    model = create_model("tiny")
    assert isinstance(model, MatchmapModel) and model.config == get_config("tiny") and not model.training
    with pytest.raises(FileNotFoundError, match="neither a registered model config"):
        create_model("no-such-model")
    missing = tmp_path / "default_model" / "tiny.pt"
    monkeypatch.setattr("encoders.checkpoint.default_checkpoint_path", lambda: missing)
    with pytest.raises(FileNotFoundError, match="no shipped default model.*matchmap train"):
        create_model()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        create_model(garbage)


def test_register_config_adds_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_REGISTRY", dict(config_module._registry()))
    d = get_config("tiny").to_dict()
    d["name"] = "tiny-wide"
    d["embed_dim"] = 128
    path = tmp_path / "tiny-wide.json"
    path.write_text(json.dumps(d))
    assert register_config(path) == "tiny-wide"
    assert "tiny-wide" in list_models()
    assert create_model("tiny-wide").config.embed_dim == 128
    d["audio"]["kernel_width"] = 3
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"tiny-wide.json.*unknown keys \['kernel_width'\]"):
        register_config(path)


def test_invalid_configs_say_what_is_wrong():
    d = get_config("tiny").to_dict()
    d["audio"]["kernel_widths"] = [11, 11]
    with pytest.raises(ValueError, match="kernel_widths has 2 entries but channels has 4"):
        ModelConfig.from_dict(d)
    d = get_config("tiny").to_dict()
    d["image"]["arch"] = "resnet"
    with pytest.raises(ValueError, match="image.arch must be one of"):
        ModelConfig.from_dict(d)
    d = get_config("tiny").to_dict()
    d["audio"]["instance_norm_layers"] = 5
    with pytest.raises(ValueError, match="instance_norm_layers must be in 0..4"):
        ModelConfig.from_dict(d)
    with pytest.raises(KeyError, match="registered: davenet-vgg16"):
        get_config("nope")


def test_models_command_lists_the_registry():
    result = CliRunner().invoke(cli_main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(rows) == set(list_models())
    assert rows["davenet-vgg16"]["image_grid"] == [14, 14] and rows["davenet-vgg16"]["embed_dim"] == 1024
    assert rows["tiny"]["params"] == count_parameters(get_config("tiny"))["total"]
    assert rows["tiny"]["audio_frames_per_second"] == pytest.approx(
        1 / get_config("tiny").audio.output_frame_seconds
    )
    table = CliRunner().invoke(cli_main, ["models"])
    assert table.exit_code == 0 and "davenet-vgg16" in table.output and "14x14" in table.output
