"""SimCLRv2 backbones in pure PyTorch, loaded from Google's TensorFlow checkpoints without TensorFlow.

The architecture follows ``google-research/simclr`` resnet.py (read, not copied): ResNet-v1
bottlenecks with the stride on the 3×3 conv, width multiplier on every layer; with selective kernels
(``sk_ratio`` > 0, the ``sk1`` models) also the ResNet-D stem (three 3×3 convs), the ResNet-D
projection shortcut (2×2 average pool, then a 1×1 conv) and an SK unit in place of each 3×3 conv.
TF's arithmetic is reproduced where it differs from PyTorch's defaults: the stem max-pool and the
stride-1 shortcut average pool use TF ``SAME`` padding (bottom/right only; the pool ignores the
padding), strided convs pad ``(k-1)//2`` before / the rest after, batch-norm epsilon is 1e-5, and
preprocessing is TF's 87.5 % aspect-preserving centre crop with TF1's bicubic resize (no half-pixel
centres, a = −0.75, no antialiasing) to [0, 1] pixels without mean/std.

Variables are read from the checkpoint's ``base_model/`` scope (not ``ema_model/``, not optimizer
slots) in TF's creation order — ``conv2d``, ``conv2d_1``, …, ``batch_normalization``, … — and the
``head_supervised`` linear layer is kept, so a conversion can be checked against its published top-1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import hookimpl
from sslbench.cards import ModelCard, backbone_entries
from sslbench.errors import SSLBenchError
from sslbench.imaging import rgb
from sslbench.interfaces import Backbone, BackboneEntry
from sslbench.tf_bundle import TFCheckpoint

LOADER = "simclrv2"
BN_EPSILON = 1e-5
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
#: Checkpoint variables that are not the backbone's and are ignored on purpose.
IGNORED_PREFIXES = ("ema_model/", "head_contrastive/", "global_step")
SUPERVISED_HEAD = "head_supervised/linear_layer/dense"


def _nn() -> Any:
    import torch.nn

    return torch.nn


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding of one spatial axis: (before, after), the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def build_model(
    depth: int,
    width: int,
    sk_ratio: float,
    num_classes: int = 0,
    seed: int = 0,
    base_width: int = 64,
    stage_blocks: tuple[int, ...] | None = None,
) -> Any:
    """The SimCLRv2 ResNet (random initialisation from ``seed``), optionally with its linear head.

    ``base_width`` and ``stage_blocks`` exist for small stand-ins in tests; the published models use
    64 and the depth's block counts.
    """
    import torch

    if stage_blocks is None:
        if depth not in STAGE_BLOCKS:
            raise SSLBenchError(f"SimCLRv2 ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        stage_blocks = STAGE_BLOCKS[depth]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _model_class()(stage_blocks, base_width * width, sk_ratio, num_classes)


def _model_class() -> Any:
    """The module classes, defined on first use so that importing the plugin does not import torch."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvBN(nn.Module):
        """Conv (no bias, TF fixed padding) → batch norm → optional ReLU."""

        def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, relu: bool = True) -> None:
            super().__init__()
            # Stride 1 'SAME' and TF's fixed padding both pad (k-1)//2 on each side for odd k.
            self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, bias=False)
            self.bn = nn.BatchNorm2d(c_out, eps=BN_EPSILON)
            self.relu = relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn(self.conv(x))
            return F.relu(x) if self.relu else x

        def tf_layers(self) -> list[tuple[str, nn.Module]]:
            return [("conv", self.conv), ("bn", self.bn)]

    class SelectiveKernel(nn.Module):
        """Two 3×3 streams from one conv, mixed by a softmax over streams of a squeezed global feature."""

        def __init__(self, c_in: int, filters: int, stride: int, sk_ratio: float) -> None:
            super().__init__()
            self.filters = filters
            self.streams = ConvBN(c_in, 2 * filters, 3, stride)
            self.squeeze = ConvBN(filters, max(int(filters * sk_ratio), 32), 1, 1)
            self.mixing = nn.Conv2d(self.squeeze.conv.out_channels, 2 * filters, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            streams = self.streams(x)
            n, _, h, w = streams.shape
            streams = streams.view(n, 2, self.filters, h, w)
            pooled = streams.sum(dim=1).mean(dim=(2, 3), keepdim=True)
            weights = self.mixing(self.squeeze(pooled)).view(n, 2, self.filters, 1, 1).softmax(dim=1)
            return (streams * weights).sum(dim=1)

        def tf_layers(self) -> list[tuple[str, nn.Module]]:
            return [*self.streams.tf_layers(), *self.squeeze.tf_layers(), ("conv", self.mixing)]

    class Shortcut(nn.Module):
        """Projection shortcut; with SK the ResNet-D form: 2×2 average pool, then a 1×1 conv."""

        def __init__(self, c_in: int, c_out: int, stride: int, resnet_d: bool) -> None:
            super().__init__()
            self.stride, self.resnet_d = stride, resnet_d
            self.proj = ConvBN(c_in, c_out, 1, 1 if resnet_d else stride, relu=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.resnet_d:
                if self.stride > 1:
                    # TF: fixed_padding(2) with zeros, then a VALID pool (the zeros are averaged).
                    x = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, self.stride)
                else:
                    # TF 'SAME' average pool: bottom/right padding left out of each window's mean.
                    x = F.pad(x, (0, 1, 0, 1))
                    ones = F.pad(torch.ones_like(x[:1, :1, :-1, :-1]), (0, 1, 0, 1))
                    x = F.avg_pool2d(x, 2, 1) / F.avg_pool2d(ones, 2, 1)
            return self.proj(x)

        def tf_layers(self) -> list[tuple[str, nn.Module]]:
            return self.proj.tf_layers()

    class Bottleneck(nn.Module):
        def __init__(self, c_in: int, filters: int, stride: int, projection: bool, sk_ratio: float) -> None:
            super().__init__()
            self.shortcut = Shortcut(c_in, 4 * filters, stride, sk_ratio > 0) if projection else None
            self.conv1 = ConvBN(c_in, filters, 1, 1)
            self.conv2: SelectiveKernel | ConvBN = (
                SelectiveKernel(filters, filters, stride, sk_ratio)
                if sk_ratio > 0
                else ConvBN(filters, filters, 3, stride)
            )
            self.conv3 = ConvBN(filters, 4 * filters, 1, 1, relu=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = self.shortcut(x) if self.shortcut is not None else x
            return F.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)

        def tf_layers(self) -> list[tuple[str, nn.Module]]:
            # TF creates the shortcut's layers first (bottleneck_block), which fixes their numbers.
            head = self.shortcut.tf_layers() if self.shortcut is not None else []
            return [*head, *self.conv1.tf_layers(), *self.conv2.tf_layers(), *self.conv3.tf_layers()]

    class SimCLRv2ResNet(nn.Module):
        def __init__(self, stage_blocks: tuple[int, ...], base: int, sk_ratio: float, num_classes: int) -> None:
            super().__init__()
            if sk_ratio > 0:
                half = base // 2
                self.stem = nn.Sequential(ConvBN(3, half, 3, 2), ConvBN(half, half, 3, 1), ConvBN(half, base, 3, 1))
            else:
                self.stem = nn.Sequential(ConvBN(3, base, 7, 2))
            blocks, c_in = [], base
            for stage, count in enumerate(stage_blocks):
                filters = base * 2**stage
                for index in range(count):
                    stride = (1 if stage == 0 else 2) if index == 0 else 1
                    blocks.append(Bottleneck(c_in, filters, stride, index == 0, sk_ratio))
                    c_in = 4 * filters
            self.blocks = nn.Sequential(*blocks)
            self.num_features = c_in
            self.fc = nn.Linear(c_in, num_classes) if num_classes else None

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            top, bottom = tf_same_padding(x.shape[2], 3, 2)
            left, right = tf_same_padding(x.shape[3], 3, 2)
            x = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), 3, 2)
            return self.blocks(x).mean(dim=(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc is None:
                raise SSLBenchError("this SimCLRv2 model was built without its supervised head")
            return self.fc(self.forward_features(x))

        def tf_layers(self) -> list[tuple[str, nn.Module]]:
            modules: list[Any] = [*self.stem, *self.blocks]
            return [layer for module in modules for layer in module.tf_layers()]

    _MODEL = SimCLRv2ResNet
    return _MODEL


_MODEL: Any = None


# --------------------------------------------------------------------------------------------------
# TF variables → PyTorch parameters


def tf_variable_names(model: Any, scope: str = "base_model") -> dict[str, tuple[Any, str]]:
    """``{TF variable name: (torch tensor, kind)}`` for every backbone variable, in TF's numbering."""
    names: dict[str, tuple[Any, str]] = {}
    count = {"conv": 0, "bn": 0}
    for kind, module in model.tf_layers():
        index = count[kind]
        count[kind] += 1
        if kind == "conv":
            layer = f"{scope}/conv2d" + (f"_{index}" if index else "")
            names[f"{layer}/kernel"] = (module.weight, "kernel")
        else:
            layer = f"{scope}/batch_normalization" + (f"_{index}" if index else "")
            names[f"{layer}/gamma"] = (module.weight, "vector")
            names[f"{layer}/beta"] = (module.bias, "vector")
            names[f"{layer}/moving_mean"] = (module.running_mean, "vector")
            names[f"{layer}/moving_variance"] = (module.running_var, "vector")
    if model.fc is not None:
        names[f"{SUPERVISED_HEAD}/kernel"] = (model.fc.weight, "dense")
        names[f"{SUPERVISED_HEAD}/bias"] = (model.fc.bias, "vector")
    return names


def load_tf_checkpoint(model: Any, checkpoint: TFCheckpoint, scope: str = "base_model") -> None:
    """Copy the checkpoint's ``scope`` variables (and the supervised head) into ``model``, strictly:
    a missing or unexpected variable, or a shape that differs, is an error naming it."""
    import torch

    expected = tf_variable_names(model, scope)
    other_scope = "ema_model/" if scope == "base_model" else "base_model/"
    ignored = (*(p for p in IGNORED_PREFIXES if p != f"{scope}/"), other_scope)
    present = {
        name
        for name in checkpoint.names()
        if not name.endswith("/Momentum")
        and not name.startswith(ignored)
        and (name.startswith(f"{scope}/") or name.startswith(f"{SUPERVISED_HEAD}/"))
    }
    if model.fc is None:
        present = {n for n in present if not n.startswith(f"{SUPERVISED_HEAD}/")}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} variable(s) missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise SSLBenchError(
            f"{checkpoint.prefix} does not match the architecture: {'; '.join(parts)} "
            "(a different depth, width or SK setting?)"
        )
    with torch.no_grad():
        for name, (tensor, kind) in expected.items():
            value = checkpoint.read(name)
            if kind == "kernel":
                value = value.transpose(3, 2, 0, 1)  # HWIO → OIHW
            elif kind == "dense":
                value = value.T  # (in, out) → (out, in)
            if tuple(value.shape) != tuple(tensor.shape):
                raise SSLBenchError(
                    f"{checkpoint.prefix}: variable '{name}' has shape {value.shape}, the model expects "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


# --------------------------------------------------------------------------------------------------
# TF's evaluation preprocessing


@functools.lru_cache(maxsize=256)
def tf_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` weights of TF1 ``resize_bicubic`` (align_corners=False, no half-pixel
    centres): source = i · in/out, cubic convolution with a = −0.75 evaluated at the fraction rounded
    to 1/1024 (TF's coefficient table), edge samples clamped. Cached per size pair (read-only)."""
    a = -0.75
    scale = size_in / size_out
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = i * scale
        base = math.floor(source)
        t = float(np.rint((source - base) * 1024)) / 1024
        for offset in (-1, 0, 1, 2):
            d = abs(offset - t)
            if d <= 1:
                w = (a + 2) * d**3 - (a + 3) * d**2 + 1
            elif d < 2:
                w = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            else:
                w = 0.0
            weights[i, min(max(base + offset, 0), size_in - 1)] += w
    weights.flags.writeable = False
    return weights


def tf_center_crop_box(height: int, width: int, proportion: float = 0.875) -> tuple[int, int, int, int]:
    """(top, left, size_h, size_w) of SimCLR's aspect-preserving centre crop for a square output."""
    if width > height:  # image wider than the square output: crop by the height
        crop_h = crop_w = int(np.rint(proportion * height))
    else:
        crop_h = crop_w = int(np.rint(proportion * width))
    return (height - crop_h + 1) // 2, (width - crop_w + 1) // 2, crop_h, crop_w


def tf_eval_preprocess(image: Any, size: int) -> Any:
    """A PIL image → ``(3, size, size)`` float tensor in [0, 1], as SimCLR's ``preprocess_for_eval``."""
    import torch

    image = rgb(image)
    top, left, crop_h, crop_w = tf_center_crop_box(image.height, image.width)
    # Cropped while still uint8, then divided in one pass (the same values as dividing the whole
    # image and cropping, as the division is per pixel), contiguous for the first product.
    crop = np.asarray(image)[top : top + crop_h, left : left + crop_w]
    pixels = np.divide(crop, 255.0, dtype=np.float64)
    rows, cols = tf_bicubic_matrix(crop_h, size), tf_bicubic_matrix(crop_w, size)
    # Separable: resize the height, then the width, each a matrix product (an einsum over all four
    # indices at once costs size² · crop² · 3 multiplications, seconds per image).
    tall = (rows @ pixels.reshape(crop_h, -1)).reshape(size, crop_w, 3)
    resized = tall.transpose(2, 0, 1) @ cols.T
    np.clip(resized, 0.0, 1.0, out=resized)
    return torch.from_numpy(resized.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The backbone plugin


class SimCLRv2Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    weights: str | None = Field(
        None, description="a local TF checkpoint: its prefix (model.ckpt-250228), .index file or folder"
    )
    pretrained: bool = Field(True, description="false: the architecture's random initialisation")
    init_seed: int = Field(0, ge=0, description="seed of the random initialisation (pretrained: false)")
    ema: bool = Field(False, description="read the ema_model/ copy of the weights instead of base_model/")
    crop: int | None = Field(None, ge=16, description="input size instead of the card's 224")


def resolve_checkpoint(card: ModelCard, override: str | None) -> TFCheckpoint:
    """The card's TF checkpoint: the override, a copy in the torch.hub cache, or a download of its
    ``.index`` and ``.data-00000-of-00001`` files."""
    from sslbench.weights import download, hub_checkpoint_dir  # here: listing plugins needs neither

    if override is not None:
        return TFCheckpoint(override)
    for source in card.weights:
        if source.kind == "url" and source.url is not None:
            name = source.file_name or source.url.rsplit("/", 1)[-1]
            prefix = hub_checkpoint_dir() / name
            if not Path(f"{prefix}.index").is_file():
                download(f"{source.url}.data-00000-of-00001", f"{name}.data-00000-of-00001")
                download(f"{source.url}.index", f"{name}.index")
            return TFCheckpoint(prefix)
        if source.kind == "file" and source.path is not None:
            return TFCheckpoint(source.path)
    raise SSLBenchError(f"card {card.id} lists no TF checkpoint source; give the model's `weights` option")


class SimCLRv2Backbone(Backbone):
    """A SimCLRv2 ResNet; features are the globally averaged output of the last stage."""

    def __init__(self, card: ModelCard, options: SimCLRv2Options) -> None:
        args = card.architecture.args
        self.card = card
        self.feature_dim = card.feature.dim
        blocks = tuple(args["stage_blocks"]) if "stage_blocks" in args else None
        self.model = build_model(
            int(args["depth"]),
            int(args["width"]),
            float(args["sk_ratio"]),
            card.architecture.num_classes,
            options.init_seed,
            int(args.get("base_width", 64)),
            blocks,
        )
        if options.pretrained:
            checkpoint = resolve_checkpoint(card, options.weights)
            load_tf_checkpoint(self.model, checkpoint, "ema_model" if options.ema else "base_model")
            from sslbench.weights import file_digest

            # The index holds a CRC-32C of every tensor, so its digest identifies the weights.
            self.weights_sha256 = file_digest(Path(f"{checkpoint.prefix}.index"))
        else:
            self.weights_sha256 = f"random-init-{options.init_seed}"
        self.model.eval()
        self.crop = options.crop or card.preprocessing.crop
        self.ema = options.ema

    def fingerprint(self) -> dict[str, Any]:
        return {
            "card": self.card.id,
            "card_version": self.card.version,
            "weights_sha256": self.weights_sha256,
            "ema": self.ema,
            "preprocessing": {"tf_center_crop": 0.875, "tf1_bicubic": self.crop, "range": [0, 1]},
        }

    def to(self, device: str) -> SimCLRv2Backbone:
        self.model.to(device)
        return self

    def torch_modules(self) -> list[Any]:
        return [self.model]

    def preprocess(self, sample: Any) -> Any:
        from PIL import Image

        image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
        return tf_eval_preprocess(image, self.crop)

    def decode_side(self) -> int:
        # The 87.5 % centre crop of the shorter side is resized to ``crop``.
        return math.ceil(self.crop / 0.875)

    def embed(self, batch: Any) -> Any:
        return self.model.forward_features(batch)

    def logits(self, batch: Any) -> Any:
        """ImageNet class scores from the checkpoint's ``head_supervised`` (sorted-wnid order)."""
        return self.model(batch)


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    for entry in backbone_entries(LOADER, SimCLRv2Backbone, SimCLRv2Options, lambda card: "download (TF checkpoint)"):
        register(entry)
