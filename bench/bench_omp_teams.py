"""Why torch ran slower in the server's threads: the model's audio branch, timed in a worker thread, beside
other threads that have run torch work with a team of two or of one (search.threads).

Each setup runs in a fresh process (OpenMP teams live as long as their threads), the setups interleaved:
- main thread: the process's only torch thread encodes (the reference);
- worker, main thread ran torch: the main thread ran torch work with a team of two, then a worker encodes
  (the server before: its main thread loaded and warmed the model);
- worker, main thread on one core: ``single_core_thread()`` in the main thread first;
- + a decode thread on two cores: as the previous, with a live thread that ran torch with a team of two
  (the server's decode threads before);
- + a decode thread on one core: the same thread after ``single_core_thread()`` (the server now).

    python bench/bench_omp_teams.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("main thread", "worker, main thread ran torch", "worker, main thread on one core",
          "+ a decode thread on two cores", "+ a decode thread on one core")

CHILD = """if True:
    import os, statistics, sys, threading, time
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as matchmap serve sets it
    import torch
    from encoders import create_model
    from search.threads import single_core_thread
    setup = sys.argv[1]
    if setup not in ("main thread", "worker, main thread ran torch"):
        single_core_thread()
    model = create_model("encoders/default_model/tiny.pt").eval()
    mels = torch.randn(1, model.config.audio.n_mels, 300, generator=torch.Generator().manual_seed(0))
    times = []
    def encode():
        with torch.inference_mode():
            for i in range(45):
                started = time.perf_counter()
                model.encode_audio(mels, torch.tensor([300]))
                if i >= 5:
                    times.append(1000 * (time.perf_counter() - started))
    def torch_work():
        with torch.inference_mode():
            torch.randn(512, 512) @ torch.randn(512, 512)
            torch.nn.functional.conv1d(torch.randn(1, 40, 3000), torch.randn(128, 40, 5))
    if setup == "main thread":
        encode()
    else:
        if setup == "worker, main thread ran torch":
            torch_work()
        stop = threading.Event()
        def decode_thread():
            if setup == "+ a decode thread on one core":
                single_core_thread()
            torch_work()
            stop.wait()
        if setup.startswith("+"):
            decoder = threading.Thread(target=decode_thread)
            decoder.start()
        worker = threading.Thread(target=encode)
        worker.start()
        worker.join()
        stop.set()
    print(statistics.median(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per setup, interleaved")
    args = parser.parse_args()
    medians: dict[str, list[float]] = {s: [] for s in SETUPS}
    for _ in range(args.rounds):
        for setup in SETUPS:
            out = subprocess.run([sys.executable, "-c", CHILD, setup], cwd=ROOT, check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
            medians[setup].append(float(out[-1]))
    reference = statistics.median(medians["main thread"])
    print(f"audio branch, one 3 s caption, median of 40 per process, {args.rounds} processes per setup "
          f"({os.cpu_count()} CPUs):")
    for setup, values in medians.items():
        value = statistics.median(values)
        print(f"  {setup:>34}: {value:.2f} ms (x{value / reference:.2f} the main thread's; "
              f"runs {', '.join(f'{v:.2f}' for v in values)})")
    print(f"reproduce: python bench/bench_omp_teams.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
