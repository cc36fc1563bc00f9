"""The faiss backend (installed by the test extra) and the cuML backend's errors without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
    lloyd = {"algorithm": "lloyd", "max_iter": 20}
    results = evaluate_features(x[:900], y[:900], x[900:], y[900:], seeds=3, backend="faiss", protocol=lloyd)
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
    import torch

    extra = "gpu-cu13" if (torch.version.cuda or "").startswith("13") else "gpu-cu12"
    with pytest.raises(SSLBenchError, match=rf"backend 'cuml' needs RAPIDS cuML and cupy .*sslbench\[{extra}\]"):
        evaluate_features(*split_blobs, backend="cuml", seeds=1, protocol={"algorithm": "lloyd", "max_iter": 1})


@pytest.mark.parametrize(
    ("cuda", "extra"), [("13.0", "gpu-cu13"), ("12.8", "gpu-cu12"), ("11.8", "gpu-cu12"), (None, "gpu-cu12")]
)
def test_the_gpu_extra_follows_the_cuda_major_of_torch(cuda, extra):
    from sslbench_plugins.cuml_backend import gpu_extra

    assert gpu_extra(cuda) == extra


def test_every_gpu_extra_pins_one_cuda_major():
    tomllib = pytest.importorskip("tomllib")

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for major in ("12", "13"):
        packages = " ".join(extras[f"gpu-cu{major}"])
        assert f"cupy-cuda{major}x" in packages and f"cuml-cu{major}" in packages
