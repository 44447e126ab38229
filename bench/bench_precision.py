"""One training step of the tiny model (both branches, forward and backward, AdamW) in float32 and under
bfloat16 autocast, side by side, on this machine's CPU.

Whether bf16 pays depends on the CPU: with native bfloat16 (AVX512-BF16, AMX) it is faster; on a CPU
with AVX2 only (an AMD EPYC here) a step took 23 s in bf16 against 1.4 s in fp32, which is why
`matchmap train --precision bf16` warns on such CPUs (encoders.precision.bf16_training_warning).

    python bench/bench_precision.py
"""

from __future__ import annotations

import time

import torch

from encoders import create_model
from encoders.precision import cpu_has_native_bf16


def main() -> None:
    torch.manual_seed(0)
    model = create_model("tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    images = torch.randn(32, 3, 256, 256)
    logmel, lengths = torch.randn(32, model.config.audio.n_mels, 400), torch.full((32,), 400)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            audio, _ = model.encode_audio(logmel, lengths)
            loss = audio.float().mean() + model.encode_images(images).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16: {cpu_has_native_bf16()}, "
          f"{torch.get_num_threads()} threads")
    seconds = {}
    for bf16 in (False, True):
        step(bf16)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            step(bf16)
        seconds[bf16] = (time.perf_counter() - started) / 3
        print(f"{'bf16' if bf16 else 'fp32'}: {seconds[bf16]:.2f} s per step of 32")
    print(f"bf16 / fp32: {seconds[True] / seconds[False]:.1f}x; reproduce: python bench/bench_precision.py")


if __name__ == "__main__":
    main()
