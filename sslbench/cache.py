"""The feature cache: extracted features on disk as memory-mapped arrays, one entry per
(backbone, weights, preprocessing, dataset, split, file list).

An entry is a directory holding ``features.npy`` (float32, memory-mapped), ``labels.npy`` and
``manifest.json``. While extraction runs, ``progress.json`` records how many rows are committed:
rows are flushed and fsynced before the count is written (atomically), so after a crash — even
``kill -9`` — the next run continues from the last commit. Committed rows end on batch
boundaries, so the resumed extraction sees the same batches and the result is bit-identical.

The root is ``$SSLBENCH_CACHE`` or ``~/.cache/sslbench/features``, or a spec's ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslbench.errors import SSLBenchError
from sslbench.results import write_atomic

CACHE_ENV = "SSLBENCH_CACHE"
#: Part of every key: entries written by an older layout are never read as current ones.
FORMAT_VERSION = 2
#: Folder under the cache root for runs' temporary files (PCA projections); not a cache entry.
SCRATCH_FOLDER = ".scratch"


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

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.backbone}__{self.dataset}__{self.split}")
        return f"{slug}__{self.digest()}"


@dataclass
class CommitState:
    committed: int = 0
    dims: int | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: Rows at which an interrupted extraction was resumed (provenance, kept in the manifest).
    resumed_at: list[int] = field(default_factory=list)
    #: Committed rows holding NaN or inf, and the first of them (-1: none), counted as they are written
    #: so that readers of the entry never scan it again.
    nonfinite_rows: int = 0
    first_nonfinite: int = -1


class CacheEntry:
    """One cache directory; see the module docstring for its files."""

    def __init__(self, path: Path, key: CacheKey) -> None:
        self.path = path
        self.key = key

    @property
    def features_path(self) -> Path:
        return self.path / "features.npy"

    @property
    def labels_path(self) -> Path:
        return self.path / "labels.npy"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest.get("complete") and self.features_path.is_file())

    def load(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Features (memory-mapped, read-only), labels and the manifest of a complete entry."""
        manifest = self.manifest()
        if not manifest or not manifest.get("complete"):
            raise SSLBenchError(f"feature cache entry {self.path} is incomplete")
        try:
            features = np.load(self.features_path, mmap_mode="r")
            labels = np.load(self.labels_path)
        except (OSError, ValueError) as exc:
            raise SSLBenchError(
                f"feature cache entry {self.path} is unreadable ({exc}); remove it with "
                f"`sslbench cache rm {self.path.name}`"
            ) from None
        if features.shape != (manifest["n"], manifest["dims"]) or len(labels) != manifest["n"]:
            raise SSLBenchError(
                f"feature cache entry {self.path} does not match its manifest; remove it with "
                f"`sslbench cache rm {self.path.name}`"
            )
        return features, labels, manifest

    # -- writing -----------------------------------------------------------------------------

    def progress(self) -> CommitState:
        try:
            return CommitState(**json.loads(self.progress_path.read_text()))
        except FileNotFoundError:
            return CommitState()

    def open_features(self, n: int, dims: int, fresh: bool) -> np.memmap:
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh or not self.features_path.is_file():
            return np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32, shape=(n, dims))
        features = np.lib.format.open_memmap(self.features_path, mode="r+")
        if features.shape != (n, dims):
            raise SSLBenchError(f"cache entry {self.path}: partial features have shape {features.shape}")
        return features

    def commit(self, features: np.memmap, progress: CommitState) -> None:
        """Make every row before ``progress.committed`` durable, then record the count."""
        features.flush()
        with open(self.features_path, "rb+") as handle:
            os.fsync(handle.fileno())
        write_atomic(self.progress_path, json.dumps(asdict(progress)))

    def finish(self, labels: np.ndarray, progress: CommitState, extra: dict[str, Any]) -> None:
        """Drop skipped rows, save labels and the manifest; the entry is then complete."""
        features = np.load(self.features_path, mmap_mode="r")
        if progress.skipped:
            keep = np.ones(len(features), dtype=bool)
            keep[[s["index"] for s in progress.skipped]] = False
            compact_path = self.path / "features.compact.npy"
            compact = np.lib.format.open_memmap(
                compact_path, mode="w+", dtype=np.float32, shape=(int(keep.sum()), features.shape[1])
            )
            rows = np.flatnonzero(keep)
            for start in range(0, len(rows), 65536):
                chunk = rows[start : start + 65536]
                compact[start : start + len(chunk)] = features[chunk]
            compact.flush()
            del compact, features
            os.replace(compact_path, self.features_path)
            labels = labels[keep]
        n = len(labels)
        tmp = self.path / "labels.tmp.npy"
        np.save(tmp, labels.astype(np.int64))
        os.replace(tmp, self.labels_path)
        dims = int(np.load(self.features_path, mmap_mode="r").shape[1])
        manifest = {
            "complete": True,
            "key": asdict(self.key),
            "n": n,
            "dims": dims,
            "skipped": progress.skipped,
            "resumed_at": progress.resumed_at,
            "nonfinite_rows": progress.nonfinite_rows,
            "first_nonfinite": progress.first_nonfinite,
            **extra,
        }
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2, default=str))
        self.progress_path.unlink(missing_ok=True)


class FeatureCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_root()).expanduser()

    def entry(self, key: CacheKey) -> CacheEntry:
        return CacheEntry(self.root / key.label(), key)

    def entries(self) -> list[tuple[Path, dict[str, Any] | None]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest = json.loads((path / "manifest.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                manifest = None
            found.append((path, manifest))
        return found

    def remove(self, patterns: list[str]) -> list[Path]:
        """Delete the entries whose directory name contains any of ``patterns`` ("all": every one)."""
        removed = []
        for path, _ in self.entries():
            if "all" in patterns or any(p in path.name for p in patterns):
                shutil.rmtree(path)
                removed.append(path)
        return removed


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
