"""GPU check, one call: torch CUDA (and cuML where installed) on 1.28M × 2048 features, k = 1000, 60 epochs.

    python benchmarks/gpu_clustering.py            # target: torch k-means ≤ 30 s on one H100
    python benchmarks/gpu_clustering.py --device cpu --rows 20000 --k 100 --epochs 3   # a dry run

Three parts, from one run:

1. rates: float32 and float64 GEMM on the device, in the k-means and PCA shapes;
2. parity: the torch backend on the CPU and on the device, same seed, 30k × 256 blobs, k = 100:
   ACC/NMI of each, the share of identical predictions, PCA explained variance relative difference;
3. scale: 1.28M × 2048 class blobs (drawn on the device, held on the host like extracted features),
   the paper's protocol end to end (PCA all dims, k-means, train and eval prediction, scoring); the time
   of each stage, ACC and NMI; then a separate 10-epoch fit timed against its bound 2·N·k·d / rate.

Exits non-zero when the device is not visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import class_blobs_torch

from sslbench import evaluate_features
from sslbench.engine.kmeans import TorchKMeans
from sslbench.engine.pca import TorchPCA
from sslbench.interfaces import ClustererConfig, ReducerConfig
from sslbench.spec import default_kmeans_batch_size


def gemm_rate(m: int, k: int, n: int, dtype: object, device: str) -> float:
    """flop/s of an (m × k) @ (k × n) product, median of 20 after warm-up."""
    import torch

    a = torch.randn(m, k, device=device, dtype=dtype)  # type: ignore[call-overload]
    b = torch.randn(k, n, device=device, dtype=dtype)  # type: ignore[call-overload]
    times = []
    for i in range(25):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - t0) / 10)
    return 2 * m * k * n / float(np.median(times))


def parity(device: str) -> None:
    x, y = class_blobs_torch(33_000, 100, 256, "cpu", seed=1)
    xtr, ytr, xev, yev = x[:30_000], y[:30_000], x[30_000:], y[30_000:]
    scores = {}
    for where in ("cpu", device):
        res = evaluate_features(xtr, ytr, xev, yev, epochs=10, seeds=[0], backend="torch", device=where)
        scores[where] = res.runs[0].metrics
    print(
        "parity (30k × 256, k = 100, 10 epochs, seed 0): "
        + " | ".join(f"{w}: ACC {100 * m['acc']:.2f} NMI {100 * m['nmi']:.2f}" for w, m in scores.items())
    )
    config = ClustererConfig(100, 10, default_kmeans_batch_size(100), 0)
    labels = {}
    for where in ("cpu", device):
        kmeans = TorchKMeans(dataclasses.replace(config, device=where))
        kmeans.fit(xtr)
        labels[where] = kmeans.predict(xev)
    print(f"parity: identical eval predictions cpu vs {device}: {100 * np.mean(labels['cpu'] == labels[device]):.2f} %")
    variance = {}
    for where in ("cpu", device):
        pca = TorchPCA(ReducerConfig(device=where))
        pca.fit(xtr)
        assert pca.explained_variance is not None
        variance[where] = pca.explained_variance[:64]
    rel = np.abs(variance["cpu"] - variance[device]).max() / variance["cpu"].max()
    print(f"parity: PCA explained variance (top 64) max relative difference cpu vs {device}: {rel:.1e}")


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--bound-epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="profile one epoch and print the top operators")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA GPU visible", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    fp32 = gemm_rate(default_kmeans_batch_size(args.k), args.dims, args.k, torch.float32, device)
    fp64 = gemm_rate(args.dims, 8192, args.dims, torch.float64, device)
    print(f"rates: float32 GEMM {fp32 / 1e12:.1f} TFLOP/s (k-means shape), float64 {fp64 / 1e12:.1f} TFLOP/s")

    parity(device)

    t0 = time.perf_counter()
    x, y = class_blobs_torch(args.rows + 50_000, args.k, args.dims, device)
    print(f"generated {args.rows} + 50000 × {args.dims} features in {time.perf_counter() - t0:.0f} s")
    xtr, ytr, xev, yev = x[: args.rows], y[: args.rows], x[args.rows :], y[args.rows :]

    backends = ["torch"] + (["cuml"] if importlib.util.find_spec("cuml") else [])
    if len(backends) == 1:
        print("cuml: not installed, skipped")
    for backend in backends:
        t0 = time.perf_counter()
        results = evaluate_features(
            xtr, ytr, xev, yev, n_clusters=args.k, epochs=args.epochs, seeds=[0], backend=backend, device=device
        )
        run = results.runs[0]
        t = run.timings
        print(
            f"{backend}: total {time.perf_counter() - t0:.1f} s | PCA fit+transform {t.pca_s:.1f} s | "
            f"k-means {t.kmeans_s:.1f} s (target ≤ 30 s) | predict+score {t.eval_s:.1f} s | "
            f"ACC {100 * run.metrics['acc']:.2f} | NMI {100 * run.metrics['nmi']:.2f}"
        )

    kmeans = TorchKMeans(
        ClustererConfig(args.k, args.bound_epochs, default_kmeans_batch_size(args.k), 0, device=device)
    )
    kmeans.fit(xtr)
    per_epoch = kmeans.iterations_s / args.bound_epochs
    bound = 2 * args.rows * args.k * args.dims / fp32
    print(
        f"torch k-means: {per_epoch:.3f} s/epoch (k-means++ {kmeans.init_s:.2f} s once, upload included in neither)"
        f" vs bound 2·N·k·d/rate = {bound:.3f} s: {per_epoch / bound:.2f}×"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        kmeans = TorchKMeans(ClustererConfig(args.k, 1, default_kmeans_batch_size(args.k), 0, device=device))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            kmeans.fit(xtr)
        sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
