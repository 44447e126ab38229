"""The `matchmap` root command: every subcommand is mounted, and help answers without torch."""

from __future__ import annotations

import subprocess
import sys

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
