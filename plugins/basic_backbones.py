"""Baseline backbones: raw input, and a randomly initialised small CNN (the "random init" row)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import hookimpl
from sslbench.interfaces import Backbone, BackboneEntry, NoOptions


def _as_array(sample: Any) -> np.ndarray:
    return np.asarray(sample, dtype=np.float32).reshape(-1)


class RawBackbone(Backbone):
    """The input itself, flattened: raw pixels for images, the stored vectors for features."""

    feature_dim = None

    def __init__(self, options: NoOptions) -> None:
        pass

    def preprocess(self, sample: Any) -> Any:
        import torch

        return torch.from_numpy(_as_array(sample))

    def embed(self, batch: Any) -> Any:
        return batch.reshape(len(batch), -1)

    def embed_array(self, array: np.ndarray) -> np.ndarray:
        flat = array.reshape(len(array), -1)
        return flat if np.issubdtype(flat.dtype, np.floating) else flat.astype(np.float32)


class RandomCNNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image_size: int = Field(32, ge=8, description="input images are resized to this square size")
    width: int = Field(32, ge=1, description="channels of the first conv; features are 16×width")
    init_seed: int = Field(0, ge=0, description="seed of the random initialisation")


class RandomCNN(Backbone):
    """Three 3×3 conv + ReLU layers (stride 1, 2, 2), average-pooled to a 2×2 grid; never trained.

    Pooling to a grid rather than to one vector keeps the coarse layout that random filters can
    still encode, which is what makes random-init features a meaningful floor.
    """

    def __init__(self, options: RandomCNNOptions) -> None:
        import torch
        from torch import nn

        self.options = options
        self.feature_dim = 16 * options.width
        w = options.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.init_seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, w, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            ).eval()

    def to(self, device: str) -> RandomCNN:
        self.net.to(device)
        return self

    def torch_modules(self) -> list[Any]:
        return [self.net]

    def preprocess(self, sample: Any) -> Any:
        import torch
        from PIL import Image

        image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
        size = self.options.image_size
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def embed(self, batch: Any) -> Any:
        return self.net(batch)


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    register(
        BackboneEntry(
            "raw",
            RawBackbone,
            family="baseline",
            description="raw input flattened (pixels of images, or precomputed features)",
        )
    )
    register(
        BackboneEntry(
            "random_cnn",
            RandomCNN,
            family="baseline",
            description="3-layer CNN, random init (seeded), 2×2 average pool",
            options=RandomCNNOptions,
            feature_dim=512,
            weights="none (random init, seeded)",
        )
    )
