"""GPU check for stage 2: does CUDA re-ranking give the CPU's ranking, and how fast is each?

One short, self-contained script for a machine with a GPU (a few minutes at the defaults):
a random ``tiny`` model, N random blocky images indexed into a temporary library, Q noise queries.
For each query the same two-stage search runs on a CPU engine and a CUDA engine; it reports
top-10 agreement (identical lists, and set overlap), the largest score difference, and stage-2
latency (feature-map read + MISA on the candidates) per device, plus the bare score_matrix time.

    .venv/bin/python bench/gpu_check.py [--images 2000] [--queries 50] [--candidates 100 1000] [--skip-training]

Then the training side on CUDA: (1) ``training.train.train`` end to end on the GPU for two epochs
over a small generated manifest (noise captions, blocky images): losses finite, checkpoints written,
and the CUDA-trained checkpoint evaluated on the CPU gives the recall the run logged on the GPU;
(2) one training step (forward + backward, in-batch MISA loss) per config at batch 64, in
samples/s on CUDA (fp32 and bf16 autocast) and on this machine's CPU cores; (3) all-pairs MISA at
the paper's shapes (1,000 captions x 1,000 images, 14x14x1024 maps, 128 frames) on CUDA, fp32 and
bf16, against a plain matmul with the same multiply-adds.

The gate. Search runs under the precision policy of ``encoders.precision`` (exact float32 on CUDA:
TF32 off). A query's CUDA top-10 agrees with its CPU top-10 when scores match within
``SCORE_RTOL`` (1e-4) of the scores' size and any difference of order or membership is among
items within that tolerance of each other, or an item that tied at one side's stage-1 cut, so
that side never scored it (``encoders.precision.compare_rankings``). The script exits 1 if any
query's rankings diverge beyond that, or the training check fails, so it can gate a release. It
also reports, without gating on it, the same comparison under PyTorch's TF32 default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# The benchmarks' shared inputs (bench/ is on sys.path when this file runs as a script).
from bench_search import distractor_images, noise_wav

from encoders import create_model, save_checkpoint, score_matrix
from encoders.matchmap import frame_mask, pool_audio
from encoders.precision import (
    SCORE_RTOL,
    Ranking,
    compare_rankings,
    float32_settings,
    restore_float32_settings,
    use_exact_float32,
)
from indexer import Library
from search.engine import SearchEngine, SearchQuery


def build_library(folder: Path, images: int, model, seed: int) -> None:
    image_paths = distractor_images(folder / "images", images, seed)
    with Library.open(folder / "library", create=True) as library:
        library.index("gpu-check", [str(p) for p in image_paths], model, progress=False)


def stage2_ms(engine: SearchEngine, queries: list[SearchQuery]) -> list[float]:
    return [r.timings_ms["stage2"] for r in (engine.search_batch([q])[0] for q in queries)]


def batched_stage2_ms(engine: SearchEngine, queries: list[SearchQuery], batch: int = 8) -> list[float]:
    """Stage 2 per query when ``batch`` queries share one search_batch call (one scoring call on an
    accelerator): each batch's stage-2 milliseconds divided by its queries."""
    calls = [queries[i : i + batch] for i in range(0, len(queries), batch)]
    return [engine.search_batch(c)[0].timings_ms["stage2"] / len(c) for c in calls]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|, on the CPU."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def ranking(engine: SearchEngine, query: SearchQuery, result) -> Ranking:
    """A search result as a Ranking, with its stage-1 scores and the stage-1 cut: the lowest stage-1
    score among the query's candidates, recomputed the engine's way (its pooled query vector, on its
    device, searched in the collection's stage-1 index)."""
    audio, lengths = engine.encode([query.audio.logmel])
    pooled = np.ascontiguousarray(pool_audio(audio, lengths).float().cpu().numpy())
    scores, ids = engine.collection(query.collection).search_stage1(pooled, query.candidates)
    hits = result.hits
    return Ranking([h.image_id for h in hits], [h.score for h in hits], [h.stage1_score for h in hits],
                   stage1_cut=float(scores[0][ids[0] >= 0].min()))


def compare_devices(cpu: SearchEngine, gpu: SearchEngine, queries: list[SearchQuery]) -> dict:
    """Each query's CUDA top-k against its CPU top-k (encoders.precision.compare_rankings):
    {"identical", "tied", "diverged", "line"}; the first divergence is printed."""
    identical = tied = diverged = overlap = 0
    worst = 0.0
    for q in queries:
        on_cpu, on_gpu = cpu.search_batch([q])[0], gpu.search_batch([q])[0]
        result = compare_rankings(ranking(cpu, q, on_cpu), ranking(gpu, q, on_gpu))
        overlap += len({h.image_id for h in on_cpu.hits} & {h.image_id for h in on_gpu.hits})
        worst = max(worst, result.max_score_difference / max(result.tolerance / SCORE_RTOL, 1e-30))
        identical += result.identical
        tied += result.agree and not result.identical
        if not result.agree:
            if not diverged:
                print(f"  diverged (K={q.candidates}): " + "; ".join(result.problems[:4]))
            diverged += 1
    line = (f"top-10 identical {identical}/{len(queries)}, reordered only among ties {tied}, diverged "
            f"{diverged}; overlap {overlap / len(queries):.2f}/10; max |score cpu - cuda| / score size {worst:.2e}")
    return {"identical": identical, "tied": tied, "diverged": diverged, "line": line}


def bare_score_matrix_ms(device: str, candidates: int, frames: int, grid: int, dim: int, repeats: int = 20) -> float:
    audio = torch.randn(1, frames, dim, device=device)
    maps = torch.randn(candidates, grid, dim, device=device)
    lengths = torch.tensor([frames], device=device)
    for _ in range(3):
        score_matrix(audio, lengths, maps)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        score_matrix(audio, lengths, maps)["misa"].cpu()
    return 1000 * (time.perf_counter() - started) / repeats


def small_manifest(folder: Path, pairs: int, seed: int):
    """A manifest of ``pairs`` noise captions and blocky images (no speech engine needed)."""
    from training.manifest import Entry, Manifest, write_manifest

    rng = np.random.default_rng(seed)
    images = distractor_images(folder / "images", pairs, seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, image in enumerate(images):
        wav = folder / "audio" / f"{i:05d}.wav"
        wav.write_bytes(noise_wav(rng, float(rng.uniform(1.5, 5.0))))
        entries.append(Entry(wav=wav.name, image=image.name, uttid=f"noise-{i:05d}", speaker="noise", asr_text=""))
    manifest = Manifest(path=None, image_base_path=folder / "images", audio_base_path=folder / "audio",
                        entries=entries)
    write_manifest(manifest, folder / "manifest.json")
    return manifest


def training_check(folder: Path, seed: int, device: str = "cuda") -> int:
    """train() on CUDA end to end; its checkpoint evaluated on the CPU must match the GPU's logged recall."""
    import json

    from training.evaluate import evaluate
    from training.manifest import load_manifest
    from training.train import TrainConfig, train

    small_manifest(folder / "data", 192, seed)
    manifest = load_manifest(folder / "data" / "manifest.json")
    started = time.perf_counter()
    cfg = TrainConfig(model="tiny", epochs=2, batch_size=32, seed=seed, device=device)
    summary = train(cfg, manifest, manifest, folder / "run", progress=False)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for r in records for loss in r["step_losses"]]
    finite = all(np.isfinite(losses))
    model_cpu = create_model(folder / "run" / "last.pt")
    on_cpu = evaluate(model_cpu, manifest, progress=False)
    on_gpu = records[-1]["val"]
    same = all(abs(on_cpu[k][d][r] - on_gpu[k][d][r]) <= 1 / len(manifest.entries) + 1e-9
               for k in ("MISA", "SISA") for d in ("speech_to_image", "image_to_speech") for r in ("R@1", "R@5", "R@10"))
    print(f"train() on {device}: {summary['epochs']} epochs, {summary['steps']} steps in {seconds:.1f} s; "
          f"losses finite: {finite} (first {losses[0]:.3f}, last {losses[-1]:.3f}); recall logged on {device} "
          f"vs the checkpoint re-evaluated on cpu agree within one pair: {same} "
          f"(MISA s->i R@10 {on_gpu['MISA']['speech_to_image']['R@10']:.3f} vs {on_cpu['MISA']['speech_to_image']['R@10']:.3f})")
    return 0 if finite and same else 1


def train_step_rates(batch: int = 64, caption_seconds: float = 4.0, repeats: int = 5) -> None:
    """Samples/s of one forward + backward with the in-batch MISA loss, per config and device."""
    import torch.nn.functional as F

    from encoders.config import get_config
    from encoders.models import MatchmapModel

    for name in ("tiny", "davenet-vgg16"):
        cfg = get_config(name)
        for device, dtype in (("cuda", None), ("cuda", torch.bfloat16), ("cpu", None)):
            if device == "cpu" and name == "davenet-vgg16":
                continue
            torch.manual_seed(0)
            model = MatchmapModel(cfg).train().to(device)
            size = cfg.image.input_size
            frames = model.audio_frontend.num_frames(round(caption_seconds * cfg.audio.sample_rate))
            images = torch.randn(batch, 3, size, size, device=device)
            logmel = torch.randn(batch, cfg.audio.n_mels, frames, device=device)
            lengths = torch.full((batch,), frames, device=device)
            targets = torch.arange(batch, device=device)

            def step(model=model, images=images, logmel=logmel, lengths=lengths, targets=targets,
                     device=device, dtype=dtype) -> None:
                model.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                    maps = model.encode_images(images)
                    audio, out_lengths = model.encode_audio(logmel, lengths)
                    misa = score_matrix(audio, out_lengths, maps, ("misa",))["misa"].float()
                loss = F.cross_entropy(misa, targets) + F.cross_entropy(misa.T, targets)
                loss.backward()

            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - started) / repeats
            label = f"{device} {'bf16 autocast' if dtype else 'fp32'}"
            threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
            print(f"train step {name}, batch {batch}, {caption_seconds:.0f} s captions, {label}{threads}: "
                  f"{1000 * per_step:.1f} ms, {batch / per_step:,.0f} samples/s")


def all_pairs_paper_shapes(captions: int = 1000, images: int = 1000, frames: int = 128, regions: int = 196,
                           dim: int = 1024) -> None:
    """All-pairs MISA at the paper's shapes on CUDA (fp32, bf16) vs a plain matmul of the same multiply-adds."""
    g = torch.Generator(device="cuda").manual_seed(0)
    audio = torch.randn(captions, frames, dim, device="cuda", generator=g) / 32
    lengths = torch.randint(frames // 2, frames + 1, (captions,), device="cuda", generator=g)
    maps = torch.randn(images, regions, dim, device="cuda", generator=g) / 32
    flop = 2 * int(lengths.sum()) * images * regions * dim
    true_frames = audio[frame_mask(lengths, frames)]
    flat = maps.reshape(-1, dim)

    def matmul() -> None:
        step = 64 * regions
        for c0 in range(0, flat.shape[0], step):
            torch.mm(true_frames, flat[c0 : c0 + step].T)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    fp32 = timed(lambda: score_matrix(audio, lengths, maps, ("misa",)))
    bf16 = timed(lambda: score_matrix(audio, lengths, maps, ("misa",), compute_dtype=torch.bfloat16))
    plain = timed(matmul)
    a = score_matrix(audio, lengths, maps, ("misa",))["misa"]
    b = score_matrix(audio, lengths, maps, ("misa",), compute_dtype=torch.bfloat16)["misa"]
    top1 = (a.argmax(1) == b.argmax(1)).float().mean().item()
    print(f"all-pairs MISA {captions}x{images} at paper shapes ({flop / 1e12:.1f} TFLOP useful) on cuda: "
          f"score_matrix fp32 {fp32:.2f} s ({flop / fp32 / 1e12:.1f} TFLOP/s), bf16 {bf16:.2f} s "
          f"({flop / bf16 / 1e12:.1f} TFLOP/s), plain fp32 matmul {plain:.2f} s ({flop / plain / 1e12:.1f} TFLOP/s); "
          f"score_matrix / matmul {plain / fp32:.2f}; bf16 top-1 = fp32 top-1 for {100 * top1:.1f}% of captions")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="only the search (stage 2) checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing to compare", file=sys.stderr)
        return 2
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    default_precision = use_exact_float32()  # the policy: search and evaluation in exact float32
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = create_model("tiny")
        save_checkpoint(folder / "tiny.pt", model)
        started = time.perf_counter()
        build_library(folder, args.images, model, args.seed)
        print(f"indexed {args.images} random images in {time.perf_counter() - started:.1f} s")
        cpu = SearchEngine.open(folder / "tiny.pt", folder / "library", device="cpu")
        gpu = SearchEngine.open(folder / "tiny.pt", folder / "library", device="cuda")
        wavs = [noise_wav(rng, float(rng.uniform(1.5, 6.0))) for _ in range(args.queries)]
        audio = [cpu.prepare_audio(w) for w in wavs]
        failures = 0
        print(f"precision policy: {float32_settings()}; tolerance {SCORE_RTOL:g} of the scores' size")
        cpu_maps, _ = cpu.encode([a.logmel for a in audio[:8]])
        gpu_maps, _ = gpu.encode([a.logmel for a in audio[:8]])
        print(f"query audio maps, cuda vs cpu: max |difference| / max |value| "
              f"{relative_difference(cpu_maps, gpu_maps):.2e}")
        for candidates in args.candidates:
            queries = [SearchQuery(a, "gpu-check", 10, candidates) for a in audio]
            agreement = compare_devices(cpu, gpu, queries)
            failures += agreement.pop("diverged")
            stage2_ms(gpu, queries[:3])  # warm-up (CUDA context, kernels)
            cpu_ms, gpu_ms = stage2_ms(cpu, queries), stage2_ms(gpu, queries)
            gpu_batched_ms = batched_stage2_ms(gpu, queries)
            frames = int(statistics.median(cpu.encode([a.logmel])[0].shape[1] for a in audio))
            grid = cpu.model.image_grid[0] * cpu.model.image_grid[1]
            k = min(candidates, args.images)
            print(
                f"K={candidates}: {agreement['line']}; stage 2 (resident bf16 + exact re-score) median "
                f"cpu {statistics.median(cpu_ms):.2f} ms, cuda {statistics.median(gpu_ms):.2f} ms, cuda in batches "
                f"of 8 {statistics.median(gpu_batched_ms):.2f} ms per query; "
                f"bare score_matrix ({k} x {grid} regions x {frames} frames x {cpu.model.embed_dim}) "
                f"cpu {bare_score_matrix_ms('cpu', k, frames, grid, cpu.model.embed_dim):.2f} ms, "
                f"cuda {bare_score_matrix_ms('cuda', k, frames, grid, cpu.model.embed_dim):.2f} ms"
            )
        # Not gated: the same comparison under PyTorch's defaults (TF32 convolutions), for the record.
        restore_float32_settings(default_precision)
        tf32 = compare_devices(cpu, gpu, [SearchQuery(a, "gpu-check", 10, args.candidates[0]) for a in audio])
        use_exact_float32()
        print(f"for the record, PyTorch's default {default_precision} (not gated), K={args.candidates[0]}: "
              f"{tf32['line']}, {tf32['diverged']} beyond the tolerance")
        cpu.close()
        gpu.close()
        if not args.skip_training:
            restore_float32_settings(default_precision)  # training keeps PyTorch's defaults (the policy)
            failures += training_check(folder, args.seed)
            train_step_rates()
            all_pairs_paper_shapes()
    print(f"{'FAIL' if failures else 'OK'}: {failures} check(s) failed (rankings beyond ties within "
          f"{SCORE_RTOL:g}, training)")
    print(f"reproduce: {command}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
