"""Image-branch pretraining on the generator's labels: the honest stand-in for the paper's ImageNet VGG16.

The paper's image branch starts from a VGG16 trained to classify ImageNet. Here no image data set can
be downloaded, but the scene generator knows what it drew, so the image branch learns to say which
categories a rendered objects-world scene holds (no speech, no captions):

- a per-region linear classifier over the branch's region vectors (B, H, W, D) -> (B, H, W, C);
- pooled over regions by log-sum-exp (multiple-instance learning: a scene holds a dog when some
  region shows one), so the evidence stays spatial, as the matchmap needs it;
- ``objective="softmax"`` (default): cross-entropy between the softmax over categories and the
  scene's categories, equally weighted (the multi-label softmax of large weakly-labelled image
  pretraining); ``"bce"``: binary cross-entropy per category, summed. With 649 categories and 1-4
  per scene, BCE first learns to say "nothing" and sat at that plateau (R-precision at chance, 0.004,
  after 250 steps; the loss flat at the priors' ~14.5 for 170 more: docs/model.md); the softmax makes every step rank the present categories up.

The classifier is thrown away. What is kept is a whole model checkpoint whose image branch is trained
and whose audio branch is fresh: ``matchmap train --checkpoint pretrained/model.pt`` starts from it.
Validation reports how often a scene's categories are its top-scored ones (R-precision) and how
often a category's best region lies inside one of its boxes (the pointing game of the labels).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from encoders import create_model, load_checkpoint, save_checkpoint
from encoders.frontend import ImageFrontEnd
from training.objects_world import random_object_scene
from training.schedules import warmup_cosine
from training.vocabulary import load_vocabulary

LSE_SHARPNESS = 5.0  # r of the log-sum-exp pooling: 0 -> mean over regions, infinity -> max


@dataclass
class PretrainConfig:
    """Everything that decides a pretraining run; saved in its checkpoints."""

    model: str = "tiny"
    scenes: int = 20_000  # rendered training scenes (each epoch sees each once, with a new random crop)
    val_scenes: int = 500
    objects: tuple[int, int] = (1, 4)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    max_minutes: float | None = None
    objective: str = "softmax"  # softmax | bce (see the module docstring)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "objects" in values:
            values["objects"] = tuple(values["objects"])
        return cls(**values)


@dataclass
class RenderedScenes:
    """Scenes resized to the image front end's resize size (uint8), their category ids and boxes (pixels of that size)."""

    images: list[Image.Image]
    labels: list[list[int]]
    boxes: list[list[tuple[float, float, float, float]]]


def _render(args: tuple[int, int, int, tuple[int, int]]) -> tuple[bytes, tuple[int, int], list[int], list]:
    seed, index, resize, objects = args
    vocabulary = load_vocabulary()
    category_id = {c.name: i for i, c in enumerate(vocabulary)}
    scene = random_object_scene(np.random.default_rng([seed, index]), objects=objects, vocabulary=vocabulary)
    scale = resize / min(scene.image.size)
    image = scene.image.resize((round(scene.image.width * scale), round(scene.image.height * scale)), Image.BILINEAR)
    labels = sorted({category_id[o.category] for o in scene.objects})
    boxes = [(category_id[o.category], tuple(v * scale for v in o.bbox)) for o in scene.objects]
    return image.tobytes(), image.size, labels, boxes


def render_scenes(count: int, *, seed: int, resize: int, objects: tuple[int, int], workers: int | None = None,
                  progress: bool = True, desc: str = "rendering scenes") -> RenderedScenes:
    """Render ``count`` scenes; scene i depends only on (seed, i), not on the number of workers."""
    jobs = [(seed, i, resize, objects) for i in range(count)]
    workers = workers or os.cpu_count() or 1
    out = RenderedScenes([], [], [])
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        for data, size, labels, boxes in tqdm(pool.map(_render, jobs, chunksize=64), total=count, desc=desc,
                                              unit="scene", disable=not progress, leave=False):
            out.images.append(Image.frombytes("RGB", size, data))
            out.labels.append(labels)
            out.boxes.append(boxes)
    return out


class _Inline:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, items, chunksize: int = 1):
        return map(fn, items)


class RegionClassifier(nn.Module):
    """(B, H, W, D) region vectors -> (B, C) scene logits (log-sum-exp over regions) and (B, H, W, C) region logits."""

    def __init__(self, embed_dim: int, categories: int, sharpness: float = LSE_SHARPNESS) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, categories)
        self.sharpness = sharpness

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region_logits = self.linear(regions)
        flat = region_logits.flatten(1, 2)  # (B, R, C)
        r = self.sharpness
        scene = (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r
        return scene, region_logits


OBJECTIVES = ("softmax", "bce")


def label_loss(scene_logits: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """Mean over scenes of the ``objective`` between (B, C) scene logits and (B, C) multi-hot targets."""
    if objective == "softmax":
        weights = target / target.sum(dim=1, keepdim=True).clamp_min(1)
        return -(weights * F.log_softmax(scene_logits, dim=1)).sum(dim=1).mean()
    if objective == "bce":
        return F.binary_cross_entropy_with_logits(scene_logits, target, reduction="sum") / len(target)
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def multi_hot(labels: Sequence[Sequence[int]], categories: int) -> torch.Tensor:
    target = torch.zeros(len(labels), categories)
    for row, ids in enumerate(labels):
        target[row, list(ids)] = 1.0
    return target


def _batches(scenes: RenderedScenes, frontend: ImageFrontEnd, order: Sequence[int], batch_size: int):
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = order[start: start + batch_size]
        yield chosen, torch.stack([frontend(scenes.images[i]) for i in chosen])


@torch.no_grad()
def validate(model, classifier: RegionClassifier, scenes: RenderedScenes, batch_size: int = 128) -> dict[str, float]:
    """R-precision of scene labels, and pointing: the best region of each present category inside its box."""
    model.eval()
    cfg = model.config.image
    grid_h, grid_w = model.image_grid
    offset = (cfg.resize_size - cfg.input_size) / 2  # the centre crop of the evaluation front end
    hits_r, total_r, hits_p, total_p = 0, 0, 0, 0
    order = list(range(len(scenes.images)))
    for start in range(0, len(order), batch_size):
        chosen = order[start: start + batch_size]
        images = torch.stack([model.image_frontend(scenes.images[i]) for i in chosen])
        scene_logits, region_logits = classifier(model.encode_images(images))
        for row, i in enumerate(chosen):
            labels = scenes.labels[i]
            top = scene_logits[row].topk(len(labels)).indices.tolist()
            hits_r += len(set(top) & set(labels))
            total_r += len(labels)
            for category in labels:
                best = int(region_logits[row, :, :, category].argmax())
                y = (best // grid_w + 0.5) * cfg.input_size / grid_h + offset
                x = (best % grid_w + 0.5) * cfg.input_size / grid_w + offset
                boxes = [b for c, b in scenes.boxes[i] if c == category]
                hits_p += any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes)
                total_p += 1
    return {"r_precision": hits_r / max(1, total_r), "pointing": hits_p / max(1, total_p)}


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: str | Path | None = None, workers: int | None = None,
             progress: bool = True) -> dict:
    """Pretrain ``cfg.model``'s image branch; writes out_dir/model.pt (start ``matchmap train`` from it),
    out_dir/last.pt (resumable), out_dir/metrics.jsonl and out_dir/summary.json. Returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    state = load_checkpoint(resume) if resume else None
    model = create_model(resume if resume else cfg.model)
    categories = len(load_vocabulary())
    classifier = RegionClassifier(model.embed_dim, categories)
    resize = model.config.image.resize_size
    train_scenes = render_scenes(cfg.scenes, seed=cfg.seed * 2 + 1, resize=resize, objects=cfg.objects,
                                 workers=workers, progress=progress, desc="rendering training scenes")
    val_scenes = render_scenes(cfg.val_scenes, seed=cfg.seed * 2 + 2, resize=resize, objects=cfg.objects,
                               workers=workers, progress=progress, desc="rendering validation scenes")
    targets = multi_hot(train_scenes.labels, categories)
    parameters = [*model.image_net.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.scenes // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.scenes} scenes are fewer than one batch of {cfg.batch_size}; lower --batch-size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    start_epoch, step, history = 0, 0, []
    if state is not None:
        classifier.load_state_dict(state["extra"]["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, history = state["epoch"], state["step"], state["extra"]["history"]
    frontend = model.image_frontend_train
    started = time.monotonic()
    summary: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # the random crops
        order = torch.randperm(cfg.scenes, generator=generator).tolist()
        model.train()
        classifier.train()
        epoch_start, loss_sum, seen = time.monotonic(), 0.0, 0
        bar = tqdm(_batches(train_scenes, frontend, order, cfg.batch_size), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress)
        for chosen, images in bar:
            scene_logits, _ = classifier(model.encode_images(images))
            loss = label_loss(scene_logits, targets[chosen], cfg.objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 10.0)
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"pretraining diverged at step {step + 1}: loss {loss.item()}; lower --lr")
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(chosen)
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", scenes_s=f"{seen / (time.monotonic() - epoch_start):.0f}")
        record = {"epoch": epoch + 1, "step": step, "loss": loss_sum / steps_per_epoch,
                  "scenes_per_s": seen / (time.monotonic() - epoch_start), "elapsed_s": time.monotonic() - started,
                  "val": validate(model, classifier, val_scenes)}
        history.append(record)
        with (out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        over_budget = cfg.max_minutes is not None and record["elapsed_s"] > cfg.max_minutes * 60
        extra = {"pretrain_config": asdict(cfg), "history": history, "classifier": classifier.state_dict()}
        save_checkpoint(out_dir / "last.pt", model, optimizer=optimizer, scheduler=scheduler, step=step,
                        epoch=epoch + 1, extra=extra)
        save_checkpoint(out_dir / "model.pt", model, step=0, epoch=0,
                        extra={"image_pretraining": {"config": asdict(cfg), "val": record["val"], "epochs": epoch + 1}})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.3f}, {record['scenes_per_s']:.0f} scenes/s, "
                       f"R-precision {record['val']['r_precision']:.3f}, pointing {record['val']['pointing']:.3f}")
        summary = {"epochs": epoch + 1, "steps": step, "val": record["val"], "elapsed_s": record["elapsed_s"],
                   "model": str(out_dir / "model.pt")}
        if over_budget:
            break
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
