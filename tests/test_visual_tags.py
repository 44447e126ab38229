"""Visually grounded keyword targets (`matchmap train --tagger`): an image tagger's tags teach the audio branch."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from encoders import load_checkpoint
from matchmap.cli import main
from training.losses import SymmetricInfoNCELoss
from training.manifest import load_manifest
from training.train import PairObjective, TrainConfig, train
from training.visual_tags import ImageTagger, SpeechTagHead, soft_tag_loss

SMALL_PRETRAIN = ["--scenes", "64", "--val-scenes", "16", "--batch-size", "32", "--workers", "1", "--objects", "1-2",
                  "--epochs", "1", "-q"]


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory) -> str:
    """A `matchmap pretrain-images` run's last.pt (1 epoch on 64 scenes): a real, if weak, tagger."""
    out = tmp_path_factory.mktemp("tagger")
    result = CliRunner().invoke(main, ["pretrain-images", "--out", str(out), *SMALL_PRETRAIN])
    assert result.exit_code == 0, result.output
    return str(out / "last.pt")


def test_the_tag_head_reads_only_a_captions_true_frames():
    head = SpeechTagHead(embed_dim=4, categories=3)
    audio = torch.randn(2, 6, 4)
    lengths = torch.tensor([4, 6])
    padded = audio.clone()
    padded[0, 4:] = 100.0  # whatever lies past caption 0's end must not move its logits
    torch.testing.assert_close(head(padded, lengths), head(audio, lengths))
    # one frame alone saying a category raises the caption's logit for it (log-sum-exp, not the mean)
    w = head.linear.weight[2].detach()
    loud = audio.clone()
    loud[1, 3] = w * 20 / w.dot(w)
    assert head(loud, lengths)[1, 2] > head(audio, lengths)[1, 2] + 2


def test_the_objective_adds_the_weighted_tag_loss_and_its_gradient_reaches_the_audio():
    torch.manual_seed(0)
    maps = torch.nn.Module()
    image_maps = torch.nn.Parameter(torch.randn(4, 2, 2, 8))
    audio = torch.nn.Parameter(torch.randn(4, 5, 8))
    lengths = torch.tensor([5, 3, 4, 5])
    maps.encode_images = lambda images: image_maps
    maps.encode_audio = lambda logmel, lens, length_groups=1: (audio, lengths)
    head = SpeechTagHead(8, 6)
    targets = torch.softmax(torch.randn(4, 6), dim=1)
    loss = SymmetricInfoNCELoss()
    plain = PairObjective(maps, loss, 0.0)(None, None, None)
    tagged = PairObjective(maps, loss, 0.0, head, tag_weight=0.5)
    total = tagged(None, None, None, None, targets)
    expected = plain + 0.5 * soft_tag_loss(head(audio, lengths), targets)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert tagged(None, None, None, None, None).item() == pytest.approx(plain.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(total - plain, audio)
    assert grad[1, :3].abs().sum() > 0 and torch.all(grad[1, 3:] == 0)  # true frames only


def test_the_tagger_tags_what_it_was_taught(tagger_run, tiny_corpus):
    tagger = ImageTagger(tagger_run)
    manifest = load_manifest(tiny_corpus / "val.json")
    from encoders import load_image

    tags = tagger.tag([load_image(manifest.image_path(e)) for e in manifest.entries[:5]])
    assert tags.shape == (5, tagger.categories)
    torch.testing.assert_close(tags.sum(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="no region classifier"):
        ImageTagger(str(tagger_run).replace("last.pt", "model.pt"))


def test_training_with_a_tagger_keeps_its_tag_head_apart_and_resumes_exactly(tagger_run, tiny_corpus, tmp_path):
    train_m, val_m = load_manifest(tiny_corpus / "train.json"), load_manifest(tiny_corpus / "val.json")
    cfg = dict(model="tiny", epochs=2, batch_size=8, lr=2e-3, warmup_steps=2, seed=3, augment="none",
               tagger=tagger_run, tag_weight=1.0)
    train(TrainConfig(**cfg), train_m, val_m, tmp_path / "straight", progress=False)
    train(TrainConfig(**cfg, max_minutes=0), train_m, val_m, tmp_path / "split", progress=False)
    train(TrainConfig(**cfg), train_m, val_m, tmp_path / "split", resume=tmp_path / "split" / "last.pt", progress=False)
    straight, resumed = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    head_state = straight["extra"]["tag_head_state"]
    for name, tensor in head_state.items():
        assert torch.equal(tensor, resumed["extra"]["tag_head_state"][name]), name
    # the head is a training aid: the model the run keeps has no part of it
    assert not any(k.startswith("tag") for k in straight["state_dict"])
    # a tagged run resumed without its tagger (or the reverse) is refused, naming the option
    with pytest.raises(ValueError, match="--tagger"):
        train(TrainConfig(**{**cfg, "tagger": None}), train_m, val_m, tmp_path / "split",
              resume=tmp_path / "split" / "last.pt", progress=False)


def test_train_command_takes_a_tagger_and_names_a_model_pt_as_the_wrong_file(tagger_run, tiny_corpus, tmp_path):
    common = ["train", "--train", str(tiny_corpus / "train.json"), "--val", str(tiny_corpus / "val.json"),
              "--epochs", "1", "--batch-size", "8", "-q"]
    ok = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "ok"), "--tagger", tagger_run, "--tag-weight", "2"])
    assert ok.exit_code == 0, ok.output
    config = load_checkpoint(tmp_path / "ok" / "last.pt")["extra"]["train_config"]
    assert config["tagger"] == tagger_run and config["tag_weight"] == 2.0
    wrong = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "wrong"), "--tagger",
                                      tagger_run.replace("last.pt", "model.pt")])
    assert wrong.exit_code == 1 and "no region classifier" in wrong.output
