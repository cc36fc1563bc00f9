"""The Python API on precomputed features: what an SSL paper calls from its own eval suite.

:func:`evaluate_features` runs the same stages as ``sslbench run`` (:mod:`sslbench.pipeline`) on
features in memory or memory-mapped on disk and returns the same typed :class:`Results`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sslbench.cache import run_scratch
from sslbench.errors import SSLBenchError
from sslbench.events import Emit, ignore
from sslbench.extract import resolve_device
from sslbench.pipeline import checked_split, plan_protocol, run_protocol
from sslbench.plugins import Plugins, get_plugins
from sslbench.results import Results, build_results, environment
from sslbench.spec import ProtocolSpec


def evaluate_features(
    train_features: Any,
    train_labels: Any,
    eval_features: Any,
    eval_labels: Any,
    *,
    n_clusters: int | None = None,
    overcluster: float | Sequence[float] = 1.0,
    pca_dim: int | Sequence[int | None] | None = None,
    whiten: bool = False,
    epochs: int = 60,
    batch_size: int | None = None,
    seeds: int | Sequence[int] = 5,
    backend: str = "torch",
    backend_options: dict[str, Any] | None = None,
    device: str = "auto",
    n_classes: int | None = None,
    model: str = "features",
    dataset: str = "features",
    plugins: Plugins | None = None,
    scratch_dir: str | Path | None = None,
    emit: Emit = ignore,
) -> Results:
    """Cluster precomputed features with the paper's protocol and score them.

    PCA and k-means are fitted on the train features; the eval features are predicted and scored
    with the cluster → class assignment built on the train split. Every metric is computed per seed
    and summarised as mean ± sample std.

    :param train_features: ``(n_train, d)`` array (a ``np.memmap`` is read in chunks).
    :param train_labels: ``(n_train,)`` integer class indices.
    :param n_clusters: clusters before overclustering; ``None`` = number of classes.
    :param overcluster: fit ``int(overcluster × n_clusters)`` clusters; a list sweeps.
    :param pca_dim: PCA components to keep; ``None`` keeps all; a list sweeps.
    :param seeds: a count ``n`` (seeds ``0..n-1``) or explicit seeds.
    :param backend: ``reference`` (the paper's scikit-learn code) or ``torch`` (fast, CPU or GPU).
    :param backend_options: options of the backend's clusterer, e.g. ``{"algorithm": "lloyd"}``.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; used by backends that run on GPUs.
    :param n_classes: number of classes; ``None`` = ``max(label) + 1`` over both splits.
    :param scratch_dir: where the PCA projections are written while the runs last (removed after);
        default a folder beside the feature cache (``$SSLBENCH_CACHE``).
    :param emit: receives :class:`~sslbench.events.Event` objects (stages, runs) as they happen.
    :returns: :class:`~sslbench.results.Results` with ``runs`` (per seed) and ``summary``.
    :raises SSLBenchError: unusable input (NaN/inf, mismatched shapes, k larger than the train set).
    """
    started = time.perf_counter()
    plugins = plugins or get_plugins()
    try:
        protocol = ProtocolSpec.model_validate(
            {
                "pca_dims": list(pca_dim) if isinstance(pca_dim, Sequence) else pca_dim,
                "whiten": whiten,
                "k": n_clusters,
                "overcluster": list(overcluster) if isinstance(overcluster, Sequence) else overcluster,
                "epochs": epochs,
                "batch_size": batch_size,
                "seeds": list(seeds) if isinstance(seeds, Sequence) else seeds,
                "backend": backend,
                "backend_options": backend_options or {},
            }
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"][:1])
        raise SSLBenchError(f"evaluate_features: {field}: {err['msg']} (got {err.get('input')!r})") from None
    train = checked_split("train", train_features, train_labels)
    eval_ = checked_split("eval", eval_features, eval_labels)
    classes = n_classes if n_classes is not None else int(max(train.labels.max(), eval_.labels.max())) + 1
    device = resolve_device(device)
    plan = plan_protocol(
        train, eval_, n_classes=classes, protocol=protocol, plugins=plugins, model=model, dataset=dataset, device=device
    )
    with run_scratch(Path(scratch_dir) if scratch_dir is not None else None) as scratch:
        runs = list(run_protocol(plan, scratch=scratch, emit=emit))
    env = environment(device, plugins)
    spec = {"api": "evaluate_features", "protocol": protocol.model_dump(mode="json")}
    return build_results(runs, spec=spec, env=env, wall_s=time.perf_counter() - started)
