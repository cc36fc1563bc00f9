"""Data without class labels, end to end: an `images` folder through the CLI (run, saved predictions,
`clusters --grid`, the HTML per-cluster pages), a `features` dataset without labels, and
`evaluate_features(train_labels=None, eval_labels=None)`; what needs labels refused at `validate`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from sslbench import SSLBenchError, evaluate_features
from sslbench.inputs import NO_LABEL
from sslbench.predictions import load_predictions, save_predictions

from conftest import blobs, run_cli

LABEL_FREE = {"silhouette", "davies_bouldin", "calinski_harabasz", "rankme", "rankme_fit"}


def _images(root: Path) -> None:
    """Real small PNG and JPEG files of three colours, some in nested folders (which are not classes)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 18), ("val", 9)):
        for i in range(n):
            folder = root / split / ("nested/deeper" if i % 4 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(40 + 80 * (i % 3), 15, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")


def _spec(tmp_path: Path, extra: str = "", k: str = "3") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            models:
              - id: random_cnn
                options: {{image_size: 16, width: 4}}
            datasets:
              - id: images
                options: {{root: {tmp_path / "data"}}}
            protocol: {{k: {k}, epochs: 3, seeds: 2}}
            extraction: {{batch_size: 8, workers: 0}}
            cache_dir: {tmp_path / "cache"}
            device: cpu
            """
        )
        + extra
    )
    return spec


@pytest.mark.slow
def test_an_unlabeled_image_folder_runs_end_to_end_through_the_cli(tmp_path):
    _images(tmp_path / "data")
    _spec(tmp_path)
    assert run_cli("validate", "spec.yaml", cwd=tmp_path).returncode == 0
    proc = run_cli("run", "spec.yaml", "--out", "out", "--save-predictions", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["metrics"]) == LABEL_FREE
    for run in data["runs"]:
        assert run["n_train"] == 18 and run["n_eval"] == 9 and run["protocol"]["n_classes"] == 0
        assert set(run["metrics"]) == LABEL_FREE and all(np.isfinite(list(run["metrics"].values())))
    assert "no class labels" in (tmp_path / "out" / "results.md").read_text()  # the reports say why

    # the saved clusters score as scikit-learn scores them (the grid shows cluster 0's images)
    saved = sorted((tmp_path / "out" / "predictions").glob("*.npz"))
    assert len(saved) == 2
    pred, labels = load_predictions(saved[0], "eval")
    assert np.all(labels == NO_LABEL) and len(pred) == 9
    listed = run_cli(
        "clusters", "out", "--model", "random_cnn", "--grid", str(int(pred[0])), "--grid-out", "grid.png", cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    assert "no class labels" in listed.stdout and "largest clusters" in listed.stdout
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 0
    page = run_cli("report", "out", "--format", "html", "-o", "report.html", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    html = (tmp_path / "report.html").read_text()
    assert "no class labels, so no purity" in html and "largest" in html


@pytest.mark.parametrize(
    ("extra", "k", "expected"),
    [
        ("", "null", "protocol.k: datasets[0] (images) has no class labels, so k cannot be the number of classes"),
        ("probes: [{id: knn}]\n", "3", "probes[0].id: datasets[0] (images) has no class labels, and probes learn"),
        ("report: {metrics: [silhouette, acc]}\n", "3", "report.metrics[1]: datasets[0] (images) has no class labels"),
        (
            "",
            "3, main_score: acc",
            "protocol.main_score: datasets[0] (images) has no class labels, and main_score 'acc'",
        ),
    ],
)
def test_validate_refuses_what_needs_labels_in_one_line(tmp_path, extra, k, expected):
    (tmp_path / "data" / "train").mkdir(parents=True)
    _spec(tmp_path, extra, k)
    proc = run_cli("validate", "spec.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr


def test_a_features_dataset_without_labels_runs_through_the_cli(tmp_path):
    xtr, _ = blobs(40, 3, 5, seed=0)
    xev, _ = blobs(10, 3, 5, seed=1)
    np.save(tmp_path / "train.npy", xtr)
    np.save(tmp_path / "val.npy", xev)
    (tmp_path / "spec.yaml").write_text(
        textwrap.dedent(
            f"""\
            models: [{{id: raw}}]
            datasets:
              - id: features
                options:
                  splits:
                    train: {{features: {tmp_path / "train.npy"}}}
                    val: {{features: {tmp_path / "val.npy"}}}
            protocol: {{k: 3, epochs: 3, seeds: 1}}
            cache_dir: {tmp_path / "cache"}
            device: cpu
            """
        )
    )
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert set(run["metrics"]) == LABEL_FREE and run["n_eval"] == 30
    # the run's line leads with the label-free scores, as a labelled run's with ACC, ARI, AMI, NMI
    assert f"Sil {run['metrics']['silhouette']:.3f}  DB {run['metrics']['davies_bouldin']:.3f}" in proc.stderr


def test_evaluate_features_without_labels_clusters_as_with_them(split_blobs):
    """k-means never reads the labels: the same seeds give the same clusters, hence the same label-free
    scores, with and without labels; the supervised metrics are absent."""
    xtr, ytr, xev, yev = split_blobs
    options = {"n_clusters": 5, "seeds": 2, "epochs": 4}
    labeled = evaluate_features(xtr, ytr, xev, yev, **options)
    unlabeled = evaluate_features(xtr, None, xev, None, **options)
    assert set(unlabeled.metrics) == LABEL_FREE and {"acc", "nmi"} <= set(labeled.metrics)
    for with_labels, without in zip(labeled.runs, unlabeled.runs, strict=True):
        assert without.protocol.n_classes == 0 and set(without.metrics) == LABEL_FREE
        assert {m: with_labels.metrics[m] for m in LABEL_FREE} == without.metrics


def test_evaluate_features_refuses_half_labelled_or_label_needing_asks(split_blobs):
    xtr, ytr, xev, _ = split_blobs
    cases = [
        ({"n_clusters": 5, "train_labels": ytr}, "train_labels given but eval_labels is None"),
        ({"n_clusters": 5, "n_classes": 5}, "n_classes given without labels"),
        ({}, "give protocol.k"),
        ({"n_clusters": 5, "probes": [{"id": "knn"}]}, "probes learn from labels"),
        ({"n_clusters": 5, "protocol": {"main_score": "ami"}}, "main_score: 'ami' compares clusters with classes"),
    ]
    for kwargs, expected in cases:
        train_labels = kwargs.pop("train_labels", None)
        with pytest.raises(SSLBenchError, match=expected):
            evaluate_features(xtr, train_labels, xev, None, seeds=1, epochs=1, **kwargs)


def test_an_undefined_score_is_nan_in_results_json_and_reads_back(tmp_path):
    """Eval rows all alike fall in one cluster, where the cluster scores are undefined (scikit-learn
    refuses): NaN, written to results.json and read back as NaN."""
    from sslbench.results import load_results

    xtr, _ = blobs(30, 3, 4, seed=5)
    xev = np.repeat(xtr[:1], 12, axis=0)
    results = evaluate_features(xtr, None, xev, None, n_clusters=3, seeds=1, epochs=2)
    assert np.isnan(results.runs[0].metrics["silhouette"]) and np.isfinite(results.runs[0].metrics["rankme"])
    results.write(tmp_path / "results.json")
    again = load_results(tmp_path / "results.json")
    assert np.isnan(again.runs[0].metrics["silhouette"]) and np.isnan(again.summary[0].metrics["silhouette"].mean)


def test_saved_predictions_without_labels_read_back(tmp_path):
    pred = np.array([0, 2, 1, 2])
    save_predictions(tmp_path / "p.npz", pred, np.full(4, NO_LABEL), pred, np.full(4, NO_LABEL))
    read, labels = load_predictions(tmp_path / "p.npz", "eval")
    assert read.tolist() == pred.tolist() and labels.tolist() == [NO_LABEL] * 4
    save_predictions(tmp_path / "q.npz", pred, np.array([0, -1, 1, 1]), pred, np.array([0, -1, 1, 1]))
    with pytest.raises(SSLBenchError, match="outside"):  # -1 among real labels is damage, not "no labels"
        load_predictions(tmp_path / "q.npz", "eval")


def test_label_free_scores_of_unlabeled_features_equal_scikit_learns_on_their_clusters(tmp_path, plugins):
    from sslbench.inputs import checked_split
    from sslbench.pipeline import plan_protocol, run_protocol
    from sslbench.predictions import predictions_name
    from sslbench.spec import ProtocolSpec

    xtr, _ = blobs(60, 3, 4, seed=2)
    xev, _ = blobs(20, 3, 4, seed=3)
    plan = plan_protocol(
        checked_split("train", xtr, None),
        checked_split("val", xev, None),
        n_classes=0,
        protocol=ProtocolSpec(k=[3], seeds=[1], epochs=[3]),
        plugins=plugins,
        model="m",
        dataset="d",
        predictions_dir=tmp_path,
    )
    (run,) = run_protocol(plan, scratch=tmp_path / "scratch")
    pred, _ = load_predictions(tmp_path / predictions_name("m", "d", 1), "eval")
    assert run.metrics["davies_bouldin"] == pytest.approx(sk.davies_bouldin_score(xev.astype(np.float64), pred), 1e-4)


def test_an_unlabeled_image_folder_through_the_api_gives_the_runs_numbers(tmp_path, plugins):
    """evaluate_model on the `images` dataset (a model in memory) and `run_spec` on the same folder agree."""
    import sslbench
    from sslbench.runner import run_spec
    from sslbench.spec import load_spec, resolve_spec
    from sslbench_plugins.basic_backbones import RandomCNN, RandomCNNOptions

    _images(tmp_path / "data")
    results = run_spec(resolve_spec(load_spec(_spec(tmp_path)), plugins), plugins, out_dir=tmp_path / "out")
    cnn = RandomCNN(RandomCNNOptions(image_size=16, width=4))
    mine = sslbench.evaluate_model(
        cnn.net,
        "images",
        dataset_options={"root": str(tmp_path / "data")},
        transform=cnn.preprocess,
        batch_size=8,
        n_clusters=3,
        epochs=3,
        seeds=2,
        device="cpu",
        plugins=plugins,
        scratch_dir=tmp_path / "scratch",
    )
    assert [r.metrics for r in mine.runs] == [r.metrics for r in results.runs]
    assert set(mine.metrics) == LABEL_FREE and mine.runs[0].protocol.n_classes == 0
