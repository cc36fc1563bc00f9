"""Backbones described by model cards and built in PyTorch (timm architectures): MoCo v2, InfoMin,
SwAV, the supervised baselines, and the offline-installable EfficientNet-Lite0 and MobileNetV2.

Every card in the bundled registry whose ``loader`` is ``pytorch`` becomes a backbone named by the
card's id. Weights load strictly (see :mod:`sslbench.weights`); ``pretrained: false`` builds the same
architecture with its random initialisation (the "random init" control).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import hookimpl
from sslbench.cards import ModelCard, backbone_entries, cards_from
from sslbench.errors import SSLBenchError
from sslbench.imaging import EvalTransform
from sslbench.interfaces import Backbone, BackboneEntry
from sslbench.weights import (
    CARD_LOADER,
    apply_layout,
    load_state,
    read_checkpoint,
    resolve_weights,
    verify_weights,
)

LOADER = CARD_LOADER


class CardOptions(BaseModel):
    """The options of every model-card backbone (a spec's ``models[].options``), the bundled cards and those
    of ``card_backbones`` alike."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weights: str | None = Field(None, description="a local weights file instead of the card's sources")
    pretrained: bool = Field(True, description="false: the architecture's random initialisation")
    init_seed: int = Field(0, ge=0, description="seed of the random initialisation (pretrained: false)")
    crop: int | None = Field(
        None,
        ge=8,
        description="input size instead of the card's (resize scaled alike), e.g. for small images",
    )


def build_architecture(card: ModelCard, seed: int = 0) -> Any:
    """The card's architecture with its random initialisation drawn from ``seed``."""
    import timm
    import torch

    arch = card.architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch.source == "timm":
            return timm.create_model(arch.name, pretrained=False, num_classes=arch.num_classes, **arch.args)
        from timm.models.resnet import Bottleneck, ResNet

        return ResNet(block=Bottleneck, num_classes=arch.num_classes, **arch.args)  # type: ignore[arg-type]


class CardBackbone(Backbone):
    """A timm architecture with the card's weights; features are the pooled pre-logits, or the tokens of
    ``forward_features`` pooled as the card's ``feature.pool`` says."""

    def __init__(self, card: ModelCard, options: CardOptions) -> None:

        self.card = card
        self.feature_dim = card.feature.dim
        where = f"model {card.id}"
        if options.pretrained:
            self.model = build_architecture(card)
            found = resolve_weights(card, options.weights)
            self.weights_sha256 = verify_weights(found, card.id)
            read_from = f"{where} ({found.where} {found.path})"
            state = apply_layout(read_checkpoint(found.path), found.layout, read_from)
            load_state(self.model, state, found.layout, read_from)
        else:
            self.model = build_architecture(card, options.init_seed)
            self.weights_sha256 = f"random-init-{options.init_seed}"
        self.model.eval()
        if card.feature.pool in ("cls", "cls+mean") and getattr(self.model, "cls_token", None) is None:
            raise SSLBenchError(f"{where} has no class token: feature.pool '{card.feature.pool}' does not apply")
        pre = card.preprocessing
        self.crop = options.crop or pre.crop
        self.resize = round(pre.resize * self.crop / pre.crop)
        self._transform = self._eval_transform()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "card": self.card.id,
            "card_version": self.card.version,
            "weights_sha256": self.weights_sha256,
            "preprocessing": {
                **self.card.preprocessing.model_dump(),
                "crop": self.crop,
                "resize": self.resize,
                "transform": "torchvision Resize(int) + CenterCrop",
            },
        }

    def to(self, device: str) -> CardBackbone:
        self.model.to(device)
        return self

    def torch_modules(self) -> list[Any]:
        return [self.model]

    def preprocess(self, sample: Any) -> Any:
        from PIL import Image

        image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
        return self._transform(image)

    def decode_side(self) -> int:
        return self._transform.min_side

    def _eval_transform(self) -> EvalTransform:
        """torchvision's evaluation transform for the card, ``Resize(int)`` of the short side (its
        rounding, not a re-implementation: they differ on about half of all aspect ratios),
        ``CenterCrop``, ``ToTensor``, ``Normalize``, computed bit for bit by :class:`EvalTransform`
        (``.torchvision()`` gives torchvision's own)."""
        pre = self.card.preprocessing
        return EvalTransform.make(self.resize, self.crop, pre.interpolation, pre.mean, pre.std)

    def embed(self, batch: Any) -> Any:
        features = self.model.forward_features(batch)
        pool = self.card.feature.pool
        if pool == "default":
            return self.model.forward_head(features, pre_logits=True)
        from .generic_backbones import pool_output

        return pool_output(features, pool, getattr(self.model, "num_prefix_tokens", 0), f"model {self.card.id}")

    def logits(self, batch: Any) -> Any:
        """Class scores, for cards whose architecture keeps its classifier."""
        return self.model(batch)


def _weights_summary(card: ModelCard) -> str:
    """Where the card's weights come from, every kind of source in the card's order."""
    labels = {
        "url": "download",
        "hf": "Hugging Face",
        "timm": "timm",
        "package": "package",
        "file": "local file",
        "manual": "manual",
    }
    return " or ".join(dict.fromkeys(labels[source.kind] for source in card.weights))


def card_backbones(source: Any, where: str = "cards") -> list[BackboneEntry]:
    """Backbone entries for a third party's PyTorch model cards, built exactly as the bundled ones: the
    card's timm architecture, its weights from its sources in order (or the spec's ``weights`` option),
    the card's hash checked, its layout applied, strict loading, the card's preprocessing. Register
    every entry it returns from your ``sslbench_register_backbones``::

        from importlib.resources import files

        @hookimpl
        def sslbench_register_backbones(register):
            from sslbench_plugins.pytorch_zoo import card_backbones

            for entry in card_backbones(files("my_plugin") / "cards"):
                register(entry)

    :param source: a folder of card files (a path, or ``importlib.resources.files(...)`` of a package
        folder; every ``*.yaml`` in it is read, and relative ``file`` paths are taken from it), or a
        sequence of card mappings (or :class:`~sslbench.cards.ModelCard` objects) given in code. A folder
        and the weights it holds must be declared package data of your distribution.
    :param where: names the cards given in code in error messages (``where[2]: feature.dim: …``); errors
        in a card file name the file.
    :returns: one :class:`~sslbench.interfaces.BackboneEntry` per card, named by the card's id, with the
        card's family, description and feature dimension, the card itself (``entry.card``) and
        :class:`CardOptions` as its options; nothing is built or read until a spec uses the backbone.
    :raises SSLBenchError: in one line: a folder that does not exist, a card that breaks the schema, an id
        defined twice, a relative ``file`` path in a card given in code, a card whose ``loader`` is not
        ``pytorch`` (this function builds PyTorch cards only). An id another plugin registered is a
        :class:`~sslbench.errors.PluginError` naming both, raised by ``register``.
    """
    cards = cards_from(source, where)
    for card in cards:
        if card.loader != LOADER:
            raise SSLBenchError(
                f"{where}: card {card.id} has loader '{card.loader}'; card_backbones builds '{LOADER}' cards only"
            )
    return backbone_entries(LOADER, CardBackbone, CardOptions, _weights_summary, cards)


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    for entry in backbone_entries(LOADER, CardBackbone, CardOptions, _weights_summary):
        register(entry)
