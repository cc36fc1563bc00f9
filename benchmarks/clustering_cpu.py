"""Reference vs torch (vs faiss) on synthetic ImageNet-like features: time per stage, speed-up, quality.

    python benchmarks/clustering_cpu.py                      # 100k × 2048, k = 1000, 60 epochs
    python benchmarks/clustering_cpu.py --n 20000 --epochs 5  # a quick look

Prints, from one run: the float32 GEMM rate measured here; per backend the PCA, k-means and scoring
times, ACC and NMI; the end-to-end ratio reference / torch (target ≥ 10 on a 2-core CPU) and the NMI
difference (target ≤ 0.5 points); the torch k-means epoch against its GEMM bound 2·N·k·d / rate
with every distance computed (target ≤ 1.3×), and with the default bound pruning (rows whose centre
provably stays the nearest skip the product, so an epoch can beat the bound); the torch PCA fit
against N·d² / rate (target ≤ 2×).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gemm import gemm_rate
from _synthetic import class_blobs

from sslbench import evaluate_features
from sslbench.engine.kmeans import TorchKMeans
from sslbench.engine.options import TorchOptions
from sslbench.engine.pca import TorchPCA
from sslbench.interfaces import ClustererConfig, ReducerConfig
from sslbench.spec import default_kmeans_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="train rows")
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000, help="classes = clusters")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--backends", default="reference,torch,faiss")
    parser.add_argument("--bound-epochs", type=int, default=10, help="epochs timed against the GEMM bound")
    args = parser.parse_args()

    x, y = class_blobs(args.n + args.n // 10, args.k, args.dims)
    xtr, ytr, xev, yev = x[: args.n], y[: args.n], x[args.n :], y[args.n :]
    rate = gemm_rate(2048, args.dims, args.k)
    print(f"data: {args.n} × {args.dims} train, {len(xev)} eval, k = {args.k}, {args.epochs} epochs")
    print(f"float32 GEMM rate here: {rate / 1e9:.0f} GFLOP/s")

    totals, nmi = {}, {}
    for backend in args.backends.split(","):
        if backend == "faiss" and importlib.util.find_spec("faiss") is None:
            print("faiss: not installed, skipped")
            continue
        t0 = time.perf_counter()
        results = evaluate_features(xtr, ytr, xev, yev, epochs=args.epochs, seeds=[0], backend=backend)
        totals[backend] = time.perf_counter() - t0
        run = results.runs[0]
        nmi[backend] = run.metrics["nmi"]
        t = run.timings
        print(
            f"{backend:>9}: total {totals[backend]:7.1f} s | PCA fit+transform {t.pca_s:6.1f} s | "
            f"k-means {t.kmeans_s:7.1f} s | scoring {t.eval_s:5.1f} s | "
            f"ACC {100 * run.metrics['acc']:.2f} | NMI {100 * run.metrics['nmi']:.2f}"
        )
    if "reference" in totals and "torch" in totals:
        print(
            f"reference / torch end to end: {totals['reference'] / totals['torch']:.1f}×   (target ≥ 10×); "
            f"NMI torch − reference: {100 * (nmi['torch'] - nmi['reference']):+.2f} points   (target ≥ −0.5)"
        )

    # The torch stages against their flop bounds, timed apart from set-up.
    epoch_bound = 2 * args.n * args.k * args.dims / rate
    for prune in (False, True):
        options = TorchOptions(prune=prune)
        config = ClustererConfig(args.k, args.bound_epochs, default_kmeans_batch_size(args.k), 0, options=options)
        kmeans = TorchKMeans(config)
        kmeans.fit(xtr)
        per_epoch = kmeans.iterations_s / args.bound_epochs
        settled = kmeans.pruned_rows / (args.bound_epochs * args.n)
        print(
            f"torch k-means, first {args.bound_epochs} epochs, prune={prune}: {per_epoch:.2f} s/epoch "
            f"(k-means++ init {kmeans.init_s:.1f} s once; {100 * settled:.0f} % of rows settled by bounds) "
            f"vs GEMM bound 2·N·k·d/rate = {epoch_bound:.2f} s: {per_epoch / epoch_bound:.2f}×"
            + ("   (target ≤ 1.3× for a full float32 epoch)" if not prune else "")
        )
    pca_bound = args.n * args.dims**2 / rate
    for precision in ("float64", "float32"):
        pca = TorchPCA(ReducerConfig(options=TorchOptions(pca_precision=precision)))
        t0 = time.perf_counter()
        pca.fit(xtr)
        fit_s = time.perf_counter() - t0
        print(
            f"torch PCA fit ({precision} products): {fit_s:.1f} s vs bound N·d²/rate = {pca_bound:.2f} s: "
            f"{fit_s / pca_bound:.2f}×   (target ≤ 2×)"
        )


if __name__ == "__main__":
    main()
