"""Feature extraction: a backbone's own preprocessing, no augmentation, a fixed sample order."""

from __future__ import annotations

import numpy as np

from sslbench.errors import SSLBenchError
from sslbench.interfaces import Backbone, Split, iter_chunks


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``; a missing GPU is a user error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SSLBenchError(f"device '{device}' was asked for but torch sees no CUDA GPU; use device: cpu")
    return device


def extract_features(
    backbone: Backbone, split: Split, *, batch_size: int, device: str, name: str
) -> np.ndarray:
    """Features of every sample of ``split``, in order, as a float32 ``(n, d)`` array."""
    whole = split.as_array()
    if whole is not None:
        direct = backbone.embed_array(whole)
        if direct is not None:
            return direct
    import torch

    n = len(split)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows in iter_chunks(n, batch_size):
            batch = torch.stack([backbone.preprocess(split[i]) for i in range(rows.start, rows.stop)])
            features = backbone.embed(batch.to(device)).float().cpu().numpy()
            if features.ndim != 2 or len(features) != rows.stop - rows.start:
                raise RuntimeError(
                    f"backbone returned features of shape {features.shape} for a batch of "
                    f"{rows.stop - rows.start}; expected (batch, dims)"
                )
            if out is None:
                if backbone.feature_dim is not None and features.shape[1] != backbone.feature_dim:
                    raise RuntimeError(
                        f"backbone declares {backbone.feature_dim}-d features but returned "
                        f"{features.shape[1]}-d ones"
                    )
                out = np.empty((n, features.shape[1]), dtype=np.float32)
            out[rows] = features
    if out is None:
        raise SSLBenchError(f"{name} has no samples")
    return out
