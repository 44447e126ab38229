"""The ``matchmap`` command: a thin root group that mounts each package's subcommands lazily.

Each package owns its subcommands in its own ``cli.py``. The root imports none of them until a
subcommand is actually invoked, so ``matchmap --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib

import click

# subcommand -> ("module:attribute", one-line help shown by `matchmap --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.cli:synth", "Generate the spoken-scenes corpus (images + spoken captions)."),
    "vocabulary": ("training.cli:vocabulary", "The objects world's vocabulary: categories and spoken names."),
    "models": ("encoders.cli:models", "List the registered model configs."),
    "pretrain-images": ("training.cli:pretrain_images", "Pretrain the image branch on rendered, labelled scenes."),
    "train": ("training.cli:train", "Train a matchmap model on Places-format manifests."),
    "distill-stage1": ("training.cli:distill_stage1", "Train a model's stage-1 heads to rank as MISA does."),
    "eval": ("training.cli:evaluate", "Recall@1/5/10 (SISA, MISA, SIMA) on a manifest."),
    "index": ("indexer.cli:index", "Index image folders, globs or a manifest into a collection."),
    "collections": ("indexer.cli:collections", "List indexed collections."),
    "remove": ("indexer.cli:remove", "Remove a collection or some of its images."),
    "serve": ("search.cli:serve", "Run the gRPC spoken-query search service."),
    "query": ("search.cli:query", "Search a collection by speaking: send audio files to a server."),
    "localize": ("search.cli:localize", "Heatmaps of where spoken words land in an image."),
    "discover": ("training.cli:discover", "Audio-visual concept discovery report."),
    "highlight": ("search.cli:highlight", "Stream speech to the server; render live highlights."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[name]
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table above, so listing commands imports nothing.
        rows = [(name, short) for name, (_, short) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="matchmap")
def main() -> None:
    """matchmap: search images by speaking.

    \b
    First steps:
      matchmap synth corpus --pairs 200 --val-pairs 100   # a small spoken-scenes corpus
      matchmap index --collection demo corpus/val.json    # index its images (shipped model)
      matchmap serve &                                    # start the search service
      matchmap query --collection demo some_caption.wav   # speak, get images

    Every command takes --help (it lists the exit codes). Commands that need a model use the
    shipped default model unless --checkpoint FILE is given, on --device auto (CUDA when
    available); -q silences progress bars and --json prints one JSON document. Data lives in
    $MATCHMAP_DATA_DIR (default ~/.local/share/matchmap) unless --data-dir is given; only
    `index` creates a data dir that does not exist yet.
    """
