"""Stage-1 pooling heads: the model's one place for stage-1 vectors, checkpoints with and without heads,
`matchmap distill-stage1`, and indexing + search with a distilled model (real FAISS, real SQLite)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from encoders import (
    create_model,
    load_checkpoint,
    pool_audio,
    pool_images,
    save_checkpoint,
    with_stage1_heads,
)
from encoders.models import MatchmapModel
from indexer import Library
from indexer.library import ModelMismatchError
from matchmap.cli import main as cli_main
from search.engine import SearchEngine, SearchQuery
from training import distill
from training.cli import DISTILL_DEFAULTS
from training.manifest import load_manifest


def with_trained_heads(heads: int = 8, seed: int = 0) -> MatchmapModel:
    """A random tiny model with heads whose every parameter is moved off its masked-mean start."""
    torch.manual_seed(seed)
    model = MatchmapModel(dataclasses.replace(create_model("tiny").config, stage1_heads=heads)).eval()
    with torch.no_grad():
        for p in model.stage1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_untrained_heads_are_the_masked_means_and_padding_never_counts():
    torch.manual_seed(0)
    model = MatchmapModel(dataclasses.replace(create_model("tiny").config, stage1_heads=4)).eval()
    maps, audio = torch.randn(5, 64, 256), torch.randn(3, 20, 256)
    lengths = torch.tensor([20, 7, 1])
    with torch.no_grad():
        torch.testing.assert_close(model.stage1_image_vectors(maps), pool_images(maps))
        torch.testing.assert_close(model.stage1_audio_vectors(audio, lengths), pool_audio(audio, lengths))
        trained = with_trained_heads()
        padded = audio.clone()
        padded[1, 7:] = 1e3  # what pads a caption must not change its vector
        torch.testing.assert_close(trained.stage1_audio_vectors(padded, lengths),
                                   trained.stage1_audio_vectors(audio, lengths))
        assert not torch.allclose(trained.stage1_image_vectors(maps), pool_images(maps), atol=1e-3)
    with pytest.raises(ValueError, match="at least one true frame"):
        trained.stage1_audio_vectors(audio, torch.tensor([20, 0, 1]))


def test_a_model_without_heads_keeps_its_config_dict_and_version(checkpoint):
    """Adding the field must not make every existing collection stale: no heads, same dict, same version."""
    payload = load_checkpoint(checkpoint)
    assert "stage1_heads" not in payload["config"]
    model = create_model(str(checkpoint))
    assert model.stage1 is None and model.stage1_pooling == "mean"
    assert model.version == payload["version"]


def test_checkpoints_carry_the_heads_and_a_new_version(tmp_path, checkpoint):
    plain = create_model(str(checkpoint))
    headed = with_stage1_heads(plain, 8)
    with torch.no_grad():
        for p in headed.stage1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "headed.pt", headed)
    loaded = create_model(str(tmp_path / "headed.pt"))
    assert loaded.config.stage1_heads == 8 and loaded.stage1_pooling == "attention-8"
    assert loaded.version == headed.version != plain.version
    maps = torch.randn(4, 64, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.stage1_image_vectors(maps), headed.stage1_image_vectors(maps))
    for key, value in plain.state_dict().items():  # the encoders are untouched
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_training_the_heads_brings_misa_top10_into_the_stage1_top_k():
    """On maps where MISA and SISA disagree by construction (each image: one 'object' region among
    background regions; captions: frames naming the object between filler), the heads learn what the
    means miss, on images and captions they never saw."""
    torch.manual_seed(0)
    m, r, dim = 240, 64, 256
    concepts = torch.nn.functional.normalize(torch.randn(30, dim), dim=1) * 6
    backgrounds = torch.randn(4, dim)
    obj = torch.randint(0, 30, (m,))
    images = backgrounds[torch.randint(0, 4, (m,))][:, None, :] + 0.5 * torch.randn(m, r, dim)
    images[torch.arange(m), torch.randint(0, r, (m,))] += concepts[obj]
    lengths = torch.randint(6, 12, (m,))
    named = torch.rand(m, 12, 1) < 0.4
    audio = torch.where(named, concepts[obj][:, None, :], backgrounds[0]) + 0.5 * torch.randn(m, 12, dim)
    audio = audio * (torch.arange(12)[None, :, None] < lengths[:, None, None])
    corpus = distill.Corpus(images.to(torch.float16), audio, lengths, torch.arange(m))
    teacher = distill.teacher_scores(corpus)
    model = create_model("tiny")
    cfg = distill.DistillConfig(heads=2, epochs=30, batch_size=48, lr=1e-2, holdout=0.25)
    student, summary = distill.train_heads(model, corpus, teacher, cfg, progress=False)
    held = summary["held_out_agreement"]
    assert held["distilled"]["top10"] > held["masked_mean"]["top10"] + 0.15, held
    assert student.version != model.version


def test_distill_command_writes_a_model_whose_heads_index_and_search(tiny_corpus, checkpoint, tmp_path):
    out = tmp_path / "distilled.pt"
    result = CliRunner().invoke(cli_main, [
        "distill-stage1", "--checkpoint", str(checkpoint), "--train", str(tiny_corpus / "train.json"),
        "--out", str(out), "--epochs", "2", "--heads", "16", "--json", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["captions"] == 24 and summary["steps"] == 2 * 1
    assert set(summary["held_out_agreement"]) == {"masked_mean", "distilled"}
    plain, model = create_model(str(checkpoint)), create_model(str(out))
    assert model.stage1 is not None and summary["version"] == model.version != plain.version
    assert load_checkpoint(out)["extra"]["stage1_distill"]["source_version"] == plain.version

    # Indexing stores the heads' image vectors, computed from the float16 maps as stored, and stage 1
    # ranks by their product with the heads' audio vectors.
    manifest = load_manifest(tiny_corpus / "val.json")
    images = [str(manifest.image_path(e)) for e in manifest.entries]
    with Library.open(tmp_path / "lib", create=True) as library:
        library.index("plain", images, plain, progress=False)
        library.index("heads", images, model, progress=False)
        coll = library.collection("heads")
        ids = np.array(sorted(coll.ids_for_uris(images)[images[0]] + coll.ids_for_uris(images)[images[1]]))
        maps = torch.from_numpy(coll.feature_maps(ids).astype(np.float32))
        audio, lengths = torch.randn(2, 9, 256), torch.tensor([9, 5])
        with torch.no_grad():
            queries = model.stage1_audio_vectors(audio, lengths)
            expected = (queries @ model.stage1_image_vectors(maps).T).numpy()
        scores, found = coll.search_stage1(queries.numpy(), coll.size)
        for row in range(2):
            got = dict(zip(found[row].tolist(), scores[row].tolist(), strict=True))
            np.testing.assert_allclose([got[i] for i in ids.tolist()], expected[row], rtol=1e-5, atol=1e-5)
        # The plain model's collection is stale for the distilled model: a new version, refused.
        with pytest.raises(ModelMismatchError, match="not comparable"):
            library.collection("plain").check_model(model)

    # The engine embeds a spoken query with the heads: each hit's stage-1 score is the heads' product.
    engine = SearchEngine.open(out, tmp_path / "lib", device="cpu")
    try:
        query = engine.prepare_audio(manifest.audio_path(manifest.entries[0]).read_bytes())
        result = engine.search_batch([SearchQuery(query, "heads", 5, len(images))])[0]
        audio, lengths = engine.encode([query.logmel])
        hit_ids = np.array([h.image_id for h in result.hits])
        with torch.no_grad():
            maps = torch.from_numpy(engine.collection("heads").feature_maps(hit_ids).astype(np.float32))
            expected = (model.stage1_audio_vectors(audio, lengths) @ model.stage1_image_vectors(maps).T)[0]
        np.testing.assert_allclose([h.stage1_score for h in result.hits], expected.numpy(), rtol=1e-4, atol=1e-4)
    finally:
        engine.close()


def test_distill_defaults_in_help_match_the_config():
    defaults = dataclasses.asdict(distill.DistillConfig())
    assert {k: defaults[k] for k in DISTILL_DEFAULTS} == DISTILL_DEFAULTS
    result = CliRunner().invoke(cli_main, ["distill-stage1", "--help"])
    assert result.exit_code == 0 and "Exit codes:" in result.output and "--teacher-temperature" in result.output
