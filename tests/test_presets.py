"""Protocol presets: each one's predictions against its peer's own library calls, written out here as
the peer's code makes them (scikit-learn configured as the peer configures it), on the same features
(scikit-learn's digits). Equal to the last digit: the k-means of every preset on the reference backend
(the random streams are the same ones). Not verified here: TURTLE's cuML KMeans (no cuML on this
machine); its preset runs scikit-learn's KMeans with TURTLE's n_init, max_iter and seed instead."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score

from sslbench.errors import SSLBenchError
from sslbench.evaluate import evaluate_features
from sslbench.inputs import FeatureSplit
from sslbench.pipeline import cluster_seed, fit_reducer, plan_protocol, project_splits
from sslbench.plugins import get_plugins
from sslbench.presets import presets
from sslbench.progress import NullProgress
from sslbench.results import Results, merge_results
from sslbench.runner import run_spec
from sslbench.spec import ProtocolSpec, parse_spec, resolve_spec
from sslbench.table import kendall_tau, preset_comparisons, summary_tables


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def preset_predictions(
    digits: tuple[np.ndarray, ...], preset: str, seed: int, scratch: Path, **fields: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train predictions, eval predictions, the features k-means was fitted on) of one preset's run."""
    xtr, ytr, xev, yev = digits
    protocol = ProtocolSpec.model_validate({"preset": preset, "seeds": [seed], **fields})
    plan = plan_protocol(
        FeatureSplit("train", xtr, ytr),
        FeatureSplit("eval", xev, yev),
        n_classes=10,
        protocol=protocol,
        plugins=get_plugins(),
        model="m",
        dataset="d",
    )
    projected = project_splits(plan, fit_reducer(plan, NullProgress()), plan.protocol.pca_dims[0], scratch)
    preds = cluster_seed(plan, plan.points[0], seed, projected, NullProgress())
    return preds.train_pred, preds.eval_pred, np.asarray(projected.train), np.asarray(projected.eval)


def test_default_preset_is_the_protocol_as_it_was():
    assert ProtocolSpec().for_preset("zheltonozhskii2020") == ProtocolSpec()
    assert [p.preset for p in ProtocolSpec().resolved()] == [["zheltonozhskii2020"]]


@pytest.mark.parametrize("seed", [0, 3])
def test_zheltonozhskii2020_is_the_papers_loop(digits, tmp_path, seed):
    """The paper's cluster.py (Randl/kmeans_selfsuper): 60 epochs of shuffle + partial_fit, seeded by one
    RandomState, on the PCA projection (the projection itself: test_evaluate's IncrementalPCA test)."""
    train_pred, eval_pred, fitted_on, eval_on = preset_predictions(
        digits, "zheltonozhskii2020", seed, tmp_path, backend="reference"
    )
    rng = np.random.RandomState(seed)
    kmeans = MiniBatchKMeans(n_clusters=10, batch_size=2048, max_no_improvement=None, random_state=rng)
    order = np.arange(len(fitted_on))
    for _ in range(60):
        rng.shuffle(order)
        shuffled = fitted_on[order]
        for start in range(0, len(shuffled), 2048):
            kmeans.partial_fit(shuffled[start : start + 2048])
    np.testing.assert_array_equal(train_pred, kmeans.predict(fitted_on))
    np.testing.assert_array_equal(eval_pred, kmeans.predict(eval_on))


def test_mieb_is_mtebs_clustering_evaluator(digits, tmp_path):
    """mteb ClusteringEvaluator: MiniBatchKMeans(batch_size=500, n_init="auto", compute_labels=True,
    random_state=42).fit on the eval split, its labels_ scored; main score NMI."""
    xtr, ytr, xev, yev = digits
    _, eval_pred, fitted_on, _ = preset_predictions(digits, "mieb", 42, tmp_path)
    peer = MiniBatchKMeans(
        n_clusters=len(set(yev.tolist())), batch_size=500, n_init="auto", compute_labels=True, random_state=42
    ).fit(xev)
    np.testing.assert_array_equal(fitted_on, xev)  # no PCA, fitted on the eval split
    np.testing.assert_array_equal(eval_pred, peer.labels_)
    results = evaluate_features(xtr, ytr, xev, yev, preset="mieb")
    (run,) = results.runs
    assert run.protocol.main_score == "nmi" and run.seed == 42
    assert run.metrics["nmi"] == normalized_mutual_info_score(yev, peer.labels_)


def _temi_accuracy(targets: np.ndarray, preds: np.ndarray) -> float:
    """TEMI's utils.compute_metrics accuracy, as written there (count matrix, linear_sum_assignment)."""
    num_classes = max(targets.max(), preds.max()) + 1
    count = np.zeros((num_classes, num_classes), dtype=np.int32)
    for pred, target in zip(preds, targets, strict=True):
        count[pred, target] += 1
    rows, cols = linear_sum_assignment(count.max() - count)
    return float(count[rows, cols].sum() / len(preds))


@pytest.mark.parametrize("seed", [0, 7])
def test_temi_is_its_kmeans_baseline(digits, tmp_path, seed):
    """TEMI baseline_kmeans.py: KMeans(n_clusters, n_init=2).fit(train).predict(test) (seeded here)."""
    xtr, ytr, xev, yev = digits
    _, eval_pred, _, _ = preset_predictions(digits, "temi", seed, tmp_path)
    peer = KMeans(n_clusters=10, n_init=2, random_state=seed).fit(xtr)
    np.testing.assert_array_equal(eval_pred, peer.predict(xev))
    (run,) = evaluate_features(xtr, ytr, xev, yev, preset="temi", seeds=[seed]).runs
    assert run.metrics["acc_eval_assignment"] == pytest.approx(_temi_accuracy(yev, peer.predict(xev)), abs=1e-12)


def test_turtle_without_cuml_is_sklearn_kmeans_with_its_settings(digits, tmp_path):
    """TURTLE baselines/kmeans.py: cuml.KMeans(n_clusters, max_iter=1000, n_init=10, random_state=42); the
    reference backend runs scikit-learn's KMeans with those settings (k-means++, not cuML's k-means||)."""
    xtr, _, xev, _ = digits
    _, eval_pred, _, _ = preset_predictions(digits, "turtle", 42, tmp_path)
    peer = KMeans(n_clusters=10, max_iter=1000, n_init=10, random_state=42).fit(xtr)
    np.testing.assert_array_equal(eval_pred, peer.predict(xev))


def test_explicit_fields_override_the_preset(digits):
    protocol = ProtocolSpec.model_validate({"preset": "temi", "n_init": 3, "seeds": 2})
    (temi,) = protocol.resolved()
    assert (temi.n_init, temi.seeds, temi.algorithm, temi.pca) == (3, [0, 1], "lloyd", False)
    xtr, ytr, xev, yev = digits
    results = evaluate_features(xtr, ytr, xev, yev, preset="temi", protocol={"n_init": 3}, seeds=2)
    assert [(r.protocol.n_init, r.seed) for r in results.runs] == [(3, 0), (3, 1)]
    assert results.spec is not None and results.spec["resolved_protocol"][0]["n_init"] == 3


def test_what_a_backend_cannot_run_is_refused_in_one_line(digits):
    xtr, ytr, xev, yev = digits
    with pytest.raises(SSLBenchError, match=r"preset turtle\): backend 'torch' runs one k-means initialisation"):
        evaluate_features(xtr, ytr, xev, yev, preset="turtle", backend="torch")
    with pytest.raises(SSLBenchError, match=r"backend 'torch' runs algorithm minibatch or lloyd, not minibatch_fit"):
        evaluate_features(xtr, ytr, xev, yev, preset="mieb", backend="torch")
    with pytest.raises(SSLBenchError, match=r"preset mieb with the fields given: protocol: pca: false keeps every"):
        ProtocolSpec.model_validate({"preset": "mieb", "pca_dims": 8}).resolved()
    with pytest.raises(SSLBenchError, match=r"algorithm is a protocol choice: set protocol.algorithm"):
        evaluate_features(xtr, ytr, xev, yev, backend_options={"algorithm": "lloyd"})


def test_every_preset_cites_a_commit_and_sets_what_it_claims():
    shipped = presets()
    assert list(shipped) == ["mieb", "temi", "turtle", "zheltonozhskii2020"]
    for preset in shipped.values():
        assert len(preset.peer.commit) == 40
        for key in ("algorithm", "n_init", "seeds", "main_score", "pca", "fit_on"):
            assert key in preset.protocol, (preset.name, key)


def test_points_of_one_cluster_count_are_computed_once(digits):
    points = ProtocolSpec(k=[10, 20], overcluster=[1.0, 2.0]).points(10)
    assert [(p.k, p.overcluster, p.n_clusters, p.same_as) for p in points] == [
        (10, 1.0, 10, ()),
        (10, 2.0, 20, ((20, 1.0),)),
        (20, 2.0, 40, ()),
    ]
    xtr, ytr, xev, yev = digits
    results = evaluate_features(xtr, ytr, xev, yev, n_clusters=[10, 20], overcluster=[1.0, 2.0], seeds=1, epochs=2)
    assert sorted(r.protocol.n_clusters for r in results.runs) == [10, 20, 40]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=12))
def test_kendall_tau_is_scipys_tau_b(pairs):
    x, y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    ours, theirs = kendall_tau(x, y), scipy.stats.kendalltau(x, y).statistic
    assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12)


@pytest.fixture(scope="module")
def two_presets(digits) -> Results:
    """Four 'models' (the digits seen through different random projections), each under two presets."""
    xtr, ytr, xev, yev = digits
    parts = []
    for index, dims in enumerate((64, 16, 8, 4)):
        projection = np.random.default_rng(index).standard_normal((64, dims)).astype(np.float32)
        parts.append(
            evaluate_features(
                xtr @ projection,
                ytr,
                xev @ projection,
                yev,
                preset=["zheltonozhskii2020", "temi"],
                seeds=2,
                epochs=3,
                model=f"model{index}",
                dataset="digits",
            )
        )
    return merge_results(parts, [f"part{i}" for i in range(len(parts))])


def test_reports_show_each_presets_main_score_and_the_rank_agreement(two_presets):
    (comparison,) = preset_comparisons(two_presets)
    assert comparison.presets == ("zheltonozhskii2020", "temi")
    assert comparison.main_names == {"zheltonozhskii2020": "acc", "temi": "acc_eval_assignment"}
    by_preset: dict[str, dict[str, float]] = {}
    for row in two_presets.summary:
        by_preset.setdefault(row.protocol.preset, {})[row.model] = row.metrics[row.protocol.main_score].mean
    models = sorted(by_preset["temi"])
    expected = scipy.stats.kendalltau(
        [by_preset["zheltonozhskii2020"][m] for m in models], [by_preset["temi"][m] for m in models]
    ).statistic
    ((_, _, tau, n),) = comparison.agreement
    assert n == 4 and tau == pytest.approx(expected, abs=1e-12)
    line = comparison.agreement_lines()[0]
    assert line.startswith("Kendall τ zheltonozhskii2020 vs temi: ")
    plugins = get_plugins()
    for reporter in ("rich", "md", "html"):
        text = plugins.reporters.get(reporter).reporter.render(two_presets)
        assert line in text and "each preset's main score" in text, reporter
        assert comparison.text("model1", "temi") in text


def test_a_presets_main_score_leads_its_table_unless_columns_are_chosen(two_presets):
    tables = summary_tables(two_presets)
    assert [t.dataset for t in tables] == ["digits, preset zheltonozhskii2020", "digits, preset temi"]
    assert tables[0].metrics[0] == "acc" and tables[1].metrics[0] == "acc_eval_assignment"
    chosen = summary_tables(two_presets, ("nmi", "acc"))
    assert all(t.metrics == ("nmi", "acc") for t in chosen)


def test_a_spec_with_two_presets_runs_each_and_reports_them(digits, tmp_path):
    """`sslbench run`'s path: both presets run from one spec, each run records its resolved protocol, each
    preset's predictions go to its own folder, and the reports compare them."""
    xtr, ytr, xev, yev = digits
    for name, array in (("train", xtr), ("train_labels", ytr), ("val", xev), ("val_labels", yev)):
        np.save(tmp_path / f"{name}.npy", array)
    text = f"""\
models: [{{id: raw}}]
datasets:
  - id: features
    options:
      splits:
        train: {{features: {tmp_path}/train.npy, labels: {tmp_path}/train_labels.npy}}
        val: {{features: {tmp_path}/val.npy, labels: {tmp_path}/val_labels.npy}}
protocol: {{preset: [zheltonozhskii2020, mieb], epochs: 2, seeds: 1}}
device: cpu
"""
    plugins = get_plugins()
    results = run_spec(
        resolve_spec(parse_spec(text), plugins), plugins, out_dir=tmp_path / "out", save_predictions=True
    )
    protocols = [(r.protocol.preset, r.protocol.backend, r.protocol.fit_split, r.seed) for r in results.runs]
    assert protocols == [("zheltonozhskii2020", "torch", "train", 0), ("mieb", "reference", "val", 0)]
    assert results.spec is not None and [p["preset"] for p in results.spec["resolved_protocol"]] == [
        ["zheltonozhskii2020"],
        ["mieb"],
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir()) == ["mieb", "zheltonozhskii2020"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "### features, preset mieb" in markdown and "each preset's main score" in markdown


def test_validate_refuses_a_preset_its_backend_cannot_run_at_the_presets_line(tmp_path):
    text = """\
models: [{id: raw}]
datasets: [{id: digits}]
protocol:
  preset: [zheltonozhskii2020, turtle]
  backend: torch
"""
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(text, "spec.yaml"), get_plugins())
    assert str(info.value) == (
        "spec.yaml:4: protocol.preset: preset turtle: backend 'torch' runs one k-means initialisation (n_init 1) "
        "with algorithm lloyd, not n_init 10"
    )
    with pytest.raises(
        SSLBenchError,
        match=r"spec.yaml:4: protocol.preset: preset zheltonozhskii2020: main_score 'nmx' is not a metric of the run \(did you mean 'nmi'\?\)",
    ):
        resolve_spec(
            parse_spec(text.replace("turtle", "mieb").replace("torch", "reference\n  main_score: nmx"), "spec.yaml"),
            get_plugins(),
        )


def test_another_backends_options_object_is_refused_not_replaced_by_defaults():
    from sslbench.engine.kmeans import TorchKMeans
    from sslbench.interfaces import ClustererConfig

    class OtherOptions(BaseModel):
        prune: bool = False

    with pytest.raises(TypeError, match="the torch engine needs TorchOptions, got OtherOptions"):
        TorchKMeans(ClustererConfig(2, 1, 8, 0, options=OtherOptions()))


@pytest.mark.parametrize("chosen", [["mieb"], ["mieb", "zheltonozhskii2020"]])
def test_probes_learn_from_train_when_a_preset_fits_on_the_eval_split(digits, chosen):
    """mieb fits its k-means on the eval split; a probe still learns from train and scores eval (learning
    from the split it scores would report its training accuracy)."""
    x_train, y_train, x_eval, y_eval = digits
    knn = [{"id": "knn", "options": {"k": [10]}}]
    common = {"seeds": 1, "epochs": 2, "probes": knn, "backend": "reference"}
    (expected,) = evaluate_features(x_train, y_train, x_eval, y_eval, **common).probes
    (probe,) = evaluate_features(x_train, y_train, x_eval, y_eval, preset=chosen, **common).probes
    assert (probe.fit_split, probe.n_train, probe.n_eval) == ("train", len(y_train), len(y_eval))
    assert probe.metrics == expected.metrics


def test_restarts_the_papers_loop_does_not_run_are_refused(digits):
    """The reference backend's paper loop (minibatch) fits once: n_init 5 would be recorded but not run."""
    x_train, y_train, x_eval, y_eval = digits
    with pytest.raises(
        SSLBenchError, match=r"runs one k-means initialisation \(n_init 1\) with algorithm minibatch, not n_init 5"
    ):
        evaluate_features(x_train, y_train, x_eval, y_eval, backend="reference", seeds=1, protocol={"n_init": 5})


def test_an_epochs_sweep_is_refused_where_epochs_mean_nothing():
    """Lloyd and scikit-learn's MiniBatchKMeans.fit stop at max_iter or tol: two epoch counts would be one fit twice."""
    with pytest.raises(
        SSLBenchError,
        match=r"preset temi with the fields given: .*epochs count the paper.s mini-batch passes; algorithm lloyd",
    ):
        evaluate_features(*load_digits(return_X_y=True), *load_digits(return_X_y=True), preset="temi", epochs=[2, 3])
