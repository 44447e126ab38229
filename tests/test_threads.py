"""search.threads: one step of torch work on one core in its own thread only; idle OpenMP teams told
to sleep soon, in a server process, before torch loads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import torch

from search.threads import _libgomp, one_core

ROOT = Path(__file__).resolve().parents[1]


def test_one_core_holds_only_the_calling_thread_and_only_inside():
    """Team sizes as the OpenMP runtime gives them to the next parallel step (oneDNN reads it)."""
    gomp = _libgomp()
    assert gomp is not None, "the torch wheel's libgomp"
    torch.set_num_threads(2)
    seen: dict[str, int] = {}
    inside, leave = threading.Event(), threading.Event()

    def step() -> None:
        torch.zeros(1).add_(1)
        with one_core():
            seen["inside"] = gomp.omp_get_max_threads()
            inside.set()
            leave.wait(10)
        seen["after"] = gomp.omp_get_max_threads()

    worker = threading.Thread(target=step)
    worker.start()
    assert inside.wait(10)
    seen["other thread meanwhile"] = gomp.omp_get_max_threads()
    leave.set()
    worker.join()
    assert seen == {"inside": 1, "other thread meanwhile": 2, "after": 2}


def test_a_server_process_lets_idle_openmp_threads_sleep_unless_told_otherwise():
    code = ("import os, sys; from search.threads import quiet_idle_teams; first = quiet_idle_teams(); import torch; "
            "print(first, quiet_idle_teams(), os.environ.get('GOMP_SPINCOUNT'))")
    run = lambda env: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,  # noqa: E731
                                     cwd=ROOT, env=env).stdout.split()
    base = {k: v for k, v in __import__("os").environ.items() if k != "GOMP_SPINCOUNT"}
    assert run(base) == ["True", "False", "3000"]  # set before torch loads; too late once it has
    assert run({**base, "GOMP_SPINCOUNT": "7"}) == ["True", "False", "7"]  # an operator's own setting stays
