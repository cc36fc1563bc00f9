"""Generic backbones (timm by name, torch.hub at a pinned commit, a Python callable), offline.

Nothing here reaches the network: the Hugging Face cache and the torch.hub checkout are written by the
tests themselves, in the exact folder layouts the two libraries read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from sslbench.errors import SSLBenchError
from sslbench.plugins import load_plugins
from sslbench.runner import run_spec
from sslbench.spec import parse_spec, resolve_spec
from sslbench.weights import no_downloads
from sslbench_plugins import generic_backbones
from sslbench_plugins.generic_backbones import (
    HubBackbone,
    HubOptions,
    PythonBackbone,
    PythonOptions,
    TimmBackbone,
    TimmOptions,
)

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "tests" / "helpers"))
from hf_cache_writer import write_hf_cache

#: The smallest timm model with a pretrained tag on the hub (a 64-wide, 160 px ViT; 0.5 M parameters).
TINY = "test_vit.r160_in1k"
NO_NETWORK = Path(__file__).with_name("helpers") / "no_network"


def _installed() -> bool:
    return any(ep.name == "generic_backbones" for ep in importlib.metadata.entry_points(group="sslbench"))


@pytest.fixture(scope="module")
def plugins():
    """The installed plugins, plus this module's when its entry point is not installed yet."""
    return load_plugins() if _installed() else load_plugins(extra=[("generic_backbones", generic_backbones)])


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in offline mode, for this process."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(37, 91), (301, 173), (8, 8), (160, 161), (513, 97)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes]


# --------------------------------------------------------------------------------------------------
# timm: weights from the Hugging Face cache


def test_timm_loads_the_exact_tensors_of_the_hub_cache_offline(hf_cache, monkeypatch):
    state = random_state(timm.create_model(TINY, pretrained=False), seed=1)
    snapshot = write_hf_cache(hf_cache, f"timm/{TINY}", state)

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    backbone = TimmBackbone(TimmOptions(model=TINY, pool="head"))
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    weights = backbone.fingerprint()["weights"]
    assert weights == {
        "source": "hf-hub",
        "file": "model.safetensors",
        "sha256": hashlib.sha256(snapshot.read_bytes()).hexdigest(),
    }

    default = TimmBackbone(TimmOptions(model=TINY))
    batch = torch.stack([default.preprocess(image) for image in images()])
    with torch.inference_mode():
        features = default.embed(batch)
        expected = default.model.forward_head(default.model.forward_features(batch), pre_logits=True)
    assert features.shape == (5, 64) == (5, default.feature_dim)
    assert torch.isfinite(features).all() and torch.equal(features, expected)


def test_timm_weights_absent_from_the_cache_are_a_one_line_error(hf_cache, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(SSLBenchError) as offline:
        TimmBackbone(TimmOptions(model=TINY))
    message = str(offline.value)
    assert "\n" not in message
    assert TINY in message and str(hf_cache) in message and "HF_HUB_OFFLINE" in message
    assert f"hf download timm/{TINY}" in message and f"huggingface-cli download timm/{TINY}" in message

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with no_downloads(), pytest.raises(SSLBenchError, match="optional models are never downloaded") as optional:
        TimmBackbone(TimmOptions(model=TINY))
    assert str(hf_cache) in str(optional.value)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the hub\nsecond line")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    with pytest.raises(SSLBenchError) as no_network:
        TimmBackbone(TimmOptions(model=TINY))
    message = str(no_network.value)
    assert (
        "\n" not in message
        and "cannot be downloaded (LocalEntryNotFoundError: Cannot reach the hub / second line)" in message
    )
    assert str(hf_cache) in message


def test_timm_loading_of_a_cached_file_stays_strict(hf_cache):
    state = random_state(timm.create_model(TINY, pretrained=False), seed=1)
    del state["blocks.0.norm1.weight"]
    snapshot = write_hf_cache(hf_cache, f"timm/{TINY}", state)
    with pytest.raises(SSLBenchError) as caught:
        TimmBackbone(TimmOptions(model=TINY))
    message = str(caught.value)
    assert "\n" not in message and str(snapshot) in message and "does not fit the architecture" in message
    assert "blocks.0.norm1.weight" in message


def test_timm_reads_the_cache_named_by_hf_home_in_a_fresh_process_without_network(tmp_path):
    """The environment variables themselves (HF_HOME, HF_HUB_OFFLINE), read by huggingface_hub at import."""
    state = random_state(timm.create_model(TINY, pretrained=False), seed=2)
    snapshot = write_hf_cache(tmp_path / "hf" / "hub", f"timm/{TINY}", state)
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import torch
            from safetensors.torch import load_file
            from sslbench.errors import SSLBenchError
            from sslbench_plugins.generic_backbones import TimmBackbone, TimmOptions

            backbone = TimmBackbone(TimmOptions(model={TINY!r}, pool="head"))
            reference = load_file(sys.argv[1])
            loaded = backbone.model.state_dict()
            same = set(loaded) == set(reference) and all(torch.equal(loaded[k], v) for k, v in reference.items())
            try:
                TimmBackbone(TimmOptions(model="test_vit2.r160_in1k"))
                error = None
            except SSLBenchError as exc:
                error = str(exc)
            print(json.dumps({{"same": same, "error": error}}))
            """
        )
    )
    netlog = tmp_path / "network.log"
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    env |= {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(NO_NETWORK), os.environ.get("PYTHONPATH", "")))),
        "SSLBENCH_TEST_NETLOG": str(netlog),
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(snapshot)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"]
    assert "test_vit2.r160_in1k" in result["error"] and str(tmp_path / "hf" / "hub") in result["error"]
    assert not netlog.exists() or netlog.read_text() == ""


def test_timm_model_names_are_checked_with_a_suggestion(plugins):
    def resolve(options: str) -> str:
        text = f"models: [{{id: timm, options: {options}}}]\ndatasets: [{{id: digits}}]\n"
        with pytest.raises(SSLBenchError) as caught:
            resolve_spec(parse_spec(text), plugins)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "did you mean 'vit_small_patch14_dinov2.lvd142m'" in resolve("{model: vit_smal_patch14_dinov2.lvd142m}")
    assert "vit_small_patch14_dinov2.lvd142m" in resolve("{model: vit_small_patch14_dinov2}")  # the tag is required
    assert "exclude each other" in resolve(f"{{model: {TINY}, pretrained: false, weights: w.pth}}")
    assert "unknown key" in resolve(f"{{model: {TINY}, globalpool: avg}}")
    # a bare architecture is fine when no pretrained weights are asked for
    TimmOptions(model="test_vit", pretrained=False)


# --------------------------------------------------------------------------------------------------
# timm: preprocessing is timm's own, pixel for pixel


@pytest.mark.parametrize(
    ("name", "img_size"),
    [
        (TINY, None),  # bicubic, crop 0.95, mean and std 0.5
        ("resnet18.tv_in1k", None),  # bilinear, crop 0.875, ImageNet mean and std
        ("vit_small_patch14_dinov2.lvd142m", 56),  # 518 px, crop 1.0 in timm's config: size overridden
    ],
)
def test_timm_preprocessing_is_timms_eval_transform(name, img_size):
    backbone = TimmBackbone(TimmOptions(model=name, pretrained=False, img_size=img_size))
    model = timm.create_model(name, pretrained=False, **({"img_size": img_size} if img_size else {}))
    config = timm.data.resolve_model_data_config(model)
    cfg = timm.models.get_pretrained_cfg(name)
    size = img_size or cfg.input_size[-1]
    if img_size:
        config["input_size"] = (3, img_size, img_size)
    timm_transform = timm.data.create_transform(**config, is_training=False)
    torchvision_v1 = transforms.Compose(
        [
            transforms.Resize(math.floor(size / cfg.crop_pct), interpolation=InterpolationMode(cfg.interpolation)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ]
    )
    for image in images():
        ours = backbone.preprocess(image)
        assert ours.shape == (3, size, size)
        assert torch.equal(ours, timm_transform(image))
        assert torch.equal(ours, torchvision_v1(image))
    grey = np.arange(7 * 11, dtype=np.uint8).reshape(7, 11)  # an array sample: greyscale, made RGB
    assert torch.equal(backbone.preprocess(grey), timm_transform(Image.fromarray(grey).convert("RGB")))
    assert backbone.fingerprint()["data_config"] == config


# --------------------------------------------------------------------------------------------------
# timm: pooling


def test_timm_pooling_of_a_vit_with_registers_matches_token_slicing():
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    built = {
        pool: TimmBackbone(TimmOptions(model=name, pretrained=False, img_size=28, pool=pool))
        for pool in ("default", "cls", "mean", "cls+mean")
    }
    model = built["mean"].model
    assert model.num_prefix_tokens == 5 and model.num_reg_tokens == 4  # class token + 4 registers
    batch = torch.stack([built["mean"].preprocess(image) for image in images()[:3]])
    with torch.inference_mode():
        tokens = model.forward_features(batch)
        assert tokens.shape == (3, 5 + 4, 384)  # 2×2 patches at 28 px
        cls, patches = tokens[:, 0], tokens[:, 5:].mean(dim=1)
        got = {pool: backbone.embed(batch) for pool, backbone in built.items()}
    assert torch.equal(got["cls"], cls)
    assert torch.equal(got["mean"], patches)
    assert not torch.allclose(got["mean"], tokens[:, 1:].mean(dim=1))  # registers would change it
    assert torch.equal(got["cls+mean"], torch.cat([cls, patches], dim=1))
    assert torch.equal(got["default"], cls)  # DINOv2's own convention: the class token
    assert {pool: b.feature_dim for pool, b in built.items()} == {
        "default": 384,
        "cls": 384,
        "mean": 384,
        "cls+mean": 768,
    }
    assert {b.fingerprint()["prefix_tokens"] for b in built.values()} == {5}


def test_timm_pooling_of_gap_models_and_cnns():
    # a `_gap`-style ViT: no class token, one register, average pool followed by fc_norm
    gap = TimmBackbone(TimmOptions(model="test_vit2.r160_in1k", pretrained=False, img_size=32))
    mean = TimmBackbone(TimmOptions(model="test_vit2.r160_in1k", pretrained=False, img_size=32, pool="mean"))
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = gap.model.forward_features(batch)
        assert gap.model.num_prefix_tokens == 1 and gap.model.cls_token is None
        assert torch.equal(gap.embed(batch), gap.model.fc_norm(tokens[:, 1:].mean(dim=1)))
        assert torch.equal(mean.embed(batch), tokens[:, 1:].mean(dim=1))
    for pool in ("cls", "cls+mean"):
        with pytest.raises(SSLBenchError, match="has no class token"):
            TimmBackbone(TimmOptions(model="test_vit2.r160_in1k", pretrained=False, img_size=32, pool=pool))

    cnn = {
        pool: TimmBackbone(TimmOptions(model="resnet18.tv_in1k", pretrained=False, pool=pool))
        for pool in ("default", "mean")
    }
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fmap = cnn["mean"].model.forward_features(batch)
        assert torch.allclose(cnn["mean"].embed(batch), fmap.mean(dim=(2, 3)))
        assert torch.allclose(cnn["default"].embed(batch), fmap.mean(dim=(2, 3)))  # resnet: average pool
    assert cnn["default"].feature_dim == 512
    for pool in ("cls", "cls+mean"):
        with pytest.raises(SSLBenchError, match="no class token"):
            TimmBackbone(TimmOptions(model="resnet18.tv_in1k", pretrained=False, pool=pool))
    with pytest.raises(SSLBenchError, match="no pretrained head"):
        TimmBackbone(TimmOptions(model="vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, pool="head"))


def test_timm_default_pooling_follows_each_familys_evaluation_convention():
    def global_pool(name: str) -> str:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False).global_pool

    # MAE's linear probe uses the class token (main_linprobe.py: global_pool off unless asked): timm agrees
    assert global_pool("vit_base_patch16_224.mae") == "token"
    assert global_pool("vit_small_patch16_224.dino") == "token"
    assert global_pool("vit_huge_patch14_gap_224.in1k_ijepa") == "avg"  # `_gap`: average of the patch tokens
    # timm averages DINOv3's patch tokens by default; upstream DINOv3 uses its class token, and so does `default`
    assert global_pool("vit_small_patch16_dinov3.lvd1689m") == "avg"
    dinov3 = TimmBackbone(TimmOptions(model="vit_small_patch16_dinov3.lvd1689m", pretrained=False, img_size=32))
    assert dinov3.model.global_pool == "token" and dinov3.fingerprint()["global_pool"] == "token"
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(dinov3.embed(batch), dinov3.model.forward_features(batch)[:, 0])
    mean = TimmBackbone(
        TimmOptions(model="vit_small_patch16_dinov3.lvd1689m", pretrained=False, img_size=32, pool="mean")
    )
    assert mean.prefix == 5  # class token and 4 registers skipped


# --------------------------------------------------------------------------------------------------
# timm: a local weights file loads strictly


def test_timm_local_weights_load_strictly(tmp_path):
    headless = timm.create_model(TINY, pretrained=False, num_classes=0)
    state = random_state(headless, seed=3)
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    backbone = TimmBackbone(TimmOptions(model=TINY, weights=str(good)))
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert backbone.fingerprint()["weights"] == {
        "source": "file",
        "sha256": hashlib.sha256(good.read_bytes()).hexdigest(),
    }

    # timm's own file layout, classifier included: the classifier timm names is dropped, nothing else
    with_head = tmp_path / "with_head.pth"
    torch.save(state | {"head.weight": torch.zeros(1000, 64), "head.bias": torch.zeros(1000)}, with_head)
    reloaded = TimmBackbone(TimmOptions(model=TINY, weights=str(with_head))).model.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())

    prefixed = tmp_path / "prefixed.pth"  # every key misses: must fail, never load nothing
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    with pytest.raises(SSLBenchError) as caught:
        TimmBackbone(TimmOptions(model=TINY, weights=str(prefixed)))
    message = str(caught.value)
    assert "\n" not in message and str(prefixed) in message
    assert f"{len(state)} model keys missing from the file: blocks.0.attn.proj.bias," in message
    assert f"{len(state)} unexpected file keys: module.blocks.0.attn.proj.bias," in message

    extra = tmp_path / "extra.pth"
    torch.save(state | {"decoder.weight": torch.zeros(2)}, extra)
    with pytest.raises(SSLBenchError, match=r"1 unexpected file keys: decoder\.weight"):
        TimmBackbone(TimmOptions(model=TINY, weights=str(extra)))
    with pytest.raises(SSLBenchError, match="weights file not found"):
        TimmBackbone(TimmOptions(model=TINY, weights=str(tmp_path / "absent.pth")))


# --------------------------------------------------------------------------------------------------
# timm: the known traps, refused unless allowed


def test_timm_refuses_quickgelu_trained_clip_weights_on_the_gelu_architecture(hf_cache):
    name, quick = "vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_quickgelu_224.openai"
    # timm itself says the weights are the same file and the two architectures differ in the activation
    assert timm.models.get_pretrained_cfg(name).hf_hub_id == timm.models.get_pretrained_cfg(quick).hf_hub_id
    small = {"depth": 1, "img_size": 32, "num_classes": 0}
    gelu = timm.create_model(name.split(".")[0], pretrained=False, **small).eval()
    quick_model = timm.create_model(quick.split(".")[0], pretrained=False, **small).eval()
    quick_model.load_state_dict(gelu.state_dict())
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.allclose(gelu(batch), quick_model(batch), atol=1e-4)  # the trap is real

    for options in ({"model": name}, {"model": name, "weights": str(hf_cache / "absent.pth")}):
        with pytest.raises(SSLBenchError) as caught:
            TimmBackbone(TimmOptions(**options))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"timm model {name}: ")
        assert f"use model: {quick}, or allow: [quickgelu_mismatch]" in message
    # the fix and the allowance both get past the check, to the (empty) Hugging Face cache
    for options in ({"model": quick}, {"model": name, "allow": ["quickgelu_mismatch"]}):
        with pytest.raises(SSLBenchError, match="is not in the Hugging Face cache"):
            TimmBackbone(TimmOptions(**options))
    TimmBackbone(TimmOptions(model=name, pretrained=False))  # no weights, no trap
    assert generic_backbones.quickgelu_counterpart("vit_base_patch16_clip_224.laion2b") is None  # GELU-trained
    with pytest.raises(ValueError, match="quickgelu_mismatch"):
        TimmOptions(model=name, allow=["quickgelu"])


def test_timm_refuses_position_embeddings_that_its_checkpoint_filter_resamples(hf_cache, tmp_path):
    """A file whose position embeddings were trained on another grid (224 px for a 160 px config):
    timm's filter would resample them silently."""
    from timm.layers import resample_abs_pos_embed

    state = random_state(timm.create_model("test_vit", pretrained=False, img_size=224), seed=4)
    write_hf_cache(hf_cache, f"timm/{TINY}", state)
    with pytest.raises(SSLBenchError) as caught:
        TimmBackbone(TimmOptions(model=TINY))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"timm model {TINY}: model.safetensors holds pos_embed")
    assert "14×14 patches (224 px)" in message and "model's 10×10 patches (160 px)" in message
    assert message.endswith("set img_size: 224, or allow: [pos_embed_resampled]")

    at_its_size = TimmBackbone(TimmOptions(model=TINY, img_size=224))  # the fix: nothing resampled
    assert torch.equal(at_its_size.model.pos_embed, state["pos_embed"])
    assert "accepted" not in at_its_size.fingerprint()

    allowed = TimmBackbone(TimmOptions(model=TINY, allow=["pos_embed_resampled"]))
    resampled = resample_abs_pos_embed(state["pos_embed"], new_size=[10, 10], num_prefix_tokens=1)
    assert torch.equal(allowed.model.pos_embed, resampled)  # what timm's filter did, recomputed by timm's layer
    assert allowed.fingerprint()["accepted"] == {"pos_embed_resampled": message}
    # .pth files are read as timm reads them (the state_dict key, DDP's module. prefix removed)
    for grid_state, fits in ((state, False), (random_state(timm.create_model("test_vit"), seed=5), True)):
        wrapped = tmp_path / "wrapped.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in grid_state.items()}, "epoch": 3}, wrapped)
        found = generic_backbones.resampled_pos_embed(allowed.model, wrapped, "here")
        assert (found is None) == fits, found


@pytest.mark.slow
def test_an_allowed_trap_is_recorded_in_results_json(hf_cache, plugins, tmp_path):
    state = random_state(timm.create_model("test_vit", pretrained=False, img_size=224), seed=4)
    write_hf_cache(hf_cache, f"timm/{TINY}", state)
    text = textwrap.dedent(
        f"""
        models:
          - id: timm
            name: resampled
            options: {{model: {TINY}, allow: [pos_embed_resampled]}}
        datasets:
          - {{id: digits}}
        protocol: {{epochs: 1, seeds: 1}}
        extraction: {{workers: 0}}
        cache_dir: {tmp_path / "cache"}
        device: cpu
        """
    )
    run_spec(resolve_spec(parse_spec(text), plugins), plugins, out_dir=tmp_path / "out")
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert recorded["spec"]["models"][0]["options"]["allow"] == ["pos_embed_resampled"]
    assert {run["model"] for run in recorded["runs"]} == {"resampled"}
    refused = parse_spec(text.replace(", allow: [pos_embed_resampled]", ""))
    with pytest.raises(SSLBenchError, match=r"resamples it to the model's 10×10 patches"):
        run_spec(resolve_spec(refused, plugins), plugins, out_dir=tmp_path / "refused")


# --------------------------------------------------------------------------------------------------
# timm: fingerprints


def test_timm_fingerprints_are_stable_and_tell_apart_pool_model_and_weights(tmp_path):
    def fingerprint(**options) -> str:
        return json.dumps(TimmBackbone(TimmOptions(**options)).fingerprint(), sort_keys=True)

    base = {"model": TINY, "pretrained": False}
    assert fingerprint(**base) == fingerprint(**base)  # two builds
    assert fingerprint(**base) != fingerprint(**base, pool="mean")
    assert fingerprint(**base) != fingerprint(**base, init_seed=1)
    assert fingerprint(**base) != fingerprint(model="test_vit3.r160_in1k", pretrained=False)
    assert fingerprint(**base) != fingerprint(**base, img_size=64)

    headless = timm.create_model(TINY, pretrained=False, num_classes=0)
    files = []
    for seed in (4, 5):
        path = tmp_path / f"w{seed}.safetensors"
        save_file(random_state(headless, seed), str(path))
        files.append(path)
    first, second = (fingerprint(model=TINY, weights=str(path)) for path in files)
    assert first == fingerprint(model=TINY, weights=str(files[0])) and first != second
    moved = tmp_path / "elsewhere.safetensors"  # the path is no part of it, the bytes are
    moved.write_bytes(files[0].read_bytes())
    assert fingerprint(model=TINY, weights=str(moved)) == first


# --------------------------------------------------------------------------------------------------
# torch.hub

HUBCONF = '''
dependencies = ["torch"]

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class Tokens(nn.Module):
    num_prefix_tokens = 2

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 6, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, 2, 6))

    def forward(self, x):
        patches = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(len(x), -1, -1), patches], dim=1)


def tiny(width=4):
    """A conv and a spatial mean; its weights are the seeded random initialisation."""
    return Tiny(width)


def tokens():
    return Tokens()


def fetching():
    return torch.hub.load_state_dict_from_url("https://example.invalid/fetched-weights.pth")
'''


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = Path(torch.hub.get_dir())
    assert folder == tmp_path / "torch-home" / "hub"
    for ref in ("abc1234", "main"):
        (folder / f"owner_tinyrepo_{ref}").mkdir(parents=True)
        (folder / f"owner_tinyrepo_{ref}" / "hubconf.py").write_text(HUBCONF)
    return folder


def test_hub_pinned_checkout_loads_offline_with_torchvision_preprocessing(hub_dir):
    with no_downloads():
        backbone = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tiny", kwargs={"width": 5}))
    batch = torch.stack([backbone.preprocess(image) for image in images()])
    reference = transforms.Compose(
        [
            transforms.Resize(256, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    assert torch.equal(batch, torch.stack([reference(image) for image in images()]))
    with torch.inference_mode():
        features = backbone.embed(batch)
        assert torch.equal(features, backbone.model.conv(batch).mean(dim=(2, 3)))
    assert features.shape == (5, 5)
    small = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tiny", resize=40, crop=32))
    assert small.preprocess(images()[0]).shape == (3, 32, 32)

    fingerprint = backbone.fingerprint()
    assert fingerprint["repo"] == "owner/tinyrepo:abc1234" and fingerprint["pinned"] is True
    assert fingerprint["preprocessing"]["interpolation"] == "bicubic"
    again = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tiny", kwargs={"width": 5}))
    assert again.fingerprint() == fingerprint  # seeded: the same random parts every build
    other = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tiny", kwargs={"width": 6}))
    assert other.fingerprint()["state_sha256"] != fingerprint["state_sha256"]
    assert other.fingerprint() != fingerprint


def test_hub_token_pooling_skips_the_prefix_tokens(hub_dir):
    backbone = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tokens", pool="mean", crop=32, resize=32))
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = backbone.model(batch)
        assert torch.equal(backbone.embed(batch), tokens[:, 2:].mean(dim=1))
    unpooled = HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="tokens", crop=32, resize=32))
    with pytest.raises(SSLBenchError, match=r"returns \(2, 18, 6\)-shaped outputs, not \(n, d\): set pool"):
        unpooled.embed(batch)


def test_hub_requires_a_pinned_commit(hub_dir, plugins):
    def error(options: str) -> str:
        text = f"models: [{{id: hub, options: {options}}}]\ndatasets: [{{id: digits}}]\n"
        with pytest.raises(SSLBenchError) as caught:
            resolve_spec(parse_spec(text), plugins)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    for repo in ("owner/tinyrepo", "owner/tinyrepo:main", "owner/tinyrepo:v1.0", "owner/tinyrepo:abc12"):
        assert "is not pinned" in error(f"{{repo: '{repo}', entry: tiny}}")
    assert "owner/name:<commit sha>" in error("{repo: 'not a repo', entry: tiny}")

    trusted = HubBackbone(HubOptions(repo="owner/tinyrepo:main", entry="tiny", trust_unpinned=True))
    fingerprint = trusted.fingerprint()
    assert fingerprint["trust_unpinned"] is True and fingerprint["pinned"] is False
    hubconf = hub_dir / "owner_tinyrepo_main" / "hubconf.py"
    assert fingerprint["hubconf_sha256"] == hashlib.sha256(hubconf.read_bytes()).hexdigest()
    assert (
        HubBackbone(HubOptions(repo="owner/tinyrepo", entry="tiny", trust_unpinned=True)).fingerprint()["state_sha256"]
        == fingerprint["state_sha256"]
    )  # no ref: the cached main checkout, as torch.hub picks it


def test_hub_missing_checkout_entry_or_weights_are_one_line_errors(hub_dir):
    with no_downloads(), pytest.raises(SSLBenchError) as absent:
        HubBackbone(HubOptions(repo="owner/tinyrepo:def5678", entry="tiny"))
    message = str(absent.value)
    assert "\n" not in message and str(hub_dir / "owner_tinyrepo_def5678") in message and "def5678" in message

    with pytest.raises(SSLBenchError, match="Cannot find callable nothing in hubconf"):
        HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="nothing"))

    with no_downloads(), pytest.raises(SSLBenchError) as fetching:
        HubBackbone(HubOptions(repo="owner/tinyrepo:abc1234", entry="fetching"))
    message = str(fetching.value)
    assert "\n" not in message and "https://example.invalid/fetched-weights.pth" in message
    assert str(hub_dir / "checkpoints" / "fetched-weights.pth") in message
    assert torch.hub.download_url_to_file.__name__ == "download_url_to_file"  # put back


# --------------------------------------------------------------------------------------------------
# Python callables

ENCODER_MODULE = """
import torch
from torch import nn


def build_encoder(width=8, weights=None):
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def to_pixels(sample):
    import numpy as np

    pixels = np.asarray(sample.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def tokens():
    return lambda x: torch.zeros(len(x), 5, 3)
"""


@pytest.fixture()
def encoder_module(tmp_path, monkeypatch):
    name = f"user_encoder_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{name}.py").write_text(ENCODER_MODULE)
    (folder / "broken_encoder.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


def test_python_backbone_runs_end_to_end_on_digits(encoder_module, plugins, tmp_path):
    text = textwrap.dedent(
        f"""
        models:
          - id: python
            name: user encoder
            options: {{factory: "{encoder_module}:build_encoder", kwargs: {{width: 6}}, transform: "{encoder_module}:to_pixels"}}
        datasets:
          - {{id: digits}}
        protocol: {{epochs: 1, seeds: 1}}
        extraction: {{workers: 0}}
        cache_dir: {tmp_path / "cache"}
        device: cpu
        """
    )
    results = run_spec(resolve_spec(parse_spec(text), plugins), plugins, out_dir=tmp_path / "out")
    assert {r.model for r in results.runs} == {"user encoder"}
    assert all(0.0 < r.metrics["acc"] <= 1.0 for r in results.runs)


def test_python_backbone_weights_revision_and_default_transform(encoder_module, tmp_path):
    factory = f"{encoder_module}:build_encoder"
    plain = PythonBackbone(PythonOptions(factory=factory, kwargs={"width": 4}, resize=20, crop=16))
    assert plain.preprocess(images()[1]).shape == (3, 16, 16)
    features = plain.embed(torch.stack([plain.preprocess(image) for image in images()]))
    assert features.shape == (5, 16)

    def fingerprint(**options) -> dict:
        return PythonBackbone(PythonOptions(factory=factory, kwargs={"width": 4}, **options)).fingerprint()

    small = {"resize": 20, "crop": 16}
    assert plain.fingerprint() == fingerprint(**small)  # two builds
    assert fingerprint(**small, revision="2") != plain.fingerprint()
    assert fingerprint(**small, pool="mean", prefix_tokens=1) != plain.fingerprint()
    assert fingerprint(resize=24, crop=16) != plain.fingerprint()

    weights = tmp_path / "encoder.pth"
    state = {k: torch.full_like(v, 0.5) for k, v in plain.model.state_dict().items()}
    torch.save(state, weights)
    loaded = PythonBackbone(PythonOptions(factory=factory, kwargs={"width": 4}, weights=str(weights)))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert loaded.fingerprint()["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_python_backbone_errors_are_one_line(encoder_module):
    cases = {
        "no_such_module_here:build": "cannot import the factory no_such_module_here:build: ModuleNotFoundError",
        "broken_encoder:build": "cannot import the factory broken_encoder:build: SyntaxError",
        f"{encoder_module}:nothing": f"{encoder_module} has no attribute nothing",
    }
    for factory, expected in cases.items():
        with pytest.raises(SSLBenchError) as caught:
            PythonBackbone(PythonOptions(factory=factory))
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(
        SSLBenchError, match="does not take these arguments: got an unexpected keyword argument 'depth'"
    ):
        PythonBackbone(PythonOptions(factory=f"{encoder_module}:build_encoder", kwargs={"depth": 3}))
    with pytest.raises(ValueError, match="transform replaces the eval transform: drop crop"):
        PythonOptions(factory=f"{encoder_module}:build_encoder", transform=f"{encoder_module}:to_pixels", crop=8)
    with pytest.raises(ValueError, match=r"factory must read pkg\.module:callable"):
        PythonOptions(factory="not a path")
    with pytest.raises(SSLBenchError, match="set prefix_tokens"):
        PythonBackbone(PythonOptions(factory=f"{encoder_module}:tokens", pool="mean"))
    tokens = PythonBackbone(PythonOptions(factory=f"{encoder_module}:tokens"))
    with pytest.raises(SSLBenchError, match="set pool: cls, mean or cls\\+mean"):
        tokens.embed(torch.zeros(2, 3, 8, 8))


# --------------------------------------------------------------------------------------------------
# The installed entry point, through the command line


@pytest.mark.skipif(
    not _installed() and os.environ.get("SSLBENCH_REQUIRE_GENERIC") != "1",
    reason="the generic_backbones entry point is not installed (pip install -e .); CI sets SSLBENCH_REQUIRE_GENERIC=1",
)
def test_cli_lists_and_runs_the_generic_backbones(tmp_path):
    listed = run_cli("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugin = next((p for p in json.loads(listed.stdout) if p["name"] == "generic_backbones"), None)
    assert plugin is not None, "sslbench plugins does not list generic_backbones"
    assert plugin["error"] is None and set(plugin["registered"]["backbone"]) == {"timm", "hub", "python"}

    (tmp_path / "cli_encoder.py").write_text(ENCODER_MODULE)
    spec = {
        "models": [
            {
                "id": "python",
                "name": "cli encoder",
                "options": {"factory": "cli_encoder:build_encoder", "resize": 16, "crop": 16},
            }
        ],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 1, "epochs": 1},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    path = os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH", ""))))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path, env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"cli encoder"}

    (tmp_path / "bad.yaml").write_text(
        json.dumps({**spec, "models": [{"id": "python", "options": {"factory": "absent_mod:f"}}]})
    )
    bad = run_cli("run", "bad.yaml", "--out", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and "cannot import the factory absent_mod:f" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1
