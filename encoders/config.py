"""Model configs as data: typed dataclasses, named JSON files, and a registry over them.

Every architecture is a JSON file in ``encoders/configs/`` holding ``name``, ``embed_dim``, ``audio``
and ``image``; :func:`get_config` turns one into a :class:`ModelConfig`. A checkpoint carries its
config as the same dict (:meth:`ModelConfig.to_dict`), so a trained model never depends on the
registry it was created from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"

IMAGE_ARCHS = ("vgg16", "small_cnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_tuple(value: Any, type_: type, where: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    return tuple(type_(v) for v in value)


@dataclass(frozen=True)
class AudioConfig:
    """Audio front end (log-mel) and DAVEnet-style audio branch.

    The branch: BatchNorm over the (n_mels, T) log-mel, a conv spanning all mel bins to
    ``channels[0]``, then one 1-D conv in time per entry of ``kernel_widths`` with outputs
    ``channels[1:] + [embed_dim]``, each followed by ReLU; the first ``pools`` of those 1-D convs are
    followed by a max-pool of stride 2, so the output has ``ceil(T / 2**pools)`` frames.
    """

    sample_rate: int = 16000
    n_mels: int = 40
    window_ms: float = 25.0
    hop_ms: float = 10.0
    preemphasis: float = 0.97
    max_frames: int = 1024
    channels: tuple[int, ...] = (128, 256, 512, 512)
    kernel_widths: tuple[int, ...] = (11, 17, 17, 17)
    pools: int = 4
    # BatchNorm after every 1-D conv (masked, so padding never enters the statistics). DAVEnet has none.
    batch_norm: bool = False
    # Add to every frame a linear map of the caption's mean output frame (over its true length), so each
    # frame also carries what the whole caption says (how many objects, for one). DAVEnet has none.
    global_context: bool = False
    # Standardize each channel of the first ``instance_norm_layers`` 1-D convs' outputs over the
    # caption's own true frames (instance norm, before the batch norm), which removes per-utterance
    # statistics such as a voice's or a synthesizer's timbre early on. DAVEnet has none.
    instance_norm_layers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", _as_tuple(self.channels, int, "audio.channels"))
        object.__setattr__(self, "kernel_widths", _as_tuple(self.kernel_widths, int, "audio.kernel_widths"))
        if len(self.kernel_widths) != len(self.channels):
            raise ValueError(
                f"audio: kernel_widths has {len(self.kernel_widths)} entries but channels has "
                f"{len(self.channels)}; there is one 1-D conv per channel entry (the last one outputs embed_dim)"
            )
        if any(w < 1 or w % 2 == 0 for w in self.kernel_widths):
            raise ValueError(f"audio.kernel_widths must be odd and positive, got {self.kernel_widths}")
        if not 0 <= self.instance_norm_layers <= len(self.kernel_widths):
            raise ValueError(
                f"audio.instance_norm_layers must be in 0..{len(self.kernel_widths)}, got {self.instance_norm_layers}"
            )
        if not 0 <= self.pools <= len(self.kernel_widths):
            raise ValueError(f"audio.pools must be in 0..{len(self.kernel_widths)}, got {self.pools}")
        if self.sample_rate <= 0 or self.n_mels <= 0 or self.max_frames <= 0:
            raise ValueError("audio.sample_rate, audio.n_mels and audio.max_frames must be positive")
        if not 0 < self.hop_ms <= self.window_ms:
            raise ValueError(f"audio: need 0 < hop_ms <= window_ms, got {self.hop_ms}, {self.window_ms}")

    @property
    def frame_seconds(self) -> float:
        """Seconds between log-mel frames (the hop)."""
        return self.hop_ms / 1000.0

    @property
    def output_frame_seconds(self) -> float:
        """Seconds between frames of the audio branch's output."""
        return self.frame_seconds * 2**self.pools


@dataclass(frozen=True)
class ImageConfig:
    """Image front end (resize, crop, normalize) and image branch.

    ``arch="vgg16"``: torchvision VGG16 conv layers without the last max-pool (``channels`` unused).
    ``arch="small_cnn"``: one conv-BN-ReLU block of stride 2 per entry of ``channels``, each followed by
    ``convs_per_block - 1`` stride-1 conv-BN-ReLU layers. Both end in a ``head_kernel`` conv to
    embed_dim with no nonlinearity.
    """

    arch: str = "vgg16"
    input_size: int = 224
    resize_size: int = 256
    channels: tuple[int, ...] = ()
    convs_per_block: int = 1
    head_kernel: int = 3
    # Add to every region a linear map of the trunk's mean feature, so each region also carries what the
    # whole image holds (how many objects, for one). The paper's image branch has none.
    global_context: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", _as_tuple(self.channels, int, "image.channels"))
        object.__setattr__(self, "mean", _as_tuple(self.mean, float, "image.mean"))
        object.__setattr__(self, "std", _as_tuple(self.std, float, "image.std"))
        if self.arch not in IMAGE_ARCHS:
            raise ValueError(f"image.arch must be one of {IMAGE_ARCHS}, got {self.arch!r}")
        if self.arch == "small_cnn" and not self.channels:
            raise ValueError("image.channels must list at least one block for arch 'small_cnn'")
        if self.arch == "vgg16" and self.channels:
            raise ValueError("image.channels is fixed by the architecture for arch 'vgg16'; leave it empty")
        if self.resize_size < self.input_size:
            raise ValueError(
                f"image.resize_size ({self.resize_size}) must be at least image.input_size ({self.input_size})"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("image.mean and image.std need 3 entries each, std positive")
        if self.convs_per_block < 1 or self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError("image.convs_per_block must be >= 1 and image.head_kernel odd and positive")


@dataclass(frozen=True)
class ModelConfig:
    """A whole matchmap model: both branches map into a shared ``embed_dim`` space.

    ``stage1_heads``: 0 (the default) pools stage-1 vectors as masked means (their inner product is
    SISA); N > 0 gives the model learned attention-pooling heads of N heads each
    (``encoders/pooling.py``), trained by ``matchmap distill-stage1`` to rank as MISA does.
    """

    name: str
    embed_dim: int
    audio: AudioConfig = field(default_factory=AudioConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    stage1_heads: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model config needs a non-empty name")
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.stage1_heads < 0:
            raise ValueError(f"stage1_heads must be 0 (masked means) or a number of heads, got {self.stage1_heads}")

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it.

        ``stage1_heads`` appears only when non-zero, so a model without heads keeps the dict (and
        so the weights version) it had before the field existed.
        """
        d = json.loads(json.dumps(asdict(self)))
        if not self.stage1_heads:
            del d["stage1_heads"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict as stored in JSON files and checkpoints; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict, got {type(d).__name__}")
        _reject_unknown(d, cls, "model config")
        audio = d.get("audio", {})
        image = d.get("image", {})
        _reject_unknown(audio, AudioConfig, "audio config")
        _reject_unknown(image, ImageConfig, "image config")
        if "name" not in d or "embed_dim" not in d:
            raise ValueError("model config needs 'name' and 'embed_dim'")
        return cls(
            name=str(d["name"]),
            embed_dim=int(d["embed_dim"]),
            audio=AudioConfig(**audio),
            image=ImageConfig(**image),
            stage1_heads=int(d.get("stage1_heads", 0)),
        )


def _reject_unknown(d: dict, cls: type, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")


_REGISTRY: dict[str, ModelConfig] = {}


def _load_config_file(path: Path) -> ModelConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model config {path}: cannot read JSON: {e}") from e
    data.setdefault("name", Path(path).stem)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config {path}: {e}") from e


def _registry() -> dict[str, ModelConfig]:
    if not _REGISTRY:
        for path in sorted(CONFIG_DIR.glob("*.json")):
            cfg = _load_config_file(path)
            _REGISTRY[cfg.name] = cfg
    return _REGISTRY


def list_models() -> list[str]:
    """Names of the registered model configs, sorted."""
    return sorted(_registry())


def get_config(name: str) -> ModelConfig:
    """The registered config called ``name``; KeyError naming the known ones otherwise."""
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown model config {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name]


def register_config(path: str | Path) -> str:
    """Add the JSON config at ``path`` to the registry (replacing one of the same name); returns its name.

    The name is the file's ``name`` field, or the file's stem when it has none.
    """
    cfg = _load_config_file(Path(path))
    _registry()[cfg.name] = cfg
    return cfg.name
