"""The label-free scores (plugins/label_free.py) against independent implementations: scikit-learn's
silhouette_score (same sample), davies_bouldin_score and calinski_harabasz_score, and RankMe's formula
(Garrido et al. 2023, Eq. 1) on numpy's SVD of the whole matrix; streamed over memory-mapped files,
on hostile inputs, and as every run's columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from sslbench_plugins.label_free import (
    RANKME_EPSILON,
    calinski_harabasz,
    davies_bouldin,
    rankme,
    silhouette,
    silhouette_sample,
)

from conftest import blobs


def paper_rankme(matrix: np.ndarray) -> float:
    """RankMe as the paper writes it, on the singular values numpy's SVD finds."""
    singular = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    p = singular / singular.sum() + RANKME_EPSILON
    return float(np.exp(-np.sum(p * np.log(p))))


def sklearn_or_nan(score, features: np.ndarray, labels: np.ndarray, **kwargs) -> float:
    """scikit-learn's score, NaN where it refuses (fewer than 2 clusters, or one per row)."""
    try:
        return float(score(features, labels, **kwargs))
    except ValueError:
        return math.nan


def memmap_of(tmp_path, array: np.ndarray) -> np.ndarray:
    path = tmp_path / "space.npy"
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def test_scores_equal_scikit_learn_on_a_memory_mapped_split(tmp_path):
    features, labels = blobs(300, 6, 9, seed=4, spread=3.0)
    pred = np.random.default_rng(1).permutation(labels)  # imperfect clusters
    pred[pred == 5] = 4  # and one cluster id never used: it must not count
    space = memmap_of(tmp_path, features)
    exact = features.astype(np.float64)
    assert davies_bouldin(space, pred) == pytest.approx(sk.davies_bouldin_score(exact, pred), rel=1e-12)
    assert calinski_harabasz(space, pred) == pytest.approx(sk.calinski_harabasz_score(exact, pred), rel=1e-12)
    # the sample is scikit-learn's own draw for sample_size / random_state
    assert silhouette(space, pred, 400, 7) == pytest.approx(
        sk.silhouette_score(exact, pred, sample_size=400, random_state=7), rel=1e-10
    )
    assert silhouette(space, pred, 10_000, 7) == pytest.approx(sk.silhouette_score(exact, pred), rel=1e-10)
    assert rankme(space) == pytest.approx(paper_rankme(exact), rel=1e-9)


def test_scores_of_a_subset_of_rows_equal_those_of_the_subset(tmp_path):
    features, labels = blobs(100, 4, 5, seed=2)
    space = memmap_of(tmp_path, features)
    rows = np.flatnonzero(labels != 2)
    subset, pred = features[rows].astype(np.float64), labels[rows]
    assert davies_bouldin(space, pred, rows) == pytest.approx(sk.davies_bouldin_score(subset, pred), rel=1e-12)
    assert calinski_harabasz(space, pred, rows) == pytest.approx(sk.calinski_harabasz_score(subset, pred), rel=1e-12)
    assert silhouette(space, pred, 50, 3, rows) == pytest.approx(
        sk.silhouette_score(subset, pred, sample_size=50, random_state=3), rel=1e-10
    )
    assert rankme(space, rows) == pytest.approx(paper_rankme(subset), rel=1e-9)


def test_silhouette_sample_is_seeded_and_bounded():
    assert silhouette_sample(10, 20, 0).tolist() == list(range(10))
    drawn = silhouette_sample(1000, 30, 5)
    assert len(drawn) == 30 and np.all(np.diff(drawn) > 0)
    assert drawn.tolist() == sorted(np.random.RandomState(5).permutation(1000)[:30].tolist())
    assert not np.array_equal(drawn, silhouette_sample(1000, 30, 6))


# Small integers: every distance scikit-learn and the streamed passes compute is then exact or equal,
# so the comparison is of the definitions, not of rounding; duplicate rows and constant columns abound.
@st.composite
def clustered(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(2, 40))
    dims = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(-3, 3), min_size=n * dims, max_size=n * dims))
    features = np.array(values, dtype=np.float32).reshape(n, dims)
    if draw(st.booleans()):
        features[:, 0] = 2.0  # a constant feature
    clusters = draw(st.integers(1, 6))
    pred = np.array(draw(st.lists(st.integers(0, clusters - 1), min_size=n, max_size=n)), dtype=np.int64)
    return features, pred


@settings(max_examples=150, deadline=None)
@given(clustered())
def test_calinski_harabasz_equals_scikit_learn_on_hostile_input(case):
    features, pred = case
    expected = sklearn_or_nan(sk.calinski_harabasz_score, features.astype(np.float64), pred)
    assert calinski_harabasz(features, pred) == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True)


@settings(max_examples=150, deadline=None)
@given(clustered())
def test_davies_bouldin_equals_scikit_learn_on_hostile_input(case):
    features, pred = case
    present = np.unique(pred)
    centroids = np.array([features[pred == c].mean(axis=0, dtype=np.float64) for c in present])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)[np.triu_indices(len(present), 1)]
    # two distinct clusters with the same centroid: scikit-learn's distance of them is a rounding error
    # (its expansion ‖a‖² − 2ab + ‖b‖²), and so is its score
    assume(np.all(gaps > 1e-6) or np.all(gaps == 0))
    expected = sklearn_or_nan(sk.davies_bouldin_score, features.astype(np.float64), pred)
    assert davies_bouldin(features, pred) == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True)


@settings(max_examples=150, deadline=None)
@given(clustered(), st.integers(2, 50), st.integers(0, 2**31 - 1))
def test_silhouette_equals_scikit_learn_on_the_same_sample(case, sample_rows, seed):
    features, pred = case
    rows = silhouette_sample(len(pred), sample_rows, seed)
    expected = sklearn_or_nan(sk.silhouette_score, features[rows].astype(np.float64), pred[rows])
    assert silhouette(features, pred, sample_rows, seed) == pytest.approx(expected, abs=1e-12, nan_ok=True)


@settings(max_examples=150, deadline=None)
@given(clustered())
def test_rankme_equals_the_papers_formula_on_hostile_input(case):
    features, _ = case
    if not features.any():  # an all-zero matrix: its normalised singular values do not exist
        assert math.isnan(rankme(features))
        return
    assert rankme(features) == pytest.approx(paper_rankme(features), rel=1e-6)


def test_single_cluster_and_one_cluster_per_row_are_nan():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    for pred in (np.zeros(6, dtype=np.int64), np.arange(6)):
        assert math.isnan(silhouette(features, pred, 10, 0))
        assert math.isnan(davies_bouldin(features, pred))
        assert math.isnan(calinski_harabasz(features, pred))


def test_every_run_records_the_scores_of_its_projection(tmp_path, plugins):
    """End to end: with all PCA components the projection is a rotation of the centred features, so
    distances, and the three cluster scores, equal scikit-learn's on the raw eval features."""
    from sslbench.inputs import FeatureSplit
    from sslbench.pipeline import plan_protocol, run_protocol
    from sslbench.predictions import load_predictions, predictions_name
    from sslbench.spec import ProtocolSpec

    xtr, ytr = blobs(80, 4, 6, seed=0)
    xev, yev = blobs(40, 4, 6, seed=1)
    protocol = ProtocolSpec(seeds=[0, 3], epochs=[3], silhouette_rows=60)
    plan = plan_protocol(
        FeatureSplit("train", xtr, ytr),
        FeatureSplit("val", xev, yev),
        n_classes=4,
        protocol=protocol,
        plugins=plugins,
        model="m",
        dataset="d",
        predictions_dir=tmp_path / "predictions",
    )
    runs = list(run_protocol(plan, scratch=tmp_path / "scratch"))
    raw = xev.astype(np.float64)
    for run in runs:
        assert run.protocol.silhouette_rows == 60
        pred, _ = load_predictions(tmp_path / "predictions" / predictions_name("m", "d", run.seed), "eval")
        expected = {
            "davies_bouldin": sk.davies_bouldin_score(raw, pred),
            "calinski_harabasz": sk.calinski_harabasz_score(raw, pred),
            "silhouette": sk.silhouette_score(raw, pred, sample_size=60, random_state=run.seed),
            "rankme": paper_rankme(raw),
            "rankme_fit": paper_rankme(xtr.astype(np.float64)),  # the split the clusters were fitted on
        }
        for name, value in expected.items():
            assert run.metrics[name] == pytest.approx(value, rel=1e-4), name
    assert runs[0].metrics["rankme"] == runs[1].metrics["rankme"]  # one per model × split
