"""The CPU clustering engine against the reference (the paper's scikit-learn code) at three scales.

    python benchmarks/clustering_engine.py                  # medium, small and large (≈ 15 min idle)
    python benchmarks/clustering_engine.py --targets medium,small

Every figure comes from this one run, on synthetic ImageNet-like features (``_synthetic.py``); the
float32 and bfloat16 GEMM rates are measured first and every bound is computed from them.

* **medium**: 40,000 × 1,024 train (+ 4,000 eval), k = 500, 5 epochs, 4 seeds, all PCA components,
  ``evaluate_features`` end to end with each backend — target torch ≥ 3× the reference; the torch
  k-means++ initialisation against its flop bound ``k·(2 + ln k)·n_init·d·2`` (target ≤ 2×), an
  epoch against ``2·N·k·d`` and the predictions against ``2·(N + N_eval)·k·d`` at the float32 rate.
* **large**: 100,000 × 2,048 (+ 10,000 eval), k = 1,000, 60 epochs, 1 seed — target torch ≥ 8× the
  reference end to end; torch with pruning off and on must give identical centres and labels (also
  with bfloat16 screening off); the share of rows pruned per epoch; the torch PCA fit against
  ``N·d²`` at the float32 rate (target ≤ 2×) and its explained variances against scikit-learn's
  float64 PCA (``covariance_eigh``), beside the error of the paper's IncrementalPCA.
* **small**: per-seed clustering (k-means fit + predictions of train and eval) of ≤ 10k rows —
  target < 0.3 s per seed.

The benchmark applies sslbench's thread policy as the CLI does (sleeping OpenMP threads).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sslbench.threads import prefer_sleeping_threads

prefer_sleeping_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _gemm import gemm_rate  # noqa: E402
from _synthetic import class_blobs  # noqa: E402

from sslbench import evaluate_features  # noqa: E402
from sslbench.engine.gemm import cpu_has_bf16  # noqa: E402
from sslbench.engine.kmeans import TorchKMeans  # noqa: E402
from sslbench.engine.options import TorchOptions  # noqa: E402
from sslbench.engine.pca import TorchPCA  # noqa: E402
from sslbench.interfaces import ClustererConfig, ReducerConfig  # noqa: E402
from sslbench.spec import default_kmeans_batch_size  # noqa: E402


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def end_to_end(
    x: np.ndarray, y: np.ndarray, n: int, epochs: int, seeds: int, backends: list[str]
) -> dict[str, tuple[float, float]]:
    """Wall seconds and mean NMI of ``evaluate_features`` per backend."""
    out = {}
    for backend in backends:
        started = time.perf_counter()
        results = evaluate_features(x[:n], y[:n], x[n:], y[n:], epochs=epochs, seeds=seeds, backend=backend)
        wall = time.perf_counter() - started
        nmi = float(np.mean([run.metrics["nmi"] for run in results.runs]))
        out[backend] = (wall, nmi)
        timings = results.runs[0].timings
        print(
            f"  {backend:>9}: {wall:7.1f} s end to end | PCA {timings.pca_s:6.1f} s | "
            f"k-means (first seed) {timings.kmeans_s:6.1f} s | NMI {100 * nmi:.2f}"
        )
    return out


def medium(rate32: float) -> None:
    n, d, k, epochs, seeds = 40_000, 1024, 500, 5, 4
    print(f"\n[medium] {n} × {d} (+ {n // 10} eval), k = {k}, {epochs} epochs, {seeds} seeds, all components")
    x, y = class_blobs(n + n // 10, k, d)
    times = end_to_end(x, y, n, epochs, seeds, ["reference", "torch"])
    ratio = times["reference"][0] / times["torch"][0]
    print(f"  reference / torch end to end: {ratio:.2f}×   (target ≥ 3×: {verdict(ratio >= 3)})")

    pca = TorchPCA(ReducerConfig())
    pca.fit(x[:n])
    train, held = pca.project(x[:n], d, False), pca.project(x[n:], d, False)
    batch = default_kmeans_batch_size(k)
    kmeans = TorchKMeans(ClustererConfig(k, epochs, batch, 0))
    kmeans.fit(train)
    started = time.perf_counter()
    kmeans.predict(train)
    kmeans.predict(held)
    predict_s = time.perf_counter() - started
    init_size = 3 * batch
    init_bound = k * (2 + int(math.log(k))) * init_size * d * 2 / rate32
    epoch_bound = 2 * n * k * d / rate32
    predict_bound = 2 * len(x) * k * d / rate32
    init_ratio = kmeans.init_s / init_bound
    print(
        f"  torch k-means++ ({init_size} samples): {kmeans.init_s:.2f} s vs flop bound {init_bound:.2f} s = "
        f"{init_ratio:.2f}×   (target ≤ 2×: {verdict(init_ratio <= 2)})"
    )
    print(
        f"  torch epoch: {kmeans.iterations_s / epochs:.3f} s vs 2·N·k·d/rate = {epoch_bound:.3f} s "
        f"({kmeans.iterations_s / epochs / epoch_bound:.2f}×; pruned rows per epoch: "
        f"{[round(p / n, 2) for p in kmeans.pruned_per_epoch]})"
    )
    print(
        f"  torch predictions (train + eval): {predict_s:.3f} s vs 2·N·k·d/rate = {predict_bound:.3f} s "
        f"({predict_s / predict_bound:.2f}×)"
    )


def large(rate32: float, skip_reference: bool) -> None:
    n, d, k, epochs = 100_000, 2048, 1000, 60
    print(f"\n[large] {n} × {d} (+ {n // 10} eval), k = {k}, {epochs} epochs, 1 seed, all components")
    x, y = class_blobs(n + n // 10, k, d)
    times = end_to_end(x, y, n, epochs, 1, ["torch"] if skip_reference else ["reference", "torch"])
    if not skip_reference:
        ratio = times["reference"][0] / times["torch"][0]
        print(f"  reference / torch end to end: {ratio:.2f}×   (target ≥ 8×: {verdict(ratio >= 8)})")

    started = time.perf_counter()
    pca = TorchPCA(ReducerConfig())
    pca.fit(x[:n])
    fit_s = time.perf_counter() - started
    bound = n * d * d / rate32
    ratio = fit_s / bound
    print(
        f"  torch PCA fit (float32 products): {fit_s:.2f} s vs N·d²/rate = {bound:.2f} s = {ratio:.2f}×   "
        f"(target ≤ 2×: {verdict(ratio <= 2)})"
    )
    pca_errors(x[:n], pca)

    train = pca.project(x[:n], d, False)
    batch = default_kmeans_batch_size(k)
    fits = {}
    for prune, screen in [(False, False), (True, None)]:
        options = TorchOptions(prune=prune, screen=screen)
        kmeans = TorchKMeans(ClustererConfig(k, epochs, batch, 0, options=options))
        kmeans.fit(train)
        fits[prune] = kmeans
        label = "pruned + bfloat16 screening" if prune else "unpruned float32"
        print(f"  torch k-means, {label}: init {kmeans.init_s:.1f} s + {epochs} epochs {kmeans.iterations_s:.1f} s")
    same_centres = torch.equal(fits[True].centers, fits[False].centers)
    same_labels = bool(np.array_equal(fits[True].predict(train), fits[False].predict(train)))
    print(
        f"  identical centres: {same_centres}, identical train assignments: {same_labels}   "
        f"({verdict(same_centres and same_labels)})"
    )
    shares = [p / n for p in fits[True].pruned_per_epoch]
    print(f"  rows pruned per epoch: {' '.join(f'{100 * s:.0f}%' for s in shares)}")
    speedup = fits[False].iterations_s / fits[True].iterations_s
    print(f"  k-means epochs, pruning + screening vs the unpruned float32 fit: {speedup:.2f}× faster")


def pca_errors(x: np.ndarray, ours: TorchPCA) -> None:
    """Largest error of the explained variances against scikit-learn's float64 PCA, relative to the
    largest variance and to each component's own, for float32 and float64 products and the paper's
    IncrementalPCA."""
    from sklearn.decomposition import PCA

    from sslbench_plugins.reference_backend import ReferencePCA

    exact = PCA(svd_solver="covariance_eigh").fit(x.astype(np.float64)).explained_variance_
    double = TorchPCA(ReducerConfig(options=TorchOptions(pca_precision="float64")))
    double.fit(x)
    paper = ReferencePCA(ReducerConfig())
    paper.fit(x)
    rows = [
        ("float32 products (default)", ours.explained_variance),
        ("float64 products", double.explained_variance),
        ("IncrementalPCA (the paper's)", paper._fitted().explained_variance_),
    ]
    for name, values in rows:
        error = np.abs(values - exact)
        significant = exact > 1e-6 * exact[0]
        relative = float((error[significant] / exact[significant]).max())
        print(
            f"  PCA variances, {name}: max error {float(error.max() / exact[0]):.1e} of the largest, "
            f"{relative:.1e} relative on components above 1e-6 of it"
        )


def small(rate32: float) -> None:
    print("\n[small] per-seed clustering (fit + predict train and eval), 60 epochs, target < 0.3 s per seed")
    for n, d, k in [(10_000, 1280, 10), (10_000, 2048, 100), (5_000, 256, 10)]:
        x, _ = class_blobs(n + n // 10, k, d)
        train, held = x[:n], x[n:]
        walls = []
        for seed in range(3):
            started = time.perf_counter()
            kmeans = TorchKMeans(ClustererConfig(k, 60, default_kmeans_batch_size(k), seed))
            kmeans.fit(train)
            kmeans.predict(train)
            kmeans.predict(held)
            walls.append(time.perf_counter() - started)
        median = float(np.median(walls))
        print(f"  {n} × {d}, k = {k}: {median:.3f} s per seed (median of 3)   ({verdict(median < 0.3)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="medium,small,large")
    parser.add_argument("--skip-reference-large", action="store_true", help="the large reference takes ≈ 9 min")
    args = parser.parse_args()
    rate32 = gemm_rate(2048, 1024, 500, "float32", repeats=5)
    rate16 = gemm_rate(2048, 1024, 500, "bfloat16", repeats=5)
    print(
        f"GEMM rates here (2048 × 1024 by 1024 × 500): float32 {rate32 / 1e9:.0f} GFLOP/s, "
        f"bfloat16 {rate16 / 1e9:.0f} GFLOP/s (native bfloat16: {cpu_has_bf16()}); "
        f"torch threads {torch.get_num_threads()}"
    )
    targets = args.targets.split(",")
    if "medium" in targets:
        medium(rate32)
    if "small" in targets:
        small(rate32)
    if "large" in targets:
        large(rate32, args.skip_reference_large)


if __name__ == "__main__":
    main()
