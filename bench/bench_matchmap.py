"""All-pairs MISA throughput: per-pair Python loop vs score_matrix vs a plain matmul of the same size.

For each shape set (``tiny``: 8x8 regions x 256 dims; ``davenet-vgg16``: 14x14 regions x 1024 dims)
it times, on the same captions and images:

  (a) reference -- the DAVEnet reference implementation's loop (dharwath/DAVEnet-pytorch,
                 steps/util.py: compute_matchmap_similarity_matrix -> computeMatchmap -> matchmapSim):
                 channels-first maps, one torch.mm per pair, max over H then W, mean over frames,
                 written into S[i, j] element by element
  (a') loop   -- our pair_score(image, caption, "misa") for every pair (frames-last layout, one mm
                 and a max/mean per pair), for comparison
  (b) scores  -- score_matrix(..., ("misa",)), the batched, chunked path
  (c) matmul  -- the products alone: (true frames of all captions, D) @ (D, N*R), in chunks of the
                 same size as (b)'s, into a reused buffer
  (d) bf16    -- score_matrix with compute_dtype=torch.bfloat16, and whether its top-10 rankings
                 match fp32

GFLOP/s counts the useful work, 2 * (true frames of all captions) * N * R * D, for every method,
so (b) pays for whatever padding it computes. The loop runs on a subset of pairs and is scaled per
pair; pair counts below 1000 x 1000 are extrapolated to it, labelled as such.

It also times one training step of the ``tiny`` model (forward and backward of both branches and
the symmetric in-batch MISA cross-entropy) on a batch of 64 images of 128 px and 4 s captions.

    .venv/bin/python bench/bench_matchmap.py [--only tiny|davenet-vgg16|train-step] [--threads N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from encoders.config import get_config
from encoders.matchmap import chunk_sizes, frame_mask, pair_score, score_matrix
from encoders.models import MatchmapModel, count_parameters


@dataclass(frozen=True)
class Shapes:
    name: str
    captions: int  # B for (b), (c), (d)
    images: int  # N
    frames: int  # T, padded; true lengths are drawn from [frames / 2, frames]
    regions: int  # R = H * W
    dim: int  # D
    loop_captions: int  # the loop's subset
    loop_images: int


SHAPES = (
    Shapes(
        "tiny", captions=256, images=1000, frames=32, regions=64, dim=256, loop_captions=16, loop_images=125
    ),
    Shapes(
        "davenet-vgg16",
        captions=64,
        images=256,
        frames=128,
        regions=196,
        dim=1024,
        loop_captions=8,
        loop_images=64,
    ),
)


def make_data(s: Shapes, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions whose frames are noisy copies of regions of "their" image, so rankings have a true match.

    -> audio (B, T, D), lengths (B,), images (N, R, D), all float32 with unit-norm-ish vectors.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(s.images, s.regions, s.dim, generator=g) / math.sqrt(s.dim)
    owner = torch.arange(s.captions) % s.images
    picks = torch.randint(0, s.regions, (s.captions, s.frames), generator=g)
    audio = images[owner[:, None], picks] + 1.5 * torch.randn(
        s.captions, s.frames, s.dim, generator=g
    ) / math.sqrt(s.dim)
    lengths = torch.randint(s.frames // 2, s.frames + 1, (s.captions,), generator=g)
    audio = audio * frame_mask(lengths, s.frames).unsqueeze(-1)
    return audio, lengths, images


def best_of(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` timed calls of each method after one warm-up call each (seconds).

    The methods take turns within each round, so a burst of load from other processes on a shared
    machine falls on all of them rather than on whichever happened to run then.
    """
    for fn in methods.values():
        fn()
    best = dict.fromkeys(methods, math.inf)
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_shapes(s: Shapes, repeats: int) -> dict:
    audio, lengths, images = make_data(s)
    pairs = s.captions * s.images
    total_flop = 2 * int(lengths.sum()) * s.images * s.regions * s.dim
    results: dict = {"shapes": s.__dict__, "pairs": pairs, "useful_flop": total_flop}

    # The reference keeps maps channels-first: images (N, D, H, W), captions (B, D, T).
    side = math.isqrt(s.regions)
    images_dhw = images.reshape(s.images, side, side, s.dim).permute(0, 3, 1, 2).contiguous()
    audio_dt = audio.transpose(1, 2).contiguous()

    def reference() -> None:
        def compute_matchmap(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
            d, h, w = image.shape
            return torch.mm(image.view(d, -1).t(), caption).view(h, w, caption.size(1))

        def misa(matchmap: torch.Tensor) -> torch.Tensor:
            best_over_h, _ = matchmap.max(0)
            best_over_hw, _ = best_over_h.max(0)
            return best_over_hw.mean()

        similarity = torch.zeros(s.loop_images, s.loop_captions)
        for image_idx in range(s.loop_images):
            for audio_idx in range(s.loop_captions):
                frames = max(1, int(lengths[audio_idx]))
                similarity[image_idx, audio_idx] = misa(
                    compute_matchmap(images_dhw[image_idx], audio_dt[audio_idx][:, 0:frames])
                )

    def loop() -> None:
        for i in range(s.loop_captions):
            a = audio[i, : lengths[i]]
            for j in range(s.loop_images):
                pair_score(images[j], a, "misa")

    caption_chunk, image_chunk = chunk_sizes(s.captions, s.frames, s.images, s.regions, 4)
    chunk_rows = caption_chunk * s.frames
    buffer = torch.empty(chunk_rows, image_chunk * s.regions)
    true_frames = audio[frame_mask(lengths, s.frames)]  # (sum of lengths, D)
    flat_images = images.reshape(-1, s.dim)

    def matmul_only() -> None:
        for r0 in range(0, true_frames.shape[0], chunk_rows):
            a = true_frames[r0 : r0 + chunk_rows]
            for c0 in range(0, s.images * s.regions, image_chunk * s.regions):
                im = flat_images[c0 : c0 + image_chunk * s.regions]
                torch.mm(a, im.T, out=buffer[: a.shape[0], : im.shape[0]])

    loop_pairs = s.loop_captions * s.loop_images
    seconds = best_of(
        {
            "reference": reference,
            "loop": loop,
            "score_matrix": lambda: score_matrix(audio, lengths, images, ("misa",)),
            "matmul": matmul_only,
            "bf16": lambda: score_matrix(audio, lengths, images, ("misa",), compute_dtype=torch.bfloat16),
        },
        repeats,
    )
    seconds["loop"] *= pairs / loop_pairs
    seconds["reference"] *= pairs / loop_pairs

    fp32 = score_matrix(audio, lengths, images, ("misa",))["misa"]
    bf16 = score_matrix(audio, lengths, images, ("misa",), compute_dtype=torch.bfloat16)["misa"]
    top_fp32 = fp32.topk(10, dim=1).indices
    top_bf16 = bf16.topk(10, dim=1).indices
    same_list = (top_fp32 == top_bf16).all(dim=1).float().mean().item()
    same_set = torch.tensor(
        [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_fp32, top_bf16, strict=True)]
    ).mean()
    truth = torch.arange(s.captions) % s.images
    true_top1 = (fp32.argmax(dim=1) == truth).float().mean().item()
    true_top1_bf16 = (bf16.argmax(dim=1) == truth).float().mean().item()

    for key, t in seconds.items():
        results[key] = {
            "seconds": t,
            "gflops": total_flop / t / 1e9,
            "pairs_per_second": pairs / t,
            "seconds_per_1000x1000": t / pairs * 1e6,
        }
    results["chunk"] = {"captions": caption_chunk, "images": image_chunk}
    results["score_matrix_vs_matmul"] = seconds["matmul"] / seconds["score_matrix"]
    results["score_matrix_vs_loop"] = seconds["loop"] / seconds["score_matrix"]
    results["score_matrix_vs_reference"] = seconds["reference"] / seconds["score_matrix"]
    results["bf16_vs_fp32"] = seconds["score_matrix"] / seconds["bf16"]
    results["bf16_top10_identical_lists"] = same_list
    results["bf16_top10_set_overlap"] = float(same_set)
    results["bf16_max_abs_error"] = (bf16 - fp32).abs().max().item()
    results["fp32_true_match_top1"] = true_top1
    results["bf16_true_match_top1"] = true_top1_bf16
    return results


def bench_train_step(name: str, batch: int, caption_seconds: float, repeats: int) -> dict:
    """Seconds for one forward + backward: both branches, the MISA matrix, symmetric cross-entropy."""
    torch.manual_seed(0)
    cfg = get_config(name)
    model = MatchmapModel(cfg).train()
    size = cfg.image.input_size
    frames = model.audio_frontend.num_frames(round(caption_seconds * cfg.audio.sample_rate))
    images = torch.randn(batch, 3, size, size)
    logmel = torch.randn(batch, cfg.audio.n_mels, frames)
    lengths = torch.full((batch,), frames)
    targets = torch.arange(batch)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        maps = model.encode_images(images)
        audio, out_lengths = model.encode_audio(logmel, lengths)
        misa = score_matrix(audio, out_lengths, maps, ("misa",))["misa"]
        loss = F.cross_entropy(misa, targets) + F.cross_entropy(misa.T, targets)
        loss.backward()

    return {
        "config": name,
        "params": count_parameters(cfg)["total"],
        "batch": batch,
        "caption_seconds": caption_seconds,
        "log_mel_frames": frames,
        "image_size": size,
        "seconds_per_step": best_of({"step": step}, repeats)["step"],
    }


def report(results: list[dict], train_steps: list[dict], argv: list[str], load_before: float) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"({platform.machine()}); 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
        "after (other processes on the machine slow every method)"
    )
    for r in results:
        s = r["shapes"]
        print(
            f"\n== {s['name']}: {s['captions']} captions x {s['images']} images, T={s['frames']} frames, "
            f"R={s['regions']} regions, D={s['dim']} (loop on {s['loop_captions']}x{s['loop_images']} pairs, "
            f"scaled per pair); chunks of {r['chunk']['captions']} captions x {r['chunk']['images']} images"
        )
        print(
            f"{'method':<14}{'seconds':>10}{'GFLOP/s':>10}{'pairs/s':>14}{'s per 1000x1000 (extrapolated)':>34}"
        )
        for key in ("reference", "loop", "score_matrix", "matmul", "bf16"):
            m = r[key]
            print(
                f"{key:<14}{m['seconds']:>10.3f}{m['gflops']:>10.1f}{m['pairs_per_second']:>14,.0f}"
                f"{m['seconds_per_1000x1000']:>34.2f}"
            )
        print(
            f"score_matrix / matmul speed: {r['score_matrix_vs_matmul']:.2f} (target >= 0.5)   "
            f"score_matrix / reference loop speed: {r['score_matrix_vs_reference']:.1f}x (target >= 20 at tiny)   "
            f"score_matrix / our pair_score loop: {r['score_matrix_vs_loop']:.1f}x"
        )
        print(
            f"bf16 / fp32 speed: {r['bf16_vs_fp32']:.2f}x; top-10 lists identical for "
            f"{100 * r['bf16_top10_identical_lists']:.1f}% of captions, top-10 sets overlap "
            f"{100 * r['bf16_top10_set_overlap']:.1f}%; max |bf16 - fp32| = {r['bf16_max_abs_error']:.4f}; "
            f"top-1 is the true match for {100 * r['fp32_true_match_top1']:.1f}% (fp32), "
            f"{100 * r['bf16_true_match_top1']:.1f}% (bf16)"
        )
    for r in train_steps:
        print(
            f"\n== training step, {r['config']} ({r['params'] / 1e6:.2f} M parameters): forward + backward of "
            f"{r['batch']} images of {r['image_size']} px and {r['caption_seconds']:.0f} s captions "
            f"({r['log_mel_frames']} log-mel frames), in-batch MISA loss: {r['seconds_per_step']:.3f} s"
        )
    print(f"\nreproduce: .venv/bin/python bench/bench_matchmap.py {' '.join(argv)}".rstrip())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    parser.add_argument(
        "--only", choices=[*(s.name for s in SHAPES), "train-step"], help="run one section (default: all)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = [bench_shapes(s, args.repeats) for s in SHAPES if args.only in (None, s.name)]
    train_steps = (
        [bench_train_step("tiny", 64, 4.0, args.repeats)] if args.only in (None, "train-step") else []
    )
    report(results, train_steps, argv, load_before)
    if args.json_out:
        payload = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": load_before}
        with open(args.json_out, "w") as f:
            json.dump({**payload, "scoring": results, "train_steps": train_steps}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
