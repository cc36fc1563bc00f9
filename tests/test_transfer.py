"""The ObjectNet protocols: ACC per class group (Table 2) and clusters applied to another dataset
(Table C.2), on hand-computed examples and end to end through the CLI with the `features` dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from sslbench.errors import SSLBenchError
from sslbench.protocol import contingency, hungarian_mapping
from sslbench.transfer import ClassMap, transfer_scores

from conftest import run_cli


def test_transfer_scores_by_hand():
    # Source: 4 classes, clusters 0..3 trained one-to-one onto classes 0..3.
    # Target: class 0 is source classes {0, 1} (ObjectNet's two-ImageNet-classes case), class 1 is {2},
    # class 2 is not in the source and must be left out.
    class_map = ClassMap.checked([[0, 1], [2], []], n_target=3, n_source=4, where="test")
    train_pred = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    target_labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    target_pred = np.array([0, 1, 1, 2, 2, 2, 3, 0, 3])
    train_assignment = hungarian_mapping(contingency(train_pred, train_pred.copy(), 4, 4))
    metrics, n_scored = transfer_scores(train_assignment, target_pred, target_labels, class_map, 4)
    assert n_scored == 7
    # ACC-tr: clusters → source classes 0,1,1,2 for target 0 (3 of 4 in {0, 1}); 2,2,3 for target 1 (2 of 3).
    assert metrics["acc_tr"] == pytest.approx(5 / 7)
    # ACC-val: on the target, cluster 1 → target 0 and cluster 2 → target 1 (one-to-one, 4 samples),
    # clusters 0 and 3 take their majority (target 0 and target 1): 3 of 4 and 3 of 3 right.
    assert metrics["acc_val"] == pytest.approx(6 / 7)
    # Everything in one cluster: the largest scored class, 4 of 7.
    assert metrics["single_cluster"] == pytest.approx(4 / 7)
    assert {"ari", "ami", "nmi"} <= metrics.keys()


def test_composed_assignment_follows_each_clusters_source_class():
    class_map = ClassMap.checked([[0, 1], [2], []], n_target=3, n_source=4, where="test")
    # Clusters assigned to source classes 3, 0, 2, 1: source 3 is in no target class.
    assert class_map.composed_assignment(np.array([3, 0, 2, 1])).tolist() == [-1, 0, 1, 0]


def _plan(plugins, train_labels, eval_labels, n_classes, **extra):
    from sslbench.inputs import FeatureSplit
    from sslbench.pipeline import plan_protocol
    from sslbench.spec import ProtocolSpec

    def split(name, labels):
        return FeatureSplit(name, np.zeros((len(labels), 2), dtype=np.float32), np.asarray(labels))

    protocol = ProtocolSpec(k=[n_classes], seeds=[0], epochs=[1])
    return plan_protocol(
        split("train", train_labels),
        split("eval", eval_labels),
        n_classes=n_classes,
        protocol=protocol,
        plugins=plugins,
        model="m",
        dataset="d",
        **extra,
    )


def test_every_metric_is_scored_per_class_group_by_hand(plugins):
    from sslbench.pipeline import SeedPredictions, score_seed

    groups = {"seen": np.array([0, 1]), "unseen": np.array([2])}
    plan = _plan(plugins, [0, 1, 2], [0, 1, 1, 2, 2, 0], 3, class_groups=groups)
    preds = SeedPredictions(np.array([0, 1, 2]), np.array([0, 0, 1, 2, 2, 1]), (), 0.0, 0.0)
    metrics = score_seed(plan, 3, preds).metrics
    # Train assignment: cluster c -> class c. Seen classes {0, 1}: 4 eval samples, 2 right.
    assert metrics["acc_seen"] == pytest.approx(2 / 4)
    assert metrics["acc_unseen"] == 1.0
    # Every metric plugin is also computed per group: scikit-learn's ARI on the group's samples alone.
    from sklearn.metrics import adjusted_rand_score

    assert metrics["ari_seen"] == pytest.approx(adjusted_rand_score([0, 1, 1, 0], [0, 0, 1, 1]))
    assert metrics["ari_unseen"] == pytest.approx(1.0)


def test_transfer_rows_carry_every_metric_plugin(plugins):
    """A transfer target is scored by the metric plugins in its own class space, plus Table C.2's columns."""
    from sklearn.metrics import normalized_mutual_info_score

    from sslbench.inputs import FeatureSplit
    from sslbench.pipeline import SeedPredictions, TransferTarget, score_seed

    class_map = ClassMap.checked([[0, 1], [2], []], n_target=3, n_source=4, where="test")
    target_labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    target_pred = np.array([0, 1, 1, 2, 2, 2, 3, 0, 3])
    target = TransferTarget("d → t", "test", FeatureSplit("t", np.zeros((9, 2), np.float32), target_labels), class_map)
    train = [0, 1, 2, 3, 0, 1, 2, 3]
    plan = _plan(plugins, train, [0, 1, 2, 3], 4, transfers=(target,))
    preds = SeedPredictions(np.array(train), np.array([0, 1, 2, 3]), (target_pred,), 0.0, 0.0)
    ((metrics, n_scored),) = score_seed(plan, 4, preds).transfers
    assert n_scored == 7
    assert metrics["acc_tr"] == pytest.approx(5 / 7)
    # The source train assignment carried into the target's classes gives ACC = ACC-tr for this map.
    assert metrics["acc"] == pytest.approx(5 / 7)
    assert metrics["acc_eval_assignment"] == metrics["acc_val"] == pytest.approx(6 / 7)
    scored = target_labels < 2
    assert metrics["nmi"] == pytest.approx(
        normalized_mutual_info_score(target_labels[scored], target_pred[scored], average_method="arithmetic")
    )
    assert {"v_measure", "fowlkes_mallows", "single_cluster"} <= metrics.keys()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([[0], [1]], "for each of 3 classes, got 2"),
        ([[0], [7], []], "maps to a class outside the source's [0, 4)"),
        ([[], [], []], "no class maps onto a source class"),
    ],
)
def test_bad_class_maps(raw, message):
    with pytest.raises(SSLBenchError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ClassMap.checked(raw, n_target=3, n_source=4, where="t")


def _blobs(centres: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centres[labels] + rng.normal(scale=0.3, size=(len(labels), centres.shape[1]))).astype(np.float32)


def _save(folder, name, features, labels):
    np.save(folder / f"{name}_x.npy", features)
    np.save(folder / f"{name}_y.npy", labels)
    return {"features": str(folder / f"{name}_x.npy"), "labels": str(folder / f"{name}_y.npy")}


@pytest.mark.slow
def test_transfer_and_class_groups_end_to_end(tmp_path):
    """Source: 4 well-separated classes. Target ('ObjectNet'): class 0 = source classes 0 and 1, class 1 =
    source class 2, class 2 = a new centre. Perfectly separable, so ACC-tr and ACC-val are exactly 1."""
    centres = np.random.default_rng(0).normal(scale=10.0, size=(5, 6))
    y_train, y_val = np.repeat(np.arange(4), 60), np.repeat(np.arange(4), 20)
    source_of = np.array([0, 1, 2, 2, 4, 4])  # target samples drawn from these centres …
    target_label = np.array([0, 0, 1, 1, 2, 2])  # … and labelled with these target classes
    pick = np.repeat(np.arange(6), 15)
    spec = {
        "models": [{"id": "raw"}],
        "datasets": [
            {
                "id": "features",
                "name": "source",
                "options": {
                    "splits": {
                        "train": _save(tmp_path, "train", _blobs(centres, y_train, 1), y_train),
                        "val": _save(tmp_path, "val", _blobs(centres, y_val, 2), y_val),
                    },
                    "class_groups": {"in_target": [0, 1, 2], "not_in_target": [3]},
                },
                "transfer": [
                    {
                        "id": "features",
                        "name": "target",
                        "split": "test",
                        "class_map": "source_classes",
                        "options": {
                            "splits": {
                                "test": _save(tmp_path, "test", _blobs(centres, source_of[pick], 3), target_label[pick])
                            },
                            "class_maps": {"source_classes": [[0, 1], [2], []]},
                        },
                    }
                ],
            }
        ],
        "protocol": {"seeds": 2, "epochs": 20},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("run", "spec.yaml", "--out", "out", "--save-predictions", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    source_runs = [r for r in data["runs"] if r["dataset"] == "source"]
    transfer_runs = [r for r in data["runs"] if r["dataset"] == "source → target"]
    assert len(source_runs) == len(transfer_runs) == 2
    for run in transfer_runs:
        assert run["n_eval"] == 60  # the 30 samples of the target's unmapped class are not scored
        assert run["protocol"]["eval_split"] == "test" and run["protocol"]["n_classes"] == 2
        assert run["metrics"]["acc_tr"] == 1.0 and run["metrics"]["acc_val"] == 1.0
        assert run["metrics"]["single_cluster"] == 0.5
    # The class-group ACCs equal ACC recomputed from the saved predictions over each group's samples.
    for run in source_runs:
        saved = np.load(tmp_path / "out" / "predictions" / f"raw__source__seed{run['seed']}.npz")
        mapping = hungarian_mapping(contingency(saved["train_pred"], saved["train_labels"], 4, 4))
        correct = mapping[saved["eval_pred"]] == saved["eval_labels"]
        inside = np.isin(saved["eval_labels"], [0, 1, 2])
        assert run["metrics"]["acc_in_target"] == pytest.approx(correct[inside].mean())
        assert run["metrics"]["acc_not_in_target"] == pytest.approx(correct[~inside].mean())
    # Transfer runs save their predictions too: every target sample, scored or not.
    with np.load(tmp_path / "out" / "predictions" / "raw__source-target__seed0.npz") as saved:
        assert saved["eval_pred"].shape == (90,) and saved["train_pred"].shape == (240,)
    inspect = run_cli("clusters", "out", "--model", "raw", "--dataset", "source → target", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    assert "non-empty clusters on the eval split" in inspect.stdout
    grid = run_cli("clusters", "out", "--model", "raw", "--dataset", "source → target", "--grid", "0", cwd=tmp_path)
    assert grid.returncode == 2 and "is not an image" in grid.stderr  # features, not images: named clearly
    report = (tmp_path / "out" / "results.md").read_text()
    assert "ACC in target" in report and "ACC not in target" in report
    assert "| Method | ACC-tr | ACC-val | ARI | AMI | NMI | 1 cluster |" in report


@pytest.mark.slow
def test_transfer_with_a_missing_class_map_fails_in_one_line(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 4
    files = _save(tmp_path, "a", x, y)
    spec = {
        "models": [{"id": "raw"}],
        "datasets": [
            {
                "id": "features",
                "options": {"splits": {"train": files, "val": files}},
                "transfer": [{"id": "features", "split": "train", "options": {"splits": {"train": files}}}],
            }
        ],
        "protocol": {"seeds": 1, "epochs": 2},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "datasets[0].transfer[0].class_map: dataset 'features' has no metadata 'imagenet_classes'" in proc.stderr


@pytest.mark.slow
def test_validate_counts_the_transfer_runs(tmp_path):
    proc = run_cli("validate", "paper-objectnet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "= 80 runs (+ 40 on 1 transfer target(s))" in proc.stdout


def test_predictions_are_found_by_exact_dataset_and_clusters(tmp_path):
    from sslbench.predictions import find_predictions

    folder = tmp_path / "predictions"
    folder.mkdir()
    names = [
        "raw__source__seed0.npz",
        "raw__source-target__seed0.npz",
        "raw__source__k15_pca64_ep60__seed0.npz",
        "raw-pixels__source__seed0.npz",
    ]
    for name in names:
        (folder / name).write_bytes(b"")
    assert find_predictions(tmp_path, "raw", "source → target", 0, None).name == names[1]
    assert find_predictions(tmp_path, "raw", "source", 0, 15).name == names[2]
    assert find_predictions(tmp_path, "raw pixels", None, 0, None).name == names[3]
    with pytest.raises(SSLBenchError, match="several runs match"):
        find_predictions(tmp_path, "raw", "source", 0, None)
