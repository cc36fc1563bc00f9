"""BigBiGAN encoders through TensorFlow Hub — the optional ``tf`` extra (tensorflow-cpu, tensorflow-hub).

BigBiGAN was released only as TF1 Hub modules and no PyTorch port of its encoder exists, so this
plugin runs the module itself: its ``encode`` signature on 256 × 256 images in [-1, 1] (a centre
square crop of the full shorter side, bicubic resize, as DeepMind's demo), and takes the output the
card names — ``default`` (the 120-d latent the paper's code clustered, which explains its 3 % ACC),
``avepool_feat`` or ``bn_crelu_feat`` (the representations BigBiGAN's linear top-1 was measured on).
TensorFlow is imported only when such a backbone is built; without it the error says what to install.
"""

from __future__ import annotations

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

LOADER = "bigbigan"
SIZE = 256
OUTPUTS = ("default", "avepool_feat", "bn_crelu_feat", "z_mean", "z_sample")


class BigBiGANOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    module: str | None = Field(
        None, description="a TF-Hub handle or a local module folder instead of the card's (e.g. an unpacked tarball)"
    )


INSTALL = "pip install 'sslbench[tf]' (tensorflow-cpu, tensorflow-hub)"


def _tensorflow() -> Any:
    try:
        import tensorflow as tf
    except ImportError:
        raise SSLBenchError(f"BigBiGAN backbones run its TF-Hub module: {INSTALL}") from None
    return tf


def _module_folder(handle: str) -> str:
    """A local module folder as is; a TF-Hub handle downloaded (and cached) by tensorflow_hub."""
    if not handle.startswith(("http://", "https://")):
        folder = Path(handle).expanduser()
        if not folder.is_dir():
            raise SSLBenchError(f"BigBiGAN module folder not found: {handle}")
        return str(folder)
    try:
        import tensorflow_hub as hub
    except ImportError as exc:
        raise SSLBenchError(f"resolving {handle} needs tensorflow_hub ({exc}): {INSTALL}") from None
    try:
        return str(hub.resolve(handle))
    except Exception as exc:  # noqa: BLE001 - network and format errors come in many types
        raise SSLBenchError(f"cannot download the TF-Hub module {handle}: {type(exc).__name__}: {exc}") from None


def _square(image: Any) -> Any:
    """The centre square of the shorter side, resized to 256 × 256 (bicubic): an RGB PIL image."""
    from PIL import Image

    image = rgb(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def center_square_256(image: Any) -> np.ndarray:
    """A PIL image → ``(256, 256, 3)`` float32 in [-1, 1]: centre square of the shorter side, bicubic."""
    return np.asarray(_square(image), dtype=np.float32) / 127.5 - 1.0


class BigBiGANBackbone(Backbone):
    def __init__(self, card: ModelCard, options: BigBiGANOptions) -> None:
        tf = _tensorflow()
        self.card = card
        self.output = str(card.architecture.args.get("output", "default"))
        if self.output not in OUTPUTS:
            raise SSLBenchError(f"card {card.id}: output '{self.output}' is not one of {', '.join(OUTPUTS)}")
        self.handle = options.module or card.architecture.name
        folder = _module_folder(self.handle)
        try:
            # TF1 Hub modules are TF1 SavedModels: loading them in TF2 exposes their signatures.
            module = tf.saved_model.load(folder)
        except Exception as exc:  # noqa: BLE001 - TF raises many types for a missing or bad module
            raise SSLBenchError(f"cannot load the TF-Hub module {self.handle}: {type(exc).__name__}: {exc}") from None
        signatures = getattr(module, "signatures", {})
        if "encode" not in signatures:
            raise SSLBenchError(f"{self.handle} has no 'encode' signature (it has: {', '.join(signatures) or 'none'})")
        self._encode = signatures["encode"]
        self._tf = tf
        self._module = module  # keeps the variables alive
        self.feature_dim = card.feature.dim

    def fingerprint(self) -> dict[str, Any]:
        return {"card": self.card.id, "card_version": self.card.version, "module": self.handle, "output": self.output}

    def to(self, device: str) -> BigBiGANBackbone:
        return self  # TensorFlow places the module itself

    def torch_modules(self) -> list[Any]:
        return []

    def preprocess(self, sample: Any) -> Any:
        import torch
        from PIL import Image

        image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
        # A CHW view of the HWC floats: the DataLoader's stack transposes it while it copies (measured
        # faster than a contiguous tensor made here: benchmarks/input_pipeline.py).
        return torch.from_numpy(center_square_256(image)).permute(2, 0, 1)

    def decode_side(self) -> int:
        return SIZE

    def embed(self, batch: Any) -> Any:
        import torch

        pixels = batch.float().permute(0, 2, 3, 1).cpu().numpy()
        outputs = self._encode(x=self._tf.constant(pixels))
        if self.output not in outputs:
            raise SSLBenchError(
                f"{self.handle}: 'encode' has no output '{self.output}' (it has: {', '.join(sorted(outputs))})"
            )
        features = np.asarray(outputs[self.output]).reshape(len(pixels), -1)
        if features.shape[1] != self.feature_dim:
            raise SSLBenchError(
                f"{self.handle}: output '{self.output}' is {features.shape[1]}-d, "
                f"card {self.card.id} says {self.feature_dim}"
            )
        return torch.from_numpy(np.array(features, dtype=np.float32)).to(batch.device)


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    for entry in backbone_entries(LOADER, BigBiGANBackbone, BigBiGANOptions, lambda card: "TF-Hub module (extra: tf)"):
        register(entry)
