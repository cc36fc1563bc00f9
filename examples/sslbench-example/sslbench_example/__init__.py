"""A complete third-party sslbench plugin: a backbone (``pooled_pixels``), model cards built by sslbench's
own card loader (``resnet18.example_tv_in1k`` in code; ``test_vit.example_moco`` and
``test_vit.example_package`` in ``cards/example.yaml``, their weights shipped as package data) and a
metric (``purity``).

Install it with ``pip install examples/sslbench-example``; ``sslbench plugins`` then lists it and a
spec can use ``id: pooled_pixels``. Everything it touches is sslbench's public API.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import Backbone, BackboneEntry, MetricEntry, ScoringContext, hookimpl


class PooledPixelsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grid: int = Field(4, ge=1, description="images are average-pooled to grid × grid cells")


class PooledPixels(Backbone):
    """Greyscale images average-pooled to a coarse grid: a hand-crafted baseline."""

    def __init__(self, options: PooledPixelsOptions) -> None:
        self.grid = options.grid
        self.feature_dim = options.grid * options.grid

    def preprocess(self, sample: Any) -> Any:
        import torch
        from PIL import Image

        image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None]

    def embed(self, batch: Any) -> Any:
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(batch, self.grid).flatten(1)

    def fingerprint(self) -> dict[str, Any]:
        # The cache key already holds this backbone's name, its options (the grid) and this
        # distribution's name and version. What else changes the features goes here: this model has
        # no weights file, so only a revision, bumped when a fix changes the features between releases.
        return {"revision": 1}


#: The folder of card files this package ships (package data: see pyproject.toml). A card's relative
#: ``file`` path is taken from this folder.
CARDS = Path(__file__).parent / "cards"


def weights_folder() -> Path:
    """Where this package keeps the weights of ``test_vit.example_package`` (its ``package`` source)."""
    return Path(__file__).parent / "weights"


#: A model card given in code, validated by sslbench's card schema and built exactly as the bundled cards
#: are (timm architecture, strict loading, torchvision preprocessing). Cards whose weights the package
#: ships live in the ``CARDS`` folder instead (relative paths need a card file to be resolved against).
EXAMPLE_CARDS = [
    {
        "id": "resnet18.example_tv_in1k",
        "family": "example",
        "description": "torchvision ResNet-18 ImageNet-1k weights (example of a card shipped by a plugin)",
        "architecture": {"source": "timm", "name": "resnet18", "num_classes": 1000},
        "weights": [{"kind": "url", "url": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}],
        "hash": {"kind": "sha256-prefix", "value": "f37072fd"},
        "layout": {},
        "feature": {"dim": 512},
        "preprocessing": {
            "resize": 256,
            "crop": 224,
            "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "linear_top1": {"value": 69.758, "source": "supervised top-1, torchvision ResNet18_Weights.IMAGENET1K_V1"},
        "license": "BSD-3-Clause",
    }
]


def purity(ctx: ScoringContext) -> float:
    """Fraction of eval samples that belong to their cluster's most frequent eval class."""
    return float(ctx.eval_contingency.max(axis=1).sum() / ctx.eval_contingency.sum())


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    register(
        BackboneEntry(
            "pooled_pixels",
            PooledPixels,
            family="example",
            description="greyscale image average-pooled to a grid (example plugin)",
            options=PooledPixelsOptions,
            feature_dim=16,
        )
    )
    # Imported here: loading the plugin stays light until backbones are registered.
    from sslbench_plugins.pytorch_zoo import card_backbones

    for entry in card_backbones(EXAMPLE_CARDS, where="sslbench_example.EXAMPLE_CARDS"):
        register(entry)
    for entry in card_backbones(CARDS):
        register(entry)


@hookimpl
def sslbench_register_metrics(register: Callable[[MetricEntry], None]) -> None:
    register(MetricEntry("purity", purity, "Purity", "majority eval class per cluster (example plugin)"))
