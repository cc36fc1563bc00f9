"""The TF tensor-bundle reader and the SimCLRv2 plugin, on bundles written in TF's byte format by
tests/helpers/tf_bundle_writer.py (from the format description, without TensorFlow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslbench.cards import Architecture, load_cards
from sslbench.errors import SSLBenchError
from sslbench.tf_bundle import TFCheckpoint, mask_crc, unmask_crc
from sslbench_plugins import simclrv2
from sslbench_plugins.simclrv2 import (
    SimCLRv2Backbone,
    SimCLRv2Options,
    build_model,
    tf_bicubic_matrix,
    tf_center_crop_box,
    tf_same_padding,
    tf_variable_names,
)

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "tests" / "helpers"))
from tf_bundle_writer import crc32c, write_bundle

CARDS = {card.id: card for card in load_cards()}


def test_crc32c_and_masking():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask_crc(mask_crc(value)) == value


def test_bundle_round_trip_over_several_blocks_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"scope/layer_{i:02d}/kernel": rng.normal(size=(3, 3, 2, i + 1)).astype(np.float32) for i in range(40)}
    tensors |= {
        "global_step": np.array(250228, dtype=np.int64),
        "f64": rng.normal(size=(5,)),
        "half": rng.normal(size=(2, 3)).astype(np.float16),
        "ints": np.arange(7, dtype=np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    write_bundle(tmp_path / "model.ckpt-1", tensors, block_size=200)
    index = (tmp_path / "model.ckpt-1.index").read_bytes()
    assert len(index) > 2000  # many data blocks, so the index block has several handles
    for path in (tmp_path / "model.ckpt-1", tmp_path / "model.ckpt-1.index", tmp_path):
        checkpoint = TFCheckpoint(path)
        assert checkpoint.names() == sorted(tensors)
        assert checkpoint.checksums_verified
    for name, value in tensors.items():
        read = checkpoint.read(name)
        assert read.dtype == value.dtype and read.shape == value.shape and np.array_equal(read, value), name


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    top_halves = (values.view(np.uint32) >> 16).astype(np.uint16)
    write_bundle(tmp_path / "m", {"w": top_halves}, tf_dtypes={"w": 14})  # DT_BFLOAT16
    assert np.array_equal(TFCheckpoint(tmp_path / "m").read("w"), values)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_data", "checksum mismatch in"),
        ("truncate_data", "is truncated"),
        ("truncate_index", "is not a TF checkpoint index"),
        ("flip_index", "is not a TF checkpoint index: checksum mismatch"),
        ("no_data", "cannot read"),
    ],
)
def test_damaged_bundles_fail_with_one_line(tmp_path, damage, message):
    write_bundle(tmp_path / "m", {"a": np.arange(64, dtype=np.float32), "b": np.ones(3, np.float32)})
    data, index = tmp_path / "m.data-00000-of-00001", tmp_path / "m.index"
    if damage == "flip_data":
        raw = bytearray(data.read_bytes())
        raw[10] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate_data":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "truncate_index":
        index.write_bytes(index.read_bytes()[:-10])
    elif damage == "flip_index":
        raw = bytearray(index.read_bytes())
        raw[3] ^= 0x01
        index.write_bytes(bytes(raw))
    else:
        data.unlink()
    with pytest.raises(SSLBenchError) as info:
        TFCheckpoint(tmp_path / "m").read("a")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sliced_string_and_compressed_bundles_are_refused(tmp_path):
    write_bundle(
        tmp_path / "m",
        {"part": np.ones(4, np.float32), "text": np.zeros(2, np.uint8)},
        sliced=("part",),
        strings=("text",),
    )
    checkpoint = TFCheckpoint(tmp_path / "m")
    with pytest.raises(SSLBenchError, match="partitioned"):
        checkpoint.read("part")
    with pytest.raises(SSLBenchError, match="string tensor"):
        checkpoint.read("text")
    write_bundle(tmp_path / "c", {"a": np.ones(4, np.float32)}, compression=1)
    with pytest.raises(SSLBenchError, match="compressed"):
        TFCheckpoint(tmp_path / "c")


def test_without_a_crc32c_library_tensors_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr("sslbench.tf_bundle._crc32c_function", lambda: None)
    write_bundle(tmp_path / "m", {"a": np.arange(5, dtype=np.float32)})
    checkpoint = TFCheckpoint(tmp_path / "m")
    assert not checkpoint.checksums_verified
    assert np.array_equal(checkpoint.read("a"), np.arange(5, dtype=np.float32))


def test_missing_checkpoint_names_what_to_give(tmp_path):
    with pytest.raises(SSLBenchError, match="TF checkpoint not found"):
        TFCheckpoint(tmp_path / "nothing")
    with pytest.raises(SSLBenchError, match=r"expected exactly one \*\.index"):
        TFCheckpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# TF arithmetic


def test_tf_same_padding_is_after_first():
    assert tf_same_padding(112, 3, 2) == (0, 1)
    assert tf_same_padding(56, 2, 1) == (0, 1)
    assert tf_same_padding(7, 3, 2) == (1, 1)


def test_stem_max_pool_pads_bottom_right_only():
    model = build_model(50, 1, 0.0, base_width=8, stage_blocks=(1, 1, 1, 1))
    model.blocks = torch.nn.Sequential()  # look at the pooled stem output
    model.stem = torch.nn.Sequential()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 5.0  # TF SAME (pad after): only the window starting at row/col 0 sees it
    pooled = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    assert model.forward_features(x).item() == pooled.mean().item()
    assert pooled[0, 0].tolist() == [[5.0, 0.0], [0.0, 0.0]]


def test_stride_one_resnet_d_shortcut_averages_without_the_padding():
    model = build_model(50, 1, 0.0625, base_width=8, stage_blocks=(1, 1, 1, 1))
    shortcut = model.blocks[0].shortcut  # stage 1: stride 1, 'SAME' average pool
    shortcut.proj = torch.nn.Identity()
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = shortcut(x)[0, 0]
    # Bottom-right corner: a 1×1 window after dropping the padding; last column: a 2×1 window.
    assert out[2, 2].item() == 8.0 and out[0, 2].item() == (2.0 + 5.0) / 2 and out[0, 0].item() == 2.0


def test_tf1_bicubic_matches_tensorflows_published_output():
    # tf.image.resize_bicubic of [[0,1,2],[3,4,5],[6,7,8]] to 6×6 (iwyoo/bicubic_interp-tensorflow README).
    image = np.arange(9.0).reshape(3, 3)
    weights = tf_bicubic_matrix(3, 6)
    expected = [
        [0.0, 0.40625, 1.0, 1.59375, 2.0, 2.09375],
        [1.21875, 1.625, 2.21875, 2.8125, 3.21875, 3.3125],
        [3.0, 3.40625, 4.0, 4.59375, 5.0, 5.09375],
        [4.78125, 5.1875, 5.78125, 6.375, 6.78125, 6.875],
        [6.0, 6.40625, 7.0, 7.59375, 8.0, 8.09375],
        [6.28125, 6.6875, 7.28125, 7.875, 8.28125, 8.375],
    ]
    assert np.allclose(weights @ image @ weights.T, expected, atol=1e-6)


def test_preprocessing_resizes_by_the_tf_bicubic_weights():
    """The separable resize equals Σ_h Σ_w rows[i, h] · pixels[h, w, c] · cols[j, w] written out."""
    from PIL import Image

    from sslbench_plugins.simclrv2 import tf_eval_preprocess

    pixels = np.random.default_rng(2).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    top, left, crop_h, crop_w = tf_center_crop_box(24, 32)
    crop = pixels[top : top + crop_h, left : left + crop_w].astype(np.float64) / 255.0
    rows, cols = tf_bicubic_matrix(crop_h, 16), tf_bicubic_matrix(crop_w, 16)
    expected = np.clip(np.einsum("ih,hwc,jw->cij", rows, crop, cols), 0.0, 1.0)
    assert np.allclose(tf_eval_preprocess(Image.fromarray(pixels), 16).numpy(), expected, atol=1e-6)


def test_center_crop_box_is_simclrs():
    assert tf_center_crop_box(375, 500) == (24, 86, 328, 328)  # landscape: 0.875 of the height
    assert tf_center_crop_box(500, 375) == (86, 24, 328, 328)
    assert tf_center_crop_box(224, 224) == (14, 14, 196, 196)


# --------------------------------------------------------------------------------------------------
# Checkpoint → PyTorch


TINY = {"depth": 50, "width": 1, "sk_ratio": 0.0625, "base_width": 8, "stage_blocks": [1, 1, 1, 1]}


def _tiny_card(sk_ratio: float = 0.0625):
    card = CARDS["resnet152_1x_sk1.simclrv2"]
    arch = Architecture(source="simclrv2", name="tiny", args={**TINY, "sk_ratio": sk_ratio}, num_classes=10)
    return card.model_copy(update={"architecture": arch, "feature": card.feature.model_copy(update={"dim": 256})})


def test_tf_numbering_follows_creation_order():
    model = build_model(50, 1, 0.0625, num_classes=10, base_width=8, stage_blocks=(1, 1, 1, 1))
    names = {name: tuple(t.shape) for name, (t, _) in tf_variable_names(model).items()}
    # Stem: conv2d, conv2d_1, conv2d_2 (16, 16, 8 channels). Block 1 (filters 8): shortcut conv2d_3,
    # conv1 conv2d_4, SK streams conv2d_5 (16 ch) / squeeze conv2d_6 (32) / mixing conv2d_7 (no BN),
    # conv3 conv2d_8 (32); batch norms: stem 0–2, shortcut 3, conv1 4, SK 5–6, conv3 7.
    assert names["base_model/conv2d_2/kernel"] == (8, 4, 3, 3)
    assert names["base_model/conv2d_3/kernel"] == (32, 8, 1, 1)
    assert names["base_model/conv2d_5/kernel"] == (16, 8, 3, 3)
    assert names["base_model/conv2d_7/kernel"] == (16, 32, 1, 1)
    assert names["base_model/batch_normalization_6/gamma"] == (32,)
    assert names["base_model/batch_normalization_7/gamma"] == (32,)
    assert names["base_model/conv2d_9/kernel"] == (64, 32, 1, 1)  # block 2's shortcut comes first
    assert names["head_supervised/linear_layer/dense/kernel"] == (10, 256)
    n_conv = sum(1 for n in names if n.endswith("/kernel") and "conv2d" in n)
    assert n_conv == 3 + 4 * 6


def _tf_layout(model, rng) -> dict[str, np.ndarray]:
    """Random values under TF's names and shapes (HWIO kernels, (in, out) dense)."""
    out = {}
    for name, (tensor, kind) in tf_variable_names(model).items():
        shape = tuple(tensor.shape)
        if kind == "kernel":
            shape = (shape[2], shape[3], shape[1], shape[0])
        elif kind == "dense":
            shape = (shape[1], shape[0])
        # Scaled like a trained network (He-initialised kernels, BN near identity), so that a deep
        # model's activations stay finite.
        if kind == "kernel":
            value = rng.normal(scale=np.sqrt(2.0 / np.prod(shape[:3])), size=shape)
        elif name.endswith(("gamma", "moving_variance")):
            value = 1.0 + 0.1 * np.abs(rng.normal(size=shape))
        else:
            value = 0.05 * rng.normal(size=shape)
        out[name] = value.astype(np.float32)
    return out


def _write_checkpoint(folder: Path, model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = _tf_layout(model, rng)
    extra = {
        name.replace("base_model/", "ema_model/"): value + 1
        for name, value in base.items()
        if name.startswith("base_model/")
    }
    extra |= {f"{name}/Momentum": np.zeros_like(value) for name, value in base.items()}
    extra |= {
        "head_contrastive/nl_0/dense/kernel": rng.normal(size=(256, 256)).astype(np.float32),
        "global_step": np.array(250228, dtype=np.int64),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_bundle(folder / "model.ckpt-250228", base | extra, block_size=4096)
    return base


def test_tiny_sk_resnet_goes_through_bundle_reader_and_module_with_equal_tensors(tmp_path):
    card = _tiny_card()
    reference = build_model(50, 1, 0.0625, num_classes=10, base_width=8, stage_blocks=(1, 1, 1, 1))
    tf_values = _write_checkpoint(tmp_path / "ckpt", reference)
    backbone = SimCLRv2Backbone(card, SimCLRv2Options(weights=str(tmp_path / "ckpt"), crop=64))
    loaded = tf_variable_names(backbone.model)
    for name, value in tf_values.items():
        tensor, kind = loaded[name]
        if kind == "kernel":
            value = value.transpose(3, 2, 0, 1)
        elif kind == "dense":
            value = value.T
        assert np.array_equal(tensor.detach().numpy(), value), name
    ema = SimCLRv2Backbone(card, SimCLRv2Options(weights=str(tmp_path / "ckpt"), ema=True, crop=64))
    name = "base_model/conv2d_5/kernel"
    assert np.array_equal(
        tf_variable_names(ema.model)[name][0].detach().numpy(), tf_values[name].transpose(3, 2, 0, 1) + 1
    )
    with torch.inference_mode():
        features = backbone.embed(torch.rand(2, 3, 64, 64))
        logits = backbone.logits(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 256) and logits.shape == (2, 10) and torch.isfinite(features).all()
    assert backbone.fingerprint()["weights_sha256"] != ema.fingerprint()["weights_sha256"] or ema.ema


def test_a_checkpoint_of_another_architecture_fails_naming_variables(tmp_path):
    other = build_model(50, 1, 0.0, num_classes=10, base_width=8, stage_blocks=(1, 1, 1, 1))  # no SK
    _write_checkpoint(tmp_path / "ckpt", other)
    with pytest.raises(SSLBenchError) as info:
        SimCLRv2Backbone(_tiny_card(), SimCLRv2Options(weights=str(tmp_path / "ckpt")))
    message = str(info.value)
    assert "does not match the architecture" in message and "missing, e.g. base_model/" in message
    assert "\n" not in message


def test_preprocessing_is_unnormalised_and_square(tmp_path):
    from PIL import Image

    backbone = SimCLRv2Backbone(_tiny_card(), SimCLRv2Options(pretrained=False))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(375, 500, 3), dtype=np.uint8))
    pixels = backbone.preprocess(image)
    assert tuple(pixels.shape) == (3, 224, 224) and pixels.min() >= 0.0 and pixels.max() <= 1.0
    flat = Image.fromarray(np.full((300, 400, 3), 128, dtype=np.uint8))
    assert torch.allclose(backbone.preprocess(flat), torch.full((3, 224, 224), 128 / 255))


@pytest.mark.parametrize("card_id", ["resnet50_1x_sk0.simclrv2", "resnet152_1x_sk1.simclrv2"])
def test_cards_build_with_their_declared_feature_dim(card_id):
    backbone = SimCLRv2Backbone(CARDS[card_id], SimCLRv2Options(pretrained=False, crop=64))
    with torch.inference_mode():
        assert tuple(backbone.embed(torch.rand(1, 3, 64, 64)).shape) == (1, CARDS[card_id].feature.dim)


def test_the_3x_card_declares_the_width_it_builds():
    model = simclrv2.build_model(152, 3, 0.0625, stage_blocks=(1, 1, 1, 1))  # full width, fewer blocks
    assert model.num_features == CARDS["resnet152_3x_sk1.simclrv2"].feature.dim == 6144


@pytest.mark.slow
def test_extraction_through_the_plugin_uses_the_cache_like_pytorch_backbones(tmp_path):
    """A real R50 1× checkpoint layout (random values) through `sslbench run`, twice: the second run
    reads the features from the cache and gives identical results."""
    model = build_model(50, 1, 0.0, num_classes=1000)
    _write_checkpoint(tmp_path / "r50", model)
    spec = {
        "models": [{"id": "resnet50_1x_sk0.simclrv2", "options": {"weights": str(tmp_path / "r50"), "crop": 32}}],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 2, "epochs": 5},
        "extraction": {"workers": 0},
        "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    first = run_cli("run", "spec.yaml", "--out", "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("run", "spec.yaml", "--out", "b", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "features extracted" in first.stderr + first.stdout and "from the cache" in second.stderr + second.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert [r["metrics"] for r in a["runs"]] == [r["metrics"] for r in b["runs"]]
    assert a["runs"][0]["backbone"] == "resnet50_1x_sk0.simclrv2"
