"""The feature cache: extracted features on disk, one entry per (backbone, weights, preprocessing,
dataset, split, file list), every entry self-verifying.

An entry is a directory under the cache root holding

* ``features.npy``: float32 rows in C order behind a ``.npy`` 1.0 header, written with ``pwrite``
  (never through a memory map) into space reserved up front with ``posix_fallocate``;
* ``labels.npy``: int64;
* ``manifest.json``: written last and atomically, it makes the entry complete. It records the full
  :class:`CacheKey`, the shape, the xxh3-128 checksum of every chunk of features rows and of the labels,
  and a checksum of its own content; it is written in one canonical form, so any change of its bytes
  is detected too (see :class:`Manifest`);
* while extraction runs, ``progress.json``: the rows committed so far and the checksums of their chunks
  (rows are fsynced before the count is written, atomically), so after a crash, even ``kill -9``, the
  next run continues from the last commit. Committed rows end on batch boundaries, so the resumed
  extraction sees the same batches and its result is bit-identical to an uninterrupted one;
* ``lock``: one writer per entry (``flock``); a second process waits, then finds the entry complete.

Reading an entry (:meth:`CacheEntry.load`) checks every byte it returns against the manifest, streamed
through a bounded buffer, and the manifest's key against the key the caller computed; any mismatch is
one line naming the entry and the command that removes it (:class:`CorruptEntry`).

Finishing an entry (dropping skipped rows, writing labels and the manifest) is crash-safe at every
step: the compacted features go to a uniquely named temporary file, are recorded in ``progress.json``,
then renamed over ``features.npy``; a rerun sees from the header's row count which state it is in and
goes on from there. Temporary names carry the process id and a random part. Files are opened with
``O_NOFOLLOW`` and the entry's real path must lie under the root: the cache never reads or writes
through a symbolic link.

The root is ``$SSLBENCH_CACHE`` or ``~/.cache/sslbench/features``, or a spec's ``cache_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from sslbench.errors import SSLBenchError

CACHE_ENV = "SSLBENCH_CACHE"
#: Part of every key: entries written by an older layout are never read as current ones.
#: 3: checksummed features and labels, self-checking canonical manifest.
FORMAT_VERSION = 3
#: Folder under the cache root for runs' temporary files (PCA projections); not a cache entry.
SCRATCH_FOLDER = ".scratch"

FEATURES = "features.npy"
LABELS = "labels.npy"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = "lock"
HASH = "xxh3_128"
#: Rows are checksummed in chunks of about this many bytes (the manifest lists each chunk's rows).
CHUNK_BYTES = 16 << 20
#: Size of the reusable buffer that verification and compaction read through.
READ_BUFFER_BYTES = 8 << 20
#: A manifest larger than this is not read (it would be a corrupt or foreign file).
MAX_JSON_BYTES = 256 << 20
#: Entries whose lock this process holds (real path → pid; a forked child does not inherit the hold).
_HELD: dict[str, int] = {}
_TEMP = re.compile(r"^\..+\.\d+-[0-9a-f]+\.tmp$")


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sslbench" / "features"


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the features; two runs with equal keys share one entry.

    ``plugin`` is the distribution (name and version) that provides the backbone: upgrading a plugin
    re-extracts, since its code may compute other features under the same name and options.
    ``backbone_fingerprint`` is the backbone's own :meth:`~sslbench.interfaces.Backbone.fingerprint`
    (weights hash, preprocessing, anything else that changes its output).
    """

    backbone: str
    plugin: dict[str, str | None]
    backbone_options: dict[str, Any]
    backbone_fingerprint: dict[str, Any]
    dataset: str
    dataset_options: dict[str, Any]
    split: str
    split_fingerprint: str
    format_version: int = FORMAT_VERSION
    #: How the images were decoded (``extraction.decode``). ``exact``, the default, is left out of the
    #: recorded key and its digest, so entries written before the option existed keep their keys, and
    #: an entry of ``reduced`` decodes never serves an exact run (nor the other way round).
    decode: str = "exact"
    #: The CPU forward's memory format (``extraction.cpu_memory_format``, resolved) and precision
    #: (``extraction.cpu_precision``). Left out at their defaults, NCHW and float32, as ``decode`` is: an
    #: NCHW float32 run keeps the key it had before they existed. A CUDA run records neither.
    memory_format: str = "contiguous"
    precision: str = "float32"

    def fields(self) -> dict[str, Any]:
        """The key's fields as recorded: every field, less those added later when at their defaults."""
        found = asdict(self)
        for name, default in KEY_DEFAULTS.items():
            if found[name] == default:
                del found[name]
        return found

    def as_json(self) -> dict[str, Any]:
        """The key as the manifest records it (JSON types: tuples as lists, other objects as strings)."""
        loaded: dict[str, Any] = json.loads(json.dumps(self.fields(), default=str))
        return loaded

    def digest(self) -> str:
        return key_digest(self.fields())

    def label(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.backbone}__{self.dataset}__{self.split}")
        return f"{slug}__{self.digest()}"


#: Key fields added after the format was fixed, and the value that leaves each out of a recorded key.
KEY_DEFAULTS = {"decode": "exact", "memory_format": "contiguous", "precision": "float32"}


def key_digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# Errors


def rm_command(name: str, root: Path) -> str:
    """The exact command that removes entry ``name`` of the cache at ``root``."""
    command = f"sslbench cache rm {shlex.quote(name)}"
    if root.expanduser().absolute() != default_cache_root().absolute():
        command += f" --dir {shlex.quote(str(root.expanduser().absolute()))}"
    return command


class CorruptEntry(SSLBenchError):
    """A cache entry whose files do not match its manifest, or that cannot be read: one line naming it
    and the command that removes it."""

    def __init__(self, path: Path, root: Path, reason: str) -> None:
        self.path = path
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        name = path.relative_to(root).parts[0] if path.is_relative_to(root) and path != root else path.name
        super().__init__(
            f"feature cache entry {path} is broken: {self.reason}; remove it with `{rm_command(name, root)}` "
            "and run again to re-extract"
        )


def _human(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


def _free_bytes(path: str) -> int | None:
    try:
        info = os.statvfs(path)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def _write_failed(path: str, exc: OSError) -> SSLBenchError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(os.path.dirname(path) or ".")
        reason += f" ({_human(free)} free)" if free is not None else ""
        return SSLBenchError(
            f"cannot write {path}: {reason}; free some space or set cache_dir elsewhere (committed rows are kept)"
        )
    return SSLBenchError(f"cannot write {path}: {reason}")


@contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """OSErrors while writing the cache (a full disk, an I/O error) as one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise _write_failed(os.fspath(path), exc) from None


# --------------------------------------------------------------------------------------------------
# Low-level file access: no symbolic links followed, no memory maps while writing or verifying

_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """The ``.npy`` 1.0 header numpy itself writes for a C-ordered array of ``shape`` and ``descr``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"


def _open_for_reading(path: Path) -> int:
    """A regular file opened without following a link (raises OSError; ELOOP for a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _read_exactly(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], position + done)
        if got == 0:
            raise OSError(errno.EIO, f"file ends {len(view) - done} bytes early")
        done += got


def _write_exactly(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(folder: Path, name: str, data: bytes) -> None:
    """``folder/name`` replaced in one step by a file holding ``data`` (fsynced, a unique temporary name)."""
    tmp = folder / _temp_name(name)
    with _writing(folder / name):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        try:
            try:
                _write_exactly(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, folder / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate ``size`` bytes for ``fd`` now, so that a full disk fails here, in one line."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = _free_bytes(str(path.parent))
                raise SSLBenchError(
                    f"no room for {path}: needs {_human(size)}, "
                    f"{_human(free) if free is not None else 'unknown'} free; free some space or set cache_dir "
                    "elsewhere"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                raise _write_failed(str(path), exc) from None
    # The filesystem cannot reserve space: check the free space, then extend the file sparsely.
    free = _free_bytes(str(path.parent))
    allocated = os.fstat(fd).st_blocks * 512
    if free is not None and size - allocated > free:
        raise SSLBenchError(
            f"no room for {path}: needs {_human(size)}, {_human(free)} free; free some space or set cache_dir elsewhere"
        )
    with _writing(path):
        os.ftruncate(fd, size)


Chunk = tuple[int, int, str]


class _ChunkHasher:
    """Checksums of consecutive rows, fed in order, in chunks of ``CHUNK_BYTES`` (the last one shorter)."""

    def __init__(self, start: int, row_bytes: int, chunks: list[Chunk]) -> None:
        self.row_bytes = row_bytes
        self.chunk_rows = max(1, CHUNK_BYTES // row_bytes)
        self.chunks = chunks
        self.start = start
        self.rows = 0
        self._hash = xxhash.xxh3_128()

    @property
    def end(self) -> int:
        return self.start + self.rows

    def feed(self, data: memoryview) -> None:
        """``data``: whole rows' bytes."""
        while len(data):
            take = min(self.chunk_rows - self.rows, len(data) // self.row_bytes)
            self._hash.update(data[: take * self.row_bytes])
            data = data[take * self.row_bytes :]
            self.rows += take
            if self.rows == self.chunk_rows:
                self.close()

    def feed_zeros(self, n_rows: int) -> None:
        if n_rows <= 0:
            return
        zeros = memoryview(bytes(min(n_rows, max(1, READ_BUFFER_BYTES // self.row_bytes)) * self.row_bytes))
        while n_rows > 0:
            part = min(n_rows, len(zeros) // self.row_bytes)
            self.feed(zeros[: part * self.row_bytes])
            n_rows -= part

    def close(self) -> None:
        if self.rows:
            self.chunks.append((self.start, self.end, self._hash.hexdigest()))
            self.start, self.rows, self._hash = self.end, 0, xxhash.xxh3_128()


class FeatureWriter:
    """``features.npy`` of a known shape, written row range by row range with ``pwrite``, in order, and
    checksummed as it is written. Rows never written (samples that could not be read) are zeros."""

    def __init__(self, entry: CacheEntry, n: int, dims: int, progress: CommitState, *, fresh: bool) -> None:
        self.entry, self.path = entry, entry.features_path
        self.n, self.dims = n, dims
        self.row_bytes = dims * 4
        header = npy_header((n, dims), "<f4")
        self.offset = len(header)
        size = self.offset + n * self.row_bytes
        self.progress = progress
        if fresh:
            with _writing(self.path):
                if os.path.lexists(self.path):
                    os.unlink(self.path)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            try:
                _reserve(self.fd, size, self.path)
                with _writing(self.path):
                    _write_exactly(self.fd, header, 0)
            except BaseException:
                self.close()
                os.unlink(self.path)
                raise
            progress.chunks = []
            self.hasher = _ChunkHasher(0, self.row_bytes, progress.chunks)
            self.next_row = 0
            return
        try:
            self.fd = os.open(self.path, os.O_RDWR | _NOFOLLOW)
        except OSError as exc:
            raise entry.corrupt(f"its partial {FEATURES} cannot be opened ({exc.strerror or exc})") from None
        try:
            on_disk = os.fstat(self.fd)
            start = bytearray(self.offset)
            _read_exactly(self.fd, memoryview(start), 0)
            if not stat.S_ISREG(on_disk.st_mode) or on_disk.st_size != size or bytes(start) != header:
                raise entry.corrupt(
                    f"its partial {FEATURES} is not the {n} × {dims} float32 array {PROGRESS} describes"
                )
            hashed = progress.chunks[-1][1] if progress.chunks else 0
            self.hasher = _ChunkHasher(hashed, self.row_bytes, progress.chunks)
            # The open chunk's committed rows are read back to continue its checksum.
            buffer = memoryview(bytearray(min(CHUNK_BYTES, max(self.row_bytes, READ_BUFFER_BYTES))))
            row = hashed
            while row < progress.committed:
                count = min(progress.committed - row, len(buffer) // self.row_bytes)
                view = buffer[: count * self.row_bytes]
                _read_exactly(self.fd, view, self.offset + row * self.row_bytes)
                self.hasher.feed(view)
                row += count
        except OSError as exc:
            self.close()
            raise entry.corrupt(f"its partial {FEATURES} cannot be read ({exc.strerror or exc})") from None
        except BaseException:
            self.close()
            raise
        self.next_row = progress.committed

    def write(self, first_row: int, rows: np.ndarray) -> None:
        """Rows ``[first_row, first_row + len(rows))``; rows skipped since the last write stay zeros."""
        if first_row < self.next_row or first_row + len(rows) > self.n or rows.shape[1:] != (self.dims,):
            raise ValueError(f"rows {first_row}+{rows.shape} do not follow row {self.next_row} of {self.path}")
        self.hasher.feed_zeros(first_row - self.next_row)
        data = np.ascontiguousarray(rows, dtype="<f4").data.cast("B")
        with _writing(self.path):
            _write_exactly(self.fd, data, self.offset + first_row * self.row_bytes)
        self.hasher.feed(data)
        self.next_row = first_row + len(rows)

    def copy_shard(self, shard: CacheEntry, progress: CommitState, first_row: int) -> None:
        """Copy the committed rows of ``shard`` (a range extracted by another rank) to ``first_row``,
        checking them against their checksums; those checksums, rows offset, become this file's."""
        if self.hasher.rows or first_row != self.next_row or self.hasher.start != first_row:
            raise ValueError(f"shard rows at {first_row} do not follow row {self.next_row} of {self.path}")
        if progress.dims != self.dims or _chunks_problem(progress.chunks, progress.committed):
            raise shard.corrupt(f"its {PROGRESS} does not describe {progress.committed} rows of {self.dims} columns")
        try:
            source = _open_for_reading(shard.features_path)
        except OSError as exc:
            raise shard.corrupt(f"{FEATURES} cannot be opened ({exc.strerror or exc})") from None
        try:
            offset = len(npy_header((progress.committed, self.dims), "<f4"))
            buffer = memoryview(bytearray(max(self.row_bytes, READ_BUFFER_BYTES)))
            for row, view in _read_chunks(source, offset, self.row_bytes, progress.chunks, buffer, shard.corrupt):
                with _writing(self.path):
                    _write_exactly(self.fd, view, self.offset + (first_row + row) * self.row_bytes)
        except OSError as exc:
            raise shard.corrupt(f"{FEATURES} cannot be read ({exc.strerror or exc})") from None
        finally:
            os.close(source)
        self.progress.chunks.extend((first_row + a, first_row + b, digest) for a, b, digest in progress.chunks)
        self.next_row = first_row + progress.committed
        self.hasher.start = self.next_row

    def commit(self, committed: int, final: bool = False) -> None:
        """Make every row before ``committed`` durable, then record them and their checksums."""
        self.hasher.feed_zeros(committed - self.next_row)
        self.next_row = max(self.next_row, committed)
        if final:
            self.hasher.close()
        with _writing(self.path):
            os.fsync(self.fd)
        self.progress.committed = committed
        self.entry.write_progress(self.progress)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def _read_chunks(
    fd: int, offset: int, row_bytes: int, chunks: list[Chunk], buffer: memoryview, corrupt: Callable[[str], Exception]
) -> Iterator[tuple[int, memoryview]]:
    """``(first row, rows' bytes)`` pieces of every chunk in order, read into ``buffer`` (valid until the
    next step); after a chunk's last piece, its checksum is compared: ``corrupt(reason)`` is raised when
    it differs."""
    per_read = max(1, len(buffer) // row_bytes)
    for start, stop, digest in chunks:
        hasher = xxhash.xxh3_128()
        row = start
        while row < stop:
            count = min(stop - row, per_read)
            view = buffer[: count * row_bytes]
            _read_exactly(fd, view, offset + row * row_bytes)
            hasher.update(view)
            yield row, view
            row += count
        if hasher.hexdigest() != digest:
            raise corrupt(f"rows {start}–{stop} of {FEATURES} do not match their checksum")


# --------------------------------------------------------------------------------------------------
# Manifest and progress


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeaturesFile(_Strict):
    file: Literal["features.npy"]
    dtype: Literal["<f4"]
    header_bytes: PositiveInt
    hash: Literal["xxh3_128"]
    #: ``[first row, stop row, checksum of the rows' bytes]``, contiguous from row 0 to ``n``.
    chunks: list[tuple[NonNegativeInt, NonNegativeInt, str]]


class LabelsFile(_Strict):
    file: Literal["labels.npy"]
    dtype: Literal["<i8"]
    header_bytes: PositiveInt
    hash: Literal["xxh3_128"]
    digest: str


class Manifest(BaseModel):
    """``manifest.json`` of a complete entry. Provenance beyond these fields (batch size, device, …) is
    kept as extra fields. ``checksum`` is the xxh3-128 of the canonical JSON of every other field, and
    the file holds exactly the canonical JSON (sorted keys, two-space indent, a final newline)."""

    model_config = ConfigDict(extra="allow")

    format: Literal[3]
    complete: Literal[True]
    key: dict[str, Any]
    key_digest: str
    n: NonNegativeInt
    dims: PositiveInt
    features: FeaturesFile
    labels: LabelsFile
    skipped: list[dict[str, Any]]
    resumed_at: list[int]
    nonfinite_rows: NonNegativeInt
    first_nonfinite: int
    checksum: str


def _canonical(data: dict[str, Any]) -> bytes:
    """The one form a manifest is written in: sorted keys, two-space indent, lists of plain values (a
    chunk, a key's option) on one line, a final newline."""
    return (_dump(data, 0) + "\n").encode()


def _dump(value: Any, depth: int) -> str:
    inner, outer = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(inner + _dump(v, depth + 1) for v in value) + f"\n{outer}]"
    return json.dumps(value, sort_keys=True)


def _content_checksum(data: dict[str, Any]) -> str:
    return xxhash.xxh3_128(_canonical({k: v for k, v in data.items() if k != "checksum"})).hexdigest()


class Compacted(_Strict):
    """Recorded before the compacted features replace the full ones (see :meth:`CacheEntry.finish`)."""

    rows: NonNegativeInt
    chunks: list[tuple[NonNegativeInt, NonNegativeInt, str]]


class CommitState(BaseModel):
    """``progress.json``: how far an unfinished entry is."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    key_digest: str = ""
    committed: NonNegativeInt = 0
    dims: PositiveInt | None = None
    skipped: list[dict[str, Any]] = Field(default_factory=list)
    #: Rows at which an interrupted extraction was resumed (provenance, kept in the manifest).
    resumed_at: list[int] = Field(default_factory=list)
    #: Committed rows holding NaN or inf, and the first of them (-1: none), counted as they are written
    #: so that readers of the entry never scan it again.
    nonfinite_rows: NonNegativeInt = 0
    first_nonfinite: int = -1
    #: Checksums of the committed rows, in chunks (the rows after the last chunk are re-read on resume).
    chunks: list[Chunk] = Field(default_factory=list)
    compacted: Compacted | None = None


def _chunks_problem(chunks: list[Chunk], n: int) -> str:
    """Why ``chunks`` do not cover rows ``[0, n)`` one after the other ("" when they do)."""
    row = 0
    for start, stop, _ in chunks:
        if start != row or stop <= start:
            return f"its checksummed chunks do not follow each other at row {row}"
        row = stop
    return "" if row == n else f"its checksums cover {row} of {n} rows"


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the top level"
    return f"{where}: {first['msg']}"


# --------------------------------------------------------------------------------------------------
# Entries


class CacheEntry:
    """One cache directory; see the module docstring for its files.

    ``root``: the cache root the entry lies under (default: its parent folder); the entry's real path
    must be inside it.
    """

    def __init__(self, path: Path, key: CacheKey, root: Path | None = None) -> None:
        self.path = path
        self.key = key
        self.root = root if root is not None else path.parent

    @property
    def features_path(self) -> Path:
        return self.path / FEATURES

    @property
    def labels_path(self) -> Path:
        return self.path / LABELS

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def progress_path(self) -> Path:
        return self.path / PROGRESS

    def corrupt(self, reason: str) -> CorruptEntry:
        return CorruptEntry(self.path, self.root, reason)

    # -- state ------------------------------------------------------------------------------------

    def _layout_problem(self) -> str:
        """Why the entry's path is not a real directory inside the root ("" when it is one or absent)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            return f"it cannot be read ({exc.strerror or exc})"
        if stat.S_ISLNK(info.st_mode):
            return "it is a symbolic link"
        if not stat.S_ISDIR(info.st_mode):
            return "it is not a directory"
        real, root = Path(os.path.realpath(self.path)), Path(os.path.realpath(self.root))
        if not real.is_relative_to(root) or real == root:
            return f"its real path {real} is outside the cache root {root}"
        return ""

    def claims_complete(self) -> bool:
        """Whether the entry has a manifest (or is something else than a directory): then it is read,
        and verified, rather than extracted."""
        return bool(self._layout_problem()) or os.path.lexists(self.manifest_path)

    def read_manifest(self) -> Manifest:
        """The manifest, checked in itself (its form, its checksum) and against this entry's key."""
        manifest = read_manifest_file(self.path, self.root)
        if manifest.key != self.key.as_json() or manifest.key_digest != self.key.digest():
            raise self.corrupt(f"its {MANIFEST} records another key than the one asked for (another model or split)")
        return manifest

    def load(self) -> tuple[np.ndarray, np.ndarray, Manifest]:
        """Features (memory-mapped, read-only), labels and the manifest of a complete entry, every byte
        verified against the manifest first (streamed through a bounded buffer)."""
        problem = self._layout_problem()
        if problem:
            raise self.corrupt(problem)
        if not os.path.lexists(self.manifest_path):
            raise self.corrupt(f"it has no {MANIFEST} (it is incomplete)")
        manifest = self.read_manifest()
        labels = self._read_labels(manifest)
        try:
            handle = open(str(self.features_path), "rb", opener=lambda p, _: _open_for_reading(Path(p)))  # noqa: SIM115
        except OSError as exc:
            raise self.corrupt(f"{FEATURES} cannot be opened ({exc.strerror or exc})") from None
        with handle:
            self._verify_features(handle.fileno(), manifest)
            if manifest.n == 0:
                return np.empty((0, manifest.dims), np.float32), labels, manifest
            features = np.memmap(
                handle,
                dtype=np.float32,
                mode="r",
                offset=manifest.features.header_bytes,
                shape=(manifest.n, manifest.dims),
            )
        return features, labels, manifest

    def _verify_features(self, fd: int, manifest: Manifest) -> None:
        info = manifest.features
        row_bytes = manifest.dims * 4
        header = npy_header((manifest.n, manifest.dims), "<f4")
        if info.header_bytes != len(header):
            raise self.corrupt(f"its {MANIFEST} gives a wrong header size for {FEATURES}")
        problem = _chunks_problem(info.chunks, manifest.n)
        if problem:
            raise self.corrupt(problem)
        size = os.fstat(fd).st_size
        expected = len(header) + manifest.n * row_bytes
        if size != expected:
            raise self.corrupt(
                f"{FEATURES} holds {size} bytes, not {expected} ({manifest.n} × {manifest.dims} float32)"
            )
        buffer = memoryview(bytearray(max(row_bytes, min(READ_BUFFER_BYTES, expected))))
        try:
            start = buffer[: len(header)]
            _read_exactly(fd, start, 0)
            if bytes(start) != header:
                raise self.corrupt(f"{FEATURES} is not a C-ordered {manifest.n} × {manifest.dims} float32 array")
            _advise_sequential(fd)
            for _ in _read_chunks(fd, len(header), row_bytes, info.chunks, buffer, self.corrupt):
                pass
        except OSError as exc:
            raise self.corrupt(f"{FEATURES} cannot be read ({exc.strerror or exc})") from None

    def _read_labels(self, manifest: Manifest) -> np.ndarray:
        header = npy_header((manifest.n,), "<i8")
        try:
            fd = _open_for_reading(self.labels_path)
        except OSError as exc:
            raise self.corrupt(f"{LABELS} cannot be opened ({exc.strerror or exc})") from None
        try:
            size = os.fstat(fd).st_size
            if size != len(header) + 8 * manifest.n or manifest.labels.header_bytes != len(header):
                raise self.corrupt(f"{LABELS} does not hold {manifest.n} int64 labels")
            data = bytearray(size)
            _read_exactly(fd, memoryview(data), 0)
        except OSError as exc:
            raise self.corrupt(f"{LABELS} cannot be read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        if bytes(data[: len(header)]) != header:
            raise self.corrupt(f"{LABELS} is not an array of {manifest.n} int64 labels")
        body = memoryview(data)[len(header) :]
        if xxhash.xxh3_128(body).hexdigest() != manifest.labels.digest:
            raise self.corrupt(f"{LABELS} does not match its checksum")
        return np.frombuffer(data, dtype="<i8", offset=len(header)).astype(np.int64, copy=False)

    # -- writing ----------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the entry's writer lock (waiting for another writer to finish); temporary files left in
        it by crashed writers are removed once it is held. Re-entrant within a process."""
        held = os.path.realpath(self.path)
        if _HELD.get(held) == os.getpid():
            yield
            return
        problem = self._layout_problem()
        if problem:
            raise self.corrupt(problem)
        with _writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        problem = self._layout_problem()
        if problem:
            raise self.corrupt(problem)
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.corrupt(f"its {LOCK} file is a symbolic link") from None
            raise _write_failed(str(self.path / LOCK), exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _HELD[held] = os.getpid()
            for child in os.scandir(self.path):
                if _TEMP.match(child.name) and not child.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(child.path)
            yield
        finally:
            _HELD.pop(held, None)
            os.close(fd)

    def discard(self) -> None:
        """Remove what the entry holds (call under :meth:`locked`, or when its path is no directory)."""
        if not os.path.lexists(self.path):
            return
        problem = self._layout_problem()
        if problem and not problem.startswith("its real path"):
            os.unlink(self.path)  # a link or a file: the link itself, never its target
            return
        if problem:
            raise self.corrupt(problem)
        for child in os.scandir(self.path):
            if child.name == LOCK:
                continue
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(child.path)
            else:
                os.unlink(child.path)

    def progress(self) -> CommitState:
        """The entry's ``progress.json`` (an empty state when there is none)."""
        try:
            fd = _open_for_reading(self.progress_path)
        except FileNotFoundError:
            return CommitState(key_digest=self.key.digest())
        except OSError as exc:
            raise self.corrupt(f"its {PROGRESS} cannot be opened ({exc.strerror or exc})") from None
        try:
            text = _read_small(fd, self, PROGRESS)
        finally:
            os.close(fd)
        try:
            state = CommitState.model_validate_json(text)
        except ValidationError as exc:
            raise self.corrupt(f"its {PROGRESS} is malformed ({_first_error(exc)})") from None
        if state.key_digest != self.key.digest():
            raise self.corrupt(f"its {PROGRESS} belongs to another key")
        hashed = state.chunks[-1][1] if state.chunks else 0
        problem = _chunks_problem(state.chunks, hashed)
        if problem or hashed > state.committed or (state.committed and state.dims is None):
            raise self.corrupt(f"its {PROGRESS} is inconsistent ({problem or 'rows and checksums disagree'})")
        return state

    def write_progress(self, progress: CommitState) -> None:
        progress.key_digest = self.key.digest()
        _write_file_atomic(self.path, PROGRESS, progress.model_dump_json().encode())

    def open_features(self, n: int, dims: int, progress: CommitState, *, fresh: bool) -> FeatureWriter:
        """A writer of the ``n × dims`` features: a new file (space reserved), or the partial one to resume."""
        return FeatureWriter(self, n, dims, progress, fresh=fresh)

    def finish(self, labels: np.ndarray, extra: dict[str, Any]) -> None:
        """Drop skipped rows, save labels and the manifest (last): the entry is then complete.

        Call after the last commit; it takes the entry's lock, so concurrent calls take turns and agree.
        Every step can be interrupted: run again, it goes on from what is on disk (``progress.json`` and
        the header of ``features.npy``).
        """
        with self.locked():
            self._finish(labels, extra)

    def _finish(self, labels: np.ndarray, extra: dict[str, Any]) -> None:
        if os.path.lexists(self.manifest_path):
            self.read_manifest()  # finished by another process, or by a run interrupted just after (or broken)
            with _writing(self.progress_path), contextlib.suppress(FileNotFoundError):
                os.unlink(self.progress_path)
            return
        progress = self.progress()
        if progress.dims is None:
            raise self.corrupt(f"its {PROGRESS} records no features")
        n_total, dims = progress.committed, progress.dims
        if len(labels) != n_total:
            raise ValueError(f"{len(labels)} labels for {n_total} rows in {self.path}")
        keep = np.ones(n_total, dtype=bool)
        if progress.skipped:
            keep[[int(s["index"]) for s in progress.skipped]] = False
        n = int(keep.sum())
        problem = _chunks_problem(progress.chunks, n_total)
        if problem:
            raise self.corrupt(problem)
        # The header says which step an interrupted finish reached: full rows, or compacted ones.
        rows_on_disk = self._features_rows(dims)
        if rows_on_disk == n_total:
            if n != n_total:
                self._compact(progress, keep, dims)
        elif n == n_total or progress.compacted is None or rows_on_disk != n or progress.compacted.rows != n:
            raise self.corrupt(f"{FEATURES} holds {rows_on_disk} rows where {PROGRESS} expects {n_total}")
        chunks = progress.chunks if n == n_total or progress.compacted is None else progress.compacted.chunks

        kept_labels = np.ascontiguousarray(np.asarray(labels)[keep], dtype="<i8")
        labels_header = npy_header((n,), "<i8")
        _write_file_atomic(self.path, LABELS, labels_header + kept_labels.tobytes())
        data: dict[str, Any] = {
            **json.loads(json.dumps(extra, default=str)),
            "format": FORMAT_VERSION,
            "complete": True,
            "key": self.key.as_json(),
            "key_digest": self.key.digest(),
            "n": n,
            "dims": dims,
            "features": {
                "file": FEATURES,
                "dtype": "<f4",
                "header_bytes": len(npy_header((n, dims), "<f4")),
                "hash": HASH,
                "chunks": [list(c) for c in chunks],
            },
            "labels": {
                "file": LABELS,
                "dtype": "<i8",
                "header_bytes": len(labels_header),
                "hash": HASH,
                "digest": xxhash.xxh3_128(kept_labels.data.cast("B")).hexdigest(),
            },
            "skipped": progress.skipped,
            "resumed_at": progress.resumed_at,
            "nonfinite_rows": progress.nonfinite_rows,
            "first_nonfinite": progress.first_nonfinite,
        }
        data = json.loads(json.dumps(data, default=str))
        data["checksum"] = _content_checksum(data)
        Manifest.model_validate(data)
        _write_file_atomic(self.path, MANIFEST, _canonical(data))
        with _writing(self.progress_path), contextlib.suppress(FileNotFoundError):
            os.unlink(self.progress_path)

    def _features_rows(self, dims: int) -> int:
        """Rows of the ``features.npy`` on disk, from its header (its size checked against them)."""
        try:
            fd = _open_for_reading(self.features_path)
        except OSError as exc:
            raise self.corrupt(f"{FEATURES} cannot be opened ({exc.strerror or exc})") from None
        try:
            with os.fdopen(os.dup(fd), "rb") as handle:
                version = np.lib.format.read_magic(handle)
                if version != (1, 0):
                    raise ValueError(f"version {version}")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                offset = handle.tell()
            size = os.fstat(fd).st_size
        except (OSError, ValueError) as exc:
            raise self.corrupt(f"{FEATURES} has no valid header ({exc})") from None
        finally:
            os.close(fd)
        if fortran or dtype != np.float32 or len(shape) != 2 or shape[1] != dims:
            raise self.corrupt(f"{FEATURES} is not a C-ordered float32 array of {dims} columns")
        if size != offset + shape[0] * dims * 4:
            raise self.corrupt(f"{FEATURES} is {size} bytes long, not {offset + shape[0] * dims * 4}")
        return int(shape[0])

    def _compact(self, progress: CommitState, keep: np.ndarray, dims: int) -> None:
        """Copy the kept rows into a new file, checking the old chunks and checksumming the new ones on
        the way; record it in ``progress.json``, then rename it over ``features.npy``."""
        n = int(keep.sum())
        row_bytes = dims * 4
        header = npy_header((n, dims), "<f4")
        tmp = self.path / _temp_name(FEATURES)
        new_chunks: list[Chunk] = []
        hasher = _ChunkHasher(0, row_bytes, new_chunks)
        try:
            source = _open_for_reading(self.features_path)
        except OSError as exc:
            raise self.corrupt(f"{FEATURES} cannot be opened ({exc.strerror or exc})") from None
        try:
            with _writing(tmp):
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            try:
                _reserve(out, len(header) + n * row_bytes, tmp)
                with _writing(tmp):
                    _write_exactly(out, header, 0)
                written = 0
                buffer = memoryview(bytearray(max(row_bytes, READ_BUFFER_BYTES)))
                old_header = len(npy_header((len(keep), dims), "<f4"))
                try:
                    chunks = _read_chunks(source, old_header, row_bytes, progress.chunks, buffer, self.corrupt)
                    for first, view in chunks:
                        rows = np.frombuffer(view, dtype=np.uint8).reshape(-1, row_bytes)
                        kept = np.ascontiguousarray(rows[keep[first : first + len(rows)]])
                        data = kept.data.cast("B")
                        with _writing(tmp):
                            _write_exactly(out, data, len(header) + written * row_bytes)
                        hasher.feed(data)
                        written += len(kept)
                except OSError as exc:
                    raise self.corrupt(f"{FEATURES} cannot be read ({exc.strerror or exc})") from None
                hasher.close()
                with _writing(tmp):
                    os.fsync(out)
            finally:
                os.close(out)
        except BaseException:
            with _writing(tmp):
                tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(source)
        progress.compacted = Compacted(rows=n, chunks=new_chunks)
        self.write_progress(progress)
        with _writing(self.features_path):
            os.replace(tmp, self.features_path)
            _fsync_dir(self.path)


def _advise_sequential(fd: int) -> None:
    """Tell the kernel the file is read sequentially (more read-ahead), when it can be told."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _read_small(fd: int, entry: CacheEntry, name: str) -> bytes:
    size = os.fstat(fd).st_size
    if size > MAX_JSON_BYTES:
        raise entry.corrupt(f"its {name} is {_human(size)} long")
    data = bytearray(size)
    try:
        _read_exactly(fd, memoryview(data), 0)
    except OSError as exc:
        raise entry.corrupt(f"its {name} cannot be read ({exc.strerror or exc})") from None
    return bytes(data)


def read_manifest_file(path: Path, root: Path) -> Manifest:
    """The manifest of the entry at ``path``, checked in itself: valid JSON of the right structure, in
    canonical form, with a matching checksum; raises :class:`CorruptEntry`."""
    entry_name = f"its {MANIFEST}"

    def corrupt(reason: str) -> CorruptEntry:
        return CorruptEntry(path, root, f"{entry_name} {reason}")

    try:
        fd = _open_for_reading(path / MANIFEST)
    except OSError as exc:
        raise corrupt(f"cannot be opened ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise corrupt(f"is {_human(size)} long")
        raw = bytearray(size)
        try:
            _read_exactly(fd, memoryview(raw), 0)
        except OSError as exc:
            raise corrupt(f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise corrupt("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise corrupt(f"is not valid JSON ({exc.msg} at line {exc.lineno})" if raw.strip() else "is empty") from None
    if not isinstance(data, dict):
        raise corrupt("is not a JSON object")
    if data.get("format") != FORMAT_VERSION:
        found = f"format {data['format']!r}" if "format" in data else "no checksums"
        raise corrupt(f"has {found}: it was written by another version of sslbench")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise corrupt(f"is malformed ({_first_error(exc)})") from None
    if _canonical(data) != bytes(raw) or data.get("checksum") != _content_checksum(data):
        raise corrupt("was altered (its checksum does not match)")
    if key_digest(manifest.key) != manifest.key_digest:
        raise corrupt("records a key that does not match its digest")
    return manifest


# --------------------------------------------------------------------------------------------------
# The cache root


@dataclass(frozen=True)
class EntryStatus:
    """What ``sslbench cache ls`` shows of one entry (its files are not read, only their sizes)."""

    path: Path
    state: Literal["complete", "partial", "broken"]
    manifest: Manifest | None = None
    reason: str = ""
    size: int = 0
    committed: int = 0


def _disk_size(path: Path) -> int:
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


class FeatureCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_root()).expanduser()

    def entry(self, key: CacheKey) -> CacheEntry:
        return CacheEntry(self.root / key.label(), key, self.root)

    def _children(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if not p.name.startswith("."))

    def status(self, path: Path) -> EntryStatus:
        """The state of the entry at ``path`` from its manifest (checked in itself) and file sizes."""
        size = _disk_size(path)
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return EntryStatus(path, "broken", reason="a symbolic link", size=size)
        if not stat.S_ISDIR(info.st_mode):
            return EntryStatus(path, "broken", reason="not a directory", size=size)
        if not os.path.lexists(path / MANIFEST):
            try:
                committed = _progress_rows(path, self.root)
            except CorruptEntry as exc:
                return EntryStatus(path, "broken", reason=exc.reason, size=size)
            return EntryStatus(path, "partial", size=size, committed=committed)
        try:
            manifest = read_manifest_file(path, self.root)
        except CorruptEntry as exc:
            return EntryStatus(path, "broken", reason=exc.reason, size=size)
        expected = {
            FEATURES: manifest.features.header_bytes + 4 * manifest.n * manifest.dims,
            LABELS: manifest.labels.header_bytes + 8 * manifest.n,
        }
        for name, nbytes in expected.items():
            try:
                file_info = os.lstat(path / name)
            except OSError:
                return EntryStatus(path, "broken", manifest, f"{name} is missing", size)
            if not stat.S_ISREG(file_info.st_mode) or file_info.st_size != nbytes:
                return EntryStatus(path, "broken", manifest, f"{name} is not the file its manifest describes", size)
        if not path.name.endswith(f"__{manifest.key_digest}"):
            return EntryStatus(path, "broken", manifest, "its manifest belongs to another entry", size)
        return EntryStatus(path, "complete", manifest, size=size)

    def scan(self) -> list[EntryStatus]:
        return [self.status(path) for path in self._children()]

    def entries(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Every entry with its manifest (as a dict), or ``None`` for partial and broken entries."""
        return [
            (s.path, s.manifest.model_dump() if s.state == "complete" and s.manifest else None) for s in self.scan()
        ]

    def remove(self, patterns: list[str], *, everything: bool = False) -> list[Path]:
        """Delete the entries named by ``patterns`` (exact names or shell-style globs), or every entry.

        A link is removed itself, never what it points to; nothing outside the root is touched. Every
        pattern must match an entry, and a glob that matches every entry needs ``everything``.
        """
        if everything and patterns:
            raise SSLBenchError("cache rm: give entry names or patterns, or --all, not both")
        if not everything and not patterns:
            raise SSLBenchError("cache rm: give entry names or shell-style patterns (quoted), or --all")
        children = self._children()
        names = [p.name for p in children]
        chosen: set[str] = set(names) if everything else set()
        for pattern in patterns:
            if not pattern.strip():
                raise SSLBenchError("cache rm: an empty pattern names no entry")
            matched = {name for name in names if name == pattern or fnmatch.fnmatchcase(name, pattern)}
            if not matched:
                raise SSLBenchError(f"no cache entry in {self.root} matches {pattern!r}")
            if len(names) > 1 and matched == set(names) and pattern not in names:
                raise SSLBenchError(
                    f"cache rm: {pattern!r} matches every entry in {self.root}; use --all to remove them all"
                )
            chosen |= matched
        removed = []
        root = Path(os.path.realpath(self.root))
        for path in children:
            if path.name not in chosen:
                continue
            assert Path(os.path.realpath(path.parent)) == root
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)  # does not follow links inside (fd-based on Linux)
            else:
                os.unlink(path)  # a link or a file: itself
            removed.append(path)
        return removed


def _progress_rows(path: Path, root: Path) -> int:
    """Committed rows of a partial entry (its progress.json checked in itself; 0 without one)."""
    try:
        fd = _open_for_reading(path / PROGRESS)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise CorruptEntry(path, root, f"its {PROGRESS} cannot be opened ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise CorruptEntry(path, root, f"its {PROGRESS} is {_human(size)} long")
        raw = bytearray(size)
        _read_exactly(fd, memoryview(raw), 0)
    finally:
        os.close(fd)
    try:
        return CommitState.model_validate_json(bytes(raw)).committed
    except ValidationError as exc:
        raise CorruptEntry(path, root, f"its {PROGRESS} is malformed ({_first_error(exc)})") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def run_scratch(root: Path | None = None) -> Iterator[Path]:
    """A private folder for one run's temporary files (PCA projections, as large as the features),
    under the cache root (where users keep room for features; ``/tmp`` is often a small RAM disk).

    Removed when the run ends, whatever the exit path; folders left by killed runs (``kill -9``)
    are removed by the next run, as their process is gone.
    """
    base = (root or default_cache_root()).expanduser() / SCRATCH_FOLDER
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SSLBenchError(f"cannot create the scratch folder {base}: {exc.strerror or exc}") from None
    for stale in base.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
