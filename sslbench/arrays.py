"""Reading feature matrices that may be memory-mapped files larger than RAM.

Pages of a memory-mapped file that a process has touched count towards its resident set, so
streaming a 10 GB feature file through ``np.memmap`` would grow the RSS to the file size. A
:class:`RowReader` tells the kernel to drop the mapped pages after every few hundred megabytes read:
the data stays in the page cache (fast to read again) but leaves the process's resident memory.
"""

from __future__ import annotations

import mmap

import numpy as np

#: Bytes read from a mapped file between two releases of its pages.
RELEASE_EVERY_BYTES = 256 * 1024 * 1024


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    base: object = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base if isinstance(base, mmap.mmap) else None


class RowReader:
    """Row chunks and row gathers of a 2-D array as contiguous float32, with bounded resident memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self._mapping = _mapping_of(array)
        self._unreleased = 0

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dims(self) -> int:
        return int(self.array.shape[1])

    def _after_read(self, n_bytes: int) -> None:
        if self._mapping is None:
            return
        self._unreleased += n_bytes
        if self._unreleased >= RELEASE_EVERY_BYTES:
            self.release()

    def release(self) -> None:
        """Drop the mapped pages read so far from this process's resident memory."""
        if self._mapping is not None and hasattr(self._mapping, "madvise"):
            self._mapping.madvise(mmap.MADV_DONTNEED)
        self._unreleased = 0

    def rows(self, rows: slice) -> np.ndarray:
        """Consecutive rows as a contiguous float32 array (a copy when the source is mapped)."""
        source = self.array[rows]
        if self._mapping is not None:  # copy out, so the pages can be released
            block = np.array(source, dtype=np.float32, order="C")
        else:
            block = np.ascontiguousarray(source, dtype=np.float32)
        self._after_read(block.nbytes)
        return block

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Rows at ``index`` (sorted ascending for locality) as a contiguous float32 array."""
        block = np.ascontiguousarray(self.array[index], dtype=np.float32)
        self._after_read(block.nbytes)
        return block
