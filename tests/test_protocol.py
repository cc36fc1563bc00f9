"""The paper's assignment and metrics, on hand-worked cases and against scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn import metrics as skm

from sslbench.interfaces import ScoringContext
from sslbench.protocol import contingency, hungarian_mapping, majority_mapping


def context(train_pred, train_labels, eval_pred, eval_labels, n_clusters, n_classes) -> ScoringContext:
    arrays = [np.asarray(a, dtype=np.int64) for a in (train_pred, train_labels, eval_pred, eval_labels)]
    return ScoringContext(
        *arrays,
        n_clusters=n_clusters,
        n_classes=n_classes,
        train_contingency=contingency(arrays[0], arrays[1], n_clusters, n_classes),
        eval_contingency=contingency(arrays[2], arrays[3], n_clusters, n_classes),
    )


def score(plugins, ctx: ScoringContext) -> dict[str, float]:
    return {entry.name: entry.fn(ctx) for entry in plugins.metrics}


def test_contingency_counts_cluster_class_pairs():
    c = contingency(np.array([0, 0, 1, 2, 2, 2]), np.array([1, 1, 0, 0, 1, 1]), 3, 2)
    assert c.tolist() == [[0, 2], [1, 0], [1, 2]]


def test_hungarian_is_one_to_one_and_beats_greedy():
    # Greedy would give cluster 0 class 0 (5) and then cluster 1 class 1 (1): 6.
    # The optimum gives cluster 0 class 1 (4) and cluster 1 class 0 (4): 8.
    cost = np.array([[5, 4], [4, 1]])
    assert hungarian_mapping(cost).tolist() == [1, 0]
    assert majority_mapping(cost).tolist() == [0, 0]


def test_overclustering_extra_clusters_take_their_majority_class():
    cost = np.array([[9, 0, 0], [0, 7, 1], [0, 0, 6], [5, 1, 0], [0, 0, 3], [0, 0, 0]])
    # Clusters 0..2 are matched to classes 0..2; 3 → class 0, 4 → class 2 by majority;
    # 5 is empty in train and takes class 0, as argmax does in the paper's code.
    assert hungarian_mapping(cost).tolist() == [0, 1, 2, 0, 2, 0]


def test_fewer_clusters_than_classes_leave_classes_unmatched():
    cost = np.array([[1, 8, 0], [0, 7, 6]])
    assert hungarian_mapping(cost).tolist() == [1, 2]


def test_acc_uses_the_train_assignment_not_the_eval_one(plugins):
    # Train says cluster 0 = class 0, cluster 1 = class 1; eval has them swapped.
    ctx = context([0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 0], n_clusters=2, n_classes=2)
    m = score(plugins, ctx)
    assert m["acc"] == 0.0
    assert m["acc_majority"] == 0.0
    assert m["acc_eval_assignment"] == 1.0


def test_overclustered_acc_worked_example(plugins):
    # Train contingency (clusters × classes): c0 [2,1,0], c1 [0,2,0], c2 [1,0,2], c3 [1,0,1].
    # The unique optimal matching is c0→0, c1→1, c2→2 (6 samples); c3 is extra and takes its
    # majority class, 0 (the first of its tied classes).
    train_pred = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    train_lab = [0, 0, 1, 1, 1, 0, 2, 2, 2, 0]
    cost = contingency(np.array(train_pred), np.array(train_lab), 4, 3)
    assert cost.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2], [1, 0, 1]]
    assert hungarian_mapping(cost).tolist() == [0, 1, 2, 0]
    # Eval: mapped predictions [0,1,2,0,0,2] against labels [0,1,1,0,2,2] → 4 of 6 correct.
    ctx = context(train_pred, train_lab, [0, 1, 2, 3, 3, 2], [0, 1, 1, 0, 2, 2], 4, 3)
    m = score(plugins, ctx)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["acc_majority"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_classes = 4
    n_clusters = int(rng.integers(4, 7))
    cost = rng.integers(0, 20, size=(n_clusters, n_classes))
    mapping = hungarian_mapping(cost)
    assert set(mapping.tolist()) == set(range(n_classes)), "every class gets a cluster"
    # One cluster per class chosen to maximise the matched count: pick, for each class, the
    # cluster the mapping matched it to, and compare that total with every injective choice.
    brute_force = max(
        sum(int(cost[c, y]) for y, c in enumerate(clusters))
        for clusters in itertools.permutations(range(n_clusters), n_classes)
    )
    best_matched = max(
        sum(int(cost[c, y]) for y, c in enumerate(clusters))
        for clusters in itertools.permutations(range(n_clusters), n_classes)
        if all(mapping[c] == y for y, c in enumerate(clusters))
    )
    assert best_matched == brute_force
    # the extra clusters take their majority class
    majority = cost.argmax(axis=1)
    assert (mapping == majority).sum() >= n_clusters - n_classes


@pytest.mark.parametrize(
    ("n_clusters", "n_classes", "empty_clusters"),
    [(10, 10, 0), (15, 10, 0), (15, 10, 3), (7, 1, 0), (1, 5, 0)],
)
def test_partition_metrics_equal_scikit_learn(plugins, n_clusters, n_classes, empty_clusters):
    rng = np.random.default_rng(n_clusters * 100 + n_classes + empty_clusters)
    used = n_clusters - empty_clusters
    train_pred = rng.integers(0, used, 500)
    eval_pred = rng.integers(0, used, 400)
    train_lab = rng.integers(0, n_classes, 500)
    eval_lab = (eval_pred * 7 + rng.integers(0, 2, 400)) % n_classes  # correlated with clusters
    m = score(plugins, context(train_pred, train_lab, eval_pred, eval_lab, n_clusters, n_classes))
    expected = {
        "ari": skm.adjusted_rand_score(eval_lab, eval_pred),
        "ami": skm.adjusted_mutual_info_score(eval_lab, eval_pred, average_method="arithmetic"),
        "nmi": skm.normalized_mutual_info_score(eval_lab, eval_pred, average_method="arithmetic"),
        "v_measure": skm.v_measure_score(eval_lab, eval_pred),
        "fowlkes_mallows": skm.fowlkes_mallows_score(eval_lab, eval_pred),
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-9), name
    # NMI with arithmetic normalisation is the V-measure (the paper's appendix B)
    assert m["nmi"] == pytest.approx(m["v_measure"], abs=1e-9)
    for name in ("acc", "acc_majority", "acc_eval_assignment"):
        assert 0.0 <= m[name] <= 1.0
    # the eval-built assignment can never do worse on eval than the train-built one
    assert m["acc_eval_assignment"] >= m["acc"] - 1e-12
