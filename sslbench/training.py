"""Evaluation inside a training loop: :func:`sslbench.evaluate_model` every N epochs (or steps), on the
datasets a user names, as one flat ``{"sslbench/<dataset>/<metric>": value}`` dict a logger takes.

Framework-free: a hand-written loop (one process or ``torch.distributed``) calls
:meth:`Evaluator.maybe_evaluate`; the Lightning callback (:class:`sslbench.lightning.SSLBenchCallback`)
is an adapter around the same object.

Under ``torch.distributed`` every rank calls the evaluator together (``evaluate_model`` is collective:
each rank embeds a shard) and gets the same dict; the evaluator checks that the ranks agree, so a
rank-inconsistent number is an error instead of a silently different curve per rank.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from sslbench.errors import SSLBenchError
from sslbench.evaluate import api_error, evaluate_model, protocol_keywords
from sslbench.inputs import checked_labels
from sslbench.interfaces import Dataset, Split
from sslbench.plugins import Plugins, get_plugins
from sslbench.ranks import Ranks
from sslbench.results import Results

#: The first part of every metric name the evaluator returns.
PREFIX = "sslbench"

#: What one entry of ``datasets`` may set for its own dataset (besides ``dataset`` itself).
DATASET_KEYS = ("log_name", "dataset_options", "transform", "fit_split", "eval_split")


def _keyword_names(function: Any) -> set[str]:
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind == p.KEYWORD_ONLY}


def shared_keywords() -> set[str]:
    """The keywords :class:`Evaluator` passes to every ``evaluate_model`` call: evaluate_model's own
    (``transform``, ``batch_size``, ``scratch_dir`` …) and the protocol's (``epochs``, ``seeds``, ``probes`` …)."""
    own = _keyword_names(evaluate_model) - {"plugins", "dataset_options"}
    return own | protocol_keywords()


@dataclass(frozen=True)
class EvalTarget:
    """One dataset the evaluator scores: what ``evaluate_model`` gets, and the name its metrics carry."""

    log_name: str
    dataset: str | Dataset
    keywords: Mapping[str, Any]


def _target(index: int, given: Any, plugins: Plugins) -> EvalTarget:
    where = f"sslbench.training: datasets[{index}]"
    entry: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {"dataset": given}
    unknown = sorted(set(entry) - {"dataset", *DATASET_KEYS})
    if unknown:
        raise SSLBenchError(
            f"{where}: unknown key '{unknown[0]}'; a dataset entry takes: dataset, {', '.join(DATASET_KEYS)}"
        )
    if "dataset" not in entry:
        raise SSLBenchError(f"{where}: no 'dataset' (a registered dataset id or an sslbench Dataset)")
    dataset = entry.pop("dataset")
    if isinstance(dataset, str):
        registered = plugins.datasets.get(dataset)  # an unknown id fails here, not after an epoch of training
        try:
            registered.options.model_validate(entry.get("dataset_options") or {})
        except ValidationError as exc:
            raise api_error(exc, f"datasets[{index}].dataset_options", False, "sslbench.training") from None
        default_name = dataset
    elif isinstance(dataset, Dataset):
        if "dataset_options" in entry:
            raise SSLBenchError(f"{where}: dataset_options are for a registered dataset id, not a Dataset object")
        default_name = dataset.name
    elif _is_torch_dataset(dataset):
        raise SSLBenchError(
            f"{where}: a torch Dataset has no train/eval splits; wrap it: "
            "sslbench.training.from_torch(name, {'train': ..., 'val': ...})"
        )
    else:
        raise SSLBenchError(
            f"{where}: dataset must be a registered id or an sslbench Dataset, got {type(dataset).__name__}"
        )
    log_name = entry.pop("log_name", default_name)
    if not isinstance(log_name, str) or not log_name or "/" in log_name:
        raise SSLBenchError(f"{where}: log_name must be a non-empty name without '/', got {log_name!r}")
    return EvalTarget(log_name, dataset, entry)


def _is_torch_dataset(value: Any) -> bool:
    import torch.utils.data

    return isinstance(value, torch.utils.data.Dataset)


class Evaluator:
    """``evaluate_model`` on several datasets, every ``every`` epochs (or steps), as flat metrics.

    ::

        evaluator = Evaluator(["digits", {"dataset": "fashion_mnist", "dataset_options": {"limit": 2000}}],
                              every=5, transform=eval_transform, epochs=20, seeds=3, probes=[{"id": "knn"}])
        for epoch in range(epochs):
            train_one_epoch(encoder)
            log(evaluator.maybe_evaluate(encoder, epoch))  # {} except after epochs 4, 9, 14, …

    :param datasets: each a registered dataset id, an sslbench :class:`~sslbench.interfaces.Dataset`
        (:func:`from_torch` makes one of torch datasets), or a mapping ``{"dataset": …}`` with any of
        :data:`DATASET_KEYS`: ``log_name`` (the ``<dataset>`` of the metric names; default the id or the
        Dataset's name), ``dataset_options`` (a registered dataset's options), ``transform``,
        ``fit_split``, ``eval_split`` (as :func:`~sslbench.evaluate_model` takes them).
    :param every: evaluate after every ``every``-th epoch (or step): :meth:`due`.
    :param plugins: the plugin set (default: the installed plugins).
    :param keywords: every other keyword :func:`~sslbench.evaluate_model` takes, for all datasets: its
        own (``transform``, ``batch_size``, ``name`` …) and the protocol's (``epochs``, ``seeds``,
        ``overcluster``, ``pca_dim``, ``backend``, ``probes`` …): fewer epochs, seeds and probes cost less
        (benchmarks/README.md, "Evaluation in a training loop", has the measured trade-off).
    :raises SSLBenchError: an unknown dataset id or keyword, bad dataset options, two datasets logged
        under one name, in one line, when the evaluator is made (not after an epoch of training).
    """

    def __init__(
        self,
        datasets: Sequence[str | Dataset | Mapping[str, Any]],
        *,
        every: int = 1,
        plugins: Plugins | None = None,
        **keywords: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
            raise SSLBenchError(f"sslbench.training: every must be a positive integer, got {every!r}")
        if isinstance(datasets, str | Dataset | Mapping) or not isinstance(datasets, Sequence) or not datasets:
            raise SSLBenchError("sslbench.training: datasets must be a non-empty list (of ids, Datasets or mappings)")
        unknown = sorted(set(keywords) - shared_keywords())
        if unknown:
            raise SSLBenchError(
                f"sslbench.training: unknown keyword '{unknown[0]}'; evaluate_model takes: "
                f"{', '.join(sorted(shared_keywords()))}"
            )
        self.every = int(every)
        self.plugins = plugins or get_plugins()
        self.keywords = keywords
        self.targets = [_target(index, given, self.plugins) for index, given in enumerate(datasets)]
        names = [target.log_name for target in self.targets]
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated is not None:
            raise SSLBenchError(
                f"sslbench.training: two datasets are logged as '{repeated}'; give each a distinct log_name"
            )
        #: The last evaluation's :class:`~sslbench.results.Results` per dataset (std, per-seed runs, probes).
        self.results: dict[str, Results] = {}

    def due(self, index: int) -> bool:
        """Whether to evaluate after the epoch (or step) of 0-based ``index``: when ``index + 1`` is a
        multiple of ``every`` (as Lightning's ``check_val_every_n_epoch``)."""
        return (int(index) + 1) % self.every == 0

    def evaluate(self, model: Any) -> dict[str, float]:
        """Score ``model`` on every dataset now: ``{"sslbench/<dataset>/<metric>": value}`` (see
        :func:`flat_metrics`). Under ``torch.distributed`` every rank must call it (it is collective)."""
        metrics: dict[str, float] = {}
        for target in self.targets:
            results = evaluate_model(
                model, target.dataset, plugins=self.plugins, **{**self.keywords, **target.keywords}
            )
            self.results[target.log_name] = results
            metrics.update(flat_metrics(target.log_name, results))
        ranks = self.keywords.get("ranks")
        _check_ranks_agree(metrics, ranks if ranks is not None else Ranks.of_process_group())
        return metrics

    def maybe_evaluate(self, model: Any, index: int) -> dict[str, float]:
        """:meth:`evaluate` after the epoch (or step) of 0-based ``index`` when :meth:`due`, else ``{}``."""
        return self.evaluate(model) if self.due(index) else {}


def flat_metrics(log_name: str, results: Results) -> dict[str, float]:
    """``{"sslbench/<log_name>/<metric>": value}`` of one dataset's results.

    Clustering metrics (``acc``, ``nmi`` …) are the mean over seeds; a protocol that sweeps
    ``overcluster`` or ``pca_dim`` has one summary row per point, named
    ``<metric>@overcluster=<o>,pca=<d>``. A probe's metrics (``knn_top1_k20``, ``linear_top1`` …) are
    fitted once, whatever the seeds: their single value.
    """
    metrics: dict[str, float] = {}
    probed = {metric: value for record in results.probes for metric, value in record.metrics.items()}
    rows = results.summary
    for row in rows:
        point = f"@overcluster={row.protocol.overcluster:g},pca={row.protocol.pca_dims}" if len(rows) > 1 else ""
        for metric, summary in row.metrics.items():
            if metric not in probed:  # a summary row repeats the probes' values: logged once, below
                metrics[f"{PREFIX}/{log_name}/{metric}{point}"] = summary.mean
    metrics.update({f"{PREFIX}/{log_name}/{metric}": value for metric, value in probed.items()})
    return metrics


def _check_ranks_agree(metrics: dict[str, float], ranks: Ranks) -> None:
    """Raise unless every rank of ``ranks`` (the processes that evaluated together) computed exactly these
    metrics; nothing to compare, and no collective, for one process (``ranks=ONE_PROCESS`` included)."""
    if not ranks.distributed:
        return
    mine = sorted(metrics.items())
    for rank, theirs in enumerate(ranks.all_gather_object(mine)):
        if [key for key, _ in theirs] != [key for key, _ in mine]:
            raise SSLBenchError(f"sslbench.training: rank {rank} computed other metrics than rank {ranks.rank}")
        for (key, value), (_, their_value) in zip(mine, theirs, strict=True):
            if value != their_value and not (math.isnan(value) and math.isnan(their_value)):
                raise SSLBenchError(
                    f"sslbench.training: {key} is {value!r} on rank {ranks.rank} but {their_value!r} on rank "
                    f"{rank}; evaluate_model must return the same results on every rank"
                )


# --------------------------------------------------------------------------------------------------
# The user's own torch datasets


class _TorchSplit(Split):
    """A ``torch.utils.data.Dataset`` of ``(sample, label)`` pairs as a split."""

    def __init__(self, dataset: Any, labels: np.ndarray) -> None:
        self.dataset = dataset
        self._labels = labels

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


def _torch_labels(split: str, dataset: Any) -> np.ndarray:
    """Its ``targets`` attribute (torchvision's datasets have one), else the second item of every sample."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[index][1] for index in range(len(dataset))]
    labels = np.asarray(targets.cpu() if hasattr(targets, "cpu") else targets)
    labels = checked_labels(f"split '{split}'", labels)
    if len(labels) != len(dataset):
        raise SSLBenchError(f"split '{split}': {len(labels)} targets for {len(dataset)} samples")
    return labels


def from_torch(name: str, splits: Mapping[str, Any], num_classes: int | None = None) -> Dataset:
    """An sslbench :class:`~sslbench.interfaces.Dataset` of ``torch.utils.data.Dataset`` objects that
    yield ``(sample, label)`` pairs, one per split (``{"train": …, "val": …}``).

    The labels are read once, here: from a ``targets`` attribute where the dataset has one, else by
    reading every sample. The sample goes to the evaluation's ``transform`` as the dataset returns it:
    a dataset that already returns tensors needs ``transform=lambda sample: sample``.

    :param num_classes: default: the largest label + 1.
    """
    if not splits:
        raise SSLBenchError(f"from_torch('{name}'): no splits; give e.g. {{'train': ..., 'val': ...}}")
    wrapped = {split: _TorchSplit(dataset, _torch_labels(split, dataset)) for split, dataset in splits.items()}
    largest = max(int(split.labels.max()) for split in wrapped.values())
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise SSLBenchError(f"from_torch('{name}'): label {largest} but num_classes is {num_classes}")
    classes = [str(index) for index in range(num_classes)]
    return Dataset(name, classes, wrapped, f"{name}: torch datasets")
