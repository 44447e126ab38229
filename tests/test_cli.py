"""The `matchmap` root command: every subcommand is mounted, and help answers without torch."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from matchmap.cli import SUBCOMMANDS, main


def test_root_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys; from click.testing import CliRunner; from matchmap.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); print(r.output); "
            "assert 'torch' not in sys.modules, 'matchmap --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


HEAVY_MODULES = ("torch", "torchaudio", "torchvision", "faiss", "sqlalchemy")


def test_every_subcommand_help_answers_without_importing_torch_faiss_or_sqlalchemy():
    # One fresh interpreter runs `matchmap X --help` for every X in turn and names the first X after
    # which a heavy module is loaded (help must answer instantly, not after seconds of imports).
    code = (
        "import sys; from click.testing import CliRunner; from matchmap.cli import SUBCOMMANDS, main\n"
        "for name in SUBCOMMANDS:\n"
        "    r = CliRunner().invoke(main, [name, '--help'])\n"
        "    assert r.exit_code == 0, (name, r.output)\n"
        f"    heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "    assert not heavy, f'matchmap {name} --help imported {heavy}'\n"
        "print('ok', len(SUBCOMMANDS))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok", str(len(SUBCOMMANDS))]


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_resolves_and_explains_itself(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 5


def test_an_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def _commands():
    ctx = click.Context(main)
    return [(name, main.get_command(ctx, name)) for name in SUBCOMMANDS]


def _options(command):
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_option_has_help_and_every_command_lists_its_exit_codes():
    undocumented = [f"{name} {o.opts[0]}" for name, command in _commands() for o in _options(command)
                    if not (o.help or "").strip()]
    assert not undocumented, f"options without help: {undocumented}"
    for name, _ in _commands():
        text = CliRunner().invoke(main, [name, "--help"]).output
        assert "Exit codes" in text, f"`matchmap {name} --help` does not list its exit codes"
        assert "0 " in text.split("Exit codes")[1][:80], f"`matchmap {name} --help`: exit code 0 is not explained"


# Commands that show progress bars; serve (the readiness line) is the only command without --json.
PROGRESS_COMMANDS = {"synth", "train", "eval", "index", "discover"}


def test_one_spelling_per_idea_across_commands():
    for name, command in _commands():
        by_name = {o.name: o for o in _options(command)}
        if "checkpoint" in by_name:
            assert by_name["checkpoint"].opts == ["--checkpoint"], name
            assert by_name["checkpoint"].make_metavar(click.Context(command)) == "FILE", name
        if "device" in by_name:
            assert by_name["device"].default == "auto", f"matchmap {name} --device defaults to {by_name['device'].default}"
        if name in PROGRESS_COMMANDS:
            assert {"-q", "--quiet"} <= set(by_name["quiet"].opts), f"matchmap {name} lacks --quiet/-q"
        if name != "serve":
            assert "--json" in by_name.get("as_json", click.Option(["--x"])).opts, f"matchmap {name} lacks --json"


def test_no_progress_still_works_on_index_but_help_shows_only_quiet():
    help_text = CliRunner().invoke(main, ["index", "--help"]).output
    assert "-q, --quiet" in help_text and "--no-progress" not in help_text
    # The old spelling parses: a PATH that names nothing fails (exit 2) after options were accepted.
    result = CliRunner().invoke(main, ["index", "--no-progress", "--collection", "c", "/no/such/folder"])
    assert result.exit_code == 2 and "no such file or folder" in result.output
