"""Where a training step's time goes: data, each branch's forward, the all-pairs scores, backward, the
optimizer. One batch at a time in this process (no DataLoader workers), so each part is timed alone.

    python bench/bench_train_step.py --manifest /work/exp/obj18k/train.json --checkpoint /work/exp/pre20k/model.pt

``--length-groups 1 4`` times each batch once per setting of the audio branch's length groups
(``encoders.models.length_sorted_split``; 1 is the padded batch), side by side on the same batches and weights,
and prints the ratios.

Run it on a quiet machine: beside another process on the same cores, OpenMP threads wait on each
other, and small operations (the optimizer, the data pipeline) slow down far more than the
convolutions (docs/model.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoders import create_model  # noqa: E402
from encoders.matchmap import score_matrix  # noqa: E402
from encoders.models import length_sorted_split  # noqa: E402
from training.augment import AugmentConfig  # noqa: E402
from training.data import CaptionedImages, collate  # noqa: E402
from training.losses import make_loss  # noqa: E402
from training.manifest import load_manifest  # noqa: E402
from training.train import PairObjective  # noqa: E402

PARTS = ("data", "image forward", "audio forward", "scores", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="a training manifest (Places JSON)")
    parser.add_argument("--checkpoint", default="tiny", help="a checkpoint or a config name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--augment", default="speed,noise,vtlp,specaugment")
    parser.add_argument("--length-groups", type=int, nargs="+", default=[4],
                        help="audio length groups to compare (1: the padded batch); the first is the baseline")
    args = parser.parse_args()
    command = "python bench/bench_train_step.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    manifest = load_manifest(args.manifest)
    manifest = dataclasses.replace(manifest, entries=manifest.entries[: args.batch_size * (args.steps + 1)])
    model = create_model(args.checkpoint)
    data = CaptionedImages(manifest, model, train=True, augment=AugmentConfig.from_names(args.augment), progress=False)
    objective = PairObjective(model, make_loss("infonce"), 0.5).train()
    optimizer = torch.optim.AdamW(objective.parameters(), 1e-4)
    batches = iter(DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collate))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; torch threads "
          f"{args.threads}; {sum(p.numel() for p in model.parameters()):,} parameters")
    settings = args.length_groups
    times = {g: {part: [] for part in PARTS} for g in settings}
    padding = {g: [] for g in settings}
    for step in range(args.steps + 1):
        started = time.perf_counter()
        batch = next(batches)
        data_seconds = time.perf_counter() - started
        for g in settings:  # the same batch and weights for each setting; one optimizer step after the last
            marks = [time.perf_counter() - data_seconds, time.perf_counter()]
            images = model.encode_images(batch.images)
            marks.append(time.perf_counter())
            audio, lengths = model.encode_audio(batch.logmel, batch.lengths, length_groups=g)
            marks.append(time.perf_counter())
            scores = score_matrix(audio, lengths, images, kinds=("misa", "sisa"))
            loss = objective.loss(scores["misa"]) + 0.5 * objective.sisa_loss(scores["sisa"])
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            if g != settings[-1]:
                optimizer.zero_grad(set_to_none=True)
            if step > 0:  # the first step warms up allocators and kernels
                for part, start, end in zip(PARTS, marks, marks[1:], strict=False):  # all but the optimizer
                    times[g][part].append(end - start)
            parts = length_sorted_split(batch.lengths, g) or [torch.arange(len(batch.lengths))]
            padding[g].append(sum(len(p) * int(batch.lengths[p].max()) for p in parts) / int(batch.lengths.sum()))
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # counted for every setting
            for g in settings:
                times[g]["optimizer"].append(time.perf_counter() - started)
        print(f"  step {step}: audio {tuple(audio.shape)}, log-mel {tuple(batch.logmel.shape)}", flush=True)
    baseline = None
    for g in settings:
        medians = {part: statistics.median(t) for part, t in times[g].items()}
        compute = sum(v for k, v in medians.items() if k != "data")
        baseline = baseline or compute
        print(f"length groups {g}: median seconds per step of {args.batch_size} ({args.steps} steps); frames "
              f"convolved / true frames {statistics.mean(padding[g]):.2f}")
        for part, value in medians.items():
            print(f"  {part:<14} {value:6.3f}" + ("" if part == "data" else f"  ({100 * value / compute:4.1f} % of compute)"))
        print(f"  compute {compute:.3f} s ({baseline / compute:.2f}x the first setting): {args.batch_size / compute:.1f} "
              f"samples/s with data in a worker, {args.batch_size / (compute + medians['data']):.1f} without")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; reproduce: {command}")


if __name__ == "__main__":
    main()
