"""The modern zoo's cards: official checkpoint layouts load exactly, and the known silent failures are refused.

Every checkpoint here is written by the test from the card's architecture with random weights, reshaped into
the layout of the family's official file; big architectures are only built on the meta device (shapes, no
memory), or replaced by the same architecture with two blocks (same key names) where weights must be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml

from sslbench.cards import Architecture, Feature, ModelCard, WeightsHash, load_card_file, load_cards, silent_failure
from sslbench.errors import SSLBenchError
from sslbench.weights import file_digest
from sslbench_plugins.pytorch_zoo import CardBackbone, CardOptions, build_architecture

CARDS = {card.id: card for card in load_cards()}
MODERN_FAMILIES = {
    "dino",
    "dinov2",
    "dinov3",
    "ibot",
    "mae",
    "msn",
    "mocov3",
    "clip",
    "siglip",
    "eva02",
    "ijepa",
    "barlowtwins",
    "vicreg",
}
MODERN = sorted(c for c in CARDS if CARDS[c].family in MODERN_FAMILIES)

#: The issue's list, by card id.
EXPECTED = {
    "vit_small_patch16_224.dino",
    "vit_base_patch16_224.dino",
    "vit_small_patch8_224.dino",
    "vit_base_patch8_224.dino",
    "resnet50.dino",
    *(f"vit_{s}_patch14_{r}dinov2.lvd142m" for s in ("small", "base", "large", "giant") for r in ("", "reg4_")),
    *(f"vit_{s}_patch16_dinov3.lvd1689m" for s in ("small", "base", "large")),
    *(f"convnext_{s}.dinov3_lvd1689m" for s in ("tiny", "small", "base", "large")),
    *(f"vit_{s}_patch16_224.ibot" for s in ("small", "base", "large")),
    "vit_base_patch16_224.mae",
    "vit_large_patch16_224.mae",
    "vit_huge_patch14_224.mae",
    *(f"vit_{s}_patch16_224.msn" for s in ("small", "base", "large")),
    "resnet50.mocov3_1000ep",
    "vit_small_patch16_224.mocov3_300ep",
    "vit_base_patch16_224.mocov3_300ep",
    "vit_base_patch16_clip_quickgelu_224.openai",
    "vit_large_patch14_clip_quickgelu_224.openai",
    "vit_base_patch16_siglip_224.v2_webli",
    "eva02_base_patch14_224.mim_in22k",
    "vit_huge_patch14_gap_224.in1k_ijepa",
    "resnet50.barlowtwins_1000ep",
    "resnet50.vicreg",
}


def test_modern_cards_validate_and_cover_the_issue():
    assert set(MODERN) == EXPECTED
    for card_id in MODERN:
        card = CARDS[card_id]
        assert card.license and card.notes, card_id
        assert card.architecture.source == "timm", card_id
        assert silent_failure(card) is None, card_id
        if card.hash.kind == "none":
            assert "hash" in card.notes, card_id  # the notes say why there is none
    assert CARDS["vit_small_patch16_224.dino"].knn_top1.value == 74.5
    assert CARDS["vit_small_patch14_reg4_dinov2.lvd142m"].linear_top1.value == 80.9
    assert CARDS["vit_base_patch16_224.mae"].hash == WeightsHash(kind="md5-prefix", value="8cad7c")
    assert CARDS["vit_base_patch16_224.mae"].knn_top1 is None  # MAE publishes none


def _meta_model(card: ModelCard) -> Any:
    arch = card.architecture
    with torch.device("meta"):
        return timm.create_model(arch.name, pretrained=False, num_classes=arch.num_classes, **arch.args)


@pytest.mark.parametrize("card_id", MODERN)
def test_feature_dim_matches_the_architecture_on_the_meta_device(card_id):
    """No weights are allocated: ViT-g and ViT-H cost nothing here."""
    card = CARDS[card_id]
    model = _meta_model(card)
    assert model.head_hidden_size == card.feature.dim
    crop = card.preprocessing.crop
    with torch.device("meta"):
        out = model.forward_head(model.forward_features(torch.empty(2, 3, crop, crop)), pre_logits=True)
    assert tuple(out.shape) == (2, card.feature.dim)


# --------------------------------------------------------------------------------------------------
# Official layouts


def _rand_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def _small(card: ModelCard) -> ModelCard:
    """The card with one or two blocks per stage (same key names, a small file)."""
    arch = card.architecture
    if arch.name.startswith(("vit_", "eva02_")):
        fewer: dict[str, Any] = {"depth": 2}
    elif arch.name.startswith("resnet"):
        fewer = {"layers": [1, 1, 1, 1]}
    elif arch.name.startswith("convnext"):
        fewer = {"depths": [1, 1, 1, 1]}
    else:  # pragma: no cover - every modern card is one of the above
        return card
    small = Architecture(source="timm", name=arch.name, args={**arch.args, **fewer})
    return card.model_copy(update={"architecture": small})


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _noise(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def official_checkpoint(family: str, encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The exact layout of the family's official file, heads and training state included."""
    width = next(v for k, v in encoder.items() if k.endswith("norm.weight") or k == "bn1.weight").shape[0]
    if family == "dino":  # the teacher dict of a full checkpoint, as extracted (the plain file: see below)
        return _prefixed("backbone.", encoder) | {
            "head.mlp.0.weight": _noise(16, width),
            "head.last_layer.weight_g": _noise(8, 1),
        }
    if family == "dinov2":
        return encoder | {"mask_token": _noise(1, width)}
    if family == "ibot":
        teacher = _prefixed("backbone.", encoder) | {
            "backbone.masked_embed": _noise(width),
            "head.last_layer.weight": _noise(8, 16),
        }
        return {"state_dict": teacher}
    if family == "mae":
        decoder = {
            "mask_token": _noise(1, 1, 16),
            "decoder_embed.weight": _noise(16, width),
            "decoder_pos_embed": _noise(1, 197, 16),
            "decoder_blocks.0.attn.qkv.weight": _noise(48, 16),
            "decoder_norm.weight": _noise(16),
            "decoder_pred.weight": _noise(768, 16),
        }
        return {"model": encoder | decoder}
    if family == "msn":
        target = _prefixed("module.", encoder) | {
            "module.fc.fc1.weight": _noise(16, width),
            "module.fc.fc1.bias": _noise(16),
        }
        return {
            "target_encoder": target,
            "encoder": {k: v.clone() for k, v in target.items()},
            "prototypes": _noise(32, 16),
            "epoch": 800,
            "loss": 1.5,
        }
    if family == "mocov3":
        head = "fc" if "bn1.weight" in encoder else "head"
        state = _prefixed("module.base_encoder.", encoder)
        state |= {
            f"module.base_encoder.{head}.0.weight": _noise(16, width),
            f"module.base_encoder.{head}.3.weight": _noise(8, 16),
        }
        state |= {k.replace("base_encoder", "momentum_encoder"): v.clone() for k, v in state.items()}
        state |= {"module.predictor.0.weight": _noise(16, 8), "module.predictor.3.weight": _noise(8, 16)}
        return {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    if family == "ijepa":
        return {
            "encoder": _prefixed("module.", encoder),
            "predictor": {"module.predictor_embed.weight": _noise(16, width)},
            "target_encoder": _prefixed("module.", {k: v.clone() for k, v in encoder.items()}),
            "epoch": 300,
            "loss": 0.1,
        }
    if family == "clip":  # timm's converted OpenAI image tower: the projection is timm's head
        return encoder | {"head.weight": _noise(512, width), "head.bias": torch.zeros(512)}
    # barlowtwins, vicreg (torch.hub resnet50.pth, no fc), dinov3, siglip, eva02 (timm's files): the state dict
    return dict(encoder)


#: One card per family, the smallest; stand-ins keep the card's layout on a small architecture with the
#: same key names (I-JEPA ViT-H/14 without class token → a two-block ViT-S without class token).
LAYOUT_CARDS = [
    "vit_small_patch16_224.dino",
    "resnet50.dino",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch16_dinov3.lvd1689m",
    "convnext_tiny.dinov3_lvd1689m",
    "vit_small_patch16_224.ibot",
    "vit_base_patch16_224.mae",
    "vit_small_patch16_224.msn",
    "resnet50.mocov3_1000ep",
    "vit_small_patch16_224.mocov3_300ep",
    "vit_base_patch16_clip_quickgelu_224.openai",
    "vit_base_patch16_siglip_224.v2_webli",
    "eva02_base_patch14_224.mim_in22k",
    "vit_huge_patch14_gap_224.in1k_ijepa",
    "resnet50.barlowtwins_1000ep",
    "resnet50.vicreg",
]
IJEPA_STAND_IN = Architecture(
    source="timm",
    name="vit_small_patch16_224",
    args={"class_token": False, "global_pool": "avg", "fc_norm": False, "depth": 2, "dynamic_img_size": True},
)


def _card_for_test(card_id: str) -> ModelCard:
    card = CARDS[card_id]
    if card.family == "ijepa":
        return card.model_copy(update={"architecture": IJEPA_STAND_IN, "feature": Feature(dim=384)})
    return _small(card)


def _save(checkpoint: dict, path: Path, card: ModelCard) -> ModelCard:
    torch.save(checkpoint, path)
    return card.model_copy(update={"hash": WeightsHash(kind="sha256", value=file_digest(path))})


def _load(card: ModelCard, path: Path) -> CardBackbone:
    return CardBackbone(card, CardOptions(weights=str(path)))


def _assert_equal(backbone: CardBackbone, encoder: dict[str, torch.Tensor]) -> None:
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(encoder)
    for key, value in encoder.items():
        assert torch.equal(loaded[key], value), key


def test_layout_cards_cover_every_family():
    assert {CARDS[c].family for c in LAYOUT_CARDS} == MODERN_FAMILIES


@pytest.mark.parametrize("card_id", LAYOUT_CARDS)
def test_official_layout_loads_exactly_and_a_wrong_one_fails_in_one_line(card_id, tmp_path):
    card = _card_for_test(card_id)
    encoder = _rand_like(build_architecture(card).state_dict())
    checkpoint = official_checkpoint(card.family, encoder)
    loaded_card = _save(checkpoint, tmp_path / "official.pth", card)
    backbone = _load(loaded_card, tmp_path / "official.pth")
    _assert_equal(backbone, encoder)
    with torch.inference_mode():
        features = backbone.embed(torch.rand(1, 3, 112, 112))  # a multiple of patch sizes 8, 14 and 16
    assert tuple(features.shape) == (1, card.feature.dim)
    # the same weights one level deeper (e.g. saved from a wrapper module): nothing would load by name
    inner = card.layout.top_level_key
    wrong = (
        {k: (_prefixed("net.", v) if k == inner else v) for k, v in checkpoint.items()}
        if inner
        else _prefixed("net.", checkpoint)
    )
    bad = _save(wrong, tmp_path / "wrong.pth", card)
    with pytest.raises(SSLBenchError, match=r"weights do not fit the architecture: \d+ model keys missing") as err:
        _load(bad, tmp_path / "wrong.pth")
    assert "\n" not in str(err.value)


def test_dino_plain_backbone_file_loads_too(tmp_path):
    """The downloadable DINO file is the teacher backbone alone, timm key names, no prefix."""
    card = _card_for_test("vit_small_patch16_224.dino")
    encoder = _rand_like(build_architecture(card).state_dict())
    card = _save(dict(encoder), tmp_path / "dino_deitsmall16_pretrain.pth", card)
    _assert_equal(_load(card, tmp_path / "dino_deitsmall16_pretrain.pth"), encoder)


# --------------------------------------------------------------------------------------------------
# Known silent failures


def _card_yaml(tmp_path: Path, card: ModelCard, **changes: Any) -> Path:
    data = card.model_dump(mode="json", exclude_none=True)
    data.update(changes)
    path = tmp_path / f"{card.family}.yaml"
    path.write_text(yaml.safe_dump({"family": card.family, "cards": [data]}))
    return path


def test_openai_clip_into_a_gelu_model_is_refused(tmp_path):
    card = CARDS["vit_base_patch16_clip_quickgelu_224.openai"]
    gelu = {"source": "timm", "name": "vit_base_patch16_clip_224", "args": {"dynamic_img_size": True}}
    with pytest.raises(SSLBenchError, match=r"OpenAI CLIP weights were trained with QuickGELU") as err:
        load_card_file(_card_yaml(tmp_path, card, architecture=gelu))
    assert "\n" not in str(err.value)
    # timm's `.openai` tag of the GELU architecture is caught too, whatever the card's id
    gelu_tag = [{"kind": "timm", "timm_name": "vit_base_patch16_clip_224.openai"}]
    with pytest.raises(SSLBenchError, match=r"use the _clip_quickgelu_ variant"):
        load_card_file(
            _card_yaml(tmp_path, card, id="vit_base_patch16_clip_224.mine", architecture=gelu, weights=gelu_tag)
        )
    # a QuickGELU activation given as an argument is accepted
    load_card_file(_card_yaml(tmp_path, card, architecture=gelu | {"args": {"act_layer": "quick_gelu"}}))


def test_why_the_clip_trap_is_silent(tmp_path):
    """The GELU model takes the QuickGELU weights strictly and returns other features: only the card rule sees it."""
    card = _small(CARDS["vit_base_patch16_clip_quickgelu_224.openai"])
    encoder = _rand_like(build_architecture(card).state_dict())
    card = _save(official_checkpoint("clip", encoder), tmp_path / "clip.pth", card)
    gelu_arch = card.architecture.model_copy(update={"name": "vit_base_patch16_clip_224"})
    quick, gelu = (_load(c, tmp_path / "clip.pth") for c in (card, card.model_copy(update={"architecture": gelu_arch})))
    _assert_equal(gelu, encoder)  # strict loading passes
    assert type(quick.model.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert type(gelu.model.blocks[0].mlp.act).__name__ == "GELU"
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert not torch.equal(quick.embed(x), gelu.embed(x))  # other features, no error anywhere


def test_mocov3_vit_small_has_12_heads_and_six_are_refused(tmp_path):
    card = CARDS["vit_small_patch16_224.mocov3_300ep"]
    with torch.device("meta"):
        model = build_architecture(card)
    assert {block.attn.num_heads for block in model.blocks} == {12}
    six = {"source": "timm", "name": "vit_small_patch16_224", "args": {"dynamic_img_size": True}}
    with pytest.raises(SSLBenchError, match=r"MoCo v3 ViT-S has 12 attention heads.*num_heads: 12") as err:
        load_card_file(_card_yaml(tmp_path, card, architecture=six))
    assert "\n" not in str(err.value)
    with pytest.raises(SSLBenchError, match=r"num_heads: 12"):
        load_card_file(_card_yaml(tmp_path, card, architecture=six | {"args": {"num_heads": 6}}))
    # why a rule is needed: the 6-head model takes the same file strictly
    small = _small(card)
    encoder = _rand_like(build_architecture(small).state_dict())
    small = _save(official_checkpoint("mocov3", encoder), tmp_path / "vit-s.pth.tar", small)
    six_heads = small.architecture.model_copy(update={"args": {**small.architecture.args, "num_heads": 6}})
    wrong = _load(small.model_copy(update={"architecture": six_heads}), tmp_path / "vit-s.pth.tar")
    right = _load(small, tmp_path / "vit-s.pth.tar")
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert not torch.allclose(right.embed(x), wrong.embed(x), atol=1e-3)


def test_dinov2_cards_have_the_official_518_position_embeddings_and_224_is_refused(tmp_path):
    card = CARDS["vit_small_patch14_dinov2.lvd142m"]
    assert card.architecture.args["img_size"] == 518 and card.preprocessing.crop == 224
    with torch.device("meta"):
        assert tuple(build_architecture(card).pos_embed.shape) == (1, 1 + 37 * 37, 384)
    small = _small(card)
    encoder = _rand_like(build_architecture(small).state_dict())
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    small = _save(official_checkpoint("dinov2", encoder), path, small)
    at_224 = small.architecture.model_copy(update={"args": {**small.architecture.args, "img_size": 224}})
    with pytest.raises(SSLBenchError, match=r"pos_embed has shape \(1, 1370, 384\) in the file but \(1, 257, 384\)"):
        _load(small.model_copy(update={"architecture": at_224}), path)
    # the card's own size loads, and evaluates at 224 px by resampling the position embedding
    backbone = _load(small, path)
    with torch.inference_mode():
        assert tuple(backbone.embed(torch.rand(1, 3, 224, 224)).shape) == (1, 384)


def test_dinov2_registers_cards_carry_their_register_tokens():
    for size in ("small", "base", "large", "giant"):
        model = _meta_model(CARDS[f"vit_{size}_patch14_reg4_dinov2.lvd142m"])
        assert tuple(model.reg_token.shape)[1] == 4 and model.num_prefix_tokens == 5


def test_mae_official_layout_drops_the_decoder_and_missing_encoder_keys_are_named(tmp_path):
    card = _small(CARDS["vit_base_patch16_224.mae"])
    encoder = _rand_like(build_architecture(card).state_dict())
    checkpoint = official_checkpoint("mae", encoder)
    assert any(k.startswith("decoder_") for k in checkpoint["model"]) and "mask_token" in checkpoint["model"]
    _assert_equal(_load(_save(checkpoint, tmp_path / "mae.pth", card), tmp_path / "mae.pth"), encoder)
    partial = {k: v for k, v in encoder.items() if not k.startswith("blocks.1.")}
    bad = _save(official_checkpoint("mae", partial), tmp_path / "partial.pth", card)
    with pytest.raises(SSLBenchError, match=r"model keys missing from the file: blocks\.1\.") as err:
        _load(bad, tmp_path / "partial.pth")
    assert "\n" not in str(err.value)
    # the card's md5 prefix belongs to the official file, not to this one
    with pytest.raises(SSLBenchError, match=r"does not match vit_base_patch16_224\.mae's md5-prefix 8cad7c"):
        _load(card, tmp_path / "mae.pth")


def test_a_checkpoint_whose_keys_all_miss_is_refused_naming_them(tmp_path):
    """What strict=False would accept silently: nothing loaded, a random network left."""
    card = _small(CARDS["vit_small_patch16_224.msn"])
    encoder = _rand_like(build_architecture(card).state_dict())
    # the right top-level key, but every key named for another module layout
    foreign = {"target_encoder": {f"module.trunk.{k}": v for k, v in encoder.items()}}
    bad = _save(foreign, tmp_path / "foreign.pth", card)
    with pytest.raises(SSLBenchError) as err:
        _load(bad, tmp_path / "foreign.pth")
    message = str(err.value)
    assert f"{len(encoder)} model keys missing from the file: blocks.0." in message
    assert f"{len(encoder)} unexpected file keys: trunk." in message
    assert "\n" not in message


def test_feature_pool_option_follows_a_family_convention():
    """DINOv2's linear probe reads the class token and the mean patch token; registers are never averaged."""
    card = _small(CARDS["vit_small_patch14_reg4_dinov2.lvd142m"])
    x = torch.rand(1, 3, 112, 112)
    default = CardBackbone(card, CardOptions(pretrained=False))
    feature = card.feature.model_copy(update={"pool": "cls+mean", "dim": 768})
    both = CardBackbone(card.model_copy(update={"feature": feature}), CardOptions(pretrained=False))
    with torch.inference_mode():
        tokens = default.model.forward_features(x)
        assert torch.allclose(default.embed(x), tokens[:, 0])
        assert torch.allclose(both.embed(x), torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1))
    ijepa = _card_for_test("vit_huge_patch14_gap_224.in1k_ijepa")
    no_cls = ijepa.model_copy(update={"feature": ijepa.feature.model_copy(update={"pool": "cls"})})
    with pytest.raises(SSLBenchError, match=r"has no class token: feature.pool 'cls' does not apply"):
        CardBackbone(no_cls, CardOptions(pretrained=False))
