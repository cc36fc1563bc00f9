"""The faiss backend (installed by the test extra) and the cuML backend's errors without a GPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from sklearn.decomposition import PCA

from sslbench import SSLBenchError, evaluate_features
from sslbench.interfaces import ClustererConfig, ReducerConfig

from conftest import blobs

faiss_missing = importlib.util.find_spec("faiss") is None


@pytest.mark.skipif(faiss_missing, reason="faiss-cpu is part of the test extra")
def test_faiss_backend_clusters_and_projects_like_the_others():
    from sslbench_plugins.faiss_backend import FaissKMeans, FaissPCA

    x, y = blobs(100, 12, 16, seed=1, spread=1.5)
    results = evaluate_features(x[:900], y[:900], x[900:], y[900:], seeds=3, epochs=20, backend="faiss")
    assert results.summary[0].metrics["nmi"].mean > 0.9  # random init (faiss) meets local minima

    pca = FaissPCA(ReducerConfig())
    pca.fit(x)
    exact = PCA().fit(x.astype(np.float64))
    np.testing.assert_allclose(pca._variance, exact.explained_variance_, rtol=1e-4)
    projected, reference = pca.project(x, 4, False), exact.transform(x)[:, :4]
    signs = np.sign((projected * reference).sum(axis=0))
    np.testing.assert_allclose(projected * signs, reference, atol=1e-3 * np.abs(reference).max())

    # every point is used: 1200 points for 12 centroids would be subsampled to 256 × 12 = 3072 by
    # default only above that size, so check the setting directly on a larger set
    big, _ = blobs(400, 10, 4, seed=2)
    kmeans = FaissKMeans(ClustererConfig(2, 2, 2048, 0))
    kmeans.fit(big)
    assert kmeans._kmeans.cp.max_points_per_centroid * 2 >= len(big)


@pytest.mark.skipif(importlib.util.find_spec("cuml") is not None, reason="cuML is installed here")
def test_cuml_backend_says_what_is_missing(split_blobs):
    with pytest.raises(SSLBenchError, match=r"backend 'cuml' needs RAPIDS cuML and cupy .*sslbench\[gpu\]"):
        evaluate_features(*split_blobs, backend="cuml", seeds=1, epochs=1)
