"""encoders: front ends, the image and audio branches, model configs as data, matchmap scoring, checkpoints.

Imports nothing else of this project. The usual entry point is one call::

    from encoders import create_model, load_audio
    model = create_model("tiny")              # a registered config, freshly initialized
    model = create_model("run/best.pt")       # a checkpoint (config + weights)
    logmel, length = model.audio_frontend(load_audio("caption.wav"))

The function ``encoders.matchmap.matchmap`` is not re-exported here: the name would shadow the module.

Names are imported from their submodules on first use (encoders/_lazy.py), so ``import encoders``
loads no torch until a name that needs it is touched.
"""

from encoders._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "encoders.checkpoint": (
            "create_model", "default_checkpoint_path", "load_checkpoint", "model_from_checkpoint", "save_checkpoint",
            "with_stage1_heads",
        ),
        "encoders.config": ("AudioConfig", "ImageConfig", "ModelConfig", "get_config", "list_models", "register_config"),
        "encoders.formats": ("AUDIO_FORMATS_TEXT",),
        "encoders.frontend": (
            "AudioDecodeError", "AudioFrontEnd", "AudioTooLong", "ImageDecodeError", "ImageFrontEnd", "load_audio",
            "load_image", "trim_silence", "waveform_from_pcm",
        ),
        "encoders.matchmap": ("SCORE_KINDS", "frame_mask", "pair_score", "pool_audio", "pool_images", "score_matrix"),
        "encoders.models": ("MatchmapModel", "count_parameters", "weights_version"),
    },
)
