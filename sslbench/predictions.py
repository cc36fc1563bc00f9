"""Saved cluster predictions: one ``.npz`` per run, named so that ``sslbench clusters`` finds it.

The writer (the protocol's *save* stage) and the reader (:mod:`sslbench.inspection`) share
:func:`predictions_name`, so the naming lives in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np

from sslbench.errors import SSLBenchError


def file_stem(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def predictions_name(model: str, dataset: str, seed: int, point: tuple[int, int, int] | None = None) -> str:
    """File name of one run's predictions: ``<model>__<dataset>[__k<clusters>_pca<dims>_ep<epochs>]
    __seed<seed>.npz``, names made file-safe; ``point`` (clusters, dims, epochs) when the spec sweeps."""
    tag = "" if point is None else f"__k{point[0]}_pca{point[1]}_ep{point[2]}"
    return f"{file_stem(model)}__{file_stem(dataset)}{tag}__seed{seed}.npz"


def save_predictions(
    path: Path, train_pred: np.ndarray, train_labels: np.ndarray, eval_pred: np.ndarray, eval_labels: np.ndarray
) -> None:
    """Write one run's cluster ids atomically: a crash or a full disk never leaves a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, train_pred=train_pred, train_labels=train_labels, eval_pred=eval_pred, eval_labels=eval_labels
            )
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise SSLBenchError(f"cannot write predictions {path}: {exc.strerror or exc}") from None


def find_predictions(run_dir: Path, model: str, dataset: str | None, seed: int, clusters: int | None) -> Path:
    """The predictions file of one run; ambiguity (several datasets or protocol points) is an error."""
    folder = run_dir / "predictions"
    if not folder.is_dir():
        raise SSLBenchError(f"{run_dir} has no predictions/ folder: run with --save-predictions")
    found = []
    head, tail = f"{file_stem(model)}__", f"__seed{seed}.npz"
    for path in sorted(folder.glob(f"{head}*{tail}")):
        middle = path.name[len(head) : -len(tail)]
        point = re.search(r"__k(\d+)_pca\d+_ep\d+$", middle)
        dataset_part = middle[: point.start()] if point else middle
        if dataset is not None and dataset_part != file_stem(dataset):
            continue
        if clusters is not None and not (point and int(point.group(1)) == clusters):
            continue
        found.append(path)
    if not found:
        raise SSLBenchError(f"no predictions for model '{model}' seed {seed} in {folder}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SSLBenchError(f"several runs match ({names}); choose with --dataset and --clusters")
    return found[0]
