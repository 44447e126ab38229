"""Subcommands of the training package, mounted lazily by ``matchmap.cli``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pairs", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Training pairs (image + spoken caption) to generate.")
@click.option("--val-pairs", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Validation pairs, spoken by voices that never occur in training.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed writes byte-identical files.")
@click.option("--engines", default="espeak", show_default=True, metavar="NAME[,NAME...]",
              help="Comma-separated speech engines; each pair draws one.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: all CPU cores). The corpus does not depend on it.")
@click.option("--force", is_flag=True, help="Replace a corpus that already exists in OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out: Path, pairs: int, val_pairs: int, seed: int, engines: str, workers: int | None, force: bool,
          quiet: bool) -> None:
    """Generate the spoken-scenes corpus in OUT.

    Each pair is a 256x256 image of 1-3 colored shapes on a textured background and a spoken
    caption naming them (16 kHz wav), with ground truth: word timings, object boxes, background.

    \b
    Writes:
      OUT/train.json, OUT/val.json        Places-format manifests
      OUT/images/{train,val}/*.png
      OUT/audio/{train,val}/*.wav

    An existing corpus in OUT is never overwritten unless --force is given.
    """
    from training.speech import SpeechEngineError
    from training.synth import CorpusExistsError, synthesize_corpus

    names = tuple(name.strip() for name in engines.split(",") if name.strip())
    try:
        train_path, val_path = synthesize_corpus(out, pairs=pairs, val_pairs=val_pairs, seed=seed, engines=names,
                                                 workers=workers, progress=not quiet, overwrite=force)
    except (CorpusExistsError, SpeechEngineError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {pairs} pairs to {train_path} and {val_pairs} pairs to {val_path}")
