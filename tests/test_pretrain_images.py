"""Image-branch pretraining on rendered, labelled scenes (`matchmap pretrain-images`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from encoders import create_model, load_checkpoint
from matchmap.cli import main
from training.pretrain_images import RegionClassifier, label_loss, multi_hot, render_scenes

SMALL = ["--scenes", "64", "--val-scenes", "16", "--batch-size", "32", "--workers", "1", "--objects", "1-2"]


def test_scene_logits_pool_regions_between_their_mean_and_their_max():
    classifier = RegionClassifier(embed_dim=4, categories=3)
    regions = torch.randn(2, 3, 3, 4)
    scene, region = classifier(regions)
    flat = region.flatten(1, 2)
    assert scene.shape == (2, 3) and region.shape == (2, 3, 3, 3)
    assert torch.all(scene <= flat.max(dim=1).values + 1e-6)
    assert torch.all(scene >= flat.mean(dim=1) - 1e-6)
    # one region alone showing a category is enough to raise the scene's logit for it
    regions2 = regions.clone()
    w = classifier.linear.weight[1].detach()
    regions2[0, 1, 2] = w * 20 / w.dot(w)  # this region's logit for category 1 is 20 (+ bias)
    assert classifier(regions2)[0][0, 1] > 19 - 0.5 + classifier.linear.bias[1]


def test_labels_are_the_categories_drawn_and_scenes_repeat_by_seed():
    a = render_scenes(6, seed=5, resize=146, objects=(1, 3), workers=1, progress=False)
    b = render_scenes(6, seed=5, resize=146, objects=(1, 3), workers=2, progress=False)
    assert a.labels == b.labels and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images, strict=True))
    assert all(1 <= len(labels) <= 3 for labels in a.labels)
    assert all({c for c, _ in boxes} == set(labels) for labels, boxes in zip(a.labels, a.boxes, strict=True))
    assert all(0 <= v <= 146 + 1e-6 for boxes in a.boxes for _, box in boxes for v in box)
    target = multi_hot(a.labels, 700)
    assert target.sum(1).tolist() == [len(labels) for labels in a.labels]


def test_pretraining_trains_the_image_branch_only_and_resumes_exactly(tmp_path):
    runner = CliRunner()
    whole = runner.invoke(main, ["pretrain-images", "--out", str(tmp_path / "whole"), "--epochs", "2", "--json", *SMALL])
    assert whole.exit_code == 0, whole.output
    summary = json.loads(whole.output)
    assert summary["epochs"] == 2 and set(summary["val"]) == {"r_precision", "pointing"}
    first = runner.invoke(main, ["pretrain-images", "--out", str(tmp_path / "split"), "--epochs", "2",
                                 "--max-minutes", "0", "-q", *SMALL])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(main, ["pretrain-images", "--out", str(tmp_path / "split"), "--epochs", "2", "-q",
                                   "--resume", str(tmp_path / "split" / "last.pt"), *SMALL])
    assert resumed.exit_code == 0, resumed.output
    whole_state = load_checkpoint(tmp_path / "whole" / "model.pt")["state_dict"]
    split_state = load_checkpoint(tmp_path / "split" / "model.pt")["state_dict"]
    assert all(torch.equal(whole_state[k], split_state[k]) for k in whole_state)
    torch.manual_seed(0)
    fresh = create_model("tiny").state_dict()
    changed = {k.split(".")[0] for k in whole_state if not torch.equal(whole_state[k], fresh[k])}
    assert changed == {"image_net"}  # the audio branch is left as initialized


@pytest.mark.parametrize("args, message", [(["--objects", "x-2"], "--objects"), (["--scenes", "8"], "fewer than one batch")])
def test_bad_options_are_named(tmp_path, args, message):
    result = CliRunner().invoke(main, ["pretrain-images", "--out", str(tmp_path), "--val-scenes", "4", "--workers",
                                       "1", "-q", *args])
    assert result.exit_code == 1 and message in result.output


@pytest.mark.parametrize("objective", ["softmax", "bce"])
def test_label_losses_fall_as_the_present_categories_rise(objective):
    target = multi_hot([[0, 2], [1]], 5)
    logits = torch.zeros(2, 5)
    better = logits + 3 * target
    wrong = logits + 3 * (1 - target)
    assert label_loss(better, target, objective) < label_loss(logits, target, objective) < label_loss(wrong, target, objective)


def test_softmax_objective_weighs_each_scene_equally_whatever_its_number_of_categories():
    target = multi_hot([[0, 1, 2, 3], [4]], 6)
    logits = torch.log(target + 1e-9)  # each scene's probability mass spread evenly over its categories
    # the optimum: each scene's loss is the entropy of its own categories (log 4 and 0), averaged
    assert abs(label_loss(logits, target, "softmax") - math.log(4) / 2) < 1e-5
    skewed = logits.clone()
    skewed[0, 0] += 2.0
    assert label_loss(skewed, target, "softmax") > label_loss(logits, target, "softmax")
    with pytest.raises(ValueError, match="objective"):
        label_loss(logits, target, "hinge")
