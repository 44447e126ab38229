"""Datasets and loaders: Places-format manifests -> (image, log-mel, length) batches.

Decoded waveforms and images are cached in memory once (a corpus of 5,000 pairs takes about 1 GB),
so each epoch costs only the front ends and the augmentations.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from encoders import load_audio, load_image
from training.augment import AugmentConfig, augment_logmel, augment_waveform
from training.manifest import Manifest


@dataclass
class Batch:
    """images: (B, 3, S, S) float; logmel: (B, n_mels, T) float; lengths: (B,) long; indices: (B,) long."""

    images: torch.Tensor
    logmel: torch.Tensor
    lengths: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.images, self.logmel, self.lengths, self.indices)))


def image_groups(images: Sequence[Hashable]) -> tuple[list[int], torch.Tensor]:
    """Unique images of a list of entries' images, in order of first appearance.

    Returns (the entry index of each unique image's first occurrence, each entry's unique-image index).
    """
    group_of: dict[Hashable, int] = {}
    representatives, caption_image = [], []
    for index, image in enumerate(images):
        if image not in group_of:
            group_of[image] = len(representatives)
            representatives.append(index)
        caption_image.append(group_of[image])
    return representatives, torch.tensor(caption_image, dtype=torch.long)


class CaptionedImages(Dataset):
    """The pairs of a manifest, decoded once, run through a model's front ends on every access.

    ``train=True`` uses the model's training image front end (random crops) and the augmentations;
    randomness comes from ``torch``'s global generator, so seeding it per epoch makes epochs exact.
    """

    def __init__(self, manifest: Manifest, model, *, train: bool, augment: AugmentConfig | None = None,
                 progress: bool = True) -> None:
        self.manifest = manifest
        self.audio_frontend = model.audio_frontend
        self.image_frontend = model.image_frontend_train if train else model.image_frontend
        self.train = train
        self.augment = (augment or AugmentConfig()) if train else AugmentConfig.none()
        self.sample_rate = model.config.audio.sample_rate
        self.waveforms: list[np.ndarray] = []
        self.images: list[Image.Image] = []
        entries = manifest.entries
        decoded: dict = {}  # several captions of one image share one decoded copy
        for entry in tqdm(entries, desc=f"loading {len(entries)} pairs", unit="pair", disable=not progress,
                          leave=False):
            wave = load_audio(manifest.audio_path(entry), self.sample_rate)
            self.waveforms.append((wave.clamp(-1, 1) * 32767).to(torch.int16).numpy())
            path = manifest.image_path(entry)
            if path not in decoded:
                decoded[path] = load_image(path).copy()
            self.images.append(decoded[path])
        # image_groups (N,) long: the image of each pair; pairs sharing a value are captions of one image;
        # image_representatives: for each image (group), the index of its first pair
        self.image_representatives, self.image_groups = image_groups([manifest.image_path(e) for e in entries])

    def __len__(self) -> int:
        return len(self.waveforms)

    @property
    def caption_samples(self) -> list[int]:
        """Each caption's length in samples (before augmentation), for length bucketing."""
        return [len(w) for w in self.waveforms]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        wave = torch.from_numpy(self.waveforms[index].astype(np.float32) / 32767.0)
        wave = augment_waveform(wave, self.sample_rate, self.augment)
        logmel, length = self.audio_frontend(wave, self.sample_rate)
        logmel = augment_logmel(logmel, length, self.augment)
        return self.image_frontend(self.images[index]), logmel, length, index


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]], multiple: int = 16) -> Batch:
    """Stack items, cutting the log-mel padding down to the longest caption (rounded up to ``multiple``)."""
    images, logmels, lengths, indices = zip(*items, strict=True)
    longest = max(lengths)
    frames = min(logmels[0].shape[-1], -(-longest // multiple) * multiple)
    return Batch(
        images=torch.stack(images),
        logmel=torch.stack([m[:, :frames] for m in logmels]),
        lengths=torch.tensor(lengths, dtype=torch.long),
        indices=torch.tensor(indices, dtype=torch.long),
    )


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of captions of similar length, in random order: far less padding for the audio branch.

    Each epoch is a pure function of (seed, epoch): a seeded permutation of the pairs is cut into pools
    of ``pool_steps`` steps, each pool is sorted by caption length and cut into steps of
    ``batch_size * world`` pairs, and the steps are shuffled. Rank r takes the r-th ``batch_size``
    slice of every step, so under DistributedDataParallel the ranks see disjoint pairs of similar
    length. Pairs that do not fill a last step are left out of that epoch (a different few each epoch).

    On the spoken-scenes corpus, where a batch's longest caption is about twice the mean caption,
    this roughly halves the audio branch's work per step. It is off by default (``TrainConfig``):
    caption length follows how much a caption says, so a one-object caption's in-batch negatives are
    mostly other one-object scenes (16 of 63 hold more objects, against 41 in a random batch), and the
    in-batch loss rarely teaches it to rank "a red star" above a scene with a red star and more.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 pool_steps: int = 32) -> None:
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad batching: batch_size={batch_size}, rank={rank}, world={world}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.rank, self.world, self.pool_steps = batch_size, seed, rank, world, pool_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.world)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        per_step = self.batch_size * self.world
        order = torch.randperm(len(self.lengths), generator=generator).tolist()[: len(self) * per_step]
        pool = per_step * self.pool_steps
        steps = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: (self.lengths[i], i))
            steps += [chunk[s : s + per_step] for s in range(0, len(chunk), per_step)]
        for s in torch.randperm(len(steps), generator=generator).tolist():
            yield steps[s][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
