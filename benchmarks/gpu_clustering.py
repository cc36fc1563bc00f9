"""GPU check, one call: torch CUDA (and cuML where installed) on 1.28M × 2048 features, k = 1000, 60 epochs.

    python benchmarks/gpu_clustering.py            # target: torch k-means ≤ 30 s on one H100

Features are generated on the host (the same synthetic class blobs as the CPU benchmarks), then the
torch backend runs PCA and mini-batch k-means on the GPU (the features are uploaded once when they fit
in half the free GPU memory). Prints the time of each stage, ACC and NMI on a held-out set, and the same
for cuML when it imports. Exits non-zero when no GPU is visible.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import class_blobs

from sslbench import evaluate_features


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--pca-dims", type=int, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    t0 = time.perf_counter()
    x, y = class_blobs(args.rows + 50_000, args.k, args.dims)
    print(f"generated {args.rows} + 50000 × {args.dims} features in {time.perf_counter() - t0:.0f} s")
    xtr, ytr, xev, yev = x[: args.rows], y[: args.rows], x[args.rows :], y[args.rows :]

    backends = ["torch"] + (["cuml"] if importlib.util.find_spec("cuml") else [])
    for backend in backends:
        t0 = time.perf_counter()
        results = evaluate_features(
            xtr,
            ytr,
            xev,
            yev,
            n_clusters=args.k,
            epochs=args.epochs,
            seeds=[0],
            pca_dim=args.pca_dims,
            backend=backend,
            device="cuda",
        )
        run = results.runs[0]
        t = run.timings
        print(
            f"{backend}: total {time.perf_counter() - t0:.1f} s | PCA {t.pca_s:.1f} s | "
            f"k-means {t.kmeans_s:.1f} s (target ≤ 30 s) | scoring {t.eval_s:.1f} s | "
            f"ACC {100 * run.metrics['acc']:.2f} | NMI {100 * run.metrics['nmi']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
