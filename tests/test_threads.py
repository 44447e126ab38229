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
    gomp.omp_set_num_threads(2)  # this thread's own team (`matchmap serve` run in this process sets it to 1)
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


def test_a_single_core_thread_starts_no_openmp_helper_even_after_torch_set_num_threads():
    """torch work in a thread after single_core_thread() adds no OS thread (no team of two, so libgomp keeps
    managing no more threads than cores), though torch.set_num_threads(2) ran first (as the VAD's import
    fix does) and torch's first call in each thread sets the team size from it; a thread without it does."""
    code = """if True:
        import os, sys, threading, torch
        from search.threads import single_core_thread
        torch.set_num_threads(2)
        def tasks():
            return set(os.listdir('/proc/self/task'))
        def work(out, single):
            if single:
                single_core_thread()
            before = tasks()
            (torch.randn(4_000_000) * 2).sum()  # at::parallel_for: torch's first use in a thread sets its team size
            torch.nn.functional.conv1d(torch.randn(1, 40, 3000), torch.randn(128, 40, 5))  # oneDNN's team
            torch.randn(512, 512) @ torch.randn(512, 512)  # MKL's, sized by MKL itself
            out.append(len(tasks() - before))  # threads started meanwhile
        for single in (True, False):
            out = []
            worker = threading.Thread(target=work, args=(out, single))
            worker.start(); worker.join()
            print(out[0])
    """
    added = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "2"}).stdout.split()
    assert added[0] == "0" and int(added[1]) >= 1, added
