"""The feature cache verifies itself, survives crashes at every step of finishing an entry, fails in one
line on a full disk, and its `cache ls` / `cache rm` handle broken entries and patterns safely."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sslbench.cache as cache_module
from sslbench.cache import CacheEntry, CacheKey, CorruptEntry, FeatureCache
from sslbench.errors import SSLBenchError
from sslbench.extract import ExtractionSettings, extract_split
from sslbench.interfaces import Backbone, Split

from conftest import run_cli

N, IN_DIMS, DIMS = 300, 4, 8
#: Small checksum chunks (8 rows of 32 bytes), so that entries have many.
SMALL_CHUNKS = 8 * DIMS * 4


class Linear(Backbone):
    feature_dim = DIMS

    def __init__(self, seed: int) -> None:
        self.weights = torch.from_numpy(np.random.default_rng(seed).normal(size=(IN_DIMS, DIMS)).astype(np.float32))

    def preprocess(self, sample):
        return torch.from_numpy(np.asarray(sample, dtype=np.float32))

    def embed(self, batch):
        return batch @ self.weights


class Stop(BaseException):
    """Stands for the process dying midway (not an unreadable sample)."""


class Rows(Split):
    def __init__(self, n: int = N, seed: int = 0, unreadable: tuple[int, ...] = (), stop_at: int | None = None):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, IN_DIMS)).astype(np.float32)
        self.y = rng.integers(0, 5, size=n).astype(np.int64)
        self.unreadable, self.stop_at = set(unreadable), stop_at

    @property
    def labels(self):
        return self.y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        if index == self.stop_at:
            raise Stop
        if index in self.unreadable:
            raise OSError(f"cannot decode sample {index}")
        return self.x[index]


def key_for(split: Split, model: str = "linear", seed: int = 0) -> CacheKey:
    return CacheKey(model, {"name": "test"}, {"seed": seed}, {}, "rows", {}, "train", split.fingerprint())


SETTINGS = ExtractionSettings(batch_size=32, workers=0, commit_every=2, on_error="skip")


def extract(root: Path, split: Split, seed: int = 0, **kwargs):
    entry = FeatureCache(root).entry(key_for(split, seed=seed))
    return entry, extract_split(
        Linear(seed), split, settings=SETTINGS, device="cpu", name="rows/train", entry=entry, **kwargs
    )


def expected_features(split: Rows, seed: int = 0) -> np.ndarray:
    keep = [i for i in range(len(split)) if i not in split.unreadable]
    return (torch.from_numpy(split.x[keep]) @ Linear(seed).weights).numpy()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", SMALL_CHUNKS)


def assert_one_line_rm(exc: BaseException, entry_path: Path) -> None:
    message = str(exc)
    assert isinstance(exc, SSLBenchError), repr(exc)
    assert "\n" not in message, message
    assert str(entry_path) in message, message
    assert f"sslbench cache rm {entry_path.name}" in message, message


# --------------------------------------------------------------------------------------------------
# The manifest and reading entries back


def test_entry_round_trip_and_manifest_format(tmp_path):
    split = Rows()
    entry, got = extract(tmp_path, split)
    assert not got.from_cache
    np.testing.assert_array_equal(got.features, expected_features(split))
    manifest = json.loads(entry.manifest_path.read_text())
    assert manifest["format"] == 3 and manifest["complete"] is True
    assert manifest["key"] == entry.key.as_json() and manifest["key_digest"] == entry.key.digest()
    assert (manifest["n"], manifest["dims"]) == (N, DIMS)
    chunks = manifest["features"]["chunks"]
    assert chunks[0][0] == 0 and chunks[-1][1] == N and len(chunks) == -(-N // 8)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert manifest["labels"]["hash"] == "xxh3_128" and len(manifest["labels"]["digest"]) == 32
    assert not entry.progress_path.exists() and not list(entry.path.glob(".*.tmp"))

    _, again = extract(tmp_path, split)
    assert again.from_cache
    assert again.features.tobytes() == got.features.tobytes() and again.labels.tobytes() == got.labels.tobytes()
    assert isinstance(again.features, np.memmap) and not again.features.flags.writeable


def test_reading_with_another_key_fails(tmp_path):
    split = Rows()
    entry, _ = extract(tmp_path, split)
    other = CacheEntry(entry.path, replace(entry.key, backbone_options={"seed": 1}), tmp_path)
    with pytest.raises(CorruptEntry, match="another key") as caught:
        other.load()
    assert_one_line_rm(caught.value, entry.path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty"),
        (b'{"complete": tr', "is not valid JSON"),
        (b"\xff\xfe\x00binary", "is not UTF-8"),
        (b'{"complete": true}', "written by another version"),
        (b"[1, 2]", "is not a JSON object"),
    ],
)
def test_broken_manifest_is_one_line(tmp_path, content, reason):
    split = Rows(n=40)
    entry, _ = extract(tmp_path, split)
    entry.manifest_path.write_bytes(content)
    with pytest.raises(CorruptEntry, match=reason) as caught:
        extract(tmp_path, split)
    assert_one_line_rm(caught.value, entry.path)
    (status,) = FeatureCache(tmp_path).scan()
    assert status.state == "broken" and reason in status.reason


def test_manifest_with_missing_fields_is_one_line(tmp_path):
    split = Rows(n=40)
    entry, _ = extract(tmp_path, split)
    entry.manifest_path.write_text('{"complete": true, "format": 3}')
    with pytest.raises(CorruptEntry, match="is malformed") as caught:
        entry.load()
    assert_one_line_rm(caught.value, entry.path)


def test_entry_that_is_a_file_or_a_link_is_refused(tmp_path):
    split = Rows(n=40)
    entry = FeatureCache(tmp_path).entry(key_for(split))
    tmp_path.mkdir(exist_ok=True)
    entry.path.write_text("not a directory")
    with pytest.raises(CorruptEntry, match="not a directory") as caught:
        extract(tmp_path, split)
    assert_one_line_rm(caught.value, entry.path)

    # another entry (here: a complete one of another split) linked in its place
    entry.path.unlink()
    other_split = Rows(n=40, seed=1)
    other, _ = extract(tmp_path, other_split)
    entry.path.symlink_to(other.path)
    with pytest.raises(CorruptEntry, match="symbolic link") as caught:
        extract(tmp_path, split)
    assert_one_line_rm(caught.value, entry.path)


def test_reextract_corrupt_replaces_a_bad_entry(tmp_path):
    split = Rows(n=100)
    entry, first = extract(tmp_path, split)
    original = np.array(first.features)
    with open(entry.features_path, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x00\x80\x7f")  # a float turned to inf, same size
    with pytest.raises(CorruptEntry, match="do not match their checksum"):
        extract(tmp_path, split)
    _, again = extract(tmp_path, split, reextract_corrupt=True)
    assert not again.from_cache
    assert again.features.tobytes() == original.tobytes()

    # a link in the entry's place is removed itself, not what it points to
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    shutil.copytree(entry.path, outside)
    shutil.rmtree(entry.path)
    entry.path.symlink_to(outside)
    _, third = extract(tmp_path, split, reextract_corrupt=True)
    assert third.features.tobytes() == original.tobytes()
    assert entry.path.is_dir() and not entry.path.is_symlink() and (outside / "manifest.json").is_file()


# --------------------------------------------------------------------------------------------------
# Property: random corruptions are detected, or changed nothing


PRISTINE: dict[str, Path] = {}


def pristine() -> dict[str, Path]:
    """Complete entries built once: 'a' (the one corrupted), 'b' (another model, same split and shape),
    'c' (another split of another length)."""
    if not PRISTINE:
        root = Path(tempfile.mkdtemp(prefix="sslbench-pristine-"))
        saved = cache_module.CHUNK_BYTES
        cache_module.CHUNK_BYTES = SMALL_CHUNKS
        try:
            split = Rows(n=120)
            PRISTINE["a"] = extract(root / "a", split)[0].path
            PRISTINE["b"] = extract(root / "b", split, seed=1)[0].path
            PRISTINE["c"] = extract(root / "c", Rows(n=90, seed=3))[0].path
        finally:
            cache_module.CHUNK_BYTES = saved
    return PRISTINE


FILES = ("features.npy", "labels.npy", "manifest.json")

corruption = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("extend"), st.sampled_from(FILES), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.sampled_from(FILES), st.sampled_from(("b", "c"))),
    st.tuples(st.just("link_copy"), st.sampled_from(FILES)),
    st.tuples(st.just("link_other"), st.sampled_from(FILES), st.sampled_from(("b", "c"))),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("permute_labels"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("zero_features")),
    st.tuples(st.just("entry_link"), st.sampled_from(("b", "c"))),
    st.tuples(st.just("entry_file")),
)


def _apply(entry: Path, scratch: Path, op: tuple) -> None:
    kind, *args = op
    if kind == "entry_link":
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        entry.symlink_to(pristine()[args[0]])
        return
    if kind == "entry_file":
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        entry.write_bytes(b"x")
        return
    if entry.is_symlink() or not entry.is_dir():
        return  # no files to corrupt any more
    path = entry / (args[0] if kind not in ("permute_labels", "zero_features") else FILES[0])
    if kind in ("flip", "truncate", "extend") and not (path.is_file() and not path.is_symlink()):
        return
    if kind == "flip":
        data = bytearray(path.read_bytes())
        if data:
            data[int(args[1] * len(data))] ^= args[2]
            path.write_bytes(bytes(data))
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(args[1] * len(data))])
    elif kind == "extend":
        with open(path, "ab") as handle:
            handle.write(args[1])
    elif kind == "replace":
        path.unlink(missing_ok=True)
        shutil.copyfile(pristine()[args[1]] / args[0], path)
    elif kind == "link_copy":
        if path.is_file() and not path.is_symlink():
            copy = scratch / f"copy-{args[0]}"
            shutil.copyfile(path, copy)
            path.unlink()
            path.symlink_to(copy)
    elif kind == "link_other":
        path.unlink(missing_ok=True)
        path.symlink_to(pristine()[args[1]] / args[0])
    elif kind == "delete":
        path.unlink(missing_ok=True)
    elif kind == "permute_labels":
        labels_path = entry / "labels.npy"
        if labels_path.is_file() and not labels_path.is_symlink():
            try:
                labels = np.load(labels_path)
            except (ValueError, OSError, EOFError):
                return
            np.save(labels_path, np.random.default_rng(args[0]).permutation(labels))
    elif kind == "zero_features":
        features_path = entry / "features.npy"
        if features_path.is_file() and not features_path.is_symlink():
            data = features_path.read_bytes()
            features_path.write_bytes(data[:128] + bytes(len(data) - 128))


def _signature(entry: Path) -> object:
    """What reading the entry can see: its type, and each file's type and bytes."""
    if entry.is_symlink() or not entry.is_dir():
        return "not a directory"
    found = {}
    for name in FILES:
        path = entry / name
        if path.is_symlink():
            found[name] = ("link", os.readlink(path))
        elif path.is_file():
            found[name] = ("file", path.read_bytes())
        else:
            found[name] = ("missing", None)
    return found


@settings(
    derandomize=True,
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(corruption, min_size=0, max_size=3))
def test_any_corruption_is_detected_or_changed_nothing(ops):
    source = pristine()["a"]
    original = CacheEntry(source, _key_of(source), source.parent).load()
    with tempfile.TemporaryDirectory() as folder:
        root, scratch = Path(folder) / "root", Path(folder) / "scratch"
        scratch.mkdir()
        entry_path = root / source.name
        shutil.copytree(source, entry_path)
        before = _signature(entry_path)
        for op in ops:
            _apply(entry_path, scratch, op)
        changed = _signature(entry_path) != before
        entry = CacheEntry(entry_path, _key_of(source), root)
        try:
            features, labels, manifest = entry.load()
        except SSLBenchError as exc:
            assert_one_line_rm(exc, entry_path)
            assert changed, f"unchanged entry refused: {exc}"
            return
        assert not changed, f"corruption {ops} not detected"
        assert features.tobytes() == original[0].tobytes()
        assert labels.tobytes() == original[1].tobytes()
        assert manifest == original[2]


def _key_of(path: Path) -> CacheKey:
    return CacheKey(**json.loads((path / "manifest.json").read_text())["key"])


# --------------------------------------------------------------------------------------------------
# Crash safety


def _partial_entry(root: Path, split: Rows) -> CacheEntry:
    """An entry whose rows are all committed, not yet finished (as after the extraction loop)."""
    from sslbench.extract import _extract_range

    entry = FeatureCache(root).entry(key_for(split))

    class Task:
        def advance(self, n):
            pass

    with entry.locked():
        _extract_range(Linear(0), split, entry, 0, len(split), SETTINGS, "cpu", "rows/train", Task())
    return entry


EXTRA = {"batch_size": 32, "device": "cpu", "amp": False, "ranks": 1, "extract_s": 1.5, "sample_count": N}
#: The os functions a finishing entry changes files with; a crash is injected before each call in turn.
MUTATING = ("open", "pwrite", "write", "fsync", "replace", "rename", "unlink", "ftruncate", "posix_fallocate")


class Crash(BaseException):
    pass


@contextmanager
def crash_before_call(number: int, crash: Callable[[], None]) -> Iterator[list[str]]:
    """Make the ``number``-th call to one of MUTATING crash (``crash()``), recording the calls made."""
    calls: list[str] = []
    originals = {name: getattr(os, name) for name in MUTATING}

    def wrap(name):
        original = originals[name]

        def call(*args, **kwargs):
            if name == "open" and not (args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return original(*args, **kwargs)  # reading changes nothing
            calls.append(name)
            if len(calls) == number:
                crash()
            return original(*args, **kwargs)

        return call

    for name in MUTATING:
        setattr(os, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def _files(entry: CacheEntry) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.path.iterdir()) if p.name != "lock"}


def _finish_rerun(entry: CacheEntry, split: Rows) -> None:
    """What the next run does: finish the entry from what is on disk, then read it."""
    entry.finish(split.labels, EXTRA)
    entry.load()


@pytest.mark.parametrize("unreadable", [(), (3, 40, 41, 299)], ids=["no-skips", "skips"])
def test_crash_at_every_step_of_finish_then_rerun_is_bit_identical(tmp_path, monkeypatch, unreadable):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 64 * DIMS * 4)  # 5 chunks: fewer steps, the same kinds
    split = Rows(unreadable=unreadable)
    clean = _partial_entry(tmp_path / "clean", split)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(clean.path, snapshot)
    with crash_before_call(0, lambda: None) as calls:
        clean.finish(split.labels, EXTRA)
    expected = _files(clean)
    assert set(expected) == {"features.npy", "labels.npy", "manifest.json"}
    assert len(calls) >= (8 if not unreadable else 20), calls

    def raise_crash():
        raise Crash

    def die():
        os._exit(17)

    for number in range(1, len(calls) + 1):
        for how in ("raise", "exit"):
            root = tmp_path / f"{how}-{number}"
            entry = FeatureCache(root).entry(clean.key)
            shutil.copytree(snapshot, entry.path)
            if how == "raise":
                with pytest.raises(Crash), crash_before_call(number, raise_crash):
                    entry.finish(split.labels, EXTRA)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
                    pid = os.fork()
                if pid == 0:  # the child dies at the step, leaving what a killed process leaves
                    try:
                        with crash_before_call(number, die):
                            entry.finish(split.labels, EXTRA)
                    finally:
                        os._exit(0)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 17, f"call {number} not reached"
            _finish_rerun(entry, split)
            assert _files(entry) == expected, f"after a crash ({how}) before call {number}: {calls[number - 1]}"


def test_concurrent_finishes_all_succeed_and_agree(tmp_path):
    split = Rows(unreadable=(5, 6, 200))
    clean = _partial_entry(tmp_path / "clean", split)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(clean.path, snapshot)
    clean.finish(split.labels, EXTRA)
    expected = _files(clean)

    entry = FeatureCache(tmp_path / "shared").entry(clean.key)
    shutil.copytree(snapshot, entry.path)
    rows = expected_features(split).tobytes()  # torch is not used in the forked children
    children = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(32):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    entry.finish(split.labels, EXTRA)
                    features, _, _ = entry.load()
                    code = 0 if features.tobytes() == rows else 3
                finally:
                    os._exit(code)
            children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0] * 32
    assert _files(entry) == expected


def test_interrupted_extraction_resumes_its_checksums(tmp_path):
    whole = Rows(unreadable=(70,))
    _, clean = extract(tmp_path / "clean", whole)
    entry = FeatureCache(tmp_path / "cut").entry(key_for(whole))
    with pytest.raises(Stop):
        extract(tmp_path / "cut", Rows(unreadable=(70,), stop_at=150))
    progress = entry.progress()
    assert 0 < progress.committed < N and progress.chunks
    _, resumed = extract(tmp_path / "cut", whole)
    assert resumed.features.tobytes() == clean.features.tobytes()
    manifest = json.loads(entry.manifest_path.read_text())
    clean_manifest = json.loads((FeatureCache(tmp_path / "clean").entry(key_for(whole)).manifest_path).read_text())
    assert manifest["resumed_at"] == [progress.committed]
    assert manifest["features"]["chunks"] == clean_manifest["features"]["chunks"]
    assert manifest["labels"] == clean_manifest["labels"]


def test_symlinked_partial_features_are_never_written_through(tmp_path):
    split = Rows()
    entry = FeatureCache(tmp_path / "cache").entry(key_for(split))
    with pytest.raises(Stop):
        extract(tmp_path / "cache", Rows(stop_at=200))
    outside = tmp_path / "outside.npy"
    shutil.copyfile(entry.features_path, outside)
    before = outside.read_bytes()
    entry.features_path.unlink()
    entry.features_path.symlink_to(outside)
    with pytest.raises(CorruptEntry, match=r"partial features\.npy cannot be opened") as caught:
        extract(tmp_path / "cache", split)
    assert_one_line_rm(caught.value, entry.path)
    _, got = extract(tmp_path / "cache", split, reextract_corrupt=True)
    np.testing.assert_array_equal(got.features, expected_features(split))
    assert outside.read_bytes() == before and not entry.features_path.is_symlink()


# --------------------------------------------------------------------------------------------------
# A full disk


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_no_room_for_the_features_fails_at_once_in_one_line(tmp_path, monkeypatch):
    split = Rows()
    monkeypatch.setattr(os, "posix_fallocate", _raise(errno.ENOSPC))
    with pytest.raises(SSLBenchError) as caught:
        extract(tmp_path, split)
    message = str(caught.value)
    assert "\n" not in message and "features.npy" in message
    assert "needs 9.7 kB" in message and " free" in message  # 128-byte header + 300 × 8 float32
    entry = FeatureCache(tmp_path).entry(key_for(split))
    assert not entry.features_path.exists()  # nothing half-reserved left behind


def test_filesystem_without_fallocate_checks_the_free_space(tmp_path, monkeypatch):
    split = Rows()
    monkeypatch.setattr(os, "posix_fallocate", _raise(errno.EOPNOTSUPP))
    _, got = extract(tmp_path / "ok", split)  # falls back to a sparse file
    np.testing.assert_array_equal(got.features, expected_features(split))

    real = os.statvfs

    def nearly_full(path):
        info = real(path)
        return os.statvfs_result((*info[:4], 1, *info[5:]))  # f_bavail: one block

    monkeypatch.setattr(os, "statvfs", nearly_full)
    with pytest.raises(SSLBenchError, match=r"needs 9\.7 kB, \d+(\.\d)? (B|kB) free") as caught:
        extract(tmp_path / "full", split)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_errors_are_one_line_and_a_rerun_completes(tmp_path, monkeypatch, code):
    split = Rows()
    real = os.pwrite
    calls = []

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(SSLBenchError) as caught:
        extract(tmp_path, split)
    message = str(caught.value)
    assert "\n" not in message and "features.npy" in message and os.strerror(code) in message
    monkeypatch.setattr(os, "pwrite", real)
    _, got = extract(tmp_path, split)
    np.testing.assert_array_equal(got.features, expected_features(split))


# --------------------------------------------------------------------------------------------------
# cache ls / cache rm


def _two_entries(root: Path) -> tuple[Path, Path]:
    a, _ = extract(root, Rows(n=40))
    b, _ = extract(root, Rows(n=50, seed=2))
    return a.path, b.path


def test_cache_rm_patterns_are_exact_or_globs_and_refuse_everything(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    a, b = _two_entries(cache.root)
    for patterns, message in [
        ([""], "empty pattern"),
        (["_"], "matches '_'"),
        (["*"], "use --all"),
        (["linear__*"], "use --all"),
        ([], "or --all"),
        (["nothing"], "no cache entry"),
    ]:
        with pytest.raises(SSLBenchError, match=message):
            cache.remove(patterns)
    with pytest.raises(SSLBenchError, match="not both"):
        cache.remove(["*"], everything=True)
    assert a.is_dir() and b.is_dir()
    assert cache.remove([a.name]) == [a]
    assert cache.remove(["linear__*"]) == [b]  # every entry, but only one is left: allowed
    _two_entries(cache.root)
    assert len(cache.remove([], everything=True)) == 2 and not list(cache.root.iterdir())


def test_cache_rm_removes_links_not_their_targets(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    a, b = _two_entries(cache.root)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    link = cache.root / "link-to-elsewhere"
    link.symlink_to(outside)
    (b / "features.npy").unlink()
    (b / "features.npy").symlink_to(outside / "precious")
    assert cache.remove(["link-*"]) == [link]
    assert cache.remove([b.name]) == [b]
    assert (outside / "precious").read_text() == "keep me" and a.is_dir()


def test_cache_cli_lists_broken_entries_and_removes_them(tmp_path, capsys):
    from sslbench.cli import main

    root = tmp_path / "cache"
    a, b = _two_entries(root)
    (a / "manifest.json").write_text('{"complete": true}')
    (root / "a-file").write_text("x")
    partial = root / "partial"
    partial.mkdir()
    assert main(["cache", "ls", "--dir", str(root)]) == 0
    listing = capsys.readouterr().out
    lines = {line.split()[1]: line for line in listing.splitlines() if line.startswith("│")}
    assert "broken (its manifest.json has no checksums" in lines[a.name]
    assert "complete" in lines[b.name] and "50 × 8" in lines[b.name]
    assert "broken (not a directory)" in lines["a-file"] and "partial (resumable)" in lines["partial"]
    assert main(["cache", "--dir", str(root), "rm", "*"]) == 2
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1 and "--all" in refused
    assert main(["cache", "rm", a.name, "a-file", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.count("removed") == 2
    assert sorted(p.name for p in root.iterdir()) == sorted([b.name, "partial"])


DIGITS_SPEC = """\
models:
  - id: random_cnn
    options: {{image_size: 16, width: 4}}
datasets:
  - id: digits
protocol: {{k: 10, epochs: 1, seeds: 1}}
extraction: {{batch_size: 256, workers: 0}}
cache_dir: {cache}
device: cpu
"""


def test_run_with_features_altered_in_place_exits_2_in_one_line(tmp_path, plugins):
    from sslbench.runner import extract_spec
    from sslbench.spec import load_spec, resolve_spec

    cache = tmp_path / "cache"
    (tmp_path / "spec.yaml").write_text(DIGITS_SPEC.format(cache=cache))
    for _ in extract_spec(resolve_spec(load_spec(tmp_path / "spec.yaml"), plugins), plugins, device="cpu"):
        pass  # the features `sslbench run` would extract, in this process
    train = next(p for p in cache.iterdir() if "__train__" in p.name)
    features = train / "features.npy"
    size = features.stat().st_size
    with open(features, "r+b") as handle:  # same size, other numbers
        handle.seek(size // 2)
        value = np.frombuffer(handle.read(4), dtype=np.float32)
        handle.seek(size // 2)
        handle.write((value + 1).astype(np.float32).tobytes())
    second = run_cli("run", "spec.yaml", "--out", "b", cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sslbench: error: feature cache entry {train} is broken: rows ")
    assert f"`sslbench cache rm {train.name} --dir {cache}`" in last
    assert "Traceback" not in second.stderr and not (tmp_path / "b" / "results.json").exists()
    assert stat.S_ISREG(features.lstat().st_mode)
