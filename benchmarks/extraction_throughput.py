"""Extraction throughput against the same backbone's pure forward throughput, one run.

    python benchmarks/extraction_throughput.py               # Fashion-MNIST test images if installed
    python benchmarks/extraction_throughput.py --images 2000 --image-size 96 --workers 0

Pure forward: the backbone on random tensors of the input shape, batch after batch, under
``torch.inference_mode``. Extraction: the real path — reading and decoding images, the backbone's
preprocessing, the DataLoader, the forward, and committing features to a fresh cache entry.
Target: extraction ≥ 90 % of the pure forward rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sslbench.cache import CacheKey, FeatureCache
from sslbench.extract import ExtractionSettings, extract_split
from sslbench_plugins.basic_backbones import RandomCNN, RandomCNNOptions
from sslbench_plugins.datasets import ArraySplit, load_digits_dataset
from sslbench_plugins.image_datasets import DEBIAN_FASHION_MNIST, FashionMNISTOptions, load_fashion_mnist


def images(count: int) -> tuple[str, ArraySplit]:
    if Path(DEBIAN_FASHION_MNIST).is_dir():
        split = load_fashion_mnist(FashionMNISTOptions(limit=count)).splits["test"]
        return "Fashion-MNIST test (28×28 PNG-like uint8)", split  # type: ignore[return-value]
    digits = load_digits_dataset(None).splits["train"]  # type: ignore[arg-type]
    reps = -(-count // len(digits))
    array = np.concatenate([digits.as_array()] * reps)[:count]
    return "scikit-learn digits (8×8)", ArraySplit(array, np.zeros(count, dtype=np.int64), as_image=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="as the spec default")
    args = parser.parse_args()

    source, split = images(args.images)
    backbone = RandomCNN(RandomCNNOptions(image_size=args.image_size, width=args.width))
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    with torch.inference_mode():
        backbone.embed(torch.rand(shape))  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < len(split):
            backbone.embed(torch.rand(min(args.batch_size, len(split) - done), *shape[1:]))
            done += args.batch_size
        forward_s = time.perf_counter() - t0
    forward_rate = len(split) / forward_s

    with tempfile.TemporaryDirectory() as folder:
        key = CacheKey(
            backbone="random_cnn",
            plugin={"name": "basic_backbones", "distribution": "sslbench", "version": None},
            backbone_options={},
            backbone_fingerprint={},
            dataset="bench",
            dataset_options={},
            split="test",
            split_fingerprint=split.fingerprint(),
        )
        entry = FeatureCache(Path(folder)).entry(key)
        settings = ExtractionSettings(batch_size=args.batch_size, workers=args.workers, commit_every=20)
        t0 = time.perf_counter()
        extracted = extract_split(backbone, split, settings=settings, device="cpu", name="bench", entry=entry)
        extract_s = time.perf_counter() - t0
    extract_rate = len(split) / extract_s
    print(
        f"{len(split)} images from {source}, resized to {args.image_size} px, random-init CNN "
        f"(width {args.width}, {extracted.features.shape[1]}-d), batch {args.batch_size}, "
        f"{args.workers} worker(s), {torch.get_num_threads()} torch threads"
    )
    print(f"pure forward on random tensors: {forward_rate:,.0f} img/s")
    print(f"extraction (decode + preprocess + forward + cache commits): {extract_rate:,.0f} img/s")
    print(f"extraction / forward: {100 * extract_rate / forward_rate:.1f} %   (target ≥ 90 %)")


if __name__ == "__main__":
    main()
