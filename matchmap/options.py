"""Options that mean the same on every command, spelled once: ``--checkpoint FILE``, ``--device``,
``--quiet/-q``. Imports only click, so help stays instant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

DEVICES = ("auto", "cpu", "cuda")


class HiddenAliasOption(click.Option):
    """An option that also accepts old spellings (``hidden_aliases``) without listing them in --help."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = set(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [o for o in shown if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


# --no-progress was index's spelling before every command took --quiet; it still works.
quiet_option = click.option(
    "--quiet", "-q", "--no-progress", "quiet", cls=HiddenAliasOption, hidden_aliases=("--no-progress",),
    is_flag=True, help="No progress bars on stderr.",
)


def device_option(what: str = "the model") -> Callable:
    return click.option(
        "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
        help=f"Where {what} runs: auto = CUDA when torch sees a GPU, else the CPU.",
    )


def checkpoint_option(help: str = "Model checkpoint [default: the shipped default model].") -> Callable:
    return click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                        default=None, help=help)


def exit_codes(*lines: str) -> str:
    """The ``Exit codes:`` epilog every command's --help ends with: one "N  meaning" line each."""
    return "\b\nExit codes:\n" + "\n".join(f"  {line}" for line in lines)
