"""How torch's OpenMP threads behave in the server, where several threads run torch work.

**Idle teams spin.** Every thread that runs torch work has its own OpenMP team, and libgomp keeps an
idle team's threads spinning for a while (``GOMP_SPINCOUNT``) before they sleep. The server's decode
threads and its model thread hand each query on to each other: each team spun on a core the next
step needed. In that hand-off (decode threads and a model thread, one query at a time, 100,000
images), a short spin took a query from 36.3 to 28.9 ms in process (``quiet_idle_teams``).

**One team of two, not several.** libgomp spins an idle team's threads only while it manages no
more threads than the machine has cores; past that ("throttled"), a helper sleeps after about a
hundred spins and every parallel step waits for it to be woken. Each thread that runs torch work
with a team of two adds one managed thread. So once the main thread, a decode thread and the model
thread had each run torch work, the model thread's audio branch took 6.2-6.7 ms where the process's
only torch thread took 3.7; with every other thread on a team of one it took 3.6 ms again (a small
script, 40 captions, interleaved runs). ``matchmap serve`` therefore runs the decode threads and the
main thread on one core each (``single_core_thread``), and start-up work (loading, holding maps) in
threads that end, which returns their helpers.

**And on 2 cores, no team of two at all.** A team's every parallel step ends at a barrier, so it runs
at the pace of its slower core. Served, something else always wants one of the two cores (the decode
threads, gRPC's threads, the client on the same machine), and a team of two lost at every stage: on
100,000 images the model thread on one core (``serve --model-threads 1``, ``thread_team``) took a
query from 35.0 to 28.3 ms at p50 and from 32-38 to 43-46 queries/s at concurrency 8 (docs/search.md,
"One core per query"). FAISS carries its own OpenMP runtime (the faiss wheel's libgomp), whose
per-thread team ``thread_team`` sets too.

**Holding one step of torch work to one core, in the calling thread only.**

``torch.set_num_threads`` is one setting for the whole process. But the OpenMP runtime the PyTorch
wheel carries (libgomp) keeps a team size per thread, which oneDNN reads: so a thread can run one
step on one core while every other thread keeps both.

The VAD's LSTM needs it. It is a hundred tiny steps, one per 32 ms frame, each a hand-off to the
thread's OpenMP team. In a thread other than the process's first, as the server's decode threads are,
a team of two made Silero's network take 9.9 ms per caption instead of 3.5 (docs/search.md, "A hundred
thousand images in 20 ms"); on one core it takes 3.5 there too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

SERVER_SPINCOUNT = "3000"  # libgomp's default is 300,000 (up to milliseconds of spinning); 0 and 3,000 measured alike


def quiet_idle_teams() -> bool:
    """Let idle OpenMP threads sleep soon (GOMP_SPINCOUNT, unless already set), for a server. It takes
    effect only before torch is first imported (libgomp reads it when it loads): False when too late."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("GOMP_SPINCOUNT", SERVER_SPINCOUNT)
    return True


def _mapped_libraries(name: str) -> list[str] | None:
    """Paths of the shared libraries this process has mapped whose file name contains ``name``, sorted;
    None where /proc/self/maps cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if name in line.rsplit("/", 1)[-1]})
    except OSError:
        return None


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch was loaded with, when it is libgomp; else None. The copy this process has
    mapped (a second copy would be a second runtime, whose settings torch never reads)."""
    import torch

    loaded = _mapped_libraries("libgomp")
    if loaded is None:  # not Linux: the wheel's own copy, if any
        loaded = [str(p) for p in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))]
    if not loaded:
        return None
    try:
        return ctypes.CDLL(loaded[0])
    except OSError:
        return None


def single_core_thread() -> None:
    """From now on, torch work in the calling thread runs on one core (an OpenMP team of one), so the
    thread adds no managed thread (see the module's notes). Also a ThreadPoolExecutor initializer."""
    thread_team(1)


def thread_team(size: int) -> None:
    """From now on, torch's and FAISS's parallel work in the calling thread runs on ``size`` cores (an
    OpenMP team of ``size``: libgomp's per-thread setting, MKL's per-thread count, and the same in the
    OpenMP runtime the faiss wheel carries, when faiss is loaded). Other threads keep theirs."""
    if size < 1:
        raise ValueError(f"a thread's team needs at least 1 thread, got {size}")
    _torch_team(size)
    _faiss_team(size)


def _torch_team(size: int) -> None:
    """The calling thread's team for torch work: libgomp's per-thread setting and MKL's per-thread count."""
    gomp = _libgomp()
    if gomp is None:
        return
    import torch

    torch.get_num_threads()  # torch's first call in a thread sets its team size: let it happen first
    gomp.omp_set_num_threads(size)
    mkl_local = _mkl_set_num_threads_local()
    if mkl_local is not None:  # MKL's products (torch's float matmul) size their OpenMP team themselves
        mkl_local(size)


def _faiss_team(size: int) -> None:
    """The calling thread's team in the faiss wheel's own libgomp (a second runtime with its own
    per-thread setting), when faiss is loaded."""
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(size)


@functools.cache
def _mkl_set_num_threads_local():
    """MKL's per-thread thread count setter, as the torch wheel links it (into libtorch_cpu); else None."""
    libraries = _mapped_libraries("libtorch_cpu")
    if not libraries:
        return None
    try:
        setter = ctypes.CDLL(libraries[0]).MKL_Set_Num_Threads_Local  # the C entry (lowercase: Fortran's, by pointer)
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


def team_size() -> int:
    """The calling thread's OpenMP team size for torch work (libgomp's per-thread setting); torch's
    own count where torch does not run on libgomp."""
    gomp = _libgomp()
    if gomp is None:
        import torch

        return torch.get_num_threads()
    return int(gomp.omp_get_max_threads())


@contextlib.contextmanager
def team(size: int) -> Iterator[None]:
    """torch and FAISS work inside runs on ``size`` cores, in this thread only (thread_team), and the
    thread's team sizes are put back after."""
    gomp = _libgomp()
    before = gomp.omp_get_max_threads() if gomp is not None else None
    faiss = sys.modules.get("faiss")
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    thread_team(size)
    try:
        yield
    finally:
        if before is not None:
            _torch_team(before)
        if faiss_before is not None:
            _faiss_team(faiss_before)


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """torch work inside runs on one core, in this thread only; elsewhere (no libgomp) as it would."""
    gomp = _libgomp()
    if gomp is None:
        yield
        return
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(before)
