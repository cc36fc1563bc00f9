"""Saved cluster predictions: one ``.npz`` per run, named so that ``sslbench clusters`` finds it.

The writer (the protocol's *save* stage) and the reader (:mod:`sslbench.inspection`) share
:func:`predictions_name`, so the naming lives in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from sslbench.errors import SSLBenchError, did_you_mean
from sslbench.inputs import NO_LABEL


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


#: What reading a damaged or foreign .npz raises.
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_predictions(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids, labels) of ``split`` (``train`` or ``eval``) from a predictions file, checked: both
    1-D arrays of non-negative integers of one length. Anything else (not an .npz, truncated, keys
    missing, other dtypes) is a one-line :class:`SSLBenchError` naming the file. Labels of a split
    without labels are all :data:`~sslbench.inputs.NO_LABEL`."""
    try:
        # Opened here, so that a damaged archive leaves no file open.
        with open(path, "rb") as handle:
            if handle.read(2) != b"PK":
                raise SSLBenchError(f"{path}: not a predictions file (not an .npz archive)")
            handle.seek(0)
            with np.load(handle) as saved:
                missing = [key for key in (f"{split}_pred", f"{split}_labels") if key not in saved.files]
                if missing:
                    raise SSLBenchError(f"{path}: not a predictions file: no {' or '.join(missing)} array")
                pred, labels = saved[f"{split}_pred"], saved[f"{split}_labels"]
    except _READ_ERRORS as exc:
        text = str(exc).strip().splitlines()
        raise SSLBenchError(f"cannot read predictions {path}: {text[0] if text else type(exc).__name__}") from None
    for key, array in ((f"{split}_pred", pred), (f"{split}_labels", labels)):
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise SSLBenchError(f"{path}: {key} must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
        unlabeled = key.endswith("_labels") and len(array) and bool(np.all(array == NO_LABEL))
        if len(array) and not unlabeled and (array.min() < 0 or int(array.max()) > np.iinfo(np.int64).max):
            raise SSLBenchError(f"{path}: {key} holds values outside [0, 2^63) ({array.min()} to {array.max()})")
    if len(pred) != len(labels):
        raise SSLBenchError(f"{path}: {split}_pred has {len(pred)} entries but {split}_labels {len(labels)}")
    if len(pred) == 0:
        raise SSLBenchError(f"{path}: the {split} split has no predictions")
    return pred.astype(np.int64), labels.astype(np.int64)


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
        models = sorted({p.name.split("__", 1)[0] for p in folder.glob("*__seed*.npz")})
        stem = file_stem(model).lower()
        prefixed = [m for m in models if m.lower().startswith(stem)]
        hint = did_you_mean(prefixed[0], prefixed[:1]) if len(prefixed) == 1 else did_you_mean(stem, models)
        raise SSLBenchError(
            f"no predictions for model '{model}' seed {seed} in {folder}{hint}; models there (file-safe names): "
            f"{', '.join(models) or 'none'}"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SSLBenchError(f"several runs match ({names}); choose with --dataset and --clusters")
    return found[0]
