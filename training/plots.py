"""Learning-curve pictures from one or more runs' metrics.jsonl files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records a training run wrote to run_dir/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curves(run_dirs: Sequence[str | Path], out_png: str | Path,
                         labels: Sequence[str] | None = None) -> Path:
    """Training loss per step and validation MISA/SISA R@10 per epoch for each run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_dir, label in zip(run_dirs, labels, strict=True):
        records = read_metrics(run_dir)
        losses = [loss for r in records for loss in r.get("step_losses", [r["loss"]])]
        window = max(1, len(losses) // 100)
        smoothed = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                    for i in range(len(losses))]
        line, = ax_loss.plot(range(1, len(smoothed) + 1), smoothed, label=label)
        epochs = [r["epoch"] for r in records if "val" in r]
        for kind, style in (("MISA", "-"), ("SISA", ":")):
            for direction, marker in (("speech_to_image", "o"), ("image_to_speech", "s")):
                values = [r["val"][kind][direction]["R@10"] for r in records if "val" in r]
                ax_recall.plot(epochs, values, style, marker=marker, color=line.get_color(), markersize=3,
                               label=f"{label} {kind} {direction.replace('_', ' ')}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_loss.legend()
    ax_recall.set(xlabel="epoch", ylabel="R@10 on unheard voices", title="Validation recall@10", ylim=(0, 1))
    ax_recall.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
    ax_recall.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
