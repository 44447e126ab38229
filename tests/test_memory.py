"""search.memory: the heap trimmer that keeps `matchmap serve`'s resident memory flat."""

from __future__ import annotations

import time

import psutil
import pytest

from search.memory import HeapTrimmer, release_free_memory


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _fragment_heap(blocks: int = 60_000, size: int = 1000) -> bytes:
    """Allocate ``blocks`` malloc'd blocks (too big for Python's small-object allocator), free all but the
    last: the kept block pins the heap's top, so glibc cannot give the freed memory back by itself."""
    allocated = [bytes(size) for _ in range(blocks)]
    kept = allocated[-1]
    del allocated
    return kept


@pytest.mark.skipif(not HeapTrimmer().supported, reason="needs glibc's malloc_trim")
def test_release_free_memory_returns_freed_heap_pages_pinned_below_a_live_block():
    kept = _fragment_heap()
    before = _rss_mb()
    assert release_free_memory()
    assert _rss_mb() < before - 30, "about 60 MB were freed but stayed resident"
    assert kept


@pytest.mark.skipif(not HeapTrimmer().supported, reason="needs glibc's malloc_trim")
def test_heap_trimmer_trims_on_its_own_thread_until_stopped():
    kept = _fragment_heap()
    before = _rss_mb()
    with HeapTrimmer(0.05) as trimmer:
        deadline = time.monotonic() + 10
        while _rss_mb() > before - 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rss_mb() < before - 30
    assert trimmer.trims >= 1 and not trimmer._thread.is_alive()
    assert kept


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(0)
