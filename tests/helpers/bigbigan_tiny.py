"""TensorFlow side of the BigBiGAN tests, run in a subprocess: TensorFlow's bundled libraries and
torch's triton must not share the pytest process (importing both segfaults).

    python bigbigan_tiny.py make DIR [AVEPOOL_DIM]   # a SavedModel with BigBiGAN's `encode` signature
    python bigbigan_tiny.py embed DIR CARD_ID        # the plugin's features of a fixed image, as JSON
"""

from __future__ import annotations

import json
import sys

import numpy as np


def make(folder: str, avepool_dim: int) -> None:
    """x [N, 256, 256, 3] → default (120), avepool_feat, bn_crelu_feat (2× avepool), from channel means."""
    import tensorflow as tf

    class Encoder(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(0)
            self.w = tf.Variable(rng.normal(size=(3, avepool_dim)).astype(np.float32))
            self.z = tf.Variable(rng.normal(size=(avepool_dim, 120)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 256, 256, 3], tf.float32)])
        def encode(self, x):
            pooled = tf.reduce_mean(x, axis=[1, 2]) @ self.w
            return {
                "default": pooled @ self.z,
                "avepool_feat": pooled,
                "bn_crelu_feat": tf.concat([tf.nn.relu(pooled), tf.nn.relu(-pooled)], axis=1),
            }

    module = Encoder()
    tf.saved_model.save(module, folder, signatures={"encode": module.encode})


def embed(folder: str, card_id: str) -> None:
    import torch
    from PIL import Image

    from sslbench.cards import load_cards
    from sslbench.errors import SSLBenchError
    from sslbench_plugins.bigbigan import BigBiGANBackbone, BigBiGANOptions

    card = next(c for c in load_cards() if c.id == card_id)
    try:
        backbone = BigBiGANBackbone(card, BigBiGANOptions(module=folder))
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
        features = backbone.embed(torch.stack([backbone.preprocess(image)] * 2))
        print(json.dumps({"shape": list(features.shape), "row": features[0].tolist()}))
    except SSLBenchError as exc:
        print(json.dumps({"error": str(exc)}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2048)
    else:
        embed(sys.argv[2], sys.argv[3])
