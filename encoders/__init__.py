"""encoders: front ends, the image and audio branches, model configs as data, matchmap scoring, checkpoints.

Imports nothing else of this project. The usual entry point is one call::

    from encoders import create_model, load_audio
    model = create_model("tiny")              # a registered config, freshly initialized
    model = create_model("run/best.pt")       # a checkpoint (config + weights)
    logmel, length = model.audio_frontend(load_audio("caption.wav"))

The function ``encoders.matchmap.matchmap`` is not re-exported here: the name would shadow the module.
"""

from encoders.checkpoint import (
    create_model,
    default_checkpoint_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from encoders.config import AudioConfig, ImageConfig, ModelConfig, get_config, list_models, register_config
from encoders.frontend import (
    AUDIO_FORMATS,
    AudioDecodeError,
    AudioFrontEnd,
    AudioTooLong,
    ImageDecodeError,
    ImageFrontEnd,
    load_audio,
    load_image,
    trim_silence,
    waveform_from_pcm,
)
from encoders.matchmap import (
    SCORE_KINDS,
    frame_mask,
    pair_score,
    pool_audio,
    pool_images,
    score_matrix,
)
from encoders.models import MatchmapModel, count_parameters, weights_version

__all__ = [
    "SCORE_KINDS",
    "AudioConfig",
    "AUDIO_FORMATS",
    "AudioDecodeError",
    "AudioTooLong",
    "AudioFrontEnd",
    "ImageConfig",
    "ImageDecodeError",
    "ImageFrontEnd",
    "MatchmapModel",
    "ModelConfig",
    "count_parameters",
    "create_model",
    "default_checkpoint_path",
    "frame_mask",
    "get_config",
    "list_models",
    "load_audio",
    "load_checkpoint",
    "load_image",
    "model_from_checkpoint",
    "pair_score",
    "pool_audio",
    "pool_images",
    "register_config",
    "save_checkpoint",
    "score_matrix",
    "trim_silence",
    "waveform_from_pcm",
    "weights_version",
]
