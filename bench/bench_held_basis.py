"""Does stage 2's rough pass over maps held in fewer dimensions keep exact MISA's top 10?

The held maps keep their region vectors' principal directions (``search.resident.region_basis``). For
each caption of a `matchmap synth` corpus's val split (voices the model never heard): stage 1 at the
default K as the server runs it; exact float32 MISA over every image of the collection (the truth);
then, for each number of dims, the rough pass over the K candidates in the top directions of the
region vectors' second moment (4,096 maps drawn at random), the best 16 / 32 / 64 of it scored
exactly, and how much of the true top 10 their exact top 10 holds. Stage 1's own share of the true top
10 is the ceiling; "stage 1's order" hands the exact pass stage 1's own best, with no rough pass at
all (the pooled score plus the centroid interaction, as PLAID ranks before its exact pass). "keep 0"
is the rough pass's own top 10, nothing scored exactly: what a store holding only these maps, and no
exact ones, would rank. A dims entry ending in "i8" ("64i8") holds
them in int8, a step per dimension (``search.resident.int8_scale``), as a million images are held;
"i4" and "i2" in 4 and 2 bits (values -7..7 and -1..1), with steps of 0.34 and 1.2 standard deviations of
each dimension (about the least squared error of a uniform quantizer of a normal variable).

    python bench/bench_held_basis.py /work/exp/s100k/library /work/exp/c10 32,64,64i8,96,128,256 40
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_search import corpus_inputs  # noqa: E402

from search.centroid_prune import centroid_scores, keep_best  # noqa: E402
from search.engine import SearchEngine, SearchLimits  # noqa: E402
from search.resident import int8_scale  # noqa: E402

KEEPS = (0, 16, 32, 64)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] in ("-h", "--help"):  # three positional arguments, a fourth optional
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    library, corpus, dims_arg = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    queries_count = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    torch.set_grad_enabled(False)
    engine = SearchEngine.open("encoders/default_model/tiny.pt", library, device="cpu",
                               limits=SearchLimits(held_energy=1))  # every dim held; projected here
    engine.warm_up()
    engine.wait_held()
    coll = engine.collection("bench")
    maps = engine._resident["bench"].maps  # (N, R, D) bfloat16
    n, r, d = maps.shape
    sample = maps[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4096]].float().reshape(-1, d)
    values, vectors = torch.linalg.eigh(sample.T @ sample / len(sample))
    values, vectors = values.flip(0), vectors.flip(1)
    dims = dims_arg.split(",")
    width = {k: int(k.split("i")[0]) for k in dims}
    bits = {k: int(k.split("i")[1]) if "i" in k else 16 for k in dims}
    print("energy in the top " + ", ".join(f"{k}: {float(values[:width[k]].sum() / values.sum()):.3f}" for k in dims))
    held, steps = {}, {}
    for k in dims:
        basis = vectors[:, : width[k]]
        if bits[k] < 16:  # values v stand for v * step; small integers are exact in bfloat16
            top = 2 ** (bits[k] - 1) - 1
            steps[k] = (int8_scale(sample.view(-1, r, d)[:1024], basis) if bits[k] == 8
                        else (sample[: 1024 * r] @ basis).std(0) * {4: 0.34, 2: 1.2}[bits[k]])
            held[k] = torch.cat([((maps[i : i + 8192].float() @ basis) / steps[k]).round_().clamp_(-top, top)
                                 .bfloat16() for i in range(0, n, 8192)])
        else:
            held[k] = (maps.float() @ basis).bfloat16() if width[k] < d else maps
    _, queries, _ = corpus_inputs(corpus)
    _, candidates = engine.resolve_counts(10, 0, coll.size)
    all_ids = coll.ids()
    kept = {(k, keep): [] for k in dims for keep in KEEPS}
    ceiling, by_stage1 = [], {keep: [] for keep in (*KEEPS[1:], 128)}
    for data in queries[:queries_count]:
        audio, lengths = engine.encode([engine.prepare_audio(data).logmel])
        length = int(lengths[0])
        audio = audio[:, :length]
        pooled = engine.model.stage1_audio_vectors(audio, lengths).numpy()
        scores, ids = coll.search_stage1(pooled, engine.limits.stage1_widen * candidates)
        scores, ids = keep_best(scores, ids, centroid_scores(coll, audio, lengths, ids), candidates)
        exact = torch.empty(n)  # every image, float32 from the store's float16 maps
        for start in range(0, n, 4096):
            block = torch.from_numpy(coll.feature_maps(all_ids[start : start + 4096])).float()
            exact[start : start + 4096] = (audio[0] @ block.reshape(-1, d).T).view(length, -1, r).amax(2).mean(0)
        truth = set(all_ids[torch.topk(exact, 10).indices.numpy()].tolist())
        found = ids[0][ids[0] >= 0]
        positions = torch.from_numpy(coll.positions_of(found))
        ceiling.append(len(truth & set(found.tolist())) / 10)
        for keep, shares in by_stage1.items():  # found is in stage 1's order (keep_best)
            top = torch.topk(exact[positions[:keep]], min(10, len(positions[:keep]))).indices
            shares.append(len(truth & set(found[:keep][top.numpy()].tolist())) / 10)
        for k in dims:
            projected = width[k] < d or k in steps  # quantized maps are held in the basis even at every dim
            frames = audio[0] @ vectors[:, : width[k]] if projected else audio[0]
            frames = (frames * steps[k] if k in steps else frames).bfloat16()
            rough_maps = held[k][positions]
            rough = (frames @ rough_maps.reshape(-1, rough_maps.shape[-1]).T).view(length, -1, r).amax(2).float().mean(0)
            order = torch.argsort(rough, descending=True)
            kept[(k, 0)].append(len(truth & set(found[order[:10].numpy()].tolist())) / 10)
            for keep in KEEPS[1:]:
                best = order[:keep]
                top = best[torch.topk(exact[positions[best]], min(10, keep)).indices]
                kept[(k, keep)].append(len(truth & set(found[top.numpy()].tolist())) / 10)
    print(f"{queries_count} captions, K={candidates}: stage 1 holds {np.mean(ceiling):.3f} of the exhaustive top 10")
    print("  stage 1's order: " + ", ".join(f"keep {keep}: {np.mean(v):.3f}" for keep, v in by_stage1.items()))
    for k in dims:
        print(f"  {k} dims: " + ", ".join(f"keep {keep}: {np.mean(kept[(k, keep)]):.3f}" for keep in KEEPS)
              + f"  ({width[k] * bits[k] * r // 8} bytes per image)")
    print(f"reproduce: python bench/bench_held_basis.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
