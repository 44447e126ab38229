"""Every script in bench/ still imports and has its ``main``: the benches share helpers (bench_search's
corpus_inputs, cached_exhaustive_top10, collection_arguments) and import the engine's internals, so a
change elsewhere can break one silently until someone next measures with it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_a_bench_script_imports_and_has_a_main(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/<script>.py` puts its folder first
    spec = importlib.util.spec_from_file_location(f"bench_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
