"""A second run of a cached spec rescans nothing: weights digests come from the digest cache, and image
folders are listed and fingerprinted without a ``stat`` per image."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sslbench import weights
from sslbench.cache import default_cache_root
from sslbench.cards import Layout, WeightsHash
from sslbench.errors import SSLBenchError
from sslbench.imagenet_val import IMAGE_EXTENSIONS
from sslbench_plugins import image_datasets
from sslbench_plugins.image_datasets import FileSplit, ImageFolderOptions, load_image_folder

# --------------------------------------------------------------------------------------------------
# Weights digests


@pytest.fixture()
def digests_json(tmp_path, monkeypatch) -> Path:
    """A private cache root; returns where the digest cache must live."""
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache" / "features"))
    return tmp_path / "cache" / "digests.json"


@pytest.fixture()
def weights_file(tmp_path) -> Path:
    # Larger than one read block, so that hashing really runs over several blocks.
    data = np.random.default_rng(0).integers(0, 256, size=(5 << 20) // 2, dtype=np.uint8).tobytes()
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    return path


class Reads:
    """Counts how often the weights file is opened (by any code) and how often ``hash_file`` runs."""

    def __init__(self, target: Path) -> None:
        self.target = target.resolve()
        self.opens = 0
        self.hashes: list[tuple[str, ...]] = []

    def opened(self, file: object) -> None:
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == self.target:
            self.opens += 1


@pytest.fixture()
def reads(weights_file, monkeypatch) -> Reads:
    counter = Reads(weights_file)
    real_open, real_hash = builtins.open, weights.hash_file

    def counting_open(file, *args, **kwargs):
        counter.opened(file)
        return real_open(file, *args, **kwargs)

    def counting_hash(path, kinds=("sha256",)):
        kinds = tuple(kinds)
        counter.hashes.append(kinds)
        return real_hash(path, kinds)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(weights, "hash_file", counting_hash)
    return counter


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def verify(path: Path, expected: WeightsHash) -> str:
    """A local file checked against ``expected`` as a card's weights are."""
    return weights.verify_weights(weights.LocalWeights(path, "file", Layout(), expected), "test.card")


def test_digest_cache_lives_beside_the_feature_cache(digests_json):
    assert weights.digest_cache_path() == default_cache_root().parent / "digests.json" == digests_json


def test_weights_file_is_hashed_once_then_taken_from_the_cache(weights_file, digests_json, reads):
    expected = sha256_of(weights_file)
    reads.opens = 0  # sha256_of read it itself
    assert weights.file_digest(weights_file) == expected
    assert (reads.opens, reads.hashes) == (1, [("sha256",)])
    assert digests_json.is_file()

    card_hash = WeightsHash(kind="sha256", value=expected)
    for _ in range(3):
        assert weights.file_digest(weights_file) == expected
        assert verify(weights_file, card_hash) == expected
        assert verify(weights_file, WeightsHash(kind="none")) == expected
    assert (reads.opens, len(reads.hashes)) == (1, 1)

    # Another process (a fresh read of the cache file) trusts the entry too.
    entry = json.loads(digests_json.read_text())["files"][str(weights_file.resolve())]
    assert entry["sha256"] == expected
    assert (entry["size"], entry["mtime_ns"]) == (weights_file.stat().st_size, weights_file.stat().st_mtime_ns)


def test_entries_of_deleted_files_are_dropped_when_the_cache_is_written(tmp_path, digests_json):
    """digests.json holds the weights on this machine, not every path ever hashed."""
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    weights.file_digest(first)
    first.unlink()
    weights.file_digest(second)
    assert list(json.loads(digests_json.read_text())["files"]) == [str(second.resolve())]


def test_a_link_to_the_file_shares_its_entry(weights_file, digests_json, reads, tmp_path):
    link = tmp_path / "link.pth"
    link.symlink_to(weights_file)
    assert weights.file_digest(weights_file) == weights.file_digest(link)
    assert len(reads.hashes) == 1


def test_new_mtime_or_size_means_hashing_again(weights_file, digests_json, reads):
    first = weights.file_digest(weights_file)
    stat = weights_file.stat()

    # Same bytes, new modification time: not trusted, hashed again (to the same digest).
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weights.file_digest(weights_file) == first
    assert len(reads.hashes) == 2
    assert weights.file_digest(weights_file) == first
    assert len(reads.hashes) == 2

    # Different size with the modification time put back: hashed again, to the new content's digest.
    with open(weights_file, "ab") as handle:
        handle.write(b"one more byte")
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    reads.opens = 0
    expected = sha256_of(weights_file)
    assert weights.file_digest(weights_file) == expected != first
    assert len(reads.hashes) == 3


@pytest.mark.parametrize(
    "damage",
    [
        b"{not json",
        b"\xff\xfe\x00 not utf-8",
        b"",
        b"[1, 2, 3]",
        b'{"version": 999, "files": {}}',
        b'{"version": 1, "files": []}',
    ],
    ids=["bad-json", "bad-utf8", "empty", "a-list", "other-version", "files-not-a-dict"],
)
def test_damaged_digest_cache_is_ignored_and_rebuilt(weights_file, digests_json, reads, damage):
    digests_json.parent.mkdir(parents=True)
    digests_json.write_bytes(damage)
    assert weights.file_digest(weights_file) == sha256_of(weights_file)
    assert len(reads.hashes) == 1
    assert json.loads(digests_json.read_text())["files"][str(weights_file.resolve())]["sha256"]
    weights.file_digest(weights_file)
    assert len(reads.hashes) == 1


def test_damaged_entry_is_not_trusted(weights_file, digests_json, reads):
    expected = sha256_of(weights_file)
    weights.file_digest(weights_file)
    data = json.loads(digests_json.read_text())
    entry = data["files"][str(weights_file.resolve())]
    for bad in ("not-a-digest", "0" * 63, 12345, None):
        entry["sha256"] = bad
        digests_json.write_text(json.dumps(data))
        assert weights.file_digest(weights_file) == expected
    entry["sha256"], entry["size"] = "0" * 64, "big"
    digests_json.write_text(json.dumps(data))
    assert weights.file_digest(weights_file) == expected
    assert len(reads.hashes) == 6


def test_unwritable_cache_costs_a_rehash_not_the_run(weights_file, tmp_path, monkeypatch, reads):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root cannot be made under a file")
    monkeypatch.setenv("SSLBENCH_CACHE", str(blocker / "features"))
    expected = sha256_of(weights_file)
    assert weights.file_digest(weights_file) == expected
    assert weights.file_digest(weights_file) == expected
    assert len(reads.hashes) == 2


def test_md5_card_is_checked_with_one_read(weights_file, digests_json, reads):
    sha256, md5 = sha256_of(weights_file), md5_of(weights_file)
    reads.opens = 0
    card_hash = WeightsHash(kind="md5-prefix", value=md5[:8])
    assert verify(weights_file, card_hash) == sha256
    assert reads.opens == 1
    assert sorted(reads.hashes[0]) == ["md5", "sha256"]
    assert verify(weights_file, card_hash) == sha256
    assert weights.file_digests(weights_file, ("md5", "sha256")) == {"md5": md5, "sha256": sha256}
    assert (reads.opens, len(reads.hashes)) == (1, 1)


def test_missing_kind_is_added_to_the_entry_in_one_more_read(weights_file, digests_json, reads):
    md5 = md5_of(weights_file)
    weights.file_digest(weights_file)
    assert verify(weights_file, WeightsHash(kind="md5-prefix", value=md5[:10]))
    assert reads.hashes == [("sha256",), ("md5",)]
    assert weights.file_digest(weights_file, "md5") == md5
    assert weights.file_digest(weights_file) == sha256_of(weights_file)
    assert len(reads.hashes) == 2


def test_wrong_hash_is_an_error_also_from_the_cache(weights_file, digests_json, reads):
    md5 = md5_of(weights_file)
    wrong = WeightsHash(kind="md5-prefix", value=("0" if md5[0] != "0" else "1") + md5[1:8])  # one digit off
    for _ in range(2):
        with pytest.raises(SSLBenchError, match=r"does not match test\.card's md5-prefix"):
            verify(weights_file, wrong)
    with pytest.raises(SSLBenchError, match="does not match"):
        verify(weights_file, WeightsHash(kind="sha256", value="f" * 64))
    assert len(reads.hashes) == 1


# --------------------------------------------------------------------------------------------------
# Image folders


def make_tree(root: Path, links: bool = True) -> None:
    """root/{train,val}/<class>/… with nesting, other files, odd names and (optionally) symlinks."""
    names = [
        "a.jpg",
        "B.JPG",
        "c.Jpeg",
        "d.png",
        "e.WebP",
        "f.tiff",
        "g.ppm",
        "notes.txt",
        "no_extension",
        "archive.jpg.gz",
        ".hidden.jpg",
        ".jpg",
        "trailing.jpg.",
        "sub/h.jpg",
        "sub/I.PNG",
        "sub/deeper/j.bmp",
        "sub/deeper/readme.md",
        "folder.jpg/k.jpg",
        "space name/l m.jpeg",
        ".hidden_dir/n.jpg",
    ]
    for split, classes in (("train", ["dog", "cat", "Zebra", "empty"]), ("val", ["cat", "dog", "yak"])):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            if cls == "empty":
                continue
            for name in names:
                path = root / split / cls / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{split}/{cls}/{name}".encode())
    (root / "train" / "stray.jpg").write_bytes(b"a file beside the class folders")
    if links:
        outside = root / "outside"
        (outside / "more").mkdir(parents=True)
        (outside / "more" / "o.jpg").write_bytes(b"o")
        (outside / "p.jpg").write_bytes(b"p")
        cat = root / "train" / "cat"
        (cat / "linked.jpg").symlink_to(outside / "p.jpg")
        (cat / "dangling.jpg").symlink_to(outside / "gone.jpg")
        (cat / "loop.jpg").symlink_to(cat / "loop.jpg")
        (cat / "linked_dir").symlink_to(outside / "more")  # rglob does not descend into it
        (root / "train" / "linked_class").symlink_to(outside)  # a class folder that is a link is one
        (root / "val" / "linked_class").symlink_to(outside / "more")


def reference_image_files(folder: Path) -> list[str]:
    """The listing as it was: rglob, suffix, is_file."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def reference_image_folder(root: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    folders = {split: root / split for split in ("train", "val")}
    classes = sorted({c.name for folder in folders.values() for c in folder.iterdir() if c.is_dir()})
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split, folder in folders.items():
        files, labels = [], []
        for cls in sorted(c for c in folder.iterdir() if c.is_dir()):
            for file in reference_image_files(cls):
                files.append(f"{cls.name}/{file}")
                labels.append(index[cls.name])
        splits[split] = (files, labels)
    return classes, splits


@pytest.mark.parametrize("links", [True, False], ids=["with-links", "plain"])
def test_listing_equals_the_rglob_reference(tmp_path, links):
    make_tree(tmp_path, links)
    for folder in [tmp_path / "train", tmp_path / "train" / "cat", tmp_path / "val" / "dog", tmp_path / "nowhere"]:
        assert image_datasets._image_files(folder) == reference_image_files(folder)
    classes, expected = reference_image_folder(tmp_path)
    dataset = load_image_folder(ImageFolderOptions(root=str(tmp_path)))
    assert list(dataset.classes) == classes
    for split, (files, labels) in expected.items():
        listed = dataset.splits[split]
        assert isinstance(listed, FileSplit)
        assert listed.files == files
        assert listed.labels.tolist() == labels
    names = set(dataset.splits["train"].files)
    assert {"cat/sub/deeper/j.bmp", "cat/B.JPG", "cat/folder.jpg/k.jpg", "cat/.hidden.jpg"} <= names
    assert not names & {"cat/notes.txt", "cat/.jpg", "cat/trailing.jpg.", "cat/archive.jpg.gz"}
    if links:
        assert "cat/linked.jpg" in names and "cat/dangling.jpg" not in names and "cat/loop.jpg" not in names
        assert "linked_class/more/o.jpg" in names and not any(n.startswith("cat/linked_dir") for n in names)


class StatCalls:
    """Every ``os.stat``/``os.lstat`` call: pathlib's ``stat``, ``is_file``, ``is_dir`` … all go through them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        for name in ("stat", "lstat"):
            real = getattr(os, name)

            def counting(path, *args, _real=real, **kwargs):
                if isinstance(path, (str, bytes, os.PathLike)):
                    self.paths.append(Path(os.fsdecode(path)))
                return _real(path, *args, **kwargs)

            monkeypatch.setattr(os, name, counting)

    def take(self) -> list[Path]:
        """The paths stat'ed so far (and forget them)."""
        taken, self.paths = self.paths, []
        return taken


def test_listing_and_fingerprint_stat_no_image(tmp_path, monkeypatch):
    make_tree(tmp_path, links=False)
    calls = StatCalls(monkeypatch)
    # The counter does see pathlib's calls: the old listing's is_file() stats every image.
    reference = reference_image_files(tmp_path / "train" / "cat")
    assert len(reference) == 14
    assert {tmp_path / "train" / "cat" / name for name in reference} <= set(calls.take())

    dataset = load_image_folder(ImageFolderOptions(root=str(tmp_path)))
    for split in dataset.splits.values():
        split.fingerprint()
        split.fingerprint()
    # Only the root and the split folders are checked with is_dir(): no class folder, no image.
    assert set(calls.take()) <= {tmp_path, tmp_path / "train", tmp_path / "val"}
    assert len(dataset.splits["train"]) == 3 * 14


def test_fingerprint_is_memoised_and_covers_names_and_labels_only(tmp_path):
    make_tree(tmp_path, links=False)
    split = load_image_folder(ImageFolderOptions(root=str(tmp_path))).splits["val"]
    first = split.fingerprint()
    assert split.fingerprint() is first
    expected = hashlib.sha256()
    for name, label in zip(split.files, split.labels.tolist(), strict=True):
        expected.update(f"{name}\0{label}\n".encode())
    assert first == expected.hexdigest()

    # The documented trade: a file rewritten in place under its name is not seen …
    (tmp_path / "val" / "cat" / "a.jpg").write_bytes(b"other, longer content than before")
    assert load_image_folder(ImageFolderOptions(root=str(tmp_path))).splits["val"].fingerprint() == first
    # … while a changed file list is, and so are changed labels.
    (tmp_path / "val" / "cat" / "new.jpg").write_bytes(b"new")
    assert load_image_folder(ImageFolderOptions(root=str(tmp_path))).splits["val"].fingerprint() != first
    relabelled = FileSplit(split.root, split.files, np.roll(split.labels, 1))
    assert relabelled.fingerprint() != first
    # The root is not part of it: a dataset moved elsewhere keeps its cached features.
    assert FileSplit(tmp_path / "elsewhere", split.files, split.labels).fingerprint() == first
