"""Per-cluster inspection of saved predictions: the purest and the least pure clusters, and a
grid of the images of one cluster.

Reads the ``predictions/*.npz`` files that ``sslbench run --save-predictions`` writes. Purity is the
share of a cluster's samples that belong to its majority class; clusters smaller than ``min_size``
are left out of both lists, as the paper's code did (it ignored clusters under 10 samples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sslbench.errors import SSLBenchError

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class ClusterStat:
    cluster: int
    size: int
    majority_class: int
    purity: float


def cluster_stats(pred: np.ndarray, labels: np.ndarray) -> list[ClusterStat]:
    """Size, majority class (the smallest of tied ones) and purity of every non-empty cluster.

    Counted over the (cluster, class) pairs that occur, so memory follows the samples, not the
    largest cluster id or label.
    """
    pairs, counts = np.unique(np.stack([pred, labels], axis=1), axis=0, return_counts=True)
    # Rows are sorted by cluster, then class: each cluster is one run of rows.
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
    sizes = np.add.reduceat(counts, starts)
    stats = []
    for start, stop, size in zip(starts, [*starts[1:], len(pairs)], sizes, strict=True):
        best = start + int(np.argmax(counts[start:stop]))
        stats.append(ClusterStat(int(pairs[start, 0]), int(size), int(pairs[best, 1]), counts[best] / size))
    return stats


def purest_and_least_pure(
    stats: list[ClusterStat], top: int, min_size: int
) -> tuple[list[ClusterStat], list[ClusterStat]]:
    eligible = [s for s in stats if s.size >= min_size]
    ranked = sorted(eligible, key=lambda s: (-s.purity, -s.size, s.cluster))
    return ranked[:top], sorted(eligible, key=lambda s: (s.purity, -s.size, s.cluster))[:top]


def largest_and_smallest(stats: list[ClusterStat], top: int) -> tuple[list[ClusterStat], list[ClusterStat]]:
    """The ``top`` largest and ``top`` smallest clusters: what can be said of clusters without labels."""
    by_size = sorted(stats, key=lambda s: (-s.size, s.cluster))
    return by_size[:top], sorted(stats, key=lambda s: (s.size, s.cluster))[:top]


def cluster_members(pred: np.ndarray, cluster: int) -> np.ndarray:
    """Positions of the samples in ``cluster``, in dataset order."""
    members = np.flatnonzero(pred == cluster)
    if len(members) == 0:
        present = np.unique(pred)
        raise SSLBenchError(f"cluster {cluster} is empty; non-empty clusters are {present.min()}..{present.max()}")
    return members


def kept_indices(split_len: int, describe: Callable[[int], str], skipped: set[str], n_pred: int) -> np.ndarray:
    """Split indices of the predicted samples: all of them, less those the run skipped as unreadable."""
    kept = np.array([i for i in range(split_len) if not skipped or describe(i) not in skipped], dtype=np.int64)
    if len(kept) != n_pred:
        raise SSLBenchError(
            f"the dataset now has {len(kept)} readable samples but the run predicted {n_pred}: "
            "it changed since the run, so images cannot be matched to predictions"
        )
    return kept


def image_grid(images: Sequence[Image.Image], cell: int = 96, columns: int = 8) -> Image.Image:
    """``images`` scaled to fit ``cell``-pixel squares (aspect kept, centred) on a black grid; small
    images (8×8 digits, 32×32 CIFAR) are enlarged with nearest-neighbour so their pixels stay sharp."""
    from PIL import Image

    rows = max(1, -(-len(images) // columns))
    grid = Image.new("RGB", (columns * cell, rows * cell))
    for position, image in enumerate(images):
        scale = cell / max(image.width, image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        thumb = image.convert("RGB").resize(size, resample)
        x = (position % columns) * cell + (cell - thumb.width) // 2
        y = (position // columns) * cell + (cell - thumb.height) // 2
        grid.paste(thumb, (x, y))
    return grid


def as_image(sample: object, where: str) -> Image.Image:
    """A dataset sample as a PIL image (array samples of uint8 pixels included)."""
    from PIL import Image

    if isinstance(sample, Image.Image):
        return sample
    array = np.asarray(sample)
    if array.ndim in (2, 3) and array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.ndim in (2, 3) and np.issubdtype(array.dtype, np.number):
        span = float(array.max() - array.min()) or 1.0
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    raise SSLBenchError(f"{where} is not an image (shape {array.shape}); a grid needs an image dataset")
