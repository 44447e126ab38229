"""Leave-one-engine-out: how well a model trained on some speech engines recalls images for an engine it never heard.

Needs a corpus spoken by several engines, e.g.::

    .venv/bin/python -m matchmap synth corpus2 --pairs 5000 --val-pairs 1000 --engines espeak,festival

For each held-out engine E (default: every engine of the corpus) and each augmentation setting, one
cell: train a model (``training.train.train``) on the train pairs of the other engines, then
evaluate its final weights (MISA recall@1/5/10, both directions) on

  unheard engine -- val pairs spoken by E;
  in-engine      -- val pairs spoken by the training engines (voices never heard in training).

Both evaluations use the same number of pairs (the smaller of the two, or --eval-pairs), so their
recalls are comparable. The in-engine pairs are also the per-epoch validation of the training run.

--augment-sweep runs the ablation: none, each augmentation alone, all of them. Each cell is a
training run; cells are resumable: a cell whose result.json exists is skipped, and a cell with a
last.pt continues from it. Prints a markdown table and the command that reproduces it; writes
OUT/results.json and, per cell, OUT/<engine>/<augment>/{result.json, cell.json, run/}.

    .venv/bin/python bench/bench_generalization.py --corpus corpus2 --out bench/out/generalization \\
        [--epochs 14] [--max-minutes M] [--augment speed,noise,eq,vtlp,specaugment | --augment-sweep] \\
        [--holdout festival] [--sisa-weight 0.25]

Training options default to `matchmap train`'s (the shipped recipe); the tables in
docs/generalization.md were measured with --sisa-weight 0.25, the default then.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Collection
from pathlib import Path

from encoders import create_model, load_checkpoint
from training.augment import AugmentConfig
from training.evaluate import evaluate
from training.manifest import Manifest, load_manifest
from training.train import TrainConfig, resolve_device, train

DIRECTIONS = ("speech_to_image", "image_to_speech")
KS = (1, 5, 10)


def engines_of(manifest: Manifest) -> list[str]:
    """The engines that spoke ``manifest``'s entries, sorted; ValueError if an entry does not say."""
    unnamed = [e.uttid for e in manifest.entries if not e.engine]
    if unnamed:
        raise ValueError(f"{manifest.path}: {len(unnamed)} entries (e.g. {unnamed[0]}) do not name their speech "
                         "engine; generate the corpus with `matchmap synth OUT --engines espeak,festival`")
    return sorted({e.engine for e in manifest.entries})


def spoken_by(manifest: Manifest, engines: Collection[str], limit: int | None = None) -> Manifest:
    """The entries of ``manifest`` spoken by one of ``engines``; the first ``limit`` of them if given."""
    entries = [e for e in manifest.entries if e.engine in engines]
    return dataclasses.replace(manifest, entries=entries[:limit])


def augment_settings(sweep: bool, augment: str) -> dict[str, str]:
    """label -> augmentation names: the sweep (none, each alone, all), or the one given setting."""
    if not sweep:
        AugmentConfig.from_names(augment)  # fail before any training on an unknown name
        return {augment.replace(",", "+") or "none": augment}
    names = list(AugmentConfig.PRESETS)
    return {"none": "none", **{name: name for name in names}, "all": ",".join(names)}


def misa_recalls(result: dict) -> dict[str, dict[str, float]]:
    """The MISA part of an evaluation result: direction -> {"R@1", "R@5", "R@10"}."""
    return {direction: dict(result["MISA"][direction]) for direction in DIRECTIONS}


def run_cell(cell_dir: Path, cfg: TrainConfig, train_set: Manifest, unheard: Manifest, in_engine: Manifest,
             description: dict, *, progress: bool) -> dict:
    """Train on ``train_set`` (validating on ``in_engine``), evaluate its final weights on both val sets.

    The result is kept in cell_dir/result.json and returned from there next time; a cell directory
    made with other settings (cell.json) is an error, not silently reused.
    """
    result_path, cell_path = cell_dir / "result.json", cell_dir / "cell.json"
    if cell_path.exists() and json.loads(cell_path.read_text()) != description:
        raise SystemExit(f"{cell_dir} holds a cell with other settings (see {cell_path}); "
                         "choose another --out or delete that directory")
    if result_path.exists():
        return json.loads(result_path.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    cell_path.write_text(json.dumps(description, indent=2))
    run_dir = cell_dir / "run"
    last = run_dir / "last.pt"
    started = time.monotonic()
    train(cfg, train_set, in_engine, run_dir, resume=last if last.exists() else None, progress=progress)
    device = resolve_device(cfg.device)
    model = create_model(last).to(device)
    result = {
        **description,
        "epochs_run": load_checkpoint(last)["epoch"],
        "train_seconds": round(time.monotonic() - started, 1),
        "unheard_engine": {"pairs": len(unheard), "MISA": misa_recalls(
            evaluate(model, unheard, batch_size=cfg.batch_size, device=device, progress=False))},
        "in_engine": {"pairs": len(in_engine), "MISA": misa_recalls(
            evaluate(model, in_engine, batch_size=cfg.batch_size, device=device, progress=False))},
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def recall_cell(recalls: dict[str, float]) -> str:
    return " / ".join(f"{recalls[f'R@{k}']:.2f}" for k in KS)


def markdown_table(cells: list[dict]) -> str:
    """One row per (held-out engine, augmentation): MISA R@1 / R@5 / R@10 on both val sets, both directions."""
    lines = [
        "| held out | augment | train pairs | eval pairs | unheard engine: speech->image | unheard engine: image->speech "
        "| in-engine: speech->image | in-engine: image->speech |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        unheard, in_engine = cell["unheard_engine"]["MISA"], cell["in_engine"]["MISA"]
        lines.append(f"| {cell['heldout']} | {cell['augment_label']} | {cell['train_pairs']} "
                     f"| {cell['unheard_engine']['pairs']} | {recall_cell(unheard['speech_to_image'])} "
                     f"| {recall_cell(unheard['image_to_speech'])} | {recall_cell(in_engine['speech_to_image'])} "
                     f"| {recall_cell(in_engine['image_to_speech'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory with train.json and val.json")
    parser.add_argument("--out", type=Path, default=Path("bench/out/generalization"), help="results directory")
    parser.add_argument("--holdout", default=None, help="comma-separated engines to hold out (default: all)")
    parser.add_argument("--augment", default=TrainConfig.augment,
                        help=f"augmentations of every cell (default {TrainConfig.augment!r}; 'none' for none)")
    parser.add_argument("--augment-sweep", action="store_true",
                        help="ablation: none, each augmentation alone, all (overrides --augment)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of each training run")
    parser.add_argument("--config", default=TrainConfig.model, help="model config (see `matchmap models`)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="see `matchmap train --help`")
    parser.add_argument("--sisa-weight", type=float, default=TrainConfig.sisa_weight)
    parser.add_argument("--eval-pairs", type=int, default=None,
                        help="pairs in each evaluation (default: as many as the smaller val set has)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--bucket-by-length", action=argparse.BooleanOptionalAction,
                        default=TrainConfig.bucket_by_length, help="see `matchmap train --help`")
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                        help="validate every N-th epoch (and always the last)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    train_manifest = load_manifest(args.corpus / "train.json")
    val_manifest = load_manifest(args.corpus / "val.json")
    engines = engines_of(train_manifest)
    if len(engines) < 2:
        raise SystemExit(f"{args.corpus} is spoken by {engines} only; leave-one-engine-out needs two engines or more "
                         "(`matchmap synth OUT --engines espeak,festival`)")
    holdout = args.holdout.split(",") if args.holdout else engines
    unknown = sorted(set(holdout) - set(engines))
    if unknown:
        raise SystemExit(f"--holdout {unknown}: not engines of {args.corpus} (it has {', '.join(engines)})")
    settings = augment_settings(args.augment_sweep, args.augment)

    load_before = os.getloadavg()[0]
    cells = []
    for heldout in holdout:
        heard = [e for e in engines if e != heldout]
        n = min(len(spoken_by(val_manifest, [heldout])), len(spoken_by(val_manifest, heard)),
                args.eval_pairs or sys.maxsize)
        if n < 10:
            raise SystemExit(f"held out {heldout}: only {n} val pairs to evaluate on; generate more --val-pairs")
        unheard, in_engine = spoken_by(val_manifest, [heldout], n), spoken_by(val_manifest, heard, n)
        train_set = spoken_by(train_manifest, heard)
        for label, augment in settings.items():
            cfg = TrainConfig(model=args.config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              augment=augment, seed=args.seed, max_minutes=args.max_minutes, device=args.device,
                              num_workers=args.workers, precision=args.precision, sisa_weight=args.sisa_weight,
                              bucket_by_length=args.bucket_by_length, eval_every=args.eval_every)
            description = {"heldout": heldout, "train_engines": heard,
                           "augment_label": label, "train_pairs": len(train_set), "corpus": str(args.corpus.absolute()),
                           "train_config": dataclasses.asdict(cfg)}
            print(f"cell: hold out {heldout}, augment {label} ({len(train_set)} train pairs, {n} eval pairs each)",
                  flush=True)
            cells.append(run_cell(args.out / heldout / label, cfg, train_set, unheard, in_engine, description,
                                  progress=not args.quiet))

    command = "  .venv/bin/python bench/bench_generalization.py " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command.strip(), "cells": cells}, indent=2))
    print(f"\nMISA recall R@1 / R@5 / R@10 (load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f})\n")
    print(markdown_table(cells))
    print(f"\nwrote {args.out / 'results.json'}\nreproduce:\n{command}")


if __name__ == "__main__":
    main()
