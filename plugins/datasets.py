"""Built-in datasets that need no download: scikit-learn's digits, and precomputed features."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbench import hookimpl
from sslbench.errors import SSLBenchError, exception_line
from sslbench.inputs import NO_LABEL, checked_feature_array, checked_labels, class_index
from sslbench.interfaces import Dataset, DatasetEntry, NoOptions, Split


class ArraySplit(Split):
    """A split held as one array: images ``(n, h, w)`` / ``(n, h, w, c)`` or features ``(n, d)``."""

    def __init__(self, samples: np.ndarray, labels: np.ndarray, as_image: bool) -> None:
        self._samples = samples
        self._labels = labels
        self._as_image = as_image

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Any:
        sample = self._samples[index]
        if self._as_image:
            from PIL import Image

            return Image.fromarray(np.asarray(sample))
        return np.asarray(sample)

    def as_array(self) -> np.ndarray:
        return self._samples


def digits_split_mask(n: int) -> np.ndarray:
    """``True`` for the validation samples of digits: every fourth sample (indices 3, 7, 11, …)."""
    return np.arange(n) % 4 == 3


def load_digits_dataset(options: NoOptions) -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits as greyscale images, split 3:1 by index."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 ink levels → 8-bit greyscale; the 17 levels stay distinct.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    val = digits_split_mask(len(labels))
    splits = {
        "train": ArraySplit(images[~val], labels[~val], as_image=True),
        "val": ArraySplit(images[val], labels[val], as_image=True),
    }
    return Dataset("digits", [str(d) for d in range(10)], splits, "scikit-learn digits, 8×8 greyscale")


class SplitFiles(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    features: str = Field(description=".npy file of shape (n, d); memory-mapped")
    labels: str | None = Field(
        None,
        description=".npy file of n non-negative integer class indices (or one-hot rows); leave it out of "
        "every split for features without labels (label-free scores only)",
    )


class FeaturesOptions(BaseModel):
    """Either one .npz in the paper's code layout, or one pair of .npy files per split."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: str | None = Field(None, description=".npz with <split>_embs and <split>_labs arrays")
    splits: dict[str, SplitFiles] | None = Field(None, description="split name → .npy files")
    num_classes: int | None = Field(
        None,
        ge=1,
        description="default: max label + 1; sparse labels (max ≥ 2 × distinct labels + 64) are renumbered "
        "0..m-1 in increasing order instead",
    )
    class_groups: dict[str, list[int]] | None = Field(
        None, description="group name → class indices; ACC is also reported per group (acc_<group>)"
    )
    class_maps: dict[str, list[list[int]]] | None = Field(
        None,
        description="name → per class, the classes of another dataset it maps onto (a transfer's class_map)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> FeaturesOptions:
        if (self.file is None) == (self.splits is None):
            raise ValueError("give exactly one of `file` (an .npz) or `splits` (.npy files per split)")
        if self.splits is not None and len({files.labels is None for files in self.splits.values()}) > 1:
            raise ValueError("give `labels` for every split, or for none (features without labels)")
        if not self.labeled and (self.num_classes or self.class_groups or self.class_maps):
            raise ValueError("features without labels have no classes: leave out num_classes, class_groups, class_maps")
        return self

    @property
    def labeled(self) -> bool:
        """Whether the splits come with labels (an .npz always has them: ``<split>_labs``)."""
        return self.splits is None or all(files.labels is not None for files in self.splits.values())


#: What reading a damaged .npy or .npz raises.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _labels(array: np.ndarray, where: str) -> np.ndarray:
    """Checked class indices (:func:`~sslbench.inputs.checked_labels`); one-hot rows, as some
    extraction scripts save labels, become indices, and a single column is a column of indices."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array.reshape(-1)
    elif array.ndim == 2:
        if array.dtype.kind not in "biuf" or not bool(
            np.all((array == 0) | (array == 1)) and np.all(array.sum(axis=1) == 1)
        ):
            raise SSLBenchError(
                f"{where} labels of shape {array.shape} must be one-hot rows (a single 1 per row, 0 elsewhere)"
            )
        array = array.argmax(axis=1)
    return checked_labels(where, array)


def _features(array: np.ndarray, where: str) -> np.ndarray:
    """Checked features (:func:`~sslbench.inputs.checked_feature_array`; values are checked when the
    split is used). The paper's code saved some as (n, d, 1, 1): a reshape keeps a memmap a memmap."""
    if array.ndim > 2:
        array = array.reshape(array.shape[0], int(np.prod(array.shape[1:])))
    return checked_feature_array(where, array)


def _file_format(path: Path) -> str | None:
    """``npy`` or ``npz`` by the file's first bytes (``None``: neither)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise SSLBenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head == b"\x93NUMPY":
        return "npy"
    return "npz" if head.startswith(b"PK") else None


def _load_npy(path_text: str) -> np.ndarray:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SSLBenchError(f"features file not found: {path}")
    kind = _file_format(path)
    if kind == "npz":
        raise SSLBenchError(f"{path}: `splits` takes .npy files, this is an .npz archive (give it as `file`)")
    if kind is None:
        raise SSLBenchError(f"cannot read {path}: not an .npy file")
    try:
        return np.load(path, mmap_mode="r")
    except _READ_ERRORS as exc:
        raise SSLBenchError(f"cannot read {path}: {exception_line(exc)}") from None


def _load_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels per split of the paper's .npz layout (``<split>_embs``, ``<split>_labs``)."""
    kind = _file_format(path)
    if kind == "npy":
        raise SSLBenchError(
            f"{path}: `file` takes an .npz archive of <split>_embs and <split>_labs arrays, this is "
            "a .npy array (give .npy files under `splits`)"
        )
    if kind is None:
        raise SSLBenchError(f"cannot read {path}: not an .npz archive")
    splits = {}
    try:
        # Opened here, so that a damaged archive leaves no file open.
        with open(path, "rb") as handle, np.load(handle) as archive:
            names = sorted(key[: -len("_embs")] for key in archive.files if key.endswith("_embs"))
            for name in names:
                if f"{name}_labs" not in archive.files:
                    raise SSLBenchError(f"{path}: has {name}_embs but no {name}_labs")
                splits[name] = (archive[f"{name}_embs"], archive[f"{name}_labs"])
    except _READ_ERRORS as exc:
        raise SSLBenchError(f"cannot read {path}: {exception_line(exc)}") from None
    if not splits:
        raise SSLBenchError(f"{path}: no <split>_embs arrays (expected e.g. train_embs, val_embs)")
    return splits


def load_features_dataset(options: FeaturesOptions) -> Dataset:
    """Features and labels per split, checked as the API checks them (dtype, shape, label values).

    Without ``num_classes``, labels index the classes directly (``max label + 1`` of them) unless they
    are sparse, as :func:`~sslbench.inputs.class_index` decides for every split together: then the
    distinct labels are renumbered 0..m-1 in increasing order, the class names are the original
    labels, and ``class_groups`` name original labels too.
    """
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if options.file is not None:
        path = Path(options.file).expanduser()
        if not path.is_file():
            raise SSLBenchError(f"features file not found: {path}")
        for name, (features, labels) in _load_npz(path).items():
            where = f"{name} ({path.name})"
            arrays[name] = (_features(features, where), _labels(labels, where))
    else:
        assert options.splits is not None
        for name, files in options.splits.items():
            features = _features(_load_npy(files.features), f"{name} ({files.features})")
            if files.labels is None:
                arrays[name] = (features, np.full(len(features), NO_LABEL, dtype=np.int64))
            else:
                arrays[name] = (features, _labels(_load_npy(files.labels), f"{name} ({files.labels})"))
    if not options.labeled:
        unlabeled = {name: ArraySplit(features, labels, as_image=False) for name, (features, labels) in arrays.items()}
        return Dataset("features", [], unlabeled, "precomputed features without labels")
    group_ids: dict[str, list[int]] | None = options.class_groups
    if options.num_classes is not None:
        n_classes = options.num_classes
        for name, (_, labels) in arrays.items():
            if int(labels.max()) >= n_classes:
                raise SSLBenchError(f"{name} labels go up to {int(labels.max())} but num_classes is {n_classes}")
        names = [str(c) for c in range(n_classes)]
    else:
        index = class_index([labels for _, labels in arrays.values()])
        n_classes = index.n_classes
        names = [str(c) for c in range(n_classes)] if index.ids is None else [str(c) for c in index.ids]
        if index.ids is not None:
            arrays = {name: (features, index.apply(labels)) for name, (features, labels) in arrays.items()}
            group_ids = _renumbered_groups(options, index.ids)
    splits: dict[str, Split] = {
        name: ArraySplit(features, labels, as_image=False) for name, (features, labels) in arrays.items()
    }
    metadata: dict[str, object] = dict(options.class_maps or {})
    if group_ids is not None:
        metadata["class_groups"] = group_ids
    return Dataset("features", names, splits, "precomputed features", metadata)


def _renumbered_groups(options: FeaturesOptions, ids: np.ndarray) -> dict[str, list[int]] | None:
    """``class_groups`` (original labels) in the renumbered classes of sparse labels."""
    if options.class_maps:
        raise SSLBenchError(
            f"the labels are sparse ({len(ids)} distinct, up to {int(ids[-1])}) and are renumbered, which "
            "class_maps cannot follow: set num_classes, or give labels 0..n-1"
        )
    if options.class_groups is None:
        return None
    position = {int(label): index for index, label in enumerate(ids)}
    groups = {}
    for group, classes in options.class_groups.items():
        missing = [c for c in classes if c not in position]
        if missing:
            raise SSLBenchError(f"class_groups.{group}: class {missing[0]} is not a label of any split")
        groups[group] = [position[c] for c in classes]
    return groups


@hookimpl
def sslbench_register_datasets(register: Callable[[DatasetEntry], None]) -> None:
    register(
        DatasetEntry(
            "digits",
            load_digits_dataset,
            "scikit-learn's 1,797 8×8 digits (shipped with scikit-learn); val = every 4th sample",
        )
    )
    register(
        DatasetEntry(
            "features",
            load_features_dataset,
            "precomputed features and labels per split (.npz or .npy; labels may be left out); use with backbone `raw`",
            FeaturesOptions,
            labeled=lambda options: bool(options.labeled),
        )
    )
