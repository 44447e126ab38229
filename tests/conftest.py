"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synth import synthesize_corpus

TINY_TRAIN_PAIRS = 24
TINY_VAL_PAIRS = 12


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spoken-scenes corpus of 24 train + 12 val pairs (seed 0), generated once per test session.

    Returns the directory holding train.json, val.json, images/ and audio/. Treat it as read-only:
    other tests share it.
    """
    out = tmp_path_factory.mktemp("tiny_corpus")
    synthesize_corpus(out, pairs=TINY_TRAIN_PAIRS, val_pairs=TINY_VAL_PAIRS, seed=0, workers=1, progress=False)
    return out
