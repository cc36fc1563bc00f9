"""Verifying a feature-cache entry on read: throughput on a 1 GB entry against a plain sequential read.

Writes one entry through the cache's own writer (rows checksummed as they are written), then times,
best of ``--repeats``, with the file in the page cache (as after extraction or an earlier run; a cold
read is bound by the disk in both cases):

* a plain sequential read of ``features.npy``'s rows with ``preadv`` into a reusable 8 MB buffer: the
  bytes verification reads, in the same pieces (from the end of the 128-byte header). Read from byte 0
  instead, the same loop measured up to 2× slower here: a page-aligned source and a destination 16 bytes
  past a page boundary (``bytearray``'s) hit the kernel copy's 4K-aliasing slowdown; that figure is
  printed too;
* ``CacheEntry.load()``: manifest, labels and every features chunk checked (what every cache hit does);
* for ``torchrun`` assembly, where rank 0 copies the ranks' shards into the entry: the copy with the
  shards' chunk checksums checked on the way (what ``_assemble`` does) against a plain copy, and against a
  plain copy followed by one checksum pass at finish (the alternative).

Usage: python benchmarks/cache_verify.py [--gb 1.0] [--dims 2048] [--dir FOLDER] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

from sslbench.cache import CacheEntry, CacheKey, CommitState, FeatureCache


def _key(name: str, n: int) -> CacheKey:
    return CacheKey("bench", {"name": None}, {}, {}, "synthetic", {}, name, f"{n}")


def write_entry(root: Path, name: str, n: int, dims: int) -> CacheEntry:
    entry = FeatureCache(root).entry(_key(name, n))
    rng = np.random.default_rng(0)
    block = rng.standard_normal((8192, dims), dtype=np.float32)
    with entry.locked():
        progress = CommitState()
        progress.dims = dims
        writer = entry.open_features(n, dims, progress, fresh=True)
        for start in range(0, n, len(block)):
            rows = block[: min(len(block), n - start)] + np.float32(start)
            writer.write(start, rows)
        writer.commit(n, final=True)
        writer.close()
        entry.finish(np.arange(n, dtype=np.int64) % 1000, {"benchmark": True})
    return entry


def plain_read(path: Path, buffer: memoryview, start: int = 0) -> int:
    """Read ``path`` from byte ``start`` to its end through ``buffer``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        position, total = start, 0
        while True:
            got = os.preadv(fd, [buffer], position)
            if not got:
                return total
            position += got
            total += got
    finally:
        os.close(fd)


def best(repeats: int, *works) -> list[float]:
    """The best time of each of ``works``, run in turn ``repeats`` times (interleaved, so that a busy
    neighbour on the machine slows all of them alike)."""
    times: list[list[float]] = [[] for _ in works]
    for _ in range(repeats):
        for work, spent in zip(works, times, strict=True):
            started = time.perf_counter()
            work()
            spent.append(time.perf_counter() - started)
    return [min(spent) for spent in times]


def copy(source: Path, target: Path, buffer: memoryview, hashed: bool) -> None:
    """``source`` into ``target`` through ``buffer``, optionally hashing every piece (16 MB chunks)."""
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        position = 0
        hasher = xxhash.xxh3_128()
        while True:
            got = os.preadv(src, [buffer], position)
            if not got:
                break
            if hashed:
                hasher.update(buffer[:got])
            os.pwrite(dst, buffer[:got], position)
            position += got
    finally:
        os.close(src)
        os.close(dst)


def hash_pass(path: Path, buffer: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        hasher = xxhash.xxh3_128()
        while True:
            got = os.preadv(fd, [buffer], position)
            if not got:
                break
            hasher.update(buffer[:got])
            position += got
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the features file")
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--dir", help="folder for the entry (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    n = int(args.gb * 1e9) // (args.dims * 4)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        root = Path(folder)
        started = time.perf_counter()
        entry = write_entry(root, "verify", n, args.dims)
        write_s = time.perf_counter() - started
        size = entry.features_path.stat().st_size
        buffer = memoryview(bytearray(8 << 20))
        plain_read(entry.features_path, buffer)  # into the page cache

        header = entry.read_manifest().features.header_bytes
        read_s, verify_s, hash_s, read0_s = best(
            args.repeats,
            lambda: plain_read(entry.features_path, buffer, header),
            entry.load,
            lambda: xxhash.xxh3_128(buffer).hexdigest(),  # 8 MB in memory
            lambda: plain_read(entry.features_path, buffer),
        )
        copy_s, copy_hash_s = best(
            args.repeats,
            lambda: copy(entry.features_path, root / "copy.npy", buffer, hashed=False),
            lambda: copy(entry.features_path, root / "copy.npy", buffer, hashed=True),
        )
        (pass_s,) = best(args.repeats, lambda: hash_pass(root / "copy.npy", buffer))

    gb = size / 1e9
    print(f"entry: {n:,} × {args.dims} float32, features.npy {gb:.2f} GB, written in {write_s:.2f} s")
    print(
        f"plain sequential read of the rows (preadv, 8 MB buffer, page cache): {read_s:.3f} s = "
        f"{gb / read_s:.2f} GB/s (from byte 0: {gb / read0_s:.2f} GB/s)"
    )
    print(
        f"verify on read (CacheEntry.load: manifest, labels, every chunk): {verify_s:.3f} s = "
        f"{gb / verify_s:.2f} GB/s = {read_s / verify_s:.2f} of the plain read's throughput"
    )
    print(f"xxh3_128 in memory: {len(buffer) / 1e9 / hash_s:.1f} GB/s")
    print(
        f"assembly copy: plain {copy_s:.3f} s, checksums checked during the copy {copy_hash_s:.3f} s "
        f"(+{copy_hash_s - copy_s:.3f} s), plain copy then a checksum pass at finish "
        f"{copy_s + pass_s:.3f} s (+{pass_s:.3f} s)"
    )


if __name__ == "__main__":
    main()
