"""Rows on the compute device and across the ranks of a process group (:class:`~sslbench.ranks.Ranks`),
read in chunks from arrays or memory-mapped files (:class:`~sslbench.arrays.RowReader`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sslbench.arrays import RowReader
from sslbench.engine.device import torch_module
from sslbench.interfaces import iter_chunks
from sslbench.ranks import ONE_PROCESS, Ranks

if TYPE_CHECKING:
    from torch import Tensor


CHUNK_ROWS = 8192


class RowShards:
    """Which rows of a fit this process holds: its contiguous shard of ``n_total`` rows among ``ranks``
    (rank order = row order), or every row on one process."""

    def __init__(self, n_local: int, device: str, ranks: Ranks = ONE_PROCESS) -> None:
        torch = torch_module()
        self.n_local, self.device, self.ranks = n_local, device, ranks
        self.active = ranks.distributed
        if not self.active:
            self.n_total, self.start = n_local, 0
            return
        counts = [int(c.item()) for c in ranks.all_gather(torch.tensor([n_local], dtype=torch.int64))]
        self.n_total = sum(counts)
        self.start = sum(counts[: ranks.rank])

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` in place (a no-op on one rank)."""
        return self.ranks.sum_(tensor)

    def local(self, global_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``global_index``, local row numbers) of the rows this rank holds."""
        mask = (global_index >= self.start) & (global_index < self.start + self.n_local)
        return np.flatnonzero(mask), global_index[mask] - self.start


class DeviceRows:
    """The rows to fit on, on the compute device: uploaded once when they fit in half the free GPU
    memory (a 1.28M × 2048 ImageNet set does on an 80 GB card), else streamed batch by batch."""

    def __init__(self, reader: RowReader, device: str) -> None:
        torch = torch_module()
        self.reader, self.device = reader, device
        self.resident: Tensor | None = None
        # Rows in this process's memory are gathered by torch (on its threads, twice numpy's rate),
        # into one buffer reused batch after batch (a fresh 8 MB array page-faults on every batch).
        array = reader.array
        self._host: Tensor | None = None
        if (
            device == "cpu"
            and not reader.file_backed
            and array.dtype == np.float32
            and array.flags.c_contiguous
            and array.flags.writeable
        ):
            self._host = torch.from_numpy(array)
        self._buffer: Tensor | None = None
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if len(reader) * reader.dims * 4 < 0.5 * free:
                self.resident = torch.empty((len(reader), reader.dims), dtype=torch.float32, device=device)
                for rows in iter_chunks(len(reader), 8 * CHUNK_ROWS):
                    self.resident[rows] = torch.from_numpy(reader.rows(rows)).to(device)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def dims(self) -> int:
        return self.reader.dims

    def gather(self, local: np.ndarray, reuse: bool = False) -> Tensor:
        """Rows at ascending local indices; with ``reuse``, into a buffer the next reusing gather
        overwrites."""
        torch = torch_module()
        if self.resident is not None:
            return self.resident[torch.from_numpy(local).to(self.device)]
        if self._host is None:
            return torch.from_numpy(self.reader.gather(local)).to(self.device)
        index = torch.from_numpy(local)
        if not reuse:
            return torch.index_select(self._host, 0, index)
        if self._buffer is None or len(self._buffer) < len(local):
            self._buffer = torch.empty((len(local), self.dims), dtype=torch.float32)
        return torch.index_select(self._host, 0, index, out=self._buffer[: len(local)])

    def rows(self, rows: slice) -> Tensor:
        torch = torch_module()
        if self.resident is not None:
            return self.resident[rows]
        return torch.from_numpy(self.reader.rows(rows)).to(self.device)


def gather_rows(reader: DeviceRows, ranks: RowShards, global_index: np.ndarray) -> Tensor:
    """Rows at sorted global indices, identical on every rank (owners fill, then a sum)."""
    torch = torch_module()
    positions, local = ranks.local(global_index)
    if not ranks.active:
        return reader.gather(local)
    out = torch.zeros((len(global_index), reader.dims), dtype=torch.float32, device=ranks.device)
    if len(local):
        out[torch.from_numpy(positions).to(ranks.device)] = reader.gather(local)
    return ranks.sum_(out)
