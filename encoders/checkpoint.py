"""Checkpoints (config + weights + training state, written atomically) and the one model factory."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.config import ModelConfig, get_config, list_models
from encoders.models import MatchmapModel, weights_version

CHECKPOINT_FORMAT = "matchmap-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def default_checkpoint_path() -> Path:
    """Where the shipped default model lives: ``encoders/default_model/tiny.pt`` inside the package."""
    return Path(__file__).parent / "default_model" / "tiny.pt"


def _unwrap(model: nn.Module) -> MatchmapModel:
    # DistributedDataParallel and torch.compile wrap the model; checkpoints hold the bare one.
    while not isinstance(model, MatchmapModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"save_checkpoint needs a MatchmapModel, got {type(model).__name__}")
        model = inner
    return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    epoch: int = 0,
    extra: dict | None = None,
) -> None:
    """Write config, weights, optional optimizer/scheduler state, step, epoch and ``extra`` to ``path``.

    The file appears whole or not at all (written to a temporary file beside it, then renamed).
    ``extra`` must hold plain data (numbers, strings, lists, dicts, tensors): checkpoints are read
    with ``weights_only=True``. Also sets ``model.version`` to the saved weights' version.
    """
    model = _unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = weights_version(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": model.config.to_dict(),
        "version": version,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    model.version = version


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by save_checkpoint -> its dict.

    Keys: format, format_version, config (dict), version, state_dict, optimizer, scheduler, step,
    epoch, extra. FileNotFoundError if missing; ValueError naming the file if it is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise ValueError(f"checkpoint {str(path)!r} cannot be read as a matchmap checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a matchmap checkpoint (no format marker)")
    if payload.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {payload['format_version']}; "
            f"this code reads up to {CHECKPOINT_FORMAT_VERSION}"
        )
    return payload


def model_from_checkpoint(checkpoint: dict) -> MatchmapModel:
    """A MatchmapModel (on the CPU) built from a loaded checkpoint's config and weights."""
    model = MatchmapModel(ModelConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.version = checkpoint.get("version") or weights_version(model)
    return model


def with_stage1_heads(model: MatchmapModel, heads: int) -> MatchmapModel:
    """A copy of ``model`` with the same encoder weights and fresh stage-1 heads of ``heads`` heads (they
    start as the masked means), or none (``heads`` = 0), in eval mode on the model's device."""
    out = MatchmapModel(dataclasses.replace(model.config, stage1_heads=heads))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("stage1.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("stage1.") for k in missing):
        raise RuntimeError(f"encoder weights did not carry over: missing {missing}, unexpected {unexpected}")
    return out.to(next(model.parameters()).device).eval()


def create_model(
    name_or_checkpoint: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> MatchmapModel:
    """The one factory: a registered config name, a checkpoint path, or None for the shipped default.

    A name gives a freshly initialized model (no pretrained weights are ever downloaded); a path
    loads config and weights from the checkpoint; None loads default_checkpoint_path(). The model
    comes back in eval mode on ``device``; call ``.train()`` to train it.
    """
    if name_or_checkpoint is None:
        path = default_checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"no shipped default model at {path}. Train one (`matchmap synth corpus`, then "
                f"`matchmap train --train corpus/train.json --val corpus/val.json --config tiny --out RUN`) "
                f"and pass its checkpoint with --checkpoint, or copy it to {path}"
            )
        model = model_from_checkpoint(load_checkpoint(path))
    elif isinstance(name_or_checkpoint, str) and name_or_checkpoint in list_models():
        model = MatchmapModel(get_config(name_or_checkpoint))
    elif Path(name_or_checkpoint).is_file():
        model = model_from_checkpoint(load_checkpoint(name_or_checkpoint))
    else:
        raise FileNotFoundError(
            f"{str(name_or_checkpoint)!r} is neither a registered model config "
            f"({', '.join(list_models())}) nor an existing checkpoint file"
        )
    return model.to(device).eval()
