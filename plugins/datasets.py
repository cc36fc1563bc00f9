"""Built-in datasets that need no download: scikit-learn's digits, and precomputed features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbench import hookimpl
from sslbench.errors import SSLBenchError
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
    labels: str = Field(description=".npy file of n class indices (or one-hot rows)")


class FeaturesOptions(BaseModel):
    """Either one .npz in the paper's code layout, or one pair of .npy files per split."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: str | None = Field(None, description=".npz with <split>_embs and <split>_labs arrays")
    splits: dict[str, SplitFiles] | None = Field(None, description="split name → .npy files")
    num_classes: int | None = Field(None, ge=1, description="default: max label + 1")
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
        return self


def _labels(array: np.ndarray) -> np.ndarray:
    """Class indices; one-hot rows, as some extraction scripts save labels, become indices.

    Dtype and range are checked by the protocol, which names the split.
    """
    array = np.asarray(array)
    return array.argmax(axis=1) if array.ndim == 2 else array.reshape(-1)


def _features(array: np.ndarray) -> np.ndarray:
    # The paper's code saved some features as (n, d, 1, 1); a reshape keeps a memmap a memmap.
    return array.reshape(len(array), -1)


def _load_npy(path_text: str) -> np.ndarray:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SSLBenchError(f"features file not found: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise SSLBenchError(f"cannot read {path}: {exc}") from None


def load_features_dataset(options: FeaturesOptions) -> Dataset:
    splits: dict[str, Split] = {}
    if options.file is not None:
        path = Path(options.file).expanduser()
        if not path.is_file():
            raise SSLBenchError(f"features file not found: {path}")
        try:
            archive = np.load(path)
            names = sorted(key[: -len("_embs")] for key in archive.files if key.endswith("_embs"))
            for name in names:
                if f"{name}_labs" not in archive.files:
                    raise SSLBenchError(f"{path}: has {name}_embs but no {name}_labs")
                splits[name] = ArraySplit(
                    _features(archive[f"{name}_embs"]),
                    _labels(archive[f"{name}_labs"]),
                    as_image=False,
                )
        except (ValueError, OSError, EOFError) as exc:
            raise SSLBenchError(f"cannot read {path}: {exc}") from None
        if not splits:
            raise SSLBenchError(f"{path}: no <split>_embs arrays (expected e.g. train_embs, val_embs)")
    else:
        assert options.splits is not None
        for name, files in options.splits.items():
            splits[name] = ArraySplit(
                _features(_load_npy(files.features)),
                _labels(_load_npy(files.labels)),
                as_image=False,
            )
    top = max(int(split.labels.max()) for split in splits.values() if len(split))
    n_classes = options.num_classes or top + 1
    metadata: dict[str, object] = dict(options.class_maps or {})
    if options.class_groups is not None:
        metadata["class_groups"] = options.class_groups
    return Dataset("features", [str(c) for c in range(n_classes)], splits, "precomputed features", metadata)


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
            "precomputed features and labels per split (.npz or .npy); use with backbone `raw`",
            FeaturesOptions,
        )
    )
