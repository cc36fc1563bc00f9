"""Weighted k-nearest-neighbour top-1 on frozen features: the DINO protocol, beside k-means.

The protocol (facebookresearch/dino ``eval_knn.py``, as described in its paper and README; this is
our own implementation):

* every train and eval feature vector is L2-normalised (a zero vector stays zero: its cosine
  similarity with anything is 0);
* for each eval sample, its ``k`` train samples of highest cosine similarity are its neighbours;
* neighbour ``j`` votes for its class with weight ``exp(sim_j / T)`` (``T = 0.07``);
* the prediction is the class of largest summed weight; top-1 accuracy is the fraction of eval
  samples predicted as their label.

Computed streaming, so that ImageNet (1.28M train × 50k eval × 2048 dims) needs neither a similarity
matrix nor the features in memory: eval rows are taken in chunks; for each chunk the train rows are
read in chunks (:class:`~sslbench.arrays.RowReader`, so memory-mapped files stay in the page cache),
normalised, multiplied on the device in float32, and merged into the chunk's running top-k with
``torch.topk`` over ``[current best, new chunk]``. The largest ``k`` asked for is computed once; the
neighbours of every smaller ``k`` are a prefix of its sorted list. Working memory is about
``eval_chunk × (train_chunk + k) × 12`` bytes (~0.4 GB with the defaults), reused from chunk to chunk,
plus ``n_eval × max k × 12`` for the result: measured peak RSS 1.3 GB for a 100k × 1024 float32 memmap
against 8,192 eval rows, k up to 200, process and torch included (the whole train file is 1.2 GB).

Determinism (ties): neighbours are ranked by similarity (the float32 product), then by train index,
lower first. This is exact, not left to ``torch.topk``: each candidate's key is one int64 holding the
similarity's order-preserving bit pattern above the complement of its train index, so all keys differ
and the selection is the same on every device and for every chunk size. ``-0.0`` counts as ``0.0``.
Class scores are summed in float64 in rank order on the CPU; among classes of equal score the lowest
class index wins. ``k`` larger than the train split is refused (:func:`check_knn`): clipping it would
silently report a different protocol.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sslbench.arrays import RowReader
from sslbench.errors import SSLBenchError
from sslbench.interfaces import iter_chunks
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    import torch as torch_types

#: DINO's temperature of the neighbour weights ``exp(sim / T)``.
DEFAULT_TEMPERATURE = 0.07
#: Eval and train rows per block of the similarity computation.
EVAL_CHUNK = 4096
TRAIN_CHUNK = 8192
#: Train indices are packed into the low 32 bits of a candidate's key.
MAX_TRAIN_ROWS = 2**32 - 1


def check_knn(ks: Sequence[int], n_train: int, what: str = "train") -> None:
    """Refuse, in one line, a ``k`` the train split cannot give (more neighbours than samples)."""
    if ks and max(ks) > n_train:
        raise SSLBenchError(f"knn: k={max(ks)} neighbours asked for but {what} has only {n_train} samples")
    if n_train > MAX_TRAIN_ROWS:
        raise SSLBenchError(f"knn: {what} has {n_train} samples; at most {MAX_TRAIN_ROWS}")


def normalized_rows(reader: RowReader, rows: slice) -> np.ndarray:
    """Rows L2-normalised (norms in float64, so that any finite input is safe), as float32; zero rows
    stay zero."""
    chunk = reader.rows(rows, as_float32=False).astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
    norms[norms == 0] = 1.0
    return (chunk / norms[:, None]).astype(np.float32)


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """float32 products on CUDA (no TF32) while the block runs; the global setting is restored."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


_LOW = 2**32


def _keys_into(sims: torch_types.Tensor, first_index: int, out: torch_types.Tensor) -> None:
    """Write into ``out`` (int64, the shape of ``sims``) the keys ordering (similarity desc, train index
    asc) of a block of float32 similarities whose column ``j`` is train row ``first_index + j``.
    ``sims`` is overwritten (its memory holds the intermediate bit patterns)."""
    import torch

    sims.add_(0.0)  # -0.0 → 0.0
    bits = sims.view(torch.int32)
    # Order-preserving bit pattern: negative floats get their magnitude bits flipped.
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    del flip
    out.copy_(bits)
    out.mul_(_LOW)
    out.add_((_LOW - 1) - torch.arange(first_index, first_index + sims.shape[1], device=sims.device))


def _decode(keys: torch_types.Tensor) -> tuple[torch_types.Tensor, torch_types.Tensor]:
    """(float32 similarities, train indices) of keys made by :func:`_keys_into`."""
    import torch

    index = (_LOW - 1) - (keys & (_LOW - 1))
    ordered = torch.div(keys - (keys & (_LOW - 1)), _LOW, rounding_mode="floor").to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), index


def nearest_neighbours(
    train_features: np.ndarray,
    eval_features: np.ndarray,
    k: int,
    *,
    device: str = "cpu",
    eval_chunk: int = EVAL_CHUNK,
    train_chunk: int = TRAIN_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar train rows of every eval row, best first (ties: lower train index):
    ``(similarities float32 (n_eval, k), train indices int64 (n_eval, k))``."""
    import torch

    check_knn([k], len(train_features))
    train = RowReader(train_features)
    evals = RowReader(eval_features)
    sims_out = np.empty((len(evals), k), dtype=np.float32)
    index_out = np.empty((len(evals), k), dtype=np.int64)
    try:
        work = 2 * min(eval_chunk, len(evals)) * min(train_chunk, len(train)) * train.dims
        with _exact_float32(), torch.no_grad(), torch_threads(work):
            for erows in iter_chunks(len(evals), eval_chunk):
                queries = torch.from_numpy(normalized_rows(evals, erows)).to(device)
                # Candidates: [running best (width columns) | keys of the new train chunk].
                candidates = torch.empty(
                    (len(queries), k + min(train_chunk, len(train))), dtype=torch.int64, device=device
                )
                width = 0
                for trows in iter_chunks(len(train), train_chunk):
                    block = torch.from_numpy(normalized_rows(train, trows)).to(device)
                    n_new = trows.stop - trows.start
                    _keys_into(queries @ block.T, trows.start, candidates[:, width : width + n_new])
                    del block
                    top = torch.topk(candidates[:, : width + n_new], min(k, width + n_new), dim=1, sorted=False)
                    width = top.values.shape[1]
                    candidates[:, :width] = top.values
                    del top
                best = torch.sort(candidates[:, :width], dim=1, descending=True).values
                del candidates
                sims, index = _decode(best)
                sims_out[erows] = sims.cpu().numpy()
                index_out[erows] = index.cpu().numpy()
    finally:
        train.release()
        evals.release()
    return sims_out, index_out


def vote(
    sims: np.ndarray, index: np.ndarray, train_labels: np.ndarray, n_classes: int, temperature: float
) -> np.ndarray:
    """Predicted classes from ranked neighbours: weights ``exp(sim / T)`` summed per class in float64,
    in rank order; ties go to the lowest class index."""
    scores = np.zeros((len(sims), n_classes), dtype=np.float64)
    rows = np.arange(len(sims))
    weights = np.exp(sims.astype(np.float64) / temperature)
    labels = train_labels[index]
    for j in range(sims.shape[1]):
        scores[rows, labels[:, j]] += weights[:, j]
    return np.argmax(scores, axis=1)


@dataclass(frozen=True)
class KnnResult:
    """Top-1 accuracy (a fraction) and predictions per ``k``, and the seconds it took."""

    top1: dict[int, float]
    predictions: dict[int, np.ndarray]
    seconds: float


def knn_top1(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    ks: Sequence[int] = (20,),
    *,
    n_classes: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    device: str = "cpu",
    eval_chunk: int = EVAL_CHUNK,
    train_chunk: int = TRAIN_CHUNK,
) -> KnnResult:
    """Weighted kNN top-1 of the eval split against the train split, for every ``k`` in ``ks`` (one
    neighbour search, for the largest). Labels are class indices below ``n_classes`` (default: the
    largest label + 1)."""
    started = time.perf_counter()
    if not ks:
        return KnnResult({}, {}, 0.0)
    if min(ks) < 1:
        raise SSLBenchError(f"knn: k must be at least 1, got {min(ks)}")
    if not temperature > 0 or not np.isfinite(temperature):
        raise SSLBenchError(f"knn: the temperature must be a positive number, got {temperature}")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    eval_labels = np.asarray(eval_labels, dtype=np.int64)
    classes = n_classes if n_classes is not None else int(max(train_labels.max(), eval_labels.max())) + 1
    sims, index = nearest_neighbours(
        train_features, eval_features, max(ks), device=device, eval_chunk=eval_chunk, train_chunk=train_chunk
    )
    top1, predictions = {}, {}
    for k in ks:
        pred = vote(sims[:, :k], index[:, :k], train_labels, classes, temperature)
        predictions[k] = pred
        top1[k] = float(np.mean(pred == eval_labels))
    return KnnResult(top1, predictions, time.perf_counter() - started)
