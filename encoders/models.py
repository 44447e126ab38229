"""The two branches and the model that holds them with their front ends.

Image branch: (B, 3, S, S) -> (B, D, H, W); VGG16 conv layers (the paper) or a small CNN, ending in a
conv to D with no nonlinearity. Audio branch: DAVEnet, (B, n_mels, T) log-mel -> (B, D, T / 2**pools),
with padded frames masked to zero after every layer so that a caption's output never depends on
what pads it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg

from encoders.config import AudioConfig, ImageConfig, ModelConfig
from encoders.frontend import AudioFrontEnd, ImageFrontEnd
from encoders.matchmap import frame_mask, pool_audio, pool_images
from encoders.pooling import Stage1Pooling

# Queries come in every length, and oneDNN makes new convolution primitives for each new input shape
# (a 3.6 s query: 14 ms to encode where a shape seen before takes 6 ms). Padded to a multiple of this
# many log-mel frames (0.32 s at a 10 ms hop; 16 frames more on average, 4 % of that query), a server meets a few
# dozen shapes in its life (MatchmapModel.encode_audio's frame_multiple).
QUERY_FRAME_MULTIPLE = 32


def _keeps(xs: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
    """Each part's mask (B_i, L_i) as a (B_i, 1, L_i) multiplier of its features' dtype."""
    return [mask.unsqueeze(1).to(x.dtype) for x, mask in zip(xs, masks, strict=True)]


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over (B, C, L) whose training statistics use only positions where mask is True.

    Output at masked-out positions is zero. In eval mode it is plain BatchNorm with running stats.
    """

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: (B, C, L), mask: (B, L) bool
        return self.forward_parts([x], [mask])[0]

    def forward_parts(self, xs: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """One batch given as parts of different lengths (``xs[i]``: (B_i, C, L_i), ``masks[i]``: (B_i, L_i));
        the training statistics span every part, so the result is the same as for the padded whole."""
        valids = _keeps(xs, masks)
        xs = [x * valid for x, valid in zip(xs, valids, strict=True)]
        if self.training:
            # One pass of sums over the valid positions (padding is zero): E[x] and E[x^2] - E[x]^2.
            count = sum(valid.sum() for valid in valids)
            mean = sum(x.sum(dim=(0, 2)) for x in xs) / count
            var = (sum((x * x).sum(dim=(0, 2)) for x in xs) / count - mean * mean).clamp_min(0)
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    momentum = (
                        self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    )
                    unbiased = var * (count / (count - 1).clamp_min(1))
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        # affine map as one fused op, then zero the padding again
        return [torch.addcmul(shift[:, None], x, scale[:, None]) * valid for x, valid in zip(xs, valids, strict=True)]


def masked_instance_norm(x: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """x: (B, C, L), mask: (B, L) bool -> each (utterance, channel) standardized over its True positions.

    Positions where mask is False come out zero and never enter the statistics.
    """
    valid = mask.unsqueeze(1).to(x.dtype)
    count = valid.sum(dim=2, keepdim=True).clamp_min(1)
    mean = (x * valid).sum(dim=2, keepdim=True) / count
    centered = (x - mean) * valid
    var = (centered * centered).sum(dim=2, keepdim=True) / count
    return centered * torch.rsqrt(var + eps)


def length_sorted_split(lengths: Tensor, groups: int) -> list[Tensor] | None:
    """The indices of a batch's captions in ``groups`` groups of similar length (equal counts, shortest
    first), or None where one group it is (``groups`` <= 1, or under 2 captions a group). For a batch
    whose groups share BatchNorm's training statistics (:meth:`AudioBranch.forward`); the search engine's
    queries, independent at inference, are grouped by a padding budget instead (``search.engine.length_groups``).

    A random training batch of the objects world pads its audio to about 2.1x its true frames (its
    longest caption is about twice the mean); as 4 groups, each padded to its own longest, 1.24x. Unlike
    length-bucketed batches (``training.data.LengthBucketBatchSampler``), the batch, and so every
    caption's negatives, stays the same.
    """
    groups = min(groups, len(lengths) // 2)
    if groups <= 1:
        return None
    return list(torch.tensor_split(torch.argsort(lengths, stable=True), groups))


def pooled_length(lengths: Tensor, pools: int) -> Tensor:
    """Frames left after ``pools`` max-pools of kernel 3, stride 2, padding 1: ceil(L / 2) each time."""
    for _ in range(pools):
        lengths = (lengths + 1) // 2
    return lengths


class AudioBranch(nn.Module):
    """DAVEnet: (B, n_mels, T) log-mel, (B,) lengths -> (B, D, T') features, (B,) output lengths.

    BatchNorm over the whole log-mel (one channel, as DAVEnet), a conv spanning all mel bins
    (DAVEnet's Conv2d with kernel (n_mels, 1), written as the equivalent Conv1d over mel channels),
    then 1-D convs in time, each followed by ReLU and the first ``pools`` by a max-pool of stride 2.
    The first ``instance_norm_layers`` 1-D convs are instance-normalized over each caption's true
    frames. With ``global_context``, a linear map of the mean output frame (true frames only) is
    added to every true frame.
    """

    def __init__(self, cfg: AudioConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.input_norm = MaskedBatchNorm1d(1)
        self.mel_conv = nn.Conv1d(cfg.n_mels, cfg.channels[0], kernel_size=1)
        outputs = [*cfg.channels[1:], embed_dim]
        inputs = list(cfg.channels)
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, c_out, kernel_size=w, padding=w // 2, bias=not cfg.batch_norm)
            for c_in, c_out, w in zip(inputs, outputs, cfg.kernel_widths, strict=True)
        )
        self.norms = nn.ModuleList(MaskedBatchNorm1d(c) for c in outputs) if cfg.batch_norm else None
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)
        self.context = nn.Linear(embed_dim, embed_dim) if cfg.global_context else None

    def forward(self, logmel: Tensor, lengths: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """``groups`` > 1 runs the captions as that many groups of similar length, each cut to its own
        longest caption: less padding to convolve, the same result (see :func:`length_sorted_split`)."""
        parts = length_sorted_split(lengths, groups)
        if parts is None:
            (x,), (out_lengths,) = self._forward_parts([logmel], [lengths])
            return x, out_lengths
        xs, part_lengths = self._forward_parts(
            [logmel[index, :, : int(lengths[index].max())] for index in parts], [lengths[index] for index in parts]
        )
        longest = max(x.shape[-1] for x in xs)
        inverse = torch.argsort(torch.cat(parts))  # row of each caption in the parts' concatenation
        x = torch.cat([F.pad(x, (0, longest - x.shape[-1])) for x in xs])[inverse]
        return x, torch.cat(part_lengths)[inverse]

    def _forward_parts(self, xs: list[Tensor], lengths: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The branch over a batch given as parts (``xs[i]``: (B_i, n_mels, T_i)), layer by layer, with
        BatchNorm's statistics over every part at once; a part is a whole batch when there is one."""
        masks = [frame_mask(length, x.shape[-1]) for x, length in zip(xs, lengths, strict=True)]
        keeps = _keeps(xs, masks)
        flat = self.input_norm.forward_parts(
            [x.reshape(len(x), 1, -1) for x in xs],
            [mask.unsqueeze(1).expand(len(x), x.shape[1], x.shape[2]).reshape(len(x), -1)
             for x, mask in zip(xs, masks, strict=True)],
        )
        xs = [torch.relu(self.mel_conv(f.reshape(x.shape))) * keep for f, x, keep in zip(flat, xs, keeps, strict=True)]
        for i, conv in enumerate(self.convs):
            xs = [conv(x) for x in xs]
            if i < self.cfg.instance_norm_layers:
                xs = [masked_instance_norm(x, mask) for x, mask in zip(xs, masks, strict=True)]
            # Zeros past the end make each conv see exactly what its own zero padding would show it.
            xs = self.norms[i].forward_parts(xs, masks) if self.norms is not None else [
                x * keep for x, keep in zip(xs, keeps, strict=True)]
            xs = [torch.relu(x) for x in xs]
            if i < self.cfg.pools:
                # Inputs are >= 0 after ReLU, so zero padding acts like the pool's own -inf padding.
                xs = [self.pool(x) for x in xs]
                lengths = [pooled_length(length, 1) for length in lengths]
                masks = [frame_mask(length, x.shape[-1]) for x, length in zip(xs, lengths, strict=True)]
                keeps = _keeps(xs, masks)
                xs = [x * keep for x, keep in zip(xs, keeps, strict=True)]
        if self.context is not None:
            # Mean over the caption's own frames only (x is already zero past them), so padding changes
            # nothing. Not pool_audio: its length checks read values, which meta-tensor shape runs lack.
            means = [x.sum(dim=2) / length.clamp_min(1).unsqueeze(1).to(x.dtype) for x, length in zip(xs, lengths, strict=True)]
            xs = [(x + self.context(mean).unsqueeze(2)) * keep for x, mean, keep in zip(xs, means, keeps, strict=True)]
        return xs, lengths


def _vgg16_trunk() -> nn.Sequential:
    # torchvision.models.vgg16(weights=None).features without its last max-pool, built without the
    # 120 M-parameter classifier, and initialized as torchvision's VGG initializes its convs.
    layers = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)[:-1]
    for m in layers.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return layers


def _small_cnn_trunk(cfg: ImageConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in cfg.channels:
        for j in range(cfg.convs_per_block):
            stride = 2 if j == 0 else 1
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
    return nn.Sequential(*layers)


def _trunk_channels(cfg: ImageConfig) -> int:
    return 512 if cfg.arch == "vgg16" else cfg.channels[-1]


def image_grid_size(cfg: ImageConfig) -> tuple[int, int]:
    """(H, W) of the image branch's output map for a square input of cfg.input_size."""
    size = cfg.input_size
    if cfg.arch == "vgg16":
        for _ in range(4):  # four 2x2 max-pools remain
            size //= 2
    else:
        for _ in cfg.channels:  # one stride-2 3x3 conv (padding 1) per block
            size = (size + 1) // 2
    if size < 1:
        raise ValueError(f"image.input_size {cfg.input_size} is too small for arch {cfg.arch!r}")
    return size, size


class ImageBranch(nn.Module):
    """(B, 3, S, S) normalized images -> (B, D, H, W): trunk, then a conv to D with no nonlinearity.

    With ``global_context``, a linear map of the trunk's spatial mean is added to every region.
    """

    def __init__(self, cfg: ImageConfig, embed_dim: int):
        super().__init__()
        self.trunk = _vgg16_trunk() if cfg.arch == "vgg16" else _small_cnn_trunk(cfg)
        self.head = nn.Conv2d(_trunk_channels(cfg), embed_dim, cfg.head_kernel, padding=cfg.head_kernel // 2)
        self.context = nn.Linear(_trunk_channels(cfg), embed_dim) if cfg.global_context else None

    def forward(self, images: Tensor) -> Tensor:
        features = self.trunk(images)
        regions = self.head(features)
        if self.context is not None:
            regions = regions + self.context(features.mean(dim=(2, 3)))[:, :, None, None]
        return regions


class MatchmapModel(nn.Module):
    """Image branch, audio branch, and the front ends that feed them, all from one ModelConfig.

    ``version`` names the weights (``<config name>-<12 hex digits of their hash>``); it is computed at
    construction and refreshed by checkpoint saving and loading, so an index built with one model
    can refuse queries embedded by another.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_net = ImageBranch(config.image, config.embed_dim)
        self.audio_net = AudioBranch(config.audio, config.embed_dim)
        self.audio_frontend = AudioFrontEnd(config.audio)
        self.image_frontend = ImageFrontEnd(config.image, train=False)
        self.image_frontend_train = ImageFrontEnd(config.image, train=True)
        # Learned stage-1 pooling (matchmap distill-stage1), or None: masked means, whose product is SISA.
        self.stage1 = Stage1Pooling(config.embed_dim, config.stage1_heads) if config.stage1_heads else None
        self.version = weights_version(self)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def audio_frame_seconds(self) -> float:
        """Seconds per output audio frame (log-mel hop * 2**pools)."""
        return self.config.audio.output_frame_seconds

    @property
    def image_grid(self) -> tuple[int, int]:
        """(H, W) of the image feature map for the configured input size."""
        return image_grid_size(self.config.image)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """lengths: (B,) log-mel frames -> (B,) output frames of encode_audio."""
        return pooled_length(lengths, self.config.audio.pools)

    @property
    def stage1_pooling(self) -> str:
        """What stage-1 vectors are: "mean" (masked means; their product is SISA) or "attention-N" (learned)."""
        return f"attention-{self.config.stage1_heads}" if self.stage1 is not None else "mean"

    def stage1_image_vectors(self, image_maps: Tensor) -> Tensor:
        """image_maps: (N, R, D) or (N, H, W, D) float -> (N, D) float32 stage-1 vectors of the images.

        The one place image vectors for the stage-1 index are made (indexing, benchmarks): the learned
        heads when the model has them, otherwise the mean over regions (then a product with
        :meth:`stage1_audio_vectors` is exactly SISA).
        """
        regions = image_maps.reshape(image_maps.shape[0], -1, image_maps.shape[-1]).float()
        if self.stage1 is None:
            return pool_images(regions)
        mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return self.stage1.image(regions, mask)

    def stage1_audio_vectors(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """audio: (B, T, D) float, lengths: (B,) true frames -> (B, D) float32 stage-1 vectors of the queries."""
        audio = audio.float()
        if self.stage1 is None:
            return pool_audio(audio, lengths)
        if audio.dim() != 3 or lengths.shape != audio.shape[:1]:
            raise ValueError(f"need audio (B, T, D) and lengths (B,), got {tuple(audio.shape)}, {tuple(lengths.shape)}")
        if len(lengths) and int(lengths.min()) < 1:
            raise ValueError(f"every caption needs at least one true frame, got lengths {lengths.tolist()}")
        return self.stage1.audio(audio, frame_mask(lengths.to(audio.device), audio.shape[1]))

    def encode_images(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) normalized (see image_frontend) -> (B, H, W, D) feature maps."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        return self.image_net(images).permute(0, 2, 3, 1).contiguous()

    def encode_audio(self, logmel: Tensor, lengths: Tensor, length_groups: int = 1,
                     frame_multiple: int = 1) -> tuple[Tensor, Tensor]:
        """logmel: (B, n_mels, T) float, lengths: (B,) long true frames -> ((B, T', D), (B,) long T' lengths).

        Frames past the longest true length are dropped before the network (they cannot change the
        result), so T' = output_lengths(max(lengths)). Output frames past a caption's own length are 0.
        ``length_groups`` > 1 runs the batch as groups of similar caption length (less padding to
        convolve, the same result up to float rounding; :func:`length_sorted_split`).

        ``frame_multiple`` > 1 zero-pads the batch to a multiple of that many frames before the network
        (the same result up to float rounding, and the same T'): for queries, which come in every
        length, where oneDNN would make new convolution primitives for each new shape (see
        ``QUERY_FRAME_MULTIPLE``). With ``length_groups`` > 1 each group is cut to its own longest.
        """
        n_mels = self.config.audio.n_mels
        if logmel.dim() != 3 or logmel.shape[1] != n_mels:
            raise ValueError(f"logmel must be (B, {n_mels}, T), got {tuple(logmel.shape)}")
        lengths = torch.as_tensor(lengths, device=logmel.device).long()
        b, _, t = logmel.shape
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be ({b},), got {tuple(lengths.shape)}")
        if b and (int(lengths.min()) < 1 or int(lengths.max()) > t):
            raise ValueError(f"lengths must lie in 1..{t} (the log-mel's frames), got {lengths.tolist()}")
        longest = int(lengths.max()) if b else t
        logmel = logmel[:, :, :longest]
        if frame_multiple > 1 and longest % frame_multiple:
            logmel = F.pad(logmel, (0, frame_multiple - longest % frame_multiple))
        features, out_lengths = self.audio_net(logmel, lengths, groups=length_groups)
        features = features[:, :, : pooled_length(longest, self.config.audio.pools)]
        return features.transpose(1, 2).contiguous(), out_lengths


def weights_version(model: MatchmapModel) -> str:
    """``<config name>-<12 hex>``: a hash of the config and every parameter and buffer, stable across runs."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{model.config.name}-{digest.hexdigest()[:12]}"


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """{"image": n, "audio": n, "total": n} parameters, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        image = sum(p.numel() for p in ImageBranch(config.image, config.embed_dim).parameters())
        audio = sum(p.numel() for p in AudioBranch(config.audio, config.embed_dim).parameters())
    return {"image": image, "audio": audio, "total": image + audio}
