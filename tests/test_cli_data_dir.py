"""A data dir that does not exist: reading commands refuse it, `index` creates it, and a first run on
the built-in default (~/.local/share/matchmap) finds no collections yet instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def matchmap(*args: str, home: Path, data_dir_env: str | None = None, timeout: float = 180):
    """Run the real `matchmap` command with HOME (and so the default data dir) under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MATCHMAP_DATA_DIR", "MATCHMAP_DB_URL")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    if data_dir_env is not None:
        env["MATCHMAP_DATA_DIR"] = data_dir_env
    return subprocess.run([sys.executable, "-m", "matchmap", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [["collections"], ["collections", "--json"], ["remove", "--collection", "c"]])
def test_reading_commands_refuse_a_missing_data_dir_and_create_nothing(tmp_path, command):
    missing = tmp_path / "typo" / "data"
    run = matchmap(*command, "--data-dir", str(missing), home=tmp_path)
    assert run.returncode == 2, run.stderr
    assert str(missing) in run.stderr and "does not exist" in run.stderr and "--data-dir" in run.stderr
    assert run.stdout == ""
    assert not (tmp_path / "typo").exists()


def test_a_missing_data_dir_from_the_environment_is_refused_too(tmp_path):
    missing = tmp_path / "nowhere"
    run = matchmap("collections", home=tmp_path, data_dir_env=str(missing))
    assert run.returncode == 2
    assert str(missing) in run.stderr and "$MATCHMAP_DATA_DIR" in run.stderr
    assert not missing.exists()


def test_serve_refuses_a_missing_data_dir_before_listening(tmp_path, checkpoint):
    missing = tmp_path / "typo"
    run = matchmap("serve", "--data-dir", str(missing), "--checkpoint", str(checkpoint), "--device", "cpu",
                   "--host", "127.0.0.1", "--port", "0", home=tmp_path)
    assert run.returncode != 0
    assert str(missing) in run.stderr and "does not exist" in run.stderr
    assert "listening" not in run.stderr
    assert not missing.exists()


def test_first_run_on_the_default_data_dir_lists_no_collections(tmp_path):
    run = matchmap("collections", home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("no collections yet")
    assert (tmp_path / ".local" / "share" / "matchmap" / "catalog.sqlite").is_file()  # created for index
    assert matchmap("collections", "--json", home=tmp_path).stdout.strip() == "[]"


def test_index_creates_a_missing_data_dir(tmp_path, checkpoint, tiny_corpus):
    data = tmp_path / "new" / "data"
    image = next((tiny_corpus / "images" / "val").glob("*.png"))
    run = matchmap("index", "--data-dir", str(data), "--checkpoint", str(checkpoint), "--device", "cpu",
                   "--collection", "c", "--json", str(image), home=tmp_path)
    assert run.returncode == 0, run.stderr
    listed = matchmap("collections", "--data-dir", str(data), home=tmp_path)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[:2] == ["c", "1"]
