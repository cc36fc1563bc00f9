"""Extraction: the cache, resuming after kill -9, sharded torchrun extraction, unreadable images."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslbench.cache import FeatureCache
from sslbench.extract import batch_shards

from conftest import run_cli, run_torchrun

HELPERS = Path(__file__).with_name("helpers")


def test_batch_shards_cover_every_row_once_on_batch_boundaries():
    for n, batch, world in [(1348, 16, 2), (1000, 256, 3), (10, 4, 4), (5, 8, 3)]:
        shards = batch_shards(n, batch, world)
        assert len(shards) == world
        rows = [i for start, stop in shards for i in range(start, stop)]
        assert rows == list(range(n))  # no duplicates, no padding, in order
        assert all(start % batch == 0 for start, stop in shards if stop > start)


DIGITS_SPEC = """\
models:
  - id: random_cnn
    options: {{image_size: 16, width: 4}}
datasets:
  - id: digits
protocol: {{k: {k}, epochs: 2, seeds: 1}}
extraction: {{batch_size: 64, workers: 0, commit_every: 1}}
cache_dir: {cache}
device: cpu
"""


@pytest.mark.slow
def test_second_run_reuses_the_cache_and_cache_commands(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "a.yaml").write_text(DIGITS_SPEC.format(k=10, cache=cache))
    (tmp_path / "b.yaml").write_text(DIGITS_SPEC.format(k=15, cache=cache))
    first = run_cli("run", "a.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "features extracted" in first.stderr
    entries = FeatureCache(cache).entries()
    assert len(entries) == 2 and all(m and m["complete"] for _, m in entries)  # train and val
    stamps = {p: (p / "features.npy").stat().st_mtime_ns for p, _ in entries}

    second = run_cli("run", "b.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "features from the cache" in second.stderr
    assert stamps == {p: (p / "features.npy").stat().st_mtime_ns for p, _ in FeatureCache(cache).entries()}

    listing = run_cli("cache", "--dir", str(cache), "ls", cwd=tmp_path)
    assert listing.returncode == 0 and "random_cnn" in listing.stdout and "1348 × 64" in listing.stdout
    removed = run_cli("cache", "--dir", str(cache), "rm", "*__val__*", cwd=tmp_path)
    assert removed.returncode == 0 and removed.stdout.count("removed") == 1
    assert len(FeatureCache(cache).entries()) == 1
    missing = run_cli("cache", "--dir", str(cache), "rm", "nothing-like-this", cwd=tmp_path)
    assert missing.returncode == 2 and "no cache entry" in missing.stderr


def _train_entry(cache: Path) -> Path:
    return next(p for p in cache.iterdir() if "__train__" in p.name)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path):
    interrupted, clean = tmp_path / "interrupted", tmp_path / "clean"
    (tmp_path / "a.yaml").write_text(DIGITS_SPEC.format(k=10, cache=interrupted))
    (tmp_path / "b.yaml").write_text(DIGITS_SPEC.format(k=10, cache=clean))
    worker = [sys.executable, str(HELPERS / "slow_extract.py")]

    proc = subprocess.Popen([*worker, "a.yaml", "0.15"], cwd=tmp_path)
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and committed < 5 * 64:
        time.sleep(0.1)
        progress = next(interrupted.glob("*__train__*/progress.json"), None) if interrupted.exists() else None
        if progress is not None:
            with contextlib.suppress(json.JSONDecodeError, FileNotFoundError):
                committed = json.loads(progress.read_text())["committed"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < committed < 1348, committed
    assert not next(interrupted.glob("*__train__*/manifest.json"), None)  # not complete

    resumed = subprocess.run([*worker, "a.yaml", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*worker, "b.yaml", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    manifest = json.loads((_train_entry(interrupted) / "manifest.json").read_text())
    assert manifest["resumed_at"] and manifest["resumed_at"][0] >= committed
    a = np.load(_train_entry(interrupted) / "features.npy")
    b = np.load(_train_entry(clean) / "features.npy")
    assert a.shape == b.shape == (1348, 64)
    assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_torchrun_extraction_is_bit_identical_to_one_process(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}  # the same numeric settings in both runs
    (tmp_path / "one.yaml").write_text(DIGITS_SPEC.format(k=10, cache=tmp_path / "one"))
    (tmp_path / "two.yaml").write_text(DIGITS_SPEC.format(k=10, cache=tmp_path / "two"))
    single = run_cli("extract", "one.yaml", cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr
    proc = run_torchrun("-m", "sslbench", "extract", "two.yaml", cwd=tmp_path, port=29633, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("__train__", "__val__"):
        one = next(p for p in (tmp_path / "one").iterdir() if split in p.name)
        two = next(p for p in (tmp_path / "two").iterdir() if split in p.name)
        assert json.loads((two / "manifest.json").read_text())["ranks"] == 2
        assert not list(two.glob("shard-*"))  # rank 0 assembled and removed the shards
        assert (one / "features.npy").read_bytes() == (two / "features.npy").read_bytes()
        assert (one / "labels.npy").read_bytes() == (two / "labels.npy").read_bytes()


def _image_tree(root: Path, corrupt: bool) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for c, name in enumerate(("n01", "n02", "n03")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(60 + 60 * c, 20, size=(20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    if corrupt:
        (root / "train" / "n02" / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


IMAGEFOLDER_SPEC = """\
models:
  - id: random_cnn
    options: {{image_size: 16, width: 4}}
datasets:
  - id: imagefolder
    options: {{root: {root}}}
protocol: {{epochs: 3, seeds: 2}}
extraction: {{batch_size: 8, workers: {workers}, on_error: {on_error}}}
device: cpu
"""


@pytest.mark.slow
def test_imagefolder_runs_with_workers(tmp_path):
    _image_tree(tmp_path / "data", corrupt=False)
    (tmp_path / "spec.yaml").write_text(IMAGEFOLDER_SPEC.format(root=tmp_path / "data", workers=2, on_error="fail"))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["runs"][0]["n_train"] == 36 and data["runs"][0]["n_eval"] == 12
    assert data["runs"][0]["protocol"]["n_classes"] == 3
    assert data["skipped"] == []


@pytest.mark.slow
def test_unreadable_image_fails_naming_it(tmp_path):
    _image_tree(tmp_path / "data", corrupt=True)
    (tmp_path / "spec.yaml").write_text(IMAGEFOLDER_SPEC.format(root=tmp_path / "data", workers=0, on_error="fail"))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sslbench: error: imagefolder/train (random_cnn): cannot read ")
    assert "n02/img03.png" in last and "on_error: skip" in last and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unreadable_image_skipped_and_listed(tmp_path):
    _image_tree(tmp_path / "data", corrupt=True)
    (tmp_path / "spec.yaml").write_text(IMAGEFOLDER_SPEC.format(root=tmp_path / "data", workers=0, on_error="skip"))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["runs"][0]["n_train"] == 35  # the unreadable image is left out
    assert len(data["skipped"]) == 1
    skipped = data["skipped"][0]
    assert skipped["split"] == "train" and skipped["sample"].endswith("n02/img03.png")
    assert "1 unreadable sample(s) skipped" in proc.stderr


@pytest.mark.slow
def test_prepare_imagenet_val_sorts_the_flat_folder(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, 5):
        Image.new("RGB", (4, 4)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        + "".join(f"ILSVRC2012_val_{i:08d},{'n01440764' if i % 2 else 'n01443537'} 1 2 3 4\n" for i in range(1, 5))
    )
    proc = run_cli("prepare-imagenet-val", str(val), str(csv), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (val / "n01440764").iterdir()) == [
        "ILSVRC2012_val_00000001.JPEG",
        "ILSVRC2012_val_00000003.JPEG",
    ]
    assert len(list((val / "n01443537").iterdir())) == 2

    truth, synsets = tmp_path / "truth.txt", tmp_path / "synsets.txt"
    val2 = tmp_path / "val2"
    val2.mkdir()
    for i in range(1, 4):
        Image.new("RGB", (4, 4)).save(val2 / f"ILSVRC2012_val_{i:08d}.JPEG")
    truth.write_text("2\n1\n2\n")
    synsets.write_text("n01440764\nn01443537\n")
    proc = run_cli("prepare-imagenet-val", str(val2), str(truth), "--synsets", str(synsets), "--link", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((val2 / "n01443537").iterdir())) == 2 and (val2 / "n01440764").is_dir()
    proc = run_cli("prepare-imagenet-val", str(tmp_path / "nope"), str(truth), cwd=tmp_path)
    assert proc.returncode == 2 and "val folder not found" in proc.stderr


@pytest.mark.slow
def test_objectnet_mapping_is_recorded(tmp_path):
    from sslbench_plugins.image_datasets import ObjectNetOptions, load_objectnet

    root = tmp_path / "objectnet-1.0"
    for folder in ("air_freshener", "banana", "beer_bottle"):
        (root / "images" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "images" / folder / "a.png")
    (root / "mappings").mkdir()
    (root / "mappings" / "folder_to_objectnet_label.json").write_text(
        json.dumps({"air_freshener": "Air freshener", "banana": "Banana", "beer_bottle": "Beer bottle"})
    )
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Banana": "banana", "Beer bottle": "beer bottle; wine bottle"})
    )
    (root / "mappings" / "imagenet_to_label_2012_v2").write_text("tench\nbanana\nbeer bottle\nwine bottle\n")
    dataset = load_objectnet(ObjectNetOptions(root=str(root)))
    assert list(dataset.classes) == ["Air freshener", "Banana", "Beer bottle"]
    assert dataset.metadata["imagenet_classes"] == [[], [1], [2, 3]]  # two ImageNet classes onto one
    assert dataset.metadata["in_imagenet"] == [False, True, True]
    assert len(dataset.splits["test"]) == 3


@pytest.mark.slow
def test_missing_dataset_files_say_how_to_get_them(tmp_path):
    for spec, expected in [
        ("{id: cifar10, options: {root: nowhere}}", "cifar10 not found under nowhere"),
        ("{id: fashion_mnist, options: {root: nowhere}}", "apt-get install dataset-fashion-mnist"),
        ("{id: imagefolder, options: {root: nowhere}}", "image folder root not found: nowhere"),
        ("{id: objectnet, options: {root: nowhere}}", "ObjectNet root not found: nowhere"),
    ]:
        (tmp_path / "s.yaml").write_text(f"models: [{{id: raw}}]\ndatasets: [{spec}]\ndevice: cpu\n")
        proc = run_cli("run", "s.yaml", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr.strip().splitlines()[-1]


def test_idx_reader_rejects_truncated_files(tmp_path):
    from sslbench.errors import SSLBenchError
    from sslbench_plugins.image_datasets import read_idx

    header = bytes([0, 0, 0x08, 3]) + (4).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    (tmp_path / "ok-idx3-ubyte").write_bytes(header + bytes(range(16)))
    assert read_idx(tmp_path / "ok-idx3-ubyte").shape == (4, 2, 2)
    (tmp_path / "short-idx3-ubyte").write_bytes(header + bytes(10))
    with pytest.raises(SSLBenchError, match="truncated IDX file"):
        read_idx(tmp_path / "short-idx3-ubyte")


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION.is_dir() and os.environ.get("SSLBENCH_REQUIRE_FASHION_MNIST") != "1",
    reason="apt-get install dataset-fashion-mnist (CI does)",
)
def test_real_fashion_mnist_through_a_real_backbone(tmp_path):
    """A few hundred real images at small resolution: extraction, cache and the protocol."""
    spec = """\
models:
  - id: random_cnn
    options: {image_size: 16, width: 8}
  - id: raw
datasets:
  - id: fashion_mnist
    options: {limit: 400}
    eval_split: test
protocol: {epochs: 10, seeds: 2}
extraction: {batch_size: 100, workers: 2}
device: cpu
"""
    (tmp_path / "spec.yaml").write_text(spec)
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    by_model = {row["model"]: row for row in data["summary"]}
    assert by_model["random_cnn"]["protocol"]["n_classes"] == 10
    assert data["runs"][0]["n_train"] == 400 and data["runs"][0]["n_eval"] == 400
    # real clothing images cluster far above chance (10 %) with either representation
    assert by_model["raw"]["metrics"]["acc"]["mean"] > 0.3
    assert by_model["random_cnn"]["metrics"]["nmi"]["mean"] > 0.2
