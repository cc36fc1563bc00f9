"""A tiny LightningModule on scikit-learn's digits, shared by the in-process callback tests and the DDP
script (tests/lightning_ddp_worker.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

#: The protocol every test evaluates with: small, so that a few evaluations take well under a second.
PROTOCOL = {"epochs": 3, "seeds": 2, "batch_size": 128, "probes": [{"id": "knn", "options": {"k": [5]}}]}


def to_tensor(sample) -> torch.Tensor:
    """A digits image (8×8, 8-bit) as a 1×8×8 float tensor."""
    return torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0)[None]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1)


class TinyModule(pl.LightningModule):
    """A supervised encoder + head: its features change with every step."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Encoder()
        self.head = nn.Linear(32, 10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.head(self.backbone(images)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def digits_loader(batch_size: int = 64) -> torch.utils.data.DataLoader:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    data = torch.utils.data.TensorDataset(images, torch.from_numpy(digits.target))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
