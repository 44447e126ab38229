"""Random maps gathered from a collection's feature store: this tree's reader against another tree's.

Stage 2 re-scores its best 32 candidates exactly from the store; at a million images the store (32 GB) is
larger than the page cache, so those are random reads from disk (--drop-caches starts from an empty cache). Each row draws fresh random slots for
both readers, alternating which reads first (no reader finds the other's pages cached).

    python bench/bench_store_reads.py --library /work/exp/m1/library --collection bench --previous-tree /work/prev \
        --drop-caches
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from indexer import Library  # noqa: E402


def previous_store_module(tree: Path):
    spec = importlib.util.spec_from_file_location("previous_feature_store", tree / "indexer" / "feature_store.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--previous-tree", type=Path, required=True, help="a checkout whose FeatureStore to compare")
    parser.add_argument("--counts", type=int, nargs="+", default=[32, 1000], help="maps per gather")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache first (root: /proc/sys/vm/drop_caches), so reads come from disk "
                             "as a store larger than the page cache does")
    args = parser.parse_args()
    if args.drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    previous_module = previous_store_module(args.previous_tree.resolve())
    with Library.open(args.library) as library:
        store = library.collection(args.collection).store
        previous = previous_module.FeatureStore(store.folder, previous_module.StoreLayout(**store.layout.to_dict()))
        slots = library.collection(args.collection).size
        rng = np.random.default_rng(17)
        for count in args.counts:
            times: dict[str, list[float]] = {"this tree": [], "previous tree": []}
            for trial in range(args.trials):
                readers = [("this tree", store), ("previous tree", previous)][:: 1 if trial % 2 == 0 else -1]
                for name, reader in readers:
                    chosen = rng.choice(slots, count, replace=False)
                    started = time.perf_counter()
                    reader.read_maps(chosen)
                    times[name].append(1000 * (time.perf_counter() - started))
            now, before = (statistics.median(times[k]) for k in ("this tree", "previous tree"))
            print(f"{count} random maps of {slots}: this tree {now:.1f} ms, previous tree {before:.1f} ms "
                  f"(median of {args.trials}; x{before / now:.1f})", flush=True)
    print(f"reproduce: python bench/bench_store_reads.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
