"""Subcommands of the training package, mounted lazily by ``matchmap.cli``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from matchmap.options import checkpoint_option, device_option, exit_codes, quiet_option

# DistillConfig's defaults, repeated here so that --help imports no torch (a test keeps them equal).
DISTILL_DEFAULTS = {"heads": 4, "epochs": 30, "batch_size": 128, "lr": 3e-3, "teacher_temperature": 0.1,
                    "holdout": 0.1, "seed": 0}


@click.command("synth", epilog=exit_codes(
    "0  the corpus was written",
    "1  it could not be: OUT already holds a corpus (see --force), a speech engine",
    "   is missing or failed, or OUT is not writable (the message says which)",
    "2  usage error (a bad option value)",
))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pairs", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Training pairs (image + spoken caption) to generate.")
@click.option("--val-pairs", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Validation pairs, spoken by voices that never occur in training.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed writes byte-identical files.")
@click.option("--engines", default="espeak", show_default=True, metavar="NAME[,NAME...]",
              help="Comma-separated speech engines; each pair draws one. Engines: espeak (espeak-ng), "
                   "festival (diphone and HTS voices), flite (clustergen and diphone voices).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: all CPU cores). The corpus does not depend on it.")
@click.option("--force", is_flag=True, help="Replace a corpus that already exists in OUT.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help='Print {"train", "val", "pairs", "val_pairs"} as JSON.')
@click.option("--world", type=click.Choice(["shapes", "objects"]), default="shapes", show_default=True,
              help="shapes: colored shapes, one caption per image. objects: everyday things (`matchmap "
                   "vocabulary`) and shapes, several captions per image; --pairs and --val-pairs count images.")
@click.option("--captions", default="2-5", show_default=True, metavar="MIN-MAX",
              help="Objects world: spoken captions per image, each by another voice.")
@click.option("--objects", "objects_range", default="1-4", show_default=True, metavar="MIN-MAX",
              help="Objects world: objects per image (1-1: one-object scenes).")
def synth(out: Path, pairs: int, val_pairs: int, seed: int, engines: str, workers: int | None, force: bool,
          quiet: bool, as_json: bool, world: str, captions: str, objects_range: str) -> None:
    """Generate the spoken-scenes corpus in OUT.

    Each pair is a 256x256 image of 1-3 colored shapes on a textured background and a spoken
    caption naming them (16 kHz wav), with ground truth: word timings, object boxes, background.
    With --world objects, each image holds 1-4 everyday things (emoji) or shapes and has 2-5
    captions; each object's ground truth adds its category and the words that name it.

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
        ranges = {name: _min_max(value, name) for name, value in (("captions", captions), ("objects", objects_range))}
        train_path, val_path = synthesize_corpus(out, pairs=pairs, val_pairs=val_pairs, seed=seed, engines=names,
                                                 workers=workers, progress=not quiet, overwrite=force, world=world,
                                                 **ranges)
    except (CorpusExistsError, SpeechEngineError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    unit = "images" if world == "objects" else "pairs"
    if as_json:
        import json

        click.echo(json.dumps({"train": str(train_path), "val": str(val_path), "pairs": pairs,
                               "val_pairs": val_pairs, "world": world}, indent=2))
    else:
        click.echo(f"wrote {pairs} {unit} to {train_path} and {val_pairs} {unit} to {val_path}")


def _min_max(value: str, name: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--{name} must be MIN-MAX (e.g. 2-5) or N, got {value!r}") from None


@click.command("vocabulary", epilog=exit_codes(
    "0  the vocabulary was printed",
    "2  usage error",
))
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"codepoint": "1F415", "names": ["dog"], "group": "animals"} '
                   '("codepoint": null for the geometric shapes).')
def vocabulary(as_json: bool) -> None:
    """The object vocabulary of the objects world (`synth --world objects`).

    One category per emoji of Noto Color Emoji that depicts a concrete, nameable thing, plus the
    eight geometric shapes of the shapes world. Each has a group and spoken names, the first being
    what a person says; captions use the first. Other tools read the --json form: it is stable.
    """
    import json
    from collections import Counter

    from training.vocabulary import load_vocabulary

    categories = load_vocabulary()
    if as_json:
        click.echo(json.dumps([c.to_json() for c in categories], ensure_ascii=False))
        return
    for c in categories:
        click.echo(f"{c.codepoint or '-':<6} {c.group:<11} {', '.join(c.names)}")
    counts = Counter(c.group for c in categories)
    click.echo(f"{len(categories)} categories: " + ", ".join(f"{n} {g}" for g, n in counts.items()))


def _load_manifest_or_exit(path: str, skip_bad: bool):
    from training.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path, skip_bad=skip_bad)
    except (ManifestError, OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: {exc}") from exc


def _load_manifests_or_exit(paths: tuple[str, ...], skip_bad: bool):
    """The manifests at ``paths`` as one (``training.manifest.combine_manifests``)."""
    from training.manifest import combine_manifests

    return combine_manifests([_load_manifest_or_exit(path, skip_bad) for path in paths])


@click.command(context_settings={"show_default": True}, epilog=exit_codes(
    "0  trained (under torchrun: this process's share finished)",
    "1  a manifest, --checkpoint or --resume could not be read, or training failed",
    "2  usage error (a missing or bad option)",
))
@click.option("--train", "train_paths", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Training manifest (Places JSON), e.g. corpus/train.json. Give --train again to train on "
                   "several corpora as one (e.g. both worlds, so that learning one does not forget the other).")
@click.option("--val", "val_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Validation manifest, evaluated after every epoch (its voices should be unheard).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: last.pt, best.pt, metrics.jsonl, learning_curves.png, summary.json.")
@click.option("--config", "model", default="tiny",
              help="Model config from `matchmap models` to train from scratch (a checkpoint path here works "
                   "like --checkpoint).")
@checkpoint_option("Fine-tune this checkpoint instead of training a fresh --config model.")
@click.option("--loss", type=click.Choice(["infonce", "margin"]), default="infonce",
              help="infonce: symmetric softmax over the in-batch matrix; margin: the paper's sampled margin ranking.")
@click.option("--epochs", type=click.IntRange(min=1), default=18,
              help="Passes over the training manifest.")
@click.option("--batch-size", type=int, default=64, help="Pairs per step (per process under torchrun).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              help="Peak learning rate of AdamW (reached after 100 warm-up steps, then a cosine decay to 0).")
@click.option("--image-lr-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="The image branch's learning rate as a multiple of --lr: below 1 keeps more of a pretrained "
                   "branch (`matchmap pretrain-images`), 0 freezes it (only the audio branch learns; faster steps).")
@click.option("--sisa-weight", type=float, default=0.5,
              help="Weight of the same loss on SISA scores (trains the masked-mean pooled vectors, stage 1's "
                   "without distilled heads; a fine-tuned checkpoint's heads are dropped).")
@click.option("--augment", default="speed,noise,vtlp,specaugment",
              help="Comma-separated: speed, noise, reverb, eq, vtlp, specaugment; or none. The default is "
                   "the shipped model's set: what paid on unheard engines and noisy recordings (docs/model.md).")
@click.option("--tagger", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A `matchmap pretrain-images` run's last.pt: it tags every training image, and the audio "
                   "branch also learns to predict those tags from the speech alone (visually grounded keyword "
                   "targets; no transcript is read). Resume such a run with the same --tagger.")
@click.option("--tag-weight", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --tagger: the weight of the tag loss beside the matchmap loss.")
@click.option("--seed", type=int, default=0,
              help="Seed of initialization, batch order and augmentation: the same seed repeats a run.")
@click.option("--max-minutes", type=float, default=None, help="Stop after the epoch that crosses this wall-clock budget.")
@click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate on --val after every N-th epoch (and always after the last): evaluation time "
                   "goes to training instead.")
@device_option("training")
@click.option("--workers", type=int, default=0, help="DataLoader worker processes.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: run forward passes under bfloat16 autocast (much faster on CPUs with AVX512-BF16 "
                   "or AMX, and on GPUs; much slower on CPUs without them, which get a warning); weights, "
                   "optimizer and evaluation stay float32.")
@click.option("--bucket-by-length/--no-bucket-by-length", default=False, show_default=True,
              help="Batch captions of similar length together: about 25% faster steps (less padding), but "
                   "a caption's in-batch negatives then say about as much as it does, and recall suffers "
                   "(docs/model.md); random batches are the default.")
@click.option("--audio-length-groups", type=click.IntRange(min=1), default=4, show_default=True,
              help="Run each batch's captions through the audio branch as this many groups of similar "
                   "length, each padded only to its own longest: the same loss and gradients as one padded "
                   "batch, less padding to convolve (speed only; 1 = one padded batch).")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue a run exactly from its last.pt.")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) manifest entries with missing or unreadable files.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON (and no progress bars).")
def train(train_paths, val_path, out_dir, model, checkpoint, loss, epochs, batch_size, lr, image_lr_scale, sisa_weight,
          augment, tagger, tag_weight, seed, max_minutes, eval_every, device, workers, precision, bucket_by_length,
          audio_length_groups, resume, skip_bad, quiet, as_json):
    """Train a matchmap model on spoken captions and their images.

    Evaluates recall@1/5/10 on --val after every epoch (or every --eval-every epochs), keeps the best
    checkpoint by mean MISA R@10 and draws learning curves. Launch with `torchrun --nproc_per_node N -m matchmap train ...` for
    DistributedDataParallel (gloo on CPU, NCCL on GPUs).
    """
    import json

    from training.plots import plot_learning_curves
    from training.train import TrainConfig
    from training.train import train as run_training

    if checkpoint is not None:
        if click.get_current_context().get_parameter_source("model") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("give --config (train from scratch) or --checkpoint (fine-tune), not both")
        model = str(checkpoint)
    cfg = TrainConfig(model=model, loss=loss, epochs=epochs, batch_size=batch_size, lr=lr,
                      image_lr_scale=image_lr_scale, sisa_weight=sisa_weight,
                      augment=augment, tagger=tagger, tag_weight=tag_weight, seed=seed, max_minutes=max_minutes, device=device, num_workers=workers,
                      bucket_by_length=bucket_by_length, precision=precision, eval_every=eval_every,
                      audio_length_groups=audio_length_groups)
    from encoders.precision import bf16_training_warning

    if warning := bf16_training_warning(precision, device):
        click.echo(warning, err=True)
    train_manifest = _load_manifests_or_exit(train_paths, skip_bad)
    val_manifest = _load_manifest_or_exit(val_path, skip_bad)
    try:
        summary = run_training(cfg, train_manifest, val_manifest, out_dir, resume=resume,
                               progress=not (quiet or as_json))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if summary:  # rank 0
        plot_learning_curves([out_dir], Path(out_dir) / "learning_curves.png")
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            click.echo(f"best mean MISA R@10 {summary['best_mean_r10']:.3f}; checkpoints in {out_dir}")


@click.command("pretrain-images", context_settings={"show_default": True}, epilog=exit_codes(
    "0  pretrained: OUT/model.pt is ready for `matchmap train --checkpoint OUT/model.pt`",
    "1  --resume could not be read, or pretraining failed (the message says which)",
    "2  usage error (a bad option value)",
))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: model.pt (to train from), last.pt (to resume), metrics.jsonl, summary.json.")
@click.option("--config", "model", default="tiny", help="Model config from `matchmap models`.")
@click.option("--scenes", type=click.IntRange(min=1), default=20_000,
              help="Objects-world scenes rendered for training (no speech: rendering only).")
@click.option("--val-scenes", type=click.IntRange(min=1), default=500, help="Scenes rendered for validation.")
@click.option("--objects", "objects_range", default="1-4", metavar="MIN-MAX", help="Objects per scene.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, help="Passes over the rendered scenes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Scenes per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
              help="Peak learning rate of AdamW (100 warm-up steps, then a cosine decay to 0).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the scenes, initialization and batch order.")
@click.option("--objective", type=click.Choice(["softmax", "bce"]), default="softmax",
              help="softmax: cross-entropy over categories, a scene's categories weighted equally; bce: binary "
                   "cross-entropy per category (slow to leave the say-nothing plateau with hundreds of categories).")
@click.option("--max-minutes", type=float, default=None, help="Stop after the epoch that crosses this wall-clock budget.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes rendering scenes (default: all CPU cores); the scenes do not depend on it.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue a run exactly from its last.pt.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON (and no progress bars).")
def pretrain_images(out_dir, model, scenes, val_scenes, objects_range, epochs, batch_size, lr, seed, objective,
                    max_minutes, workers, resume, quiet, as_json):
    """Pretrain the image branch to name the objects-world categories in rendered scenes.

    The stand-in for the paper's ImageNet-pretrained VGG16: the scene generator knows what it drew,
    so the image branch learns which categories each scene holds (a per-region classifier pooled
    over regions), with no speech and no captions. Validation reports R-precision (a scene's
    categories among its top-scored ones) and pointing (a category's best region inside its box).
    Then train the whole model from it:

    \b
      matchmap pretrain-images --out pre
      matchmap train --checkpoint pre/model.pt --train corpus/train.json --val corpus/val.json --out run
    """
    import json

    from training.pretrain_images import PretrainConfig, pretrain

    try:
        cfg = PretrainConfig(model=model, scenes=scenes, val_scenes=val_scenes, objects=_min_max(objects_range, "objects"),
                             epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_minutes=max_minutes,
                             objective=objective)
        summary = pretrain(cfg, out_dir, resume=resume, workers=workers, progress=not (quiet or as_json))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        val = summary["val"]
        click.echo(f"R-precision {val['r_precision']:.3f}, pointing {val['pointing']:.3f}; "
                   f"train from {summary['model']}")


@click.command("eval", context_settings={"show_default": True}, epilog=exit_codes(
    "0  evaluated",
    "1  the manifest or --checkpoint could not be read, or (with --server) the service failed",
    "2  usage error (a missing or bad option)",
    "3  with --server: no server answers at HOST:PORT",
))
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@checkpoint_option()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (recall as fractions 0..1).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Pairs per forward pass.")
@device_option()
@click.option("--skip-bad", is_flag=True, help="Skip (and count) entries with missing or unreadable files.")
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Evaluate through a live search service instead (speech_to_image recall only).")
@click.option("--collection", default=None, help="With --server: the collection holding the manifest's images.")
@click.option("--index-first", is_flag=True,
              help="With --server: index the manifest's images into --collection first (with --checkpoint, "
                   "which must be the server's model).")
@click.option("--data-dir", default=None, help="With --index-first: the server's data directory.")
@click.option("--token", envvar="MATCHMAP_TOKEN", default=None, help="With --server: bearer token.")
@quiet_option
def evaluate(manifest, checkpoint, as_json, batch_size, device, skip_bad, server, collection, index_first,
             data_dir, token, quiet):
    """Recall@1/5/10 in both directions for MISA, SISA and SIMA on MANIFEST (and STAGE1, the
    stage-1 vectors of a model with distilled heads: `matchmap distill-stage1`).

    speech_to_image: each spoken caption retrieves its image among all images of the manifest;
    image_to_speech: the reverse. With --server, the captions are sent to a running search
    service and its ranking is measured (speech_to_image only).
    """
    import json

    if server:
        from search.remote_eval import remote_recall

        if not collection:
            raise click.UsageError("--server needs --collection (the collection that holds the manifest's images)")
        from search.client import SearchServiceError, ServerUnreachable

        try:
            result = remote_recall(server, manifest, collection, token=token, index_first=index_first,
                                   data_dir=data_dir, checkpoint=checkpoint)
        except ServerUnreachable as exc:
            click.echo(f"matchmap eval: cannot reach a server at {server}: {exc.details}", err=True)
            sys.exit(3)
        except (SearchServiceError, OSError, ValueError) as exc:
            raise click.ClickException(f"{manifest}: {exc}") from exc
        click.echo(json.dumps(result, indent=2) if as_json else
                   "\n".join(f"speech_to_image {k}: {v:.3f}" for k, v in result["MISA"]["speech_to_image"].items()))
        return

    from encoders import create_model
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table
    from training.train import resolve_device

    loaded = _load_manifest_or_exit(manifest, skip_bad)
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        from encoders.precision import use_exact_float32

        use_exact_float32()  # evaluation on CUDA in exact float32 (encoders/precision.py)
    try:
        model = create_model(str(checkpoint) if checkpoint else None).to(torch_device)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = run_evaluation(model, loaded, batch_size=batch_size, device=torch_device,
                            progress=not (quiet or as_json))
    click.echo(json.dumps(result) if as_json else format_table(result))


@click.command("discover", context_settings={"show_default": True}, epilog=exit_codes(
    "0  the report was written",
    "1  the manifest or --checkpoint could not be read, or the manifest has no word timings",
    "2  usage error (a missing or bad option)",
))
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@checkpoint_option()
@click.option("--clusters", type=click.IntRange(min=2), required=True, help="k of the k-means over grounded segments.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report directory: index.html, summary.json, segments.json, cluster_<id>.png.")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              help="Share of all grounding peaks kept as segments (the most strongly grounded).")
@click.option("--half-width", type=click.IntRange(min=0), default=0,
              help="Audio frames either side of a peak in its segment (0 = the peak frame alone, measured best).")
@click.option("--image-weight", type=click.FloatRange(min=0), default=0.0,
              help="Weight of the grounded image region beside the pooled audio in the clustered features "
                   "(0 = audio alone: purer word clusters, bench/bench_discovery.py).")
@click.option("--max-pairs", type=click.IntRange(min=1), default=None, help="Use only the manifest's first N pairs.")
@click.option("--seed", type=int, default=0, help="k-means seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Pairs per forward pass.")
@device_option()
@click.option("--skip-bad", is_flag=True, help="Skip (and count) entries with missing or unreadable files.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def discover(manifest, checkpoint, clusters, out_dir, keep, half_width, image_weight, max_pairs, seed, batch_size,
             device, skip_bad, quiet, as_json):
    """Audio-visual concept discovery on MANIFEST, as in the paper.

    Finds speech segments that ground strongly in their images (peaks over time of each frame's best
    matchmap value), pools their audio frames and the image region they ground in, clusters them
    with faiss k-means, and names each cluster by the transcript word its segments overlap most
    (needs the manifest's 'words'). The report lists every cluster with its word, purity, size and
    example image patches; the summary gives mean purity and how many of the 8 shapes and 8 colors
    name a cluster.
    """
    import json

    from encoders import create_model
    from training.grounding import discover_concepts, write_report
    from training.train import resolve_device

    loaded = _load_manifest_or_exit(manifest, skip_bad)
    if not any(entry.words for entry in loaded.entries):
        raise click.ClickException(f"{manifest}: no entry has word timings ('words'); clusters could not be named")
    try:
        model = create_model(str(checkpoint) if checkpoint else None).to(resolve_device(device))
        discovery = discover_concepts(model, loaded, clusters, keep=keep, half_width=half_width,
                                      image_weight=image_weight, batch_size=batch_size, limit=max_pairs, seed=seed,
                                      progress=not (quiet or as_json))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    index = write_report(discovery, loaded, out_dir)
    s = discovery.summary
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        click.echo(f"{s['segments']} segments from {s['pairs']} pairs in {s['clusters']} clusters: mean purity "
                   f"{s['mean_purity']:.3f}, shapes named {s['shapes_found']}/8, colors {s['colors_found']}/8; "
                   f"report: {index}")


@click.command("distill-stage1", context_settings={"show_default": True}, epilog=exit_codes(
    "0  the checkpoint with stage-1 heads was written to --out",
    "1  the manifest or --checkpoint could not be read, or distillation failed",
    "2  usage error (a missing or bad option)",
))
@checkpoint_option("The trained model whose stage-1 heads to distil [default: the shipped default model].")
@click.option("--train", "train_paths", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Manifest whose images and captions teach the heads (e.g. the model's corpus/train.json); "
                   "give --train again for several corpora.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model with its heads (encoder weights unchanged; a new model version).")
@click.option("--heads", type=click.IntRange(min=1), default=DISTILL_DEFAULTS["heads"],
              help="Attention heads of each stage-1 pooling (image and audio).")
@click.option("--epochs", type=click.IntRange(min=1), default=DISTILL_DEFAULTS["epochs"],
              help="Passes over the manifest's captions.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DISTILL_DEFAULTS["batch_size"],
              help="Captions per step; each is scored against every training image.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DISTILL_DEFAULTS["lr"],
              help="Peak learning rate (AdamW, one-cycle schedule).")
@click.option("--teacher-temperature", type=click.FloatRange(min=0, min_open=True),
              default=DISTILL_DEFAULTS["teacher_temperature"],
              help="Softmax temperature of the MISA targets, in units of each caption's score spread "
                   "(smaller: only MISA's very top counts).")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=DISTILL_DEFAULTS["holdout"],
              help="Share of the images (with their captions) held out to report agreement with MISA.")
@click.option("--seed", type=int, default=DISTILL_DEFAULTS["seed"], help="Seed of the hold-out draw, init and order.")
@device_option("encoding")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) manifest entries with missing or unreadable files.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (and no progress bars).")
def distill_stage1(checkpoint, train_paths, out, heads, epochs, batch_size, lr, teacher_temperature, holdout, seed,
                   device, skip_bad, quiet, as_json):
    """Train a model's stage-1 pooling heads to rank images as MISA does.

    Search finds candidates by one inner product per image (stage 1) and re-ranks them by MISA
    (stage 2). Masked-mean vectors make stage 1 SISA, which misses much of MISA's top 10 unless
    thousands of candidates go on. This runs the frozen encoders over --train once, scores every
    caption against every image by MISA, and fits small pooling heads so that their inner product
    ranks as MISA does (a listwise KL loss). The checkpoint written to --out is the same model plus the
    heads: index and serve with it (collections indexed with the old model must be re-indexed; the
    service reports them as built with another model). Reports, on held-out images and captions, how
    much of MISA's top 10 the stage-1 top 1 % and 4 % hold, with masked means and with the heads.
    """
    import json

    from encoders import default_checkpoint_path
    from training.distill import DistillConfig, distill_checkpoint
    from training.train import resolve_device

    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        from encoders.precision import use_exact_float32

        use_exact_float32()  # the teacher's maps as search computes them (encoders/precision.py)
    manifest = _load_manifests_or_exit(train_paths, skip_bad)
    cfg = DistillConfig(heads=heads, epochs=epochs, batch_size=batch_size, lr=lr, teacher_temperature=teacher_temperature,
                        holdout=holdout, seed=seed, device=str(torch_device))
    source = checkpoint or default_checkpoint_path()
    try:
        summary = distill_checkpoint(source, manifest, out, cfg, progress=not (quiet or as_json))
    except (FileNotFoundError, ValueError, FloatingPointError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    held = summary["held_out_agreement"]
    for k in held["distilled"]:
        click.echo(f"held-out share of MISA's top 10 in the stage-1 {k.replace('top', 'top ')}: masked means "
                   f"{held['masked_mean'][k]:.3f}, distilled heads {held['distilled'][k]:.3f}")
    click.echo(f"wrote {out} (model {summary['version']}, from {summary['source_version']}) in "
               f"{summary['encode_seconds'] + summary['teacher_seconds'] + summary['train_seconds']:.0f} s")
