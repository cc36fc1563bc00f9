"""Writes TensorFlow tensor bundles (``<prefix>.index`` + ``<prefix>.data-*``) byte for byte as TF's
BundleWriter does, from the format description alone (LevelDB table format; tensor_bundle.proto),
so tests exercise the reader without TensorFlow. Pure Python, CRC-32C included."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = 0xDB4775248B80FB57
DTYPE_OF = {
    np.dtype("float32"): 1,
    np.dtype("float64"): 2,
    np.dtype("int32"): 3,
    np.dtype("uint8"): 4,
    np.dtype("int64"): 9,
    np.dtype("float16"): 19,
}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C by table; large tensors use google-crc32c when it is installed (same values)."""
    if len(data) > 65536:
        try:
            import google_crc32c

            return int(google_crc32c.value(data))
        except ImportError:
            pass
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def entry_proto(
    dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int, sliced: bool
) -> bytes:
    shape_proto = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    out = field_varint(1, dtype) + field_bytes(2, shape_proto)
    if shard:
        out += field_varint(3, shard)
    if offset:
        out += field_varint(4, offset)
    out += field_varint(5, size) + field_fixed32(6, mask(crc))
    if sliced:
        out += field_bytes(7, field_varint(1, 1))
    return out


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    for offset in restarts or [0]:
        out += struct.pack("<I", offset)
    out += struct.pack("<I", len(restarts or [0]))
    return bytes(out)


class _Table:
    def __init__(self) -> None:
        self.data = bytearray()

    def add_block(self, block: bytes, compression: int = 0) -> bytes:
        handle = varint(len(self.data)) + varint(len(block))
        trailer = bytes([compression])
        self.data += block + trailer + struct.pack("<I", mask(crc32c(block + trailer)))
        return handle


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    block_size: int = 256,
    sliced: tuple[str, ...] = (),
    strings: tuple[str, ...] = (),
    compression: int = 0,
    tf_dtypes: dict[str, int] | None = None,
) -> None:
    """``tensors`` as a one-shard bundle at ``prefix``; small data blocks so the index has several.
    ``tf_dtypes`` sets the TF dtype of a tensor whose bytes are given raw (bfloat16 as uint16)."""
    data = bytearray()
    records: list[tuple[bytes, bytes]] = [(b"", field_varint(1, 1) + field_bytes(3, field_varint(1, 1)))]
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        dtype = 7 if name in strings else (tf_dtypes or {}).get(name) or DTYPE_OF[array.dtype]
        records.append(
            (name.encode(), entry_proto(dtype, array.shape, 0, len(data), len(raw), crc32c(raw), name in sliced))
        )
        data += raw
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    table = _Table()
    index_entries, current, current_size = [], [], 0
    for key, value in records:
        current.append((key, value))
        current_size += len(key) + len(value)
        if current_size >= block_size:
            index_entries.append((current[-1][0], table.add_block(_block(current), compression)))
            current, current_size = [], 0
    if current:
        index_entries.append((current[-1][0], table.add_block(_block(current), compression)))
    metaindex = table.add_block(_block([]))
    index = table.add_block(_block(index_entries, restart_interval=1))
    footer = (metaindex + index).ljust(40, b"\0") + struct.pack("<Q", MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(table.data) + footer)
