"""The one input contract for features and labels, whether they come through the API
(``evaluate_features``) or the ``features`` dataset of a spec; light to import (numpy only), so
dataset plugins check their arrays without loading the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sslbench.arrays import RowReader
from sslbench.errors import SSLBenchError
from sslbench.interfaces import iter_chunks

#: The label of every sample of a split without class labels (an unlabeled image folder, features
#: given without labels): never a class index, and never compared with clusters.
NO_LABEL = -1


@dataclass(frozen=True)
class FeatureSplit:
    """Features (possibly a memmap larger than RAM) and labels of one split, checked by
    :func:`checked_split`; a split without labels has :data:`NO_LABEL` for every sample."""

    name: str
    features: np.ndarray
    labels: np.ndarray

    @property
    def labeled(self) -> bool:
        return not (len(self.labels) and self.labels[0] == NO_LABEL)


# --------------------------------------------------------------------------------------------------
# Input checks
#
# The one contract for features and labels, whether they come through the API (evaluate_features) or
# the ``features`` dataset of a spec:
#
# * features: a non-empty 2-D array (samples × dims) of real numbers, a floating or integer dtype
#   (bool, complex, datetime/timedelta, strings, objects and structured records are refused), finite,
#   and with its largest magnitude within [2^-100, 2^100] (or all zero): the backends compute in
#   float32, whose squares hold no more.
# * labels: a 1-D array of non-negative integer class indices, one per feature row: any integer dtype,
#   or floats that are whole numbers (NaN, inf and fractions are refused).
# * classes (when their number is not given): the labels of all splits index them directly, with
#   ``max label + 1`` classes, unless the labels are sparse (see :func:`class_index`), in which case they
#   are renumbered 0..m-1 in increasing order. Contiguous labels always index the classes as given.

#: Features of larger (or smaller, non-zero) magnitude are refused: the backends' float32 arithmetic
#: would overflow (or lose them to underflow). Within these bounds the protocol rescales the PCA
#: projections by a power of two when needed (see :func:`projection_scale`).
MAX_FEATURE_MAGNITUDE = 2.0**100
MIN_FEATURE_MAGNITUDE = 2.0**-100
#: Labels are sparse, and renumbered, when the largest is at least twice their number plus this.
SPARSE_LABEL_SLACK = 64
_INT64_MAX = int(np.iinfo(np.int64).max)


def _as_array(name: str, what: str, value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SSLBenchError(f"{name} {what} cannot be read as an array: {text}") from None


def checked_labels(name: str, labels: object) -> np.ndarray:
    """Labels as int64 class indices; errors name the split."""
    array = _as_array(name, "labels", labels)
    if array.ndim != 1:
        raise SSLBenchError(f"{name} labels must be a 1-D array of class indices, got shape {array.shape}")
    if len(array) == 0:
        raise SSLBenchError(f"{name} is empty")
    if array.dtype.names is not None or array.dtype.kind not in "iuf":
        raise SSLBenchError(f"{name} labels must be integer class indices, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        whole = np.isfinite(array)
        whole[whole] = np.mod(array[whole], 1) == 0
        if not whole.all():
            row = int(np.argmin(whole))
            raise SSLBenchError(f"{name} labels must be integer class indices, got {array[row]} at row {row}")
    low, high = array.min(), array.max()
    if low < 0:
        raise SSLBenchError(f"{name} labels must be non-negative class indices, found {low}")
    if int(high) > _INT64_MAX:
        raise SSLBenchError(f"{name} labels must be below 2^63, found {high}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class ClassIndex:
    """How labels index classes: directly (``ids`` is None), or renumbered, class ``i`` being the
    label ``ids[i]``."""

    n_classes: int
    ids: np.ndarray | None = None

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` (int64, each one of ``ids``) as class indices."""
        return labels if self.ids is None else np.searchsorted(self.ids, labels).astype(np.int64)


def class_index(label_arrays: Sequence[np.ndarray]) -> ClassIndex:
    """The classes of checked labels (:func:`checked_labels`) of every split together, when their number
    is not given.

    Labels index the classes directly, ``max label + 1`` of them, unless they are sparse: when the
    largest label is at least ``2 × (distinct labels) + 64``, the distinct labels are renumbered
    0..m-1 in increasing order (a label of 10^12 does not make 10^12 classes). Contiguous labels,
    or labels with a few classes missing, index the classes as given.
    """
    top = max(int(labels.max()) for labels in label_arrays)
    if top < 2 + SPARSE_LABEL_SLACK:  # fewer than 2·1 + slack: never sparse, whatever the count
        return ClassIndex(top + 1)
    ids = np.unique(np.concatenate([np.asarray(labels) for labels in label_arrays]))
    if top < 2 * len(ids) + SPARSE_LABEL_SLACK:
        return ClassIndex(top + 1)
    return ClassIndex(len(ids), ids)


def checked_feature_array(name: str, features: object) -> np.ndarray:
    """Dtype and shape of one split's features (no row is read): a non-empty 2-D array of real numbers."""
    array = _as_array(name, "features", features)
    if array.dtype.names is not None or array.dtype.kind not in "iuf":
        raise SSLBenchError(
            f"{name} features must be real numbers (a floating or integer dtype), got dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise SSLBenchError(f"{name} features must be a 2-D array (samples × dims), got shape {array.shape}")
    if array.shape[0] == 0:
        raise SSLBenchError(f"{name} features have no rows (shape {array.shape})")
    if array.shape[1] == 0:
        raise SSLBenchError(f"{name} features have no dimensions (shape {array.shape})")
    return array


@dataclass(frozen=True)
class RowScan:
    """What one read of a feature matrix found: rows holding NaN or inf, the first of them (-1: none),
    and the largest finite magnitude."""

    bad_rows: int
    first_bad: int
    max_abs: float


def scan_rows(features: np.ndarray) -> RowScan:
    """Non-finite rows and the largest finite magnitude, read in row chunks with bounded memory."""
    reader = RowReader(features)
    bad_rows, first_bad, max_abs = 0, -1, 0.0
    for rows in iter_chunks(len(reader)):
        chunk = reader.rows(rows, as_float32=False)
        if chunk.dtype.kind in "iu":  # |int64 min| overflows in its own dtype
            chunk = chunk.astype(np.float64)
        finite = np.isfinite(chunk)
        bad = ~finite.all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = rows.start + int(np.argmax(bad))
            bad_rows += int(bad.sum())
            chunk = np.where(finite, chunk, 0)
        if chunk.size:
            max_abs = max(max_abs, float(np.abs(chunk).max()))
    reader.release()
    return RowScan(bad_rows, first_bad, max_abs)


def first_nonfinite_rows(features: np.ndarray) -> tuple[int, int]:
    """(rows holding NaN or inf, the first such row or -1), read in row chunks with bounded memory."""
    scan = scan_rows(features)
    return scan.bad_rows, scan.first_bad


def checked_split(name: str, features: object, labels: object, *, known_finite: bool = False) -> FeatureSplit:
    """Validate one split's features and labels; errors name the split and the problem. ``labels=None``:
    the split has none (every label :data:`NO_LABEL`).

    ``known_finite``: the features were checked for NaN/inf when they were written (a feature cache
    entry records it), so they are not read again here.
    """
    array = checked_feature_array(name, features)
    checked = np.full(len(array), NO_LABEL, dtype=np.int64) if labels is None else checked_labels(name, labels)
    if len(checked) != len(array):
        raise SSLBenchError(f"{name} has {len(array)} feature rows but {len(checked)} labels; they must be equal")
    if not known_finite:
        scan = scan_rows(array)
        if scan.bad_rows:
            raise SSLBenchError(
                f"{name} features contain NaN or inf in {scan.bad_rows} of {len(array)} rows "
                f"(first: row {scan.first_bad})"
            )
        if scan.max_abs > MAX_FEATURE_MAGNITUDE or 0 < scan.max_abs < MIN_FEATURE_MAGNITUDE:
            raise SSLBenchError(
                f"{name} features reach a magnitude of {scan.max_abs:.3g}, outside what float32 arithmetic "
                f"keeps ({MIN_FEATURE_MAGNITUDE:.3g} to {MAX_FEATURE_MAGNITUDE:.3g}); rescale them"
            )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return FeatureSplit(name, array, checked)
