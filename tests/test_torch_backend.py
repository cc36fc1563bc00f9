"""The torch backend: exact PCA, scikit-learn-faithful k-means, streaming, and torch.distributed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from sslbench import SSLBenchError, evaluate_features
from sslbench.arrays import RowReader
from sslbench.engine.kmeans import TorchKMeans
from sslbench.engine.options import TorchOptions
from sslbench.engine.pca import TorchPCA
from sslbench.interfaces import ClustererConfig, ReducerConfig
from sslbench_plugins.reference_backend import ReferencePCA

from conftest import blobs, run_torchrun


def spectrum_data(n: int = 3000, d: int = 24, seed: int = 0) -> np.ndarray:
    """Gaussian data with well-separated variances in a random basis, far from the origin."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.5, d)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * scales) @ basis.T + 50.0).astype(np.float32)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_pca_matches_scikit_learn_exact_pca(precision):
    x = spectrum_data()
    ours = TorchPCA(ReducerConfig(options=TorchOptions(pca_precision=precision)))
    ours.fit(x)
    exact = PCA().fit(x.astype(np.float64))
    if precision == "float64":
        np.testing.assert_allclose(ours.explained_variance, exact.explained_variance_, rtol=1e-6)
    else:
        # float32 chunk products: errors at float32's resolution of the largest variance, and smaller
        # than those of the paper's own PCA (IncrementalPCA on the float32 features).
        error = np.abs(ours.explained_variance - exact.explained_variance_)
        assert error.max() <= 1e-7 * exact.explained_variance_[0]
        incremental = ReferencePCA(ReducerConfig())
        incremental.fit(x)
        paper_error = np.abs(incremental._fitted().explained_variance_ - exact.explained_variance_)
        assert error.max() <= paper_error.max()
    projected = ours.project(x, ours.n_components, False)
    reference = exact.transform(x.astype(np.float64))
    signs = np.sign((projected * reference).sum(axis=0))
    np.testing.assert_allclose(projected * signs, reference, atol=2e-3 * np.abs(reference).max())
    # whitening: unit variance per component; truncation keeps the leading components
    white = ours.project(x, 5, True)
    assert white.shape == (3000, 5)
    np.testing.assert_allclose(white.var(axis=0, ddof=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(ours.project(x, 5, False), projected[:, :5], atol=1e-4)


@pytest.mark.parametrize(("precision", "atol"), [("float64", 1e-6), ("float32", 5e-5)])
def test_pca_components_are_sign_fixed_and_deterministic(precision, atol):
    x = spectrum_data(seed=1)
    config = ReducerConfig(options=TorchOptions(pca_precision=precision))
    a, b = TorchPCA(config), TorchPCA(config)
    a.fit(x)
    b.fit(x[::-1].copy())  # row order changes the covariance only by rounding
    for component in a.components:
        assert component[np.abs(component).argmax()] > 0
    np.testing.assert_allclose(a.components, b.components, atol=atol)


def test_kmeans_quality_matches_the_reference_backend():
    # Separated blobs, where a correct k-means finds the classes from almost every seed; on
    # overlapping blobs both backends land in seed-dependent local minima (std ≈ 0.03 NMI).
    x, y = blobs(100, 12, 16, seed=1, spread=1.5)
    scores = {}
    for backend in ("reference", "torch"):
        results = evaluate_features(x[:900], y[:900], x[900:], y[900:], seeds=8, epochs=10, backend=backend)
        scores[backend] = results.summary[0].metrics["nmi"].mean
    assert abs(scores["torch"] - scores["reference"]) < 0.01, scores


def test_lloyd_option_converges_on_blobs():
    x, y = blobs(100, 6, 10, seed=4)
    results = evaluate_features(
        x[:450],
        y[:450],
        x[450:],
        y[450:],
        seeds=2,
        epochs=1,
        backend="torch",
        protocol={"algorithm": "lloyd", "max_iter": 50},
    )
    assert results.summary[0].metrics["acc"].mean > 0.95


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(300, 8, 16, seed=2, spread=3.0)
    predictions = []
    for seed in (5, 5, 6):
        kmeans = TorchKMeans(ClustererConfig(12, 3, 256, seed))
        kmeans.fit(x)
        predictions.append(kmeans.predict(x))
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert not np.array_equal(predictions[0], predictions[2])


def test_empty_and_starved_centres_are_reseeded():
    """With far more clusters than distinct points, reassignment keeps every centre on data."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(5, 4)).astype(np.float32), 60, axis=0)
    kmeans = TorchKMeans(ClustererConfig(8, 3, 64, 0))
    kmeans.fit(x)
    centers = kmeans.centers.numpy()
    nearest = np.abs(centers[:, None, :] - x[None, ::60, :]).sum(axis=2).min(axis=1)
    assert nearest.max() < 1e-4  # each centre sits on one of the five points


def test_memmap_streaming_equals_in_memory(tmp_path):
    x, _ = blobs(4000, 5, 64, seed=3)  # 20000 × 64: several 8192-row chunks
    path = tmp_path / "features.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    a = TorchKMeans(ClustererConfig(5, 2, 2048, 1, options=TorchOptions(chunk_rows=4096)))
    b = TorchKMeans(ClustererConfig(5, 2, 2048, 1, options=TorchOptions(chunk_rows=4096)))
    a.fit(mapped)
    b.fit(x)
    np.testing.assert_array_equal(a.predict(mapped), b.predict(x))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def test_reading_a_memmap_keeps_resident_memory_bounded(tmp_path):
    """Streaming and gathering from a 200 MB memmap leaves the resident set nearly unchanged."""
    rows = np.random.default_rng(0).normal(size=(25600, 2048)).astype(np.float32)
    np.save(tmp_path / "big.npy", rows)
    del rows
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")
    reader = RowReader(mapped)
    before = _rss_mb()
    for start in range(0, len(mapped), 4096):
        reader.rows(slice(start, start + 4096))
    for seed in range(10):
        reader.gather(np.sort(np.random.default_rng(seed).choice(len(mapped), 2048, replace=False)))
    assert _rss_mb() - before < 64  # the file is 200 MB; a mapping would have pulled it all in
    small = RowReader(mapped[:10])
    np.testing.assert_array_equal(small.gather(np.array([1, 2, 7])), np.asarray(mapped[[1, 2, 7]]))
    np.testing.assert_array_equal(RowReader(mapped[5:]).rows(slice(0, 3)), np.asarray(mapped[5:8]))


def test_bad_input_errors(split_blobs):
    xtr, ytr, xev, yev = split_blobs
    with pytest.raises(SSLBenchError, match=r"algorithm: Input should be 'minibatch', 'minibatch_fit' or 'lloyd'"):
        evaluate_features(xtr, ytr, xev, yev, backend="torch", protocol={"algorithm": "elkan"})
    with pytest.raises(SSLBenchError, match="fewer than the 300 clusters"):
        evaluate_features(xtr, ytr, xev, yev, backend="torch", n_clusters=300)
    with pytest.raises(SSLBenchError, match="pca_dims=20 exceeds"):
        evaluate_features(xtr, ytr, xev, yev, backend="torch", pca_dim=20)
    bad = xtr.copy()
    bad[7, 0] = np.inf
    with pytest.raises(SSLBenchError, match="train features contain NaN or inf in 1 of 200 rows"):
        evaluate_features(bad, ytr, xev, yev, backend="torch")


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("exponent", [66, -99])
def test_float32_pca_of_extreme_magnitudes_is_exact(device_path, exponent):
    """``pca_precision: float32`` squares overflow for features of 1e20 and underflow for 1e-30; rows are
    scaled by a power of two before the products, so the PCA is bit for bit the one of ordinary features."""

    def fit(x: np.ndarray) -> TorchPCA:
        pca = TorchPCA(ReducerConfig(options=TorchOptions(pca_precision="float32")))
        if device_path:
            pca.device = "cpu:0"  # the code path of a GPU, run on the CPU
        pca.fit(x)
        return pca

    x = spectrum_data(n=500, d=8)
    base, scaled = fit(x), fit(np.ldexp(x, exponent))
    np.testing.assert_array_equal(scaled.components, base.components)
    np.testing.assert_array_equal(scaled.explained_variance, np.ldexp(base.explained_variance, 2 * exponent))
    np.testing.assert_array_equal(scaled.mean, np.ldexp(base.mean, exponent))


def test_kmeans_refuses_centres_that_overflowed():
    x = np.full((20, 2), 3e38, dtype=np.float32)
    x[::2] *= -1
    kmeans = TorchKMeans(ClustererConfig(n_clusters=2, epochs=1, batch_size=8, seed=0))
    with pytest.raises(SSLBenchError, match=r"k-means: .*overflow"):
        kmeans.fit(x)


WORKER = Path(__file__).with_name("distributed_kmeans_worker.py")


@pytest.mark.slow
def test_distributed_kmeans_matches_single_process(tmp_path):
    x, _ = blobs(250, 6, 12, seed=7, spread=2.5)
    np.save(tmp_path / "features.npy", x)
    single = TorchKMeans(ClustererConfig(9, 3, 256, 3))
    single.fit(x)
    proc = run_torchrun(
        str(WORKER), str(tmp_path / "features.npy"), str(tmp_path / "out.json"), cwd=tmp_path, port=29631
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    np.testing.assert_allclose(np.array(out["centers"]), single.centers.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(out["labels"]), single.predict(x))


@pytest.mark.parametrize(("n_blobs", "n_clusters", "ratio", "settled"), [(8, 8, 0.01, 0.5), (4, 40, 0.5, 0.05)])
def test_pruning_skips_rows_and_changes_no_assignment(n_blobs, n_clusters, ratio, settled):
    """The triangle-inequality bounds must give exactly the unpruned fit: same centres bit for bit —
    also with 10× more clusters than blobs and a high re-seeding ratio, so centres jump all along."""
    x, _ = blobs(2400 // n_blobs, n_blobs, 16, seed=3, spread=1.5)
    fits = {}
    for prune in (False, True):
        options = TorchOptions(prune=prune, reassignment_ratio=ratio)
        config = ClustererConfig(n_clusters, 15, 256, 0, options=options)
        kmeans = TorchKMeans(config)
        kmeans.fit(x)
        fits[prune] = kmeans
    assert fits[True].pruned_rows > settled * 15 * len(x)  # rows settled by their bounds
    assert fits[False].pruned_rows == 0
    assert torch.equal(fits[True].centers, fits[False].centers)
    assert np.array_equal(fits[True].predict(x), fits[False].predict(x))
