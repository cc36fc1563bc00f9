"""The BigBiGAN plugin: preprocessing and errors always; with TensorFlow installed (the `tf` extra), a
tiny TF module with an `encode` signature goes through the plugin and through `sslbench run`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sslbench.cards import load_cards
from sslbench.errors import SSLBenchError
from sslbench_plugins.bigbigan import BigBiGANBackbone, BigBiGANOptions, center_square_256

from conftest import run_cli

CARDS = {card.id: card for card in load_cards()}
HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_hub") is not None
needs_tf = pytest.mark.skipif(
    not HAS_TF and os.environ.get("SSLBENCH_REQUIRE_TF") != "1", reason="pip install 'sslbench[tf]'"
)


def test_cards_name_the_paper_output_and_the_representations():
    latent = CARDS["bigbigan_revnet50x4.latent"]
    assert latent.architecture.args["output"] == "default" and latent.feature.dim == 120
    assert latent.paper[0].acc.mean == 3.00 and latent.paper[0].linear == 61.3
    assert CARDS["bigbigan_revnet50x4.bn_crelu"].linear_top1.value == 61.3
    assert CARDS["bigbigan_resnet50.avepool"].feature.dim == 2048


def test_preprocessing_is_a_centre_square_at_256_in_minus_one_to_one():
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[:, 50:250] = 255  # exactly the centre square is white
    out = center_square_256(Image.fromarray(pixels))
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    assert np.allclose(out, 1.0, atol=1e-6)
    assert np.allclose(center_square_256(Image.fromarray(np.zeros((10, 10, 3), np.uint8))), -1.0)


def test_without_tensorflow_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(SSLBenchError, match=r"pip install 'sslbench\[tf\]'"):
        BigBiGANBackbone(CARDS["bigbigan_resnet50.latent"], BigBiGANOptions())


HELPER = Path(__file__).parent / "helpers" / "bigbigan_tiny.py"


def _tf(*args: str) -> dict:
    """Run the TensorFlow side in its own process (see helpers/bigbigan_tiny.py)."""
    proc = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _tiny_module(folder, avepool_dim: int = 2048) -> None:
    _tf("make", str(folder), str(avepool_dim))


@needs_tf
@pytest.mark.parametrize(
    "card_id", ["bigbigan_resnet50.latent", "bigbigan_resnet50.avepool", "bigbigan_resnet50.bn_crelu"]
)
def test_the_plugin_takes_the_cards_output_of_encode(tmp_path, card_id):
    _tiny_module(tmp_path / "module")
    out = _tf("embed", str(tmp_path / "module"), card_id)
    assert out["shape"] == [2, CARDS[card_id].feature.dim]
    rng = np.random.default_rng(0)
    w, z = rng.normal(size=(3, 2048)).astype(np.float32), rng.normal(size=(2048, 120)).astype(np.float32)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    pooled = center_square_256(image).mean(axis=(0, 1)) @ w
    expected = {
        "bigbigan_resnet50.latent": pooled @ z,
        "bigbigan_resnet50.avepool": pooled,
        "bigbigan_resnet50.bn_crelu": np.concatenate([np.maximum(pooled, 0), np.maximum(-pooled, 0)]),
    }[card_id]
    assert np.allclose(out["row"], expected, rtol=1e-4, atol=1e-3)


@needs_tf
def test_a_module_with_other_widths_is_reported(tmp_path):
    _tiny_module(tmp_path / "module", avepool_dim=64)
    out = _tf("embed", str(tmp_path / "module"), "bigbigan_resnet50.avepool")
    assert "output 'avepool_feat' is 64-d, card bigbigan_resnet50.avepool says 2048" in out["error"]


@needs_tf
def test_a_missing_module_folder_is_named(tmp_path):
    out = _tf("embed", str(tmp_path / "none"), "bigbigan_resnet50.latent")
    assert out["error"] == f"BigBiGAN module folder not found: {tmp_path / 'none'}"


@needs_tf
def test_extraction_through_the_plugin(tmp_path):
    _tiny_module(tmp_path / "module")
    spec = {
        "models": [{"id": "bigbigan_resnet50.avepool", "options": {"module": str(tmp_path / "module")}}],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 1, "epochs": 5},
        "extraction": {"workers": 0, "batch_size": 128},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert run["backbone"] == "bigbigan_resnet50.avepool" and run["n_train"] == 1348
