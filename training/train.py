"""The training loop: single process, or many through torchrun (DistributedDataParallel).

Epochs are exact functions of (seed, epoch): the sampler order and every random draw of an epoch
come from generators seeded with both, so resuming from an epoch's checkpoint continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from encoders import create_model, load_checkpoint, save_checkpoint, weights_version, with_stage1_heads
from encoders.matchmap import score_matrix
from training.augment import AugmentConfig
from training.data import Batch, CaptionedImages, LengthBucketBatchSampler, collate
from training.evaluate import embed_pairs, evaluate_embeddings, format_table, manifest_images, mean_r10
from training.losses import make_loss
from training.manifest import Manifest
from training.schedules import warmup_cosine
from training.visual_tags import ImageTagger, SpeechTagHead, entropy_bits, soft_tag_loss


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in every checkpoint."""

    model: str = "tiny"  # a registry name, or a checkpoint path to start from (fine-tuning)
    loss: str = "infonce"  # infonce (in-batch, symmetric) | margin (the paper's sampled margin ranking)
    margin: float = 1.0  # eta of the margin loss
    sisa_weight: float = 0.5  # weight of the same loss on SISA scores: trains the stage-1 pooled vectors
    epochs: int = 18
    batch_size: int = 64
    lr: float = 1e-3
    # the image branch's learning rate as a multiple of lr: below 1 keeps more of a pretrained branch
    # (`matchmap pretrain-images`); 0 freezes it (no gradients, BatchNorm statistics fixed, cheaper steps)
    image_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    augment: str = "speed,noise,vtlp,specaugment"  # the shipped recipe (docs/model.md)
    num_workers: int = 0
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast (CPU or CUDA), optimizer state fp32
    calibrate_temperature: bool = True  # set the in-batch loss temperatures from the first batch's score spread
    # batches of similar caption length (LengthBucketBatchSampler): less padding, faster steps, but
    # worse negatives (a short caption's batch holds few scenes with more objects than it names)
    bucket_by_length: bool = False
    max_minutes: float | None = None  # wall-clock budget: the run stops after the epoch that crosses it
    eval_every: int = 1  # evaluate on val after every N-th epoch, and always after the last one
    device: str = "auto"
    # visually grounded keyword targets (training.visual_tags): a `matchmap pretrain-images` last.pt
    # tags every training image, and the audio branch learns to predict those tags from the speech
    tagger: str | None = None
    tag_weight: float = 1.0
    # the audio branch runs each batch as this many groups of similar caption length: the same loss and
    # gradients as the padded batch (BatchNorm statistics span the groups), far less padding to convolve
    audio_length_groups: int = 4

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PairObjective(nn.Module):
    """Model + losses as one module, so DistributedDataParallel sees a single forward and syncs them all.

    The MISA loss and the SISA loss (weighted by ``sisa_weight``) are separate instances of the same
    loss, so each score kind has its own temperature where the loss has one.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, sisa_weight: float, tag_head: nn.Module | None = None,
                 tag_weight: float = 0.0, audio_length_groups: int = 1) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        # (None without a SISA term: DistributedDataParallel refuses parameters that never get a gradient)
        self.sisa_loss = copy.deepcopy(loss) if sisa_weight > 0 else None
        self.sisa_weight = sisa_weight
        self.tag_head = tag_head  # training.visual_tags.SpeechTagHead, or None
        self.tag_weight = tag_weight
        self.audio_length_groups = audio_length_groups  # encoders.models.length_sorted_split

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("misa", "sisa") if self.sisa_weight > 0 else ("misa",)

    @property
    def image_frozen(self) -> bool:
        params = list(getattr(self.model, "image_net", nn.Identity()).parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    def train(self, mode: bool = True) -> PairObjective:
        super().train(mode)
        if self.image_frozen:
            self.model.image_net.eval()  # a frozen branch keeps its BatchNorm statistics too
        return self

    def _encode(self, images: torch.Tensor, logmel: torch.Tensor, lengths: torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_frozen):
            image_maps = self.model.encode_images(images)
        audio, out_lengths = self.model.encode_audio(logmel, lengths, length_groups=self.audio_length_groups)
        return image_maps, audio, out_lengths

    def scores(self, images: torch.Tensor, logmel: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        image_maps, audio, out_lengths = self._encode(images, logmel, lengths)
        return score_matrix(audio, out_lengths, image_maps, kinds=self.kinds)

    def forward(self, images: torch.Tensor, logmel: torch.Tensor, lengths: torch.Tensor,
                groups: torch.Tensor | None = None, tag_targets: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss; ``groups`` (B,) names each pair's image, so captions of one image are no
        negatives of each other (``training.losses.negatives_mask``); ``tag_targets`` (B, C) are the
        tagger's distributions over each pair's image, which the tag head predicts from the speech."""
        image_maps, audio, out_lengths = self._encode(images, logmel, lengths)
        scores = score_matrix(audio, out_lengths, image_maps, kinds=self.kinds)
        total = self.loss(scores["misa"], groups=groups)
        if self.sisa_weight > 0:
            total = total + self.sisa_weight * self.sisa_loss(scores["sisa"], groups=groups)
        if self.tag_head is not None and tag_targets is not None:
            total = total + self.tag_weight * soft_tag_loss(self.tag_head(audio, out_lengths), tag_targets)
        return total

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, logmel: torch.Tensor, lengths: torch.Tensor, world: int = 1) -> dict:
        """Set each loss's temperature from the spread of its scores on one batch (see
        ``SymmetricInfoNCELoss.calibrate``); under torchrun the spread is averaged over ranks so every
        replica starts from the same temperature. Returns {kind: score std}."""
        scores = self.scores(images, logmel, lengths)
        spreads = {}
        for kind, loss in (("misa", self.loss), ("sisa", self.sisa_loss)):
            if kind not in scores or loss is None or not hasattr(loss, "calibrate"):
                continue
            std = scores[kind].float().std()
            if world > 1:
                dist.all_reduce(std)
                std = std / world
            loss.calibrate(float(std))
            spreads[kind] = float(std)
        return spreads


PRECISIONS = ("fp32", "bf16")


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local world size) from torchrun's environment; (0, 1, 1) when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 1
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:6], "little")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


class TrainingDiverged(ValueError):
    """The loss or the model went non-finite (NaN or infinity): training stops, nothing of it is saved."""


def _check_finite(model: nn.Module, what: str) -> None:
    bad = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} parameter(s)/buffer(s) are not finite ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}); last.pt and best.pt keep the last finite epoch")


def train(cfg: TrainConfig, train_manifest: Manifest, val_manifest: Manifest, out_dir: str | Path, *,
          resume: str | Path | None = None, progress: bool = True) -> dict:
    """Train, evaluating on ``val_manifest`` after every epoch; returns the run summary.

    Writes out_dir/last.pt (every epoch), out_dir/best.pt (best mean MISA R@10), out_dir/metrics.jsonl,
    out_dir/summary.json and out_dir/replica-<rank>.json (each rank's final weights version).
    Raises ``TrainingDiverged`` at the first non-finite loss, or when an epoch ends with non-finite
    weights or validation embeddings, before anything of that epoch is saved: a diverged model never
    becomes last.pt or best.pt.
    """
    rank, world, local_world = _distributed()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_process = rank == 0

    torch.manual_seed(cfg.seed)
    state = load_checkpoint(resume) if resume else None
    model = create_model(resume if resume else cfg.model).to(device)
    if model.stage1 is not None:
        # Stage-1 heads fit the encoders they were distilled from; once these train, the heads would
        # be stale. The trained model has none (masked means); `matchmap distill-stage1` makes new ones.
        model = with_stage1_heads(model, 0).to(device)
    if cfg.image_lr_scale < 0:
        raise ValueError(f"image_lr_scale must be at least 0 (0 freezes the image branch), got {cfg.image_lr_scale}")
    if cfg.image_lr_scale == 0:
        model.image_net.requires_grad_(False)
    loss_fn = make_loss(cfg.loss, **({"margin": cfg.margin} if cfg.loss == "margin" else {}))
    augment = AugmentConfig.from_names(cfg.augment)
    train_set = CaptionedImages(train_manifest, model, train=True, augment=augment, progress=progress and main_process)
    tag_head, image_tags = None, None
    if cfg.tagger:
        tagger = ImageTagger(cfg.tagger)
        representatives = train_set.image_representatives
        image_tags = tagger.tag([train_set.images[i] for i in representatives]).to(device)  # (images, C)
        tag_head = SpeechTagHead(model.embed_dim, tagger.categories)
        if main_process and progress:
            tqdm.write(f"tagged {len(representatives)} training images with {cfg.tagger} "
                       f"(mean entropy {entropy_bits(image_tags):.2f} bits over {tagger.categories} categories)")
        del tagger
    objective = PairObjective(model, loss_fn, cfg.sisa_weight, tag_head, cfg.tag_weight,
                              cfg.audio_length_groups).to(device)

    val_set = CaptionedImages(val_manifest, model, train=False, progress=progress and main_process) if main_process else None
    if cfg.bucket_by_length:
        sampler = LengthBucketBatchSampler(train_set.caption_samples, cfg.batch_size, seed=cfg.seed, rank=rank,
                                           world=world)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    else:
        if world > 1:
            sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                         drop_last=True)
        else:
            sampler = RandomSampler(train_set, generator=torch.Generator())
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                            drop_last=True, num_workers=cfg.num_workers, persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training manifest has {len(train_set)} pairs, fewer than one batch of "
                         f"{cfg.batch_size} per process; lower --batch-size")

    image_params = {id(p) for p in model.image_net.parameters()}
    groups = [{"params": [p for p in objective.parameters() if p.requires_grad and id(p) not in image_params]}]
    if cfg.image_lr_scale > 0:
        groups.append({"params": list(model.image_net.parameters()), "lr": cfg.lr * cfg.image_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    start_epoch, step, best, history = 0, 0, -1.0, []
    if state is not None:
        tag_head_state = state["extra"].get("tag_head_state")
        if (tag_head is None) != (tag_head_state is None):
            raise ValueError(f"{resume} was trained {'with' if tag_head_state is not None else 'without'} --tagger: "
                             "resume it the same way")
        if tag_head is not None:
            tag_head.load_state_dict(tag_head_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_fn.load_state_dict(state["extra"]["loss_state"])
        if "sisa_loss_state" in state["extra"] and objective.sisa_loss is not None:
            objective.sisa_loss.load_state_dict(state["extra"]["sisa_loss_state"])
        start_epoch, step = state["epoch"], state["step"]
        best = state["extra"].get("best_mean_r10", -1.0)
        history = state["extra"].get("history", [])
    if cfg.eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {cfg.eval_every}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    if state is None and cfg.calibrate_temperature:
        first = next(iter(loader)).to(device)
        objective.train()
        with autocast():
            calibration = objective.calibrate(first.images, first.logmel, first.lengths, world)
        if main_process and progress and calibration:
            tqdm.write("initial score spread " + ", ".join(f"{k.upper()} {v:.3g}" for k, v in calibration.items())
                       + ": temperatures set for unit-spread logits")
    trainable = DistributedDataParallel(objective) if world > 1 else objective

    val_images = manifest_images(val_manifest)
    metrics_path = out_dir / "metrics.jsonl"
    started = time.monotonic()
    summary: dict = {}
    last_result = state["extra"].get("val_result") if state is not None else None
    for epoch in range(start_epoch, cfg.epochs):
        epoch_seed = _epoch_seed(cfg.seed, epoch)
        torch.manual_seed(epoch_seed + rank)
        if isinstance(sampler, RandomSampler):
            sampler.generator.manual_seed(epoch_seed)
        else:
            sampler.set_epoch(epoch)
        objective.train()
        epoch_start, seen, loss_sum, step_losses = time.monotonic(), 0, 0.0, []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not (progress and main_process))
        for batch in bar:
            batch: Batch = batch.to(device)
            with autocast():
                groups = train_set.image_groups[batch.indices]
                tags = image_tags[groups.to(device)] if image_tags is not None else None
                loss = trainable(batch.images, batch.logmel, batch.lengths, groups, tags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad], 10.0)
            # Before the update: a non-finite loss gives non-finite gradients, and under DDP the gradient
            # norm is the same on every rank (gradients are all-reduced), so all ranks stop together.
            if not bool(torch.isfinite(grad_norm)) or (world == 1 and not bool(torch.isfinite(loss.detach()).all())):
                raise TrainingDiverged(f"the loss is {loss.item()} (gradient norm {grad_norm.item()}) at step "
                                       f"{step + 1} (epoch {epoch + 1}); last.pt and best.pt keep the last finite "
                                       "epoch: lower --lr, or check the data")
            optimizer.step()
            scheduler.step()
            step += 1
            seen += batch.images.shape[0] * world
            loss_sum += loss.item()
            step_losses.append(round(loss.item(), 5))
            rate = seen / max(1e-9, time.monotonic() - epoch_start)
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
        record = {"epoch": epoch + 1, "step": step, "loss": loss_sum / steps_per_epoch, "step_losses": step_losses,
                  "lr": scheduler.get_last_lr()[0], "samples_per_s": seen / (time.monotonic() - epoch_start),
                  "elapsed_s": time.monotonic() - started}
        if world > 1:
            # DDP keeps parameters in step; BatchNorm running statistics each rank updates from its own
            # batches, so replicas take rank 0's at every epoch end (what rank 0 evaluates and saves).
            for buffer in objective.buffers():
                dist.broadcast(buffer, src=0)
        over_budget = cfg.max_minutes is not None and (time.monotonic() - started) > cfg.max_minutes * 60
        if world > 1:  # every rank must agree to stop, or the next all-reduce hangs
            flag = torch.tensor([int(over_budget)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over_budget = bool(flag.item())
        final = over_budget or epoch + 1 == cfg.epochs
        _check_finite(model, f"after epoch {epoch + 1}")  # every rank: DDP keeps the weights identical
        if main_process:
            score = None
            if final or (epoch + 1) % cfg.eval_every == 0:
                embeddings = embed_pairs(model, val_set, batch_size=cfg.batch_size, device=device, progress=False)
                if not all(bool(torch.isfinite(t).all()) for t in (embeddings.image_maps, embeddings.audio)):
                    raise TrainingDiverged(f"after epoch {epoch + 1} the validation embeddings are not finite; "
                                           "last.pt and best.pt keep the last finite epoch")
                result = evaluate_embeddings(embeddings, images=val_images)
                record["val"] = result
                score = mean_r10(result)
                last_result = result
            history.append({k: v for k, v in record.items() if k != "step_losses"})
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            improved = score is not None and score > best
            if improved:
                best = score
            extra = {"train_config": asdict(cfg), "loss_state": loss_fn.state_dict(),
                     "sisa_loss_state": objective.sisa_loss.state_dict() if objective.sisa_loss else None,
                     "tag_head_state": tag_head.state_dict() if tag_head is not None else None,
                     "history": history, "best_mean_r10": best, "val_result": last_result}
            save_checkpoint(out_dir / "last.pt", model, optimizer=optimizer, scheduler=scheduler, step=step,
                            epoch=epoch + 1, extra=extra)
            if improved:
                save_checkpoint(out_dir / "best.pt", model, step=step, epoch=epoch + 1, extra=extra)
            if progress:
                line = f"epoch {epoch + 1}: loss {record['loss']:.4f}, {record['samples_per_s']:.0f} samples/s"
                tqdm.write(line if score is None else
                           f"{line}, mean MISA R@10 {score:.3f} (best {best:.3f})\n{format_table(last_result)}")
            summary = {"epochs": epoch + 1, "steps": step, "best_mean_r10": best, "last": last_result,
                       "elapsed_s": record["elapsed_s"]}
        if world > 1:
            dist.barrier()
        if over_budget:
            break

    (out_dir / f"replica-{rank}.json").write_text(json.dumps({"rank": rank, "weights_version": weights_version(model),
                                                               "step": step}))
    if main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
