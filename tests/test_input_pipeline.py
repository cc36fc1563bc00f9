"""Extraction's input side: decode workers and compute threads sized together on the CPU (the logic,
not timings), and ``extraction.decode: reduced`` (JPEG DCT scaling) on real files, with its feature
cosine to the exact decode reported and its features cached apart from exact ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sslbench.extract as extract
from sslbench.cache import CacheKey, FeatureCache, key_digest
from sslbench.errors import PluginFailure
from sslbench.extract import (
    ExtractionSettings,
    compute_threads,
    extract_split,
    extraction_pool,
    pool_rate,
    usable_cores,
)
from sslbench.interfaces import Backbone, Split
from sslbench.spec import parse_spec

# --------------------------------------------------------------------------------------------------
# Workers and threads


def test_cpu_extraction_shares_the_cores_between_workers_and_threads():
    # (workers asked, cores this process may use, torch's threads) → (workers, threads)
    cases = {
        (4, 2, 2): (1, 1),  # the default on a 2-core machine: one decodes, one computes
        (4, 16, 16): (4, 12),
        (8, 4, 4): (3, 1),
        (0, 8, 8): (0, 8),
        (4, 1, 1): (0, 1),  # one core: decode in the main process
        (2, 8, 3): (2, 3),  # a thread limit the user set stays
        (16, 16, 64): (15, 1),
    }
    for (workers, cores, threads), expected in cases.items():
        got = extraction_pool(workers, "cpu", cores=cores, threads=threads)
        assert got == expected, (workers, cores, threads)
        assert got[0] + got[1] <= max(cores, 1) or cores == 1


def test_measured_costs_choose_the_workers():
    """Decode 3 ms, forward 15 ms (a MobileNetV2 on one core) or 100 ms (a ResNet-50): few cores keep
    computing and decode between batches; many cores decode beside the forward, as many as it needs."""
    mobilenet, resnet = (0.003, 0.015), (0.003, 0.100)
    assert extraction_pool(2, "cpu", cores=2, threads=2, costs=mobilenet) == (0, 2)
    assert extraction_pool(4, "cpu", cores=4, threads=4, costs=mobilenet) == (1, 3)
    assert extraction_pool(4, "cpu", cores=16, threads=16, costs=mobilenet) == (3, 13)
    assert extraction_pool(8, "cpu", cores=16, threads=16, costs=mobilenet) == (3, 13)
    assert extraction_pool(4, "cpu", cores=4, threads=4, costs=resnet) == (0, 4)
    assert extraction_pool(4, "cpu", cores=8, threads=8, costs=resnet) == (1, 7)
    assert extraction_pool(4, "cpu", cores=16, threads=16, costs=(0.01, 0.001)) == (4, 12)  # decode-bound
    assert extraction_pool(0, "cpu", cores=16, threads=16, costs=mobilenet) == (0, 16)  # never more than asked
    assert extraction_pool(4, "cuda", cores=2, threads=2, costs=mobilenet) == (4, None)
    # The model behind the choice: the slower side sets the pace; no worker means decoding in turn.
    assert pool_rate(0, 4, 0.003, 0.015) == pytest.approx(1 / (0.003 + 0.015 / 4))
    assert pool_rate(2, 4, 0.003, 0.015) == pytest.approx(min(2 / 0.003, 2 / 0.015))


def test_a_gpu_run_keeps_its_workers_and_threads():
    assert extraction_pool(8, "cuda", cores=2, threads=2) == (8, None)
    assert extraction_pool(4, "cuda:1", cores=64, threads=64) == (4, None)
    assert extraction_pool(3, "mps", cores=8, threads=8) == (3, None)


def test_usable_cores_is_the_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    assert usable_cores() == 3
    assert extraction_pool(4, "cpu", threads=64) == (2, 1)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == (os.cpu_count() or 1)


def test_compute_threads_are_restored():
    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), compute_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == before
    with compute_threads(None):
        assert torch.get_num_threads() == before


class _Pixels(Split):
    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def labels(self) -> np.ndarray:
        return np.zeros(self.n, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        return np.full((4, 4, 3), index, dtype=np.uint8)


class _ThreadProbe(Backbone):
    """Features: the BLAS threads where preprocess ran (a worker), torch's threads where embed ran."""

    feature_dim = 2

    def preprocess(self, sample):
        from threadpoolctl import threadpool_info

        blas = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1)
        return torch.tensor([float(blas), float(os.getpid())], dtype=torch.float64)

    def embed(self, batch):
        out = batch.clone().float()
        out[:, 1] = torch.get_num_threads()
        return out


def _entry(tmp_path: Path, name: str, decode: str = "exact"):
    key = CacheKey(name, {"name": "test"}, {}, {}, "probe", {}, "train", name, decode=decode)
    return FeatureCache(tmp_path / "cache").entry(key)


def test_cpu_extraction_runs_with_the_sized_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(extract, "usable_cores", lambda: 3)
    measured, real = [], extract.measure_costs

    def costs(*args):
        measured.append(real(*args))  # the real measurement runs
        return (1.0, 0.1)  # then a decode-bound pair (10× the forward): as many workers as allowed

    monkeypatch.setattr(extract, "measure_costs", costs)
    before = torch.get_num_threads()
    settings = ExtractionSettings(batch_size=4, workers=4, amp=False)
    got = extract_split(
        _ThreadProbe(), _Pixels(12), settings=settings, device="cpu", name="probe", entry=_entry(tmp_path, "pool")
    )
    workers, threads = extraction_pool(4, "cpu", cores=3, threads=before)
    assert (workers, threads) == (2, 1)
    assert set(got.features[:, 0].tolist()) == {1.0}  # BLAS limited to one thread in each worker
    assert set(got.features[:, 1].tolist()) == {float(threads)}  # the forward ran on the remaining core
    assert torch.get_num_threads() == before  # restored after the extraction
    manifest = json.loads((_entry(tmp_path, "pool").path / "manifest.json").read_text())
    assert (manifest["workers"], manifest["threads"], manifest["decode"]) == (2, 1, "exact")
    assert manifest["pool_costs_ms"] == [1000.0, 100.0]
    assert len(measured) == 1 and all(c > 0 for c in measured[0])


# --------------------------------------------------------------------------------------------------
# decode: reduced


def test_decode_is_a_spec_field_exact_by_default():
    base = "models: [{id: random_cnn}]\ndatasets: [{id: digits}]\n"
    assert parse_spec(base).spec.extraction.decode == "exact"
    assert parse_spec(base + "extraction: {decode: reduced}\n").spec.extraction.decode == "reduced"
    with pytest.raises(Exception, match="decode"):
        parse_spec(base + "extraction: {decode: fast}\n")


def test_the_decode_mode_is_in_the_cache_key_and_exact_keys_are_unchanged():
    fields = ("b", {"name": "p"}, {}, {"w": 1}, "d", {}, "train", "fp")
    exact, reduced = CacheKey(*fields), CacheKey(*fields, decode="reduced")
    assert exact.digest() != reduced.digest() and exact.label() != reduced.label()
    assert "decode" not in exact.as_json() and reduced.as_json()["decode"] == "reduced"
    # An exact key is the key entries written before the option existed have.
    before = {k: v for k, v in exact.fields().items()}
    assert key_digest(before) == exact.digest() and "decode" not in before
    assert CacheKey(**reduced.as_json()) == reduced and CacheKey(**exact.as_json()) == exact


def _write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, (width, height) in enumerate(sizes):
            target = folder / split / f"c{index % 2}"
            target.mkdir(parents=True, exist_ok=True)
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=2)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(target / f"{index}.jpg", quality=90)


SPEC = """\
models:
  - id: mobilenetv2_100.tv_in1k
    options: {{pretrained: false, crop: 32}}
datasets:
  - id: imagefolder
    options: {{root: {root}}}
protocol: {{k: 2, epochs: 1, seeds: 1}}
extraction: {{batch_size: 4, workers: 0, decode: {decode}}}
cache_dir: {cache}
device: cpu
"""


def _extract(tmp_path: Path, plugins, decode: str):
    from sslbench.events import Event
    from sslbench.runner import extract_spec
    from sslbench.spec import load_spec, resolve_spec

    spec = tmp_path / f"{decode}.yaml"
    spec.write_text(SPEC.format(root=tmp_path / "images", cache=tmp_path / "cache", decode=decode))
    notes: list[str] = []

    def emit(event: Event) -> None:
        if event.kind == "note":
            notes.append(event.text)

    features = extract_spec(resolve_spec(load_spec(spec), plugins), plugins, device="cpu", emit=emit)
    return features[0].per_dataset[0], notes


def test_reduced_decode_on_real_jpegs_reports_its_cosine_and_is_cached_apart(tmp_path, plugins):
    # Large photos (the 32-px crop resizes the shorter side to 37: DCT scales down to 1/8 apply), a
    # small one (no scale keeps 37 px) and a PNG (no DCT scaling).
    _write_jpegs(tmp_path / "images", [(800, 600), (640, 960), (600, 400), (60, 45)])
    Image.new("RGB", (500, 400), (90, 120, 30)).save(tmp_path / "images" / "val" / "c0" / "plain.png")
    exact, exact_notes = _extract(tmp_path, plugins, "exact")
    reduced, notes = _extract(tmp_path, plugins, "reduced")
    assert not exact_notes and all(got.decode_check is None for got in exact.values())

    entries = FeatureCache(tmp_path / "cache").entries()
    assert len(entries) == 4  # train and val, each once exact and once reduced
    keys = [manifest["key"] for _, manifest in entries]
    assert sorted(key.get("decode", "exact") for key in keys) == ["exact", "exact", "reduced", "reduced"]

    for name, got in reduced.items():
        check = got.decode_check
        assert check is not None and check["min_side"] == 37
        assert check["samples"] == len(got.labels)  # every sample of these small splits is compared
        assert check["changed"] == 3  # the three large JPEGs were decoded smaller
        assert 0.5 < check["min_cosine"] <= check["mean_cosine"] <= 1.0 + 1e-9
        assert not np.array_equal(got.features, exact[name].features)
        cos = np.sum(got.features * exact[name].features, axis=1) / (
            np.linalg.norm(got.features, axis=1) * np.linalg.norm(exact[name].features, axis=1)
        )
        # The small JPEG and the PNG are decoded in full either way: the same features.
        assert np.sum(np.isclose(cos, 1.0, atol=1e-6)) >= len(cos) - 3
    assert len(notes) == 2 and all("decode reduced (shorter side ≥ 37 px)" in note for note in notes)
    assert all("feature cosine to the exact decode" in note for note in notes)

    # A second run reads the reduced features back from the cache, with their check.
    again, notes_again = _extract(tmp_path, plugins, "reduced")
    assert all(got.from_cache for got in again.values())
    assert [got.decode_check for got in again.values()] == [got.decode_check for got in reduced.values()]
    assert notes_again == notes


class _NoSide(_ThreadProbe):
    def decode_side(self):
        return "big"


def test_a_bad_decode_side_is_the_plugins_bug(tmp_path):
    settings = ExtractionSettings(batch_size=4, workers=0, amp=False, owner="backbone 'x'", decode="reduced")
    with pytest.raises(PluginFailure, match=r"backbone 'x': decode_side\(\) returned 'big'"):
        extract_split(
            _NoSide(), _Pixels(4), settings=settings, device="cpu", name="x", entry=_entry(tmp_path, "bad", "reduced")
        )


def test_reduced_decode_of_a_backbone_without_a_side_decodes_in_full(tmp_path):
    settings = ExtractionSettings(batch_size=4, workers=0, amp=False, decode="reduced")
    got = extract_split(
        _ThreadProbe(), _Pixels(4), settings=settings, device="cpu", name="x", entry=_entry(tmp_path, "n", "reduced")
    )
    check = got.decode_check
    assert check is not None and (check["samples"], check["min_side"], check["changed"]) == (4, None, 0)
    assert check["mean_cosine"] == pytest.approx(1.0) and check["min_cosine"] == pytest.approx(1.0)
