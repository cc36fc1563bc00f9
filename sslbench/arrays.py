"""Reading feature matrices that may be memory-mapped files larger than RAM.

Touching a memory-mapped file maps its pages into the process, and they count towards its resident
set; with the kernel's large page-cache folios a single scattered read can map megabytes around it
(measured: gathering 6,144 random rows of a 2.4 GB ``.npy`` memmap raised the peak RSS by 2 GB). So
for a ``np.memmap`` backed by a file, :class:`RowReader` reads rows with ``preadv`` into its own
buffers: the data stays in the page cache (the kernel's memory, fast to read again) and the process
holds only what it asked for. Other arrays are read by slicing.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import numpy as np


def _mapped_file(array: np.ndarray) -> tuple[str, int] | None:
    """(file name, byte offset of row 0) when ``array`` is C-ordered rows of a file mapping."""
    top: Any = array
    while top is not None and not isinstance(getattr(top, "base", None), mmap.mmap):
        top = getattr(top, "base", None)
    filename = getattr(top, "filename", None)
    if top is None or filename is None or array.ndim != 2:
        return None
    if array.strides != (array.shape[1] * array.itemsize, array.itemsize):
        return None
    start = array.__array_interface__["data"][0] - top.__array_interface__["data"][0]
    return str(filename), int(top.offset) + start


class RowReader:
    """Row chunks and row gathers of a 2-D array as contiguous float32, with bounded resident memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        located = _mapped_file(array)
        self._fd: int | None = None
        if located is not None:
            self._fd = os.open(located[0], os.O_RDONLY)
            self._offset = located[1]
            self._row_bytes = array.shape[1] * array.itemsize

    def __del__(self) -> None:
        self.release()

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dims(self) -> int:
        return int(self.array.shape[1])

    @property
    def file_backed(self) -> bool:
        """Whether rows are read from the array's file (else by indexing the array)."""
        return self._fd is not None

    def release(self) -> None:
        """Close the file this reader opened (it reopens nothing: call when done)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, runs: list[tuple[int, int]], n_rows: int, as_float32: bool = True) -> np.ndarray:
        assert self._fd is not None
        buffer = bytearray(n_rows * self._row_bytes)
        view = memoryview(buffer)
        position = 0
        for first, count in runs:
            size = count * self._row_bytes
            done = os.preadv(self._fd, [view[position : position + size]], self._offset + first * self._row_bytes)
            if done != size:
                raise OSError(f"short read from {self.array!r}: {done} of {size} bytes (file truncated?)")
            position += size
        rows = np.frombuffer(buffer, dtype=self.array.dtype).reshape(n_rows, self.dims)
        return rows if rows.dtype == np.float32 or not as_float32 else rows.astype(np.float32)

    def rows(self, rows: slice, *, as_float32: bool = True) -> np.ndarray:
        """Consecutive rows as a contiguous float32 array (``as_float32=False``: in the array's own
        dtype, for readers that keep float64 input exact)."""
        start, stop, _ = rows.indices(len(self.array))
        if self._fd is not None:
            return self._read([(start, stop - start)], stop - start, as_float32)
        dtype = np.float32 if as_float32 else None
        return np.ascontiguousarray(self.array[start:stop], dtype=dtype)

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Rows at ``index`` (ascending) as a contiguous float32 array."""
        if self._fd is None:
            if self.array.dtype == np.float32:
                return np.take(self.array, index, axis=0)  # faster than fancy indexing, and contiguous
            return np.ascontiguousarray(self.array[index], dtype=np.float32)
        index = np.asarray(index, dtype=np.int64)
        if len(index) == 0:
            return self._read([], 0)
        starts = np.flatnonzero(np.diff(index) != 1) + 1  # where a run of consecutive rows begins
        firsts = index[np.concatenate([[0], starts])]
        counts = np.diff(np.concatenate([[0], starts, [len(index)]]))
        return self._read(list(zip(firsts.tolist(), counts.tolist(), strict=True)), len(index))


def available_memory_bytes() -> int | None:
    """What the kernel says can still be allocated without swapping (``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_in_memory(n_bytes: int, what: str, headroom: float = 0.5) -> None:
    """Refuse, in one line, to load ``n_bytes`` when they exceed ``headroom`` of the available RAM.

    For backends whose libraries take whole matrices (faiss, cuML): better a clear error before the
    work than the kernel's OOM killer after it.
    """
    from sslbench.errors import SSLBenchError

    available = available_memory_bytes()
    if available is not None and n_bytes > headroom * available:
        raise SSLBenchError(
            f"{what} needs the whole matrix in memory ({n_bytes / 1e9:.1f} GB) but only "
            f"{available / 1e9:.1f} GB are available; use backend 'torch', which streams from disk"
        )


class RowWriter:
    """A float32 ``.npy`` file of known shape written row chunk by row chunk with ``pwrite``.

    Writing through a memory map would map every written page into the process (and count it in
    its resident set until the map is dropped); ``pwrite`` leaves the data to the page cache, so
    writing a projection larger than RAM keeps the process's memory at one chunk.
    """

    def __init__(self, path: os.PathLike[str] | str, n_rows: int, dims: int) -> None:
        self.path = os.fspath(path)
        self.shape = (n_rows, dims)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        buffer = _NpyHeader()
        np.lib.format.write_array_header_1_0(buffer, {**header, "shape": self.shape})
        self._row_bytes = dims * 4
        self._offset = len(buffer.data)
        self._written = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_all(bytes(buffer.data), 0)
            os.ftruncate(self._fd, self._offset + n_rows * self._row_bytes)
        except BaseException:
            self.close()
            raise

    def _write_all(self, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data)
        while len(view):
            done = os.pwrite(self._fd, view, position)
            view, position = view[done:], position + done

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``(m, dims)``; converted to contiguous float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or self._written + len(rows) > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit {self.path} {self.shape} at row {self._written}")
        self._write_all(rows.data.cast("B"), self._offset + self._written * self._row_bytes)
        self._written += len(rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]

    def finish(self) -> np.ndarray:
        """Close the file and open it read-only as a memory map (read with :class:`RowReader`)."""
        if self._written != self.shape[0]:
            raise ValueError(f"{self.path}: {self._written} of {self.shape[0]} rows written")
        self.close()
        return np.load(self.path, mmap_mode="r")


class _NpyHeader:
    """The file-like object ``write_array_header_1_0`` writes into."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk


#: Train projections whose largest magnitude lies in this range reach k-means as computed; others are
#: first scaled by a power of two (see :func:`projection_scale`).
PROJECTION_RANGE = (2.0**-32, 2.0**32)


def projection_scale(max_abs: float) -> int:
    """The exponent of the power of two the projections are multiplied by before k-means: 0 (left as
    they are) when the train projections' largest magnitude lies in :data:`PROJECTION_RANGE`, else the
    one that brings it into [0.5, 1).

    k-means sees features only through float32 squared distances, which overflow for projections of
    magnitude 1e20 and underflow to zero for 1e-30 (every point then ties with every centre). k-means
    is scale-invariant and multiplying by a power of two is exact, so rescaled projections get the
    assignments that exact arithmetic gives the original ones.
    """
    if max_abs == 0 or PROJECTION_RANGE[0] <= max_abs <= PROJECTION_RANGE[1]:
        return 0
    return -math.frexp(max_abs)[1]
