"""Distil MISA into the stage-1 pooling heads of a trained model (``matchmap distill-stage1``).

Stage 1 of search ranks images by one inner product per image; stage 2 re-ranks the best K by MISA.
Stage 1 only has to bring MISA's top results into its top K, so its vectors should rank as MISA does.
Here the encoders stay frozen: both branches run once over a manifest (images as the indexer stores
their maps, in float16; captions as the eval front end makes them), MISA scores every caption against
every image once (the teacher), and then only the small heads of ``encoders.pooling`` train, on those
cached maps, with a listwise loss: for each caption, the KL divergence from the softmax of its MISA
scores (at ``teacher_temperature``, in units of the caption's own score spread) to the softmax of
the heads' scores, over a list of images: the caption's ``mined`` MISA top images among all training
images, and ``negatives`` random ones. A tenth of the images (and their captions) is held out
and reported: how much of MISA's top 10 among all images the heads' top K holds (K = 1 % and 4 % of
the images), beside the same for masked-mean pooling (SISA).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from encoders import load_checkpoint, model_from_checkpoint, save_checkpoint, with_stage1_heads
from encoders.matchmap import score_matrix
from encoders.models import MatchmapModel
from training.data import CaptionedImages
from training.evaluate import embed_pairs, image_groups, manifest_images
from training.manifest import Manifest


@dataclass
class DistillConfig:
    """Everything that decides a distillation run; saved in the checkpoint's ``extra["stage1_distill"]``."""

    heads: int = 4  # attention heads per pooling (image and audio)
    epochs: int = 30
    batch_size: int = 128  # captions per step
    mined: int = 64  # each caption's MISA top images among the training images, in every step's list
    negatives: int = 1024  # random training images added to every step's list
    lr: float = 3e-3
    weight_decay: float = 0.0
    teacher_temperature: float = 0.1  # of the softmax over MISA scores, in units of each caption's score std
    holdout: float = 0.1  # share of the images (with their captions) held out to report agreement
    seed: int = 0
    device: str = "cpu"


@dataclass
class Corpus:
    """Frozen maps of a manifest: images (M, R, D) float16 as stored; audio (N, T, D), lengths (N,);
    caption_image (N,): the row of ``images`` each caption describes."""

    images: torch.Tensor
    audio: torch.Tensor
    lengths: torch.Tensor
    caption_image: torch.Tensor


def encode_corpus(model: MatchmapModel, manifest: Manifest, *, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = True) -> Corpus:
    """Run both (frozen) branches over ``manifest`` once; images as the indexer stores them (float16)."""
    dataset = CaptionedImages(manifest, model, train=False, progress=progress)
    emb = embed_pairs(model, dataset, batch_size=batch_size, device=device, progress=progress)
    representatives, caption_image = image_groups(manifest_images(manifest))
    regions = emb.image_maps[representatives]
    images = regions.reshape(regions.shape[0], -1, regions.shape[-1]).to(torch.float16)
    return Corpus(images, emb.audio, emb.lengths, caption_image)


def teacher_scores(corpus: Corpus, *, captions_per_chunk: int = 256,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N captions, M images) MISA of every caption against every image (float32 from bfloat16 products:
    the teacher's ranking, not exact scores)."""
    images = corpus.images.float()
    rows = []
    for start in range(0, len(corpus.lengths), captions_per_chunk):
        lengths = corpus.lengths[start : start + captions_per_chunk]
        audio = corpus.audio[start : start + captions_per_chunk, : int(lengths.max())]
        rows.append(score_matrix(audio, lengths, images, compute_dtype=torch.bfloat16)["misa"])
        if progress is not None:
            progress(len(lengths))
    return torch.cat(rows)


def holdout_split(corpus: Corpus, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out image mask (M,), held-out caption mask (N,)): ``share`` of the images and their captions."""
    generator = torch.Generator().manual_seed(seed)
    m = corpus.images.shape[0]
    held = torch.zeros(m, dtype=torch.bool)
    held[torch.randperm(m, generator=generator)[: int(round(share * m))]] = True
    return held, held[corpus.caption_image]


def top10_overlap(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    """Mean share of each row's teacher top 10 found in its student top k (k capped at the row length)."""
    k = min(k, student.shape[1])
    top_teacher = teacher.topk(min(10, teacher.shape[1]), dim=1).indices
    top_student = student.topk(k, dim=1).indices
    found = (top_teacher[:, :, None] == top_student[:, None, :]).any(dim=2)
    return float(found.float().mean())


def stage1_scores(model: MatchmapModel, corpus: Corpus, captions: torch.Tensor,
                  images: torch.Tensor | None = None) -> torch.Tensor:
    """(len(captions), M) stage-1 scores under ``model``'s pooling (masked means or its heads)."""
    regions = corpus.images if images is None else images
    lengths = corpus.lengths[captions]
    audio = corpus.audio[captions, : int(lengths.max())]
    return model.stage1_audio_vectors(audio, lengths) @ model.stage1_image_vectors(regions).T


def agreement(model: MatchmapModel, corpus: Corpus, teacher: torch.Tensor, captions: torch.Tensor) -> dict:
    """Held-out captions against every image: share of MISA's top 10 in the stage-1 top K, K = 1 %, 4 %."""
    with torch.no_grad():
        student = stage1_scores(model, corpus, captions)
    m = corpus.images.shape[0]
    return {f"top{k}": top10_overlap(student, teacher[captions], k)
            for k in sorted({max(10, m // 100), max(10, m // 25)})}


def _standardized(scores: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, over its standard deviation."""
    return (scores - scores.mean(dim=1, keepdim=True)) / scores.std(dim=1, keepdim=True).clamp_min(1e-6)


def train_heads(model: MatchmapModel, corpus: Corpus, teacher: torch.Tensor, cfg: DistillConfig, *,
                progress: bool = True) -> tuple[MatchmapModel, dict]:
    """Fit new stage-1 heads on ``model``'s frozen maps -> (the model with heads, a summary dict).

    The summary holds the held-out agreement of masked means and of the heads, the loss per epoch,
    steps and seconds.
    """
    torch.manual_seed(cfg.seed)
    held_images, held_captions = holdout_split(corpus, cfg.holdout, cfg.seed)
    train_images = (~held_images).nonzero().squeeze(1)
    train_captions = (~held_captions).nonzero().squeeze(1)
    eval_captions = held_captions.nonzero().squeeze(1)
    if len(train_captions) < 2 or len(train_images) < 2:
        raise ValueError(f"too few pairs to distil from: {len(train_captions)} training captions of "
                         f"{len(train_images)} images after holding out {cfg.holdout:.0%}")
    student = with_stage1_heads(model, cfg.heads)  # untrained heads are the masked means: the baseline
    baseline = agreement(student, corpus, teacher, eval_captions) if len(eval_captions) else {}

    # Each caption's MISA scores over the training images, standardized by their own spread (a query's
    # ranking does not change with the scale or offset of its scores); the heads' likewise, per step.
    teacher_logits = _standardized(teacher[:, train_images]) / cfg.teacher_temperature
    mined = teacher_logits.topk(min(cfg.mined, len(train_images)), dim=1).indices  # (N, mined)
    train_regions = corpus.images[train_images]

    heads = student.stage1
    log_scale = torch.nn.Parameter(torch.tensor(-math.log(cfg.teacher_temperature)))  # learned, as the teacher's
    params = [*heads.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_captions) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    history = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc="distilling stage-1 heads", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        order = train_captions[torch.randperm(len(train_captions))]
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            # The step's list: the batch's mined images and random ones (every image, if that is fewer).
            listed = torch.cat([mined[batch].reshape(-1), torch.randint(len(train_images), (cfg.negatives,))]).unique()
            lengths = corpus.lengths[batch]
            queries = student.stage1_audio_vectors(corpus.audio[batch, : int(lengths.max())], lengths)
            logits = log_scale.exp() * _standardized(queries @ student.stage1_image_vectors(train_regions[listed]).T)
            targets = F.softmax(teacher_logits[batch][:, listed], dim=1)
            loss = F.kl_div(F.log_softmax(logits, dim=1), targets, reduction="batchmean")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the distillation loss went non-finite at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{losses[-1]:.3f}")
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses)})
    bar.close()
    student.eval()
    distilled = agreement(student, corpus, teacher, eval_captions) if len(eval_captions) else {}
    return student, {
        "config": dataclasses.asdict(cfg),
        "images": int(corpus.images.shape[0]),
        "captions": int(len(corpus.lengths)),
        "held_out_images": int(held_images.sum()),
        "held_out_captions": int(len(eval_captions)),
        "held_out_agreement": {"masked_mean": baseline, "distilled": distilled},
        "history": history,
        "steps": total,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def distill_checkpoint(checkpoint: str | Path, manifest: Manifest, out: str | Path, cfg: DistillConfig, *,
                       progress: bool = True) -> dict:
    """Encode ``manifest`` with ``checkpoint``'s model, distil its MISA into stage-1 heads, and write the
    model with its heads to ``out`` (the source's step, epoch and extras kept; ``extra["stage1_distill"]``
    added). Returns the summary (also in the checkpoint), with the new model version and timings."""
    started = time.perf_counter()
    source = load_checkpoint(checkpoint)
    device = torch.device(cfg.device)
    model = model_from_checkpoint(source).to(device).eval()
    with torch.no_grad():
        corpus = encode_corpus(model, manifest, device=device, progress=progress)
    corpus = Corpus(corpus.images.cpu(), corpus.audio.cpu(), corpus.lengths.cpu(), corpus.caption_image)
    model = model.cpu()
    encode_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with tqdm(total=len(corpus.lengths), desc="MISA teacher scores", unit="caption", disable=not progress) as bar:
        teacher = teacher_scores(corpus, progress=bar.update)
    teacher_seconds = time.perf_counter() - started

    student, summary = train_heads(model, corpus, teacher, cfg, progress=progress)
    extra = copy.deepcopy(source.get("extra") or {})
    extra["stage1_distill"] = {**summary, "source_version": source.get("version") or model.version}
    save_checkpoint(out, student, step=source.get("step", 0), epoch=source.get("epoch", 0), extra=extra)
    summary.update(
        source=str(checkpoint), source_version=extra["stage1_distill"]["source_version"], out=str(out),
        version=student.version, encode_seconds=round(encode_seconds, 1),
        teacher_seconds=round(teacher_seconds, 1),
    )
    return summary
