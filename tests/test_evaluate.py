"""The Python API and the reference backend, on deterministic class blobs."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import IncrementalPCA

from sslbench import Results, SSLBenchError, evaluate_features
from sslbench.interfaces import ClustererConfig, ReducerConfig
from sslbench_plugins.reference_backend import ReferenceKMeans, ReferencePCA

from conftest import PAPER_METRICS, blobs


def test_api_returns_runs_and_summary(split_blobs):
    xtr, ytr, xev, yev = split_blobs
    results = evaluate_features(xtr, ytr, xev, yev, seeds=3, epochs=5, overcluster=[1.0, 2.0])
    assert isinstance(results, Results)
    assert len(results.runs) == 6 and len(results.summary) == 2
    run = results.runs[0]
    assert run.protocol.n_classes == 5 and run.protocol.n_clusters == 5 and run.protocol.pca_dims == 12
    assert run.protocol.batch_size == 2048 and run.protocol.backend == "torch"  # the default
    assert set(run.metrics) >= PAPER_METRICS
    # fractions (up to float rounding); the chance-adjusted ARI and AMI may also dip below 0; the
    # label-free scores are raw values
    fractions = [k for k, info in results.metrics.items() if info.unit == "percent" and k not in ("ari", "ami")]
    assert {"acc", "nmi"} <= set(fractions)
    assert all(-1e-9 <= r.metrics[k] <= 1 + 1e-9 for r in results.runs for k in fractions)
    # well-separated blobs cluster almost perfectly
    assert results.summary[0].metrics["acc"].mean > 0.95
    row = results.summary[1]
    assert row.protocol.n_clusters == 10 and row.n_seeds == 3 and row.seeds == [0, 1, 2]
    values = [r.metrics["nmi"] for r in results.runs if r.protocol.n_clusters == 10]
    assert row.metrics["nmi"].mean == pytest.approx(statistics.fmean(values))
    assert row.metrics["nmi"].std == pytest.approx(statistics.stdev(values))  # ddof = 1


def test_results_json_round_trip(split_blobs):
    results = evaluate_features(*split_blobs, seeds=2, epochs=2)
    data = json.loads(results.to_json())
    assert {"sslbench_version", "created", "spec", "environment", "runs", "summary"} <= data.keys()
    assert set(data["runs"][0]["timings"]) == {"extract_s", "pca_s", "kmeans_s", "eval_s"}
    assert {"python", "torch", "numpy", "scikit_learn", "device", "plugins"} <= data["environment"].keys()
    assert Results.model_validate_json(results.to_json()) == results


def test_same_seed_same_numbers_other_seed_other_clusters():
    x, y = blobs(40, 8, 10, seed=3, spread=3.0)
    a = evaluate_features(x[:240], y[:240], x[240:], y[240:], seeds=[7, 8], epochs=3)
    b = evaluate_features(x[:240], y[:240], x[240:], y[240:], seeds=[7], epochs=3)
    assert a.runs[0].metrics == b.runs[0].metrics
    assert a.runs[0].metrics != a.runs[1].metrics


def test_memmap_input_gives_the_same_result(tmp_path, split_blobs):
    xtr, ytr, xev, yev = split_blobs
    path = tmp_path / "train.npy"
    np.save(path, xtr)
    mapped = np.load(path, mmap_mode="r")
    a = evaluate_features(mapped, ytr, xev, yev, seeds=1, epochs=2)
    b = evaluate_features(xtr, ytr, xev, yev, seeds=1, epochs=2)
    assert a.runs[0].metrics == b.runs[0].metrics


def test_reference_pca_is_incremental_pca_with_the_papers_batch(split_blobs):
    xtr, _, xev, _ = split_blobs
    reducer = ReferencePCA(ReducerConfig())
    reducer.fit(xtr)
    expected = IncrementalPCA(batch_size=4096).fit(xtr)
    assert reducer.n_components == 12
    np.testing.assert_allclose(reducer.project(xev, reducer.n_components, False), expected.transform(xev), atol=1e-4)
    np.testing.assert_allclose(reducer.project(xev, 5, False), expected.transform(xev)[:, :5], atol=1e-4)
    whitened = IncrementalPCA(batch_size=4096, whiten=True).fit(xtr).transform(xev)[:, :5]
    np.testing.assert_allclose(reducer.project(xev, 5, True), whitened, atol=1e-4)


def test_reference_kmeans_is_the_papers_loop_step_for_step():
    x, _ = blobs(500, 6, 8, seed=1, spread=2.0)
    config = ClustererConfig(n_clusters=9, epochs=4, batch_size=256, seed=11)
    ours = ReferenceKMeans(config)
    ours.fit(x)

    # The paper's loop, written out: shuffle each epoch, partial_fit consecutive batches.
    rng = np.random.RandomState(11)
    kmeans = MiniBatchKMeans(n_clusters=9, batch_size=256, max_no_improvement=None, random_state=rng)
    order = np.arange(len(x))
    for _ in range(4):
        rng.shuffle(order)
        shuffled = x[order]
        for start in range(0, len(x), 256):
            kmeans.partial_fit(shuffled[start : start + 256])
    np.testing.assert_array_equal(ours.predict(x), kmeans.predict(x))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d.update(xtr=np.where(np.arange(200)[:, None] % 50 == 0, np.nan, d["xtr"])),
            "train features contain NaN or inf in 4 of 200 rows (first: row 0)",
        ),
        (
            lambda d: d["xev"].__setitem__((3, 2), np.inf),
            "eval features contain NaN or inf in 1 of 100 rows (first: row 3)",
        ),
        (lambda d: d.update(xev=d["xev"][:, :6]), "train features have 12 dims but eval features have 6"),
        (lambda d: d.update(ytr=d["ytr"][:-1]), "train has 200 feature rows but 199 labels"),
        (lambda d: d.update(xtr=d["xtr"][:, :, None]), "train features must be a 2-D array"),
        (lambda d: d.update(ytr=d["ytr"] - 1), "train labels must be non-negative class indices"),
        (lambda d: d.update(ytr=d["ytr"] + 0.5), "train labels must be integer class indices"),
    ],
)
def test_bad_features_are_named(split_blobs, mutate, message):
    xtr, ytr, xev, yev = split_blobs
    data = {"xtr": xtr.copy(), "ytr": ytr.copy(), "xev": xev.copy(), "yev": yev.copy()}
    mutate(data)
    with pytest.raises(SSLBenchError) as info:
        evaluate_features(data["xtr"], data["ytr"], data["xev"], data["yev"], seeds=1, epochs=1)
    assert str(info.value).startswith(message)


def test_protocol_limits(split_blobs):
    xtr, ytr, xev, yev = split_blobs
    with pytest.raises(SSLBenchError, match="train has 200 samples, fewer than the 201 clusters"):
        evaluate_features(xtr, ytr, xev, yev, n_clusters=201, seeds=1, epochs=1)
    with pytest.raises(SSLBenchError, match=r"pca_dims=13 exceeds .*= 12"):
        evaluate_features(xtr, ytr, xev, yev, pca_dim=13, seeds=1, epochs=1)
    with pytest.raises(SSLBenchError, match="evaluate_features: overcluster: Input should be greater"):
        evaluate_features(xtr, ytr, xev, yev, overcluster=0.5)
    with pytest.raises(SSLBenchError, match="evaluate_features: epochs"):
        evaluate_features(xtr, ytr, xev, yev, epochs=0)
    with pytest.raises(SSLBenchError, match="evaluate_features: seeds"):
        evaluate_features(xtr, ytr, xev, yev, seeds=0)
    with pytest.raises(SSLBenchError, match="unknown backend 'troch' \\(did you mean 'torch'\\?\\)"):
        evaluate_features(xtr, ytr, xev, yev, backend="troch", seeds=1, epochs=1)


def test_pca_sweep_fits_once_and_truncates(split_blobs):
    results = evaluate_features(*split_blobs, pca_dim=[2, 6, None], seeds=1, epochs=2)
    assert [r.protocol.pca_dims for r in results.runs] == [2, 6, 12]
    assert len({r.timings.pca_s for r in results.runs}) == 3  # fit shared, transform per dims


def test_reducer_finding_fewer_components_than_asked_is_named(split_blobs):
    """The protocol checks pca_dims against what the fitted reducer found, for every backend."""
    import types

    from sslbench import BackendEntry, hookimpl, load_plugins
    from sslbench_plugins.reference_backend import ReferenceKMeans

    class TwoComponents(ReferencePCA):
        @property
        def n_components(self) -> int:
            return 2

    @hookimpl
    def sslbench_register_backends(register):
        register(BackendEntry("capped", TwoComponents, ReferenceKMeans, "finds two components"))

    plugin = types.SimpleNamespace(sslbench_register_backends=sslbench_register_backends)
    plugins = load_plugins(extra=[("capped", plugin)])
    with pytest.raises(SSLBenchError, match="pca_dims=3 exceeds the 2 components the PCA of train found"):
        evaluate_features(*split_blobs, pca_dim=[2, 3], backend="capped", seeds=1, epochs=1, plugins=plugins)
    results = evaluate_features(*split_blobs, pca_dim=None, backend="capped", seeds=1, epochs=1, plugins=plugins)
    assert results.runs[0].protocol.pca_dims == 2
