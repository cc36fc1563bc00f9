"""sslbench's evaluation inside a hand-written DDP training loop (torch.distributed, gloo on the CPU).

    torchrun --nproc_per_node 2 examples/ddp_training_loop.py OUT_DIR

Trains a small CNN on scikit-learn's digits for three epochs with DistributedDataParallel. After every
epoch every rank calls the evaluator together (evaluate_model is collective: each rank embeds a shard
of the images, every rank gets the same numbers); rank 0 prints them. Each rank writes the last
metrics to OUT_DIR/metrics_rank<r>.json, and rank 0 the encoder's weights to OUT_DIR/encoder.pt
(tests/test_training.py checks them against a single-process evaluate_model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sslbench.training import Evaluator

#: What the evaluation runs (evaluate_model's keywords): fewer k-means epochs and seeds than the paper's
#: 60 × 5 (benchmarks/README.md has the measured trade-off).
PROTOCOL = {"epochs": 20, "seeds": 3, "probes": [{"id": "knn", "options": {"k": [20]}}]}


def to_tensor(sample: object) -> torch.Tensor:
    """A dataset image (an 8-bit greyscale PIL image or array) as the encoder's 1×H×W input."""
    return torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0)[None]


def make_encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    data = TensorDataset(images, torch.from_numpy(digits.target))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    encoder = make_encoder()
    model = DistributedDataParallel(nn.Sequential(encoder, nn.Linear(64, 10)))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.2)

    evaluator = Evaluator(["digits"], every=1, transform=to_tensor, **PROTOCOL)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        model.train()
        for batch, labels in loader:
            loss = nn.functional.cross_entropy(model(batch), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        metrics = evaluator.maybe_evaluate(encoder, epoch)  # on every rank: it is collective
        if metrics and dist.get_rank() == 0:
            print(f"epoch {epoch}: ACC {metrics['sslbench/digits/acc']:.3f}  NMI {metrics['sslbench/digits/nmi']:.3f}")

    (out / f"metrics_rank{dist.get_rank()}.json").write_text(json.dumps(metrics))
    if dist.get_rank() == 0:
        torch.save(encoder.state_dict(), out / "encoder.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
