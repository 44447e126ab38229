"""Training, losses, recall evaluation, resume and DistributedDataParallel, on a tiny real corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from encoders import create_model, load_checkpoint, weights_version
from encoders.matchmap import score_matrix
from training.data import CaptionedImages, LengthBucketBatchSampler
from training.evaluate import Embeddings, embed_pairs, evaluate_embeddings, mean_r10, recall_at_k
from training.losses import SampledMarginRankingLoss, SymmetricInfoNCELoss
from training.manifest import load_manifest
from training.train import PairObjective, TrainConfig, TrainingDiverged, train

REPO = Path(__file__).resolve().parents[1]


def test_margin_loss_is_zero_when_every_positive_beats_every_imposter_by_the_margin():
    scores = torch.full((6, 6), -5.0)
    scores.fill_diagonal_(5.0)
    assert SampledMarginRankingLoss(margin=1.0)(scores).item() == 0.0
    scores.fill_diagonal_(-4.5)  # positives only 0.5 above imposters: 2 terms of 0.5 per pair
    assert SampledMarginRankingLoss(margin=1.0)(scores).item() == pytest.approx(1.0)


def test_infonce_prefers_a_matrix_with_a_dominant_diagonal():
    loss = SymmetricInfoNCELoss()
    noisy = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    assert loss(noisy + 10 * torch.eye(8)).item() < loss(noisy).item() < loss(noisy - 10 * torch.eye(8)).item()


def test_infonce_averages_both_directions():
    # rows: caption -> images (target = own image); columns: image -> captions. A matrix that is not
    # symmetric tells a one-direction loss from the symmetric one.
    scores = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    rows = (math.log1p(math.exp(-2.0)) + math.log1p(math.e)) / 2  # row 0 (2, 0) -> 0, row 1 (1, 0) -> 1
    columns = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2  # column 0 (2, 1) -> 0, column 1 (0, 0) -> 1
    loss = SymmetricInfoNCELoss()
    assert loss(scores).item() == pytest.approx((rows + columns) / 2, rel=1e-6)
    assert loss(scores.T).item() == pytest.approx(loss(scores).item(), rel=1e-6)


def test_infonce_temperature_calibrates_to_unit_spread_logits_on_the_first_batch():
    torch.manual_seed(0)
    loss = SymmetricInfoNCELoss()
    scores = 7.0 * torch.randn(32, 32)
    saturated = loss(scores).item()
    loss.calibrate(float(scores.std()))
    assert (scores * loss.scale).std().item() == pytest.approx(1.0, rel=1e-4)
    # near chance (ln 32 = 3.47) instead of far above it
    assert loss(scores).item() < min(saturated, 4.5)


@pytest.mark.parametrize("loss", [SymmetricInfoNCELoss(), SampledMarginRankingLoss()], ids=["infonce", "margin"])
def test_other_captions_of_the_same_image_are_no_negatives(loss):
    # pairs 0 and 1 are two captions of one image: whatever they score against each other's image
    # must not move the loss, while any other off-diagonal score still does
    torch.manual_seed(0)
    base = torch.randn(6, 6) + 4 * torch.eye(6)
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    confused = base.clone()
    confused[0, 1] = confused[1, 0] = 50.0
    def value(scores, g):
        return loss(scores, generator=torch.Generator().manual_seed(3), groups=g)
    assert torch.allclose(value(base, groups), value(confused, groups))
    assert value(confused, None) > value(base, None) + 1.0  # unmasked, it is (wrongly) a hard negative
    other = base.clone()
    other[2, 3] = 50.0
    assert value(other, groups) > value(base, groups) + 1.0


def test_a_training_batch_names_each_pairs_image(tiny_corpus):
    manifest = load_manifest(tiny_corpus / "train.json")
    dataset = CaptionedImages(manifest, create_model("tiny"), train=False, progress=False)
    paths = [manifest.image_path(e) for e in manifest.entries]
    groups = dataset.image_groups.tolist()
    assert all((groups[a] == groups[b]) == (paths[a] == paths[b]) for a in range(len(paths)) for b in range(len(paths)))


def test_recall_at_k_on_a_known_ranking():
    # caption a ranks its image at position a (0-based) in speech->image
    n = 12
    scores = torch.zeros(n, n)
    for a in range(n):
        others = [i for i in range(n) if i != a]
        order = others[:a] + [a] + others[a:]
        for position, image in enumerate(order):
            scores[a, image] = n - position
    result = recall_at_k(scores)
    assert result["speech_to_image"] == {"R@1": 1 / n, "R@5": 5 / n, "R@10": 10 / n}


def _embeddings_with_scores(misa: torch.Tensor, sisa: torch.Tensor) -> Embeddings:
    """One-frame captions and two-region images whose MISA and SISA score matrices are exactly ``misa``
    and ``sisa`` (requires misa >= sisa everywhere): caption a is the one-hot e_a, and image i's two
    regions hold misa[:, i] and 2 * sisa[:, i] - misa[:, i], so the max over regions is misa[a, i] and
    their mean sisa[a, i]."""
    n = misa.shape[0]
    assert bool((misa >= sisa).all())
    audio = torch.eye(n, dtype=torch.float32).unsqueeze(1)  # (N, T=1, D=N)
    regions = torch.stack([misa.T, 2 * sisa.T - misa.T], dim=1)  # (N images, 2 regions, D)
    return Embeddings(image_maps=regions.reshape(n, 1, 2, n).float(), audio=audio, lengths=torch.ones(n, dtype=torch.long))


def _hub_scores(n: int, hubs: int) -> torch.Tensor:
    """scores[a, i]: every caption's own image is its best (speech->image R@1 = 1), but the first
    ``hubs`` captions score above every other image's own caption (image->speech: those images rank
    their caption behind all the hubs)."""
    scores = -0.01 * torch.arange(n, dtype=torch.float32)[None, :] - 0.001 * torch.arange(n)[:, None]
    scores[:hubs] = 50.0 - torch.arange(hubs, dtype=torch.float32)[:, None]
    scores.fill_diagonal_(10.0)
    scores[range(hubs), range(hubs)] = 100.0
    return scores


def test_evaluation_ranks_images_along_rows_and_captions_along_columns_for_misa_and_sisa():
    # MISA and SISA rank differently by construction: for MISA every caption finds its image but 15
    # of 20 images find their caption only 6th (behind 5 hub captions); SISA is the transpose. The
    # exact values tell a swapped direction, a wrong ranking axis and a swapped score kind apart.
    n, hubs = 20, 5
    misa = _hub_scores(n, hubs)
    sisa = misa.T - 200.0
    emb = _embeddings_with_scores(misa, sisa)
    scores = score_matrix(emb.audio, emb.lengths, emb.image_maps, kinds=("misa", "sisa"))
    torch.testing.assert_close(scores["misa"], misa)
    torch.testing.assert_close(scores["sisa"], sisa)
    result = evaluate_embeddings(emb)
    assert result["pairs"] == n
    perfect = {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    behind_hubs = {"R@1": hubs / n, "R@5": hubs / n, "R@10": 1.0}
    assert result["MISA"] == {"speech_to_image": perfect, "image_to_speech": behind_hubs}
    assert result["SISA"] == {"speech_to_image": behind_hubs, "image_to_speech": perfect}
    assert mean_r10(result) == 1.0 and mean_r10(result, "SISA") == 1.0


class _FixedMaps(torch.nn.Module):
    """A stand-in for the two branches: returns the maps of ``_embeddings_with_scores`` as parameters."""

    def __init__(self, emb: Embeddings) -> None:
        super().__init__()
        self.image_maps = torch.nn.Parameter(emb.image_maps.clone())
        self.audio = torch.nn.Parameter(emb.audio.clone())
        self.lengths = emb.lengths

    def encode_images(self, images):
        return self.image_maps

    def encode_audio(self, logmel, lengths, length_groups=1):
        return self.audio, self.lengths


@pytest.mark.parametrize("sisa_weight", [0.0, 0.5])
def test_training_objective_is_the_loss_of_misa_plus_weighted_sisa(sisa_weight):
    # MISA and SISA differ by construction; the objective must put its main loss on MISA: its value,
    # and its gradient, which reaches only each frame's best region (SISA's reaches every region).
    n = 6
    misa = 3.0 * torch.eye(n) + 0.1 * torch.arange(n * n, dtype=torch.float32).view(n, n).sin()
    sisa = misa.T - 5.0 - 0.2 * torch.arange(n, dtype=torch.float32)
    maps = _FixedMaps(_embeddings_with_scores(misa, sisa))
    loss = SymmetricInfoNCELoss(initial_scale=2.0)
    objective = PairObjective(maps, loss, sisa_weight)
    total = objective(None, None, None)
    expected = loss(misa) + (sisa_weight * loss(sisa) if sisa_weight else 0.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    best_region, other_region = maps.image_maps.grad[:, 0, 0], maps.image_maps.grad[:, 0, 1]
    assert best_region.abs().sum() > 0
    if sisa_weight == 0:
        assert torch.all(other_region == 0), "MISA's gradient reaches only the max region"
    else:
        # SISA's gradient is the same on both regions (each region's share of the mean)
        sisa_only = torch.autograd.grad(sisa_weight * objective.sisa_loss(sisa.requires_grad_()), sisa)[0]
        torch.testing.assert_close(other_region, 0.5 * sisa_only.T, rtol=1e-4, atol=1e-6)


def test_recall_counts_ties_against_the_model():
    assert recall_at_k(torch.ones(4, 4))["speech_to_image"]["R@1"] == 0.0


def test_recall_from_chunked_scores_equals_full_matrix():
    g = torch.Generator().manual_seed(1)
    audio, lengths = torch.randn(20, 9, 16, generator=g), torch.randint(2, 10, (20,), generator=g)
    images = torch.randn(20, 4, 4, 16, generator=g)
    full = score_matrix(audio, lengths, images, kinds=("misa",))["misa"]
    chunked = score_matrix(audio, lengths, images, kinds=("misa",), chunk_size=3)["misa"]
    assert recall_at_k(full) == recall_at_k(chunked)


def _perfect_embeddings(captions_per_image: list[int]) -> tuple[Embeddings, list[str]]:
    """A perfect model's embeddings: every caption of image i is image i's own direction, so each
    caption scores highest on its image; images with several captions repeat the same map."""
    directions = torch.eye(16)[: len(captions_per_image)]
    owners = [i for i, count in enumerate(captions_per_image) for _ in range(count)]
    image_maps = directions[owners][:, None, None, :].expand(-1, 2, 2, -1).contiguous()
    audio = directions[owners][:, None, :].expand(-1, 3, -1).contiguous()
    return Embeddings(image_maps, audio, torch.full((len(owners),), 3)), [f"image_{i}.png" for i in owners]


def test_multi_caption_recall_ranks_unique_images_and_a_perfect_model_is_perfect():
    emb, images = _perfect_embeddings([2, 3, 1, 5, 2, 4])
    grouped = evaluate_embeddings(emb, images=images)
    assert grouped["pairs"] == 17 and grouped["images"] == 6
    for kind in ("MISA", "SISA", "SIMA"):
        for direction in ("speech_to_image", "image_to_speech"):
            assert grouped[kind][direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}, (kind, direction)
    # without the grouping, twin images tie with the true one: only the one-caption image counts at R@1
    assert evaluate_embeddings(emb)["MISA"]["speech_to_image"]["R@1"] == 1 / 17


def test_image_to_speech_hits_when_any_caption_of_the_image_is_in_the_top_k():
    # 3 images; image 0 has captions 0 and 1. Caption 0 is its image's best match overall, caption 1
    # ranks below every other caption: image 0 is still found at rank 1.
    scores = torch.tensor([[9.0, 0.0, 0.0],
                           [-5.0, 0.0, 0.0],
                           [1.0, 4.0, 0.0],
                           [2.0, 0.0, 4.0]])
    result = recall_at_k(scores, ks=(1, 2), caption_image=torch.tensor([0, 0, 1, 2]))
    assert result["image_to_speech"] == {"R@1": 1.0, "R@2": 1.0}
    # speech->image averages over the 4 captions: caption 1 ranks its image last of 3
    assert result["speech_to_image"] == {"R@1": 0.75, "R@2": 0.75}


def test_nan_scores_are_never_hits():
    for shape, caption_image in (((12, 12), None), ((12, 4), torch.arange(12) % 4)):
        nan = torch.full(shape, float("nan"))
        result = recall_at_k(nan, caption_image=caption_image)
        for direction in ("speech_to_image", "image_to_speech"):
            assert result[direction] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}
    # a NaN imposter outranks a finite true score; a NaN true score is a miss, whatever the others
    scores = torch.eye(4)
    scores[0, 1] = float("nan")
    scores[2, 2] = float("nan")
    result = recall_at_k(scores, ks=(1, 4))
    assert result["speech_to_image"] == {"R@1": 0.5, "R@4": 0.75}
    assert result["image_to_speech"] == {"R@1": 0.5, "R@4": 0.75}


def test_one_caption_per_image_gives_the_classic_protocol_on_a_real_corpus(tiny_corpus, checkpoint):
    model = create_model(checkpoint)
    manifest = load_manifest(tiny_corpus / "val.json")
    emb = embed_pairs(model, CaptionedImages(manifest, model, train=False, progress=False), progress=False)
    grouped = evaluate_embeddings(emb, images=[e.image for e in manifest.entries])
    assert grouped["images"] == grouped["pairs"] == len(manifest.entries)
    # the classic protocol, written out: pair i on the diagonal, ties against the model
    for kind in ("MISA", "SISA", "SIMA"):
        scores = score_matrix(emb.audio, emb.lengths, emb.image_maps, kinds=(kind.lower(),))[kind.lower()]
        positive = scores.diagonal()
        ranks = {"speech_to_image": (scores >= positive[:, None]).sum(1) - 1,
                 "image_to_speech": (scores >= positive[None, :]).sum(0) - 1}
        for direction, rank in ranks.items():
            classic = {f"R@{k}": int((rank < k).sum()) / len(rank) for k in (1, 5, 10)}
            assert grouped[kind][direction] == classic, (kind, direction)


def test_training_stops_at_a_non_finite_loss_and_never_keeps_a_diverged_model(tiny_corpus, tmp_path):
    train_m = load_manifest(tiny_corpus / "train.json")
    val_m = load_manifest(tiny_corpus / "val.json")
    # an infinite learning rate: step 1 is finite, its update is not, so step 2's loss is NaN
    with pytest.raises(TrainingDiverged, match="step 2"):
        train(_cfg(lr=math.inf, warmup_steps=1), train_m, val_m, tmp_path / "nan_loss", progress=False)
    assert not (tmp_path / "nan_loss" / "best.pt").exists() and not (tmp_path / "nan_loss" / "last.pt").exists()
    # one step per epoch: epoch 1's loss is finite, the weights it leaves are not; no checkpoint of them
    with pytest.raises(TrainingDiverged, match="after epoch 1"):
        train(_cfg(lr=math.inf, warmup_steps=1, batch_size=len(train_m.entries)), train_m, val_m,
              tmp_path / "nan_weights", progress=False)
    assert not (tmp_path / "nan_weights" / "best.pt").exists()
    assert not (tmp_path / "nan_weights" / "last.pt").exists()


def _cfg(**overrides) -> TrainConfig:
    base = dict(model="tiny", epochs=2, batch_size=8, lr=2e-3, warmup_steps=2, seed=3, augment="speed,specaugment")
    base.update(overrides)
    return TrainConfig(**base)


def test_length_buckets_partition_each_step_across_ranks_and_cut_padding():
    lengths = torch.randint(16_000, 140_000, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    ranks = [LengthBucketBatchSampler(lengths, 16, seed=3, rank=r, world=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(5)
    steps = list(zip(*(list(s) for s in ranks), strict=True))
    assert len(steps) == len(ranks[0]) == 1000 // 32
    seen = [i for step in steps for batch in step for i in batch]
    assert len(seen) == len(set(seen)) == 31 * 32  # every pair at most once per epoch, ranks disjoint
    assert all(len(batch) == 16 for step in steps for batch in step)
    # exact per (seed, epoch), different across epochs
    again = LengthBucketBatchSampler(lengths, 16, seed=3, rank=0, world=2)
    again.set_epoch(5)
    assert list(again) == [step[0] for step in steps]
    again.set_epoch(6)
    assert list(again) != [step[0] for step in steps]
    # padding: the longest caption of a batch is close to its mean, unlike random batches
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    random_batches = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[: 31 * 32].view(-1, 16).tolist()
    assert padding([b for step in steps for b in step]) < 0.2 * padding(random_batches)


@pytest.mark.parametrize("options", [{}, {"precision": "bf16", "num_workers": 1}], ids=["fp32", "bf16-worker"])
def test_resume_continues_exactly(tiny_corpus, tmp_path, options):
    train_m = load_manifest(tiny_corpus / "train.json")
    val_m = load_manifest(tiny_corpus / "val.json")
    train(_cfg(epochs=2, **options), train_m, val_m, tmp_path / "straight", progress=False)
    # max_minutes=0 interrupts the run after its first epoch, as a crash or a pre-emption would
    train(_cfg(epochs=2, max_minutes=0, **options), train_m, val_m, tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    train(_cfg(epochs=2, **options), train_m, val_m, tmp_path / "split", resume=tmp_path / "split" / "last.pt",
          progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert straight["step"] == resumed["step"] == 2 * (len(train_m.entries) // 8)
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    records = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (tmp_path / "straight" / "best.pt").exists()


def test_eval_every_skips_evaluations_but_always_evaluates_the_last_epoch(tiny_corpus, tmp_path):
    train_m = load_manifest(tiny_corpus / "train.json")
    val_m = load_manifest(tiny_corpus / "val.json")
    summary = train(_cfg(epochs=3, eval_every=2), train_m, val_m, tmp_path / "every2", progress=False)
    records = [json.loads(x) for x in (tmp_path / "every2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["val" in r for r in records] == [False, True, True]
    assert summary["last"] == records[2]["val"]
    assert load_checkpoint(tmp_path / "every2" / "best.pt")["epoch"] in (2, 3)
    # a run stopped by its time budget evaluates the epoch it stops after, whatever eval_every says
    summary = train(_cfg(epochs=3, eval_every=5, max_minutes=0), train_m, val_m, tmp_path / "stopped", progress=False)
    assert summary["epochs"] == 1 and summary["last"]["pairs"] == len(val_m.entries)
    assert (tmp_path / "stopped" / "best.pt").exists()
    with pytest.raises(ValueError, match="eval_every"):
        train(_cfg(eval_every=0), train_m, val_m, tmp_path / "bad", progress=False)


def test_train_and_eval_commands_end_to_end(tiny_corpus, tmp_path):
    from matchmap.cli import main

    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["train", "--train", str(tiny_corpus / "train.json"), "--val",
                                  str(tiny_corpus / "val.json"), "--out", str(run), "--epochs", "1",
                                  "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["epochs"] == 1
    assert (run / "learning_curves.png").stat().st_size > 1000
    result = runner.invoke(main, ["eval", "--checkpoint", str(run / "best.pt"), str(tiny_corpus / "val.json"),
                                  "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pairs"] == len(load_manifest(tiny_corpus / "val.json").entries)
    for kind in ("MISA", "SISA", "SIMA"):
        for direction in ("speech_to_image", "image_to_speech"):
            values = report[kind][direction]
            assert set(values) == {"R@1", "R@5", "R@10"}
            assert 0.0 <= values["R@1"] <= values["R@5"] <= values["R@10"] <= 1.0


def test_train_on_two_manifests_sees_both_corpora_each_epoch(tiny_corpus, tmp_path):
    from matchmap.cli import main

    base = ["train", "--val", str(tiny_corpus / "val.json"), "--epochs", "1", "--batch-size", "8", "--json"]
    one = CliRunner().invoke(main, [*base, "--train", str(tiny_corpus / "train.json"), "--out", str(tmp_path / "a")])
    two = CliRunner().invoke(main, [*base, "--train", str(tiny_corpus / "train.json"),
                                    "--train", str(tiny_corpus / "val.json"), "--out", str(tmp_path / "b")])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    steps = [json.loads(r.output[r.output.index("{"):])["steps"] for r in (one, two)]
    pairs = [len(load_manifest(tiny_corpus / name).entries) for name in ("train.json", "val.json")]
    assert steps == [pairs[0] // 8, (pairs[0] + pairs[1]) // 8]



def test_audio_length_groups_only_change_speed(tiny_corpus, tmp_path):
    """`train --audio-length-groups` runs each batch's captions as groups of similar length: the same
    seed gives the same step losses as one padded batch (BatchNorm statistics span the groups)."""
    from matchmap.cli import main

    base = ["train", "--train", str(tiny_corpus / "train.json"), "--val", str(tiny_corpus / "val.json"),
            "--epochs", "1", "--batch-size", "8", "--augment", "none", "-q"]
    losses = []
    for groups in ("1", "4"):
        result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / groups), "--audio-length-groups", groups])
        assert result.exit_code == 0, result.output
        losses.append(json.loads((tmp_path / groups / "metrics.jsonl").read_text().splitlines()[0])["step_losses"])
    assert len(losses[0]) > 1 and losses[1] == pytest.approx(losses[0], abs=2e-4)
    bad = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"), "--audio-length-groups", "0"])
    assert bad.exit_code == 2 and "--audio-length-groups" in bad.output

def test_eval_reports_a_missing_checkpoint_clearly(tiny_corpus, tmp_path):
    from matchmap.cli import main

    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "nope.pt"),
                                       str(tiny_corpus / "val.json")])
    assert result.exit_code != 0
    assert "nope.pt" in result.output


def test_eval_quiet_silences_progress_bars(tiny_corpus, checkpoint):
    from matchmap.cli import main

    args = ["eval", "--checkpoint", str(checkpoint), "--device", "cpu", str(tiny_corpus / "val.json")]
    loud, quiet = CliRunner().invoke(main, args), CliRunner().invoke(main, [*args, "-q"])
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "pair/s]" in loud.stderr  # a tqdm bar with its rate (it may close before drawing 100%)
    assert quiet.stderr == "" and quiet.stdout == loud.stdout


def test_eval_through_an_unreachable_server_exits_3_naming_it(tiny_corpus):
    import socket

    from matchmap.cli import main

    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["eval", "--server", f"127.0.0.1:{port}", "--collection", "c",
                                       str(tiny_corpus / "val.json")])
    assert result.exit_code == 3 and f"cannot reach a server at 127.0.0.1:{port}" in result.stderr


def test_train_checkpoint_option_fine_tunes_and_names_a_missing_file(tiny_corpus, tmp_path):
    from matchmap.cli import main

    base = ["train", "--train", str(tiny_corpus / "train.json"), "--val", str(tiny_corpus / "val.json"),
            "--out", str(tmp_path / "run"), "-q"]
    both = CliRunner().invoke(main, [*base, "--config", "tiny", "--checkpoint", str(tmp_path / "x.pt")])
    assert both.exit_code == 2 and "not both" in both.output
    missing = CliRunner().invoke(main, [*base, "--checkpoint", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 1 and "nope.pt" in missing.output and "Traceback" not in missing.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes_keep_identical_weights_and_learn(tiny_corpus, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "matchmap", "train", "--train", str(tiny_corpus / "train.json"), "--val",
           str(tiny_corpus / "val.json"), "--out", str(run), "--epochs", "4", "--batch-size", "4",
           "--lr", "3e-3", "--augment", "none", "--device", "cpu"]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=420, capture_output=True)
    replicas = [json.loads((run / f"replica-{rank}.json").read_text()) for rank in (0, 1)]
    assert replicas[0]["weights_version"] == replicas[1]["weights_version"]
    model = create_model(run / "last.pt")
    assert weights_version(model) == replicas[0]["weights_version"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def test_image_lr_scale_zero_freezes_the_image_branch_and_a_fraction_slows_it(tiny_corpus, tmp_path):
    train_m = load_manifest(tiny_corpus / "train.json")
    val_m = load_manifest(tiny_corpus / "val.json")
    torch.manual_seed(3)  # _cfg's seed: the run starts from these very weights
    start = create_model("tiny").state_dict()
    train(_cfg(epochs=1, image_lr_scale=0.0), train_m, val_m, tmp_path / "frozen", progress=False)
    frozen = load_checkpoint(tmp_path / "frozen" / "last.pt")["state_dict"]
    image_keys = [k for k in frozen if k.startswith("image_net.")]
    audio_keys = [k for k in frozen if k.startswith("audio_net.") and frozen[k].is_floating_point()]
    assert image_keys and audio_keys
    # weights and BatchNorm statistics alike stay as they were; the audio branch learned
    assert all(torch.equal(frozen[k], start[k]) for k in image_keys)
    assert any(not torch.equal(frozen[k], start[k]) for k in audio_keys)

    train(_cfg(epochs=1, image_lr_scale=0.25), train_m, val_m, tmp_path / "slow", progress=False)
    train(_cfg(epochs=1), train_m, val_m, tmp_path / "full", progress=False)
    slow, full = (load_checkpoint(tmp_path / run / "last.pt")["state_dict"] for run in ("slow", "full"))
    weights = [k for k in image_keys if k.endswith("weight") and start[k].dim() > 1]

    def moved(state):
        return sum(float((state[k] - start[k]).norm()) for k in weights)

    assert 0 < moved(slow) < 0.5 * moved(full)
    with pytest.raises(ValueError, match="image_lr_scale"):
        train(_cfg(image_lr_scale=-1.0), train_m, val_m, tmp_path / "bad", progress=False)
