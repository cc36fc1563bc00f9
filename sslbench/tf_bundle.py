"""TensorFlow checkpoints (tensor bundles) read with numpy alone, without TensorFlow.

A TF1/TF2 checkpoint ``<prefix>`` — and every SavedModel or TF-Hub ``variables/`` folder — is:

* ``<prefix>.index``: an SSTable (LevelDB's table format). Data blocks hold prefix-compressed
  ``key → value`` entries followed by a restart-point array; each block on disk is followed by a
  one-byte compression type and a masked CRC-32C of block + type. An index block maps the last key
  of each data block to its ``BlockHandle`` (varint offset, varint size); the file ends with a
  48-byte footer: the metaindex and index handles, zero padding, and the magic number
  ``0xdb4775248b80fb57`` (little-endian). TF writes the index uncompressed.
* the value of the empty key is a ``BundleHeaderProto`` (``num_shards`` = 1, ``endianness`` = 2,
  ``version`` = 3); every other key is a variable name whose value is a ``BundleEntryProto``:
  ``dtype`` = 1, ``shape`` = 2 (``TensorShapeProto``: repeated ``dim`` = 2 {``size`` = 1}),
  ``shard_id`` = 3, ``offset`` = 4, ``size`` = 5, ``crc32c`` = 6 (fixed32, masked), ``slices`` = 7;
* ``<prefix>.data-<shard:05d>-of-<num_shards:05d>``: the raw little-endian tensor bytes at
  ``offset``, ``size`` bytes long.

Checksums (of table blocks and of tensors) are verified when a real CRC-32C implementation is
installed (``google-crc32c`` or ``crc32c``); partitioned (sliced) and string tensors are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslbench.errors import SSLBenchError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
_MASK_DELTA = 0xA282EAD8

#: TF DataType enum → numpy dtype (bfloat16 is widened to float32 on read).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    14: np.dtype("<u2"),  # DT_BFLOAT16, stored as the top half of a float32
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
DT_STRING = 7
DT_BFLOAT16 = 14


def _crc32c_function() -> Callable[[bytes], int] | None:
    """A real CRC-32C (Castagnoli) implementation, if one is installed."""
    try:
        import google_crc32c

        return lambda data: int(google_crc32c.value(data))
    except ImportError:
        pass
    try:
        import crc32c

        return lambda data: int(crc32c.crc32c(data))
    except ImportError:
        return None


def unmask_crc(masked: int) -> int:
    """LevelDB/TF store ``rotate_right(crc, 15) + 0xa282ead8``; this undoes it."""
    rotated = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Protobuf wire format, for the three small messages involved


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of a protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", data, pos)[0], pos + 8
        elif wire == 2:
            length, pos = read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            if len(value) != length:
                raise ValueError("truncated length-delimited field")
        elif wire == 5:
            value, pos = struct.unpack_from("<I", data, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives: ``BundleEntryProto``."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool

    @classmethod
    def parse(cls, data: bytes) -> BundleEntry:
        dtype, shape, shard, offset, size, crc, sliced = 0, [], 0, 0, 0, None, False
        for number, _, value in _fields(data):
            if number == 1:
                dtype = int(value)
            elif number == 2 and isinstance(value, bytes):
                shape = _parse_shape(value)
            elif number == 3:
                shard = int(value)
            elif number == 4:
                offset = int(value)
            elif number == 5:
                size = int(value)
            elif number == 6:
                crc = int(value)
            elif number == 7:
                sliced = True
        return cls(dtype, tuple(shape), shard, offset, size, crc, sliced)


def _parse_shape(data: bytes) -> list[int]:
    dims = []
    for number, _, value in _fields(data):
        if number == 2 and isinstance(value, bytes):  # Dim
            size = 0
            for dim_number, _, dim_value in _fields(value):
                if dim_number == 1:
                    size = int(dim_value)
            dims.append(size)
        elif number == 3 and value:
            raise ValueError("tensor of unknown rank")
    return dims


# --------------------------------------------------------------------------------------------------
# The SSTable


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError("block shorter than its restart count")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (n_restarts + 1)
    if end < 0:
        raise ValueError("restart array larger than the block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_length, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > end:
            raise ValueError("entry runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_length]
        pos += value_length


class TFCheckpoint:
    """A TF tensor bundle: ``names()``, ``shape(name)``, ``dtype(name)`` and ``read(name)``.

    ``path`` is the checkpoint prefix (``model.ckpt-250228``), its ``.index`` file, or a folder
    holding a single ``*.index`` (a TF-Hub ``variables/`` folder or a checkpoint directory).
    """

    def __init__(self, path: str | Path) -> None:
        self.prefix = _find_prefix(Path(path).expanduser())
        self._crc32c = _crc32c_function()
        index = Path(f"{self.prefix}.index")
        try:
            data = index.read_bytes()
        except OSError as exc:
            raise SSLBenchError(f"cannot read TF checkpoint index {index}: {exc.strerror or exc}") from None
        try:
            self.entries, self.num_shards = self._parse_index(data)
        except (ValueError, struct.error) as exc:
            raise SSLBenchError(f"{index} is not a TF checkpoint index: {exc}") from None
        self.checksums_verified = self._crc32c is not None

    def _parse_index(self, data: bytes) -> tuple[dict[str, BundleEntry], int]:
        if len(data) < FOOTER_SIZE:
            raise ValueError(f"{len(data)} bytes, shorter than the 48-byte footer")
        (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
        if magic != TABLE_MAGIC:
            raise ValueError(f"bad magic number {magic:#x} (the file is truncated or not an SSTable)")
        footer = data[len(data) - FOOTER_SIZE :]
        _, pos = read_varint(footer, 0)  # metaindex offset
        _, pos = read_varint(footer, pos)  # metaindex size
        index_offset, pos = read_varint(footer, pos)
        index_size, _ = read_varint(footer, pos)
        entries: dict[str, BundleEntry] = {}
        num_shards = 1
        for _, handle in _block_entries(self._block(data, index_offset, index_size)):
            offset, pos = read_varint(handle, 0)
            size, _ = read_varint(handle, pos)
            for key, value in _block_entries(self._block(data, offset, size)):
                if key == b"":
                    for number, _, field in _fields(value):
                        if number == 1:
                            num_shards = int(field)
                        elif number == 2 and field != 0:
                            raise ValueError("big-endian bundles are not supported")
                    continue
                entries[key.decode("utf-8")] = BundleEntry.parse(value)
        return entries, num_shards

    def _block(self, data: bytes, offset: int, size: int) -> bytes:
        end = offset + size + BLOCK_TRAILER_SIZE
        if end > len(data) - FOOTER_SIZE:
            raise ValueError(f"block at {offset} (+{size}) runs past the end of the file")
        block, kind = data[offset : offset + size], data[offset + size]
        if kind != 0:
            raise ValueError(f"block at {offset} is compressed (type {kind}); TF writes uncompressed indexes")
        if self._crc32c is not None:
            (stored,) = struct.unpack_from("<I", data, offset + size + 1)
            if self._crc32c(data[offset : offset + size + 1]) != unmask_crc(stored):
                raise ValueError(f"checksum mismatch in the block at {offset}")
        return block

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> BundleEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise SSLBenchError(f"{self.prefix}: no variable '{name}'") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (bfloat16 widened to float32)."""
        entry = self._entry(name)
        where = f"{self.prefix}: variable '{name}'"
        if entry.sliced:
            raise SSLBenchError(f"{where} is partitioned (saved in slices); sslbench reads whole tensors only")
        if entry.dtype == DT_STRING:
            raise SSLBenchError(f"{where} is a string tensor; only numeric tensors are read")
        if entry.dtype not in DTYPES:
            raise SSLBenchError(f"{where} has TF dtype {entry.dtype}, which sslbench cannot read")
        dtype = DTYPES[entry.dtype]
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * dtype.itemsize != entry.size:
            raise SSLBenchError(f"{where}: {entry.size} bytes do not hold shape {entry.shape} of {dtype}")
        shard = Path(f"{self.prefix}.data-{entry.shard_id:05d}-of-{self.num_shards:05d}")
        try:
            with shard.open("rb") as handle:
                handle.seek(entry.offset)
                raw = handle.read(entry.size)
        except OSError as exc:
            raise SSLBenchError(f"cannot read {shard}: {exc.strerror or exc}") from None
        if len(raw) != entry.size:
            raise SSLBenchError(f"{shard} is truncated: {where} needs bytes up to {entry.offset + entry.size}")
        if self._crc32c is not None and entry.crc32c is not None and self._crc32c(raw) != unmask_crc(entry.crc32c):
            raise SSLBenchError(f"{where}: checksum mismatch in {shard} (a corrupt or partial download)")
        array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
        if entry.dtype == DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.copy()


def _find_prefix(path: Path) -> Path:
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise SSLBenchError(f"{path}: expected exactly one *.index file of a TF checkpoint, found {found}")
        return indexes[0].with_suffix("")
    if path.suffix == ".index":
        return path.with_suffix("")
    if Path(f"{path}.index").is_file():
        return path
    raise SSLBenchError(f"TF checkpoint not found: {path} (give the prefix, its .index file, or its folder)")
