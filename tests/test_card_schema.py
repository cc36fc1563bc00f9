"""The card schema as a third party meets it: ids explained in words, hashes that must be checkable,
relative ``file`` paths taken from the card file's folder, and what ``card_backbones`` accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sslbench.cards import load_card_file
from sslbench.errors import SSLBenchError
from sslbench.weights import resolve_weights
from sslbench_plugins.pytorch_zoo import CardOptions, card_backbones

from conftest import REPO

EXAMPLE_CARDS = REPO / "examples" / "sslbench-example" / "sslbench_example" / "cards"


def example_card(**changes: object) -> dict:
    """The example package's MoCo-layout card, as a mapping, with ``changes``."""
    card = yaml.safe_load((EXAMPLE_CARDS / "example.yaml").read_text())["cards"][0]
    return {**card, **changes}


def in_code(**changes: object) -> dict:
    """The same card as given in code: its weights file by absolute path."""
    return example_card(weights=[{"kind": "file", "path": str(EXAMPLE_CARDS / "test_vit_moco.pth")}], **changes)


def write_card_file(folder: Path, *cards: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump({"family": "example", "cards": list(cards)}))
    return path


@pytest.mark.parametrize("bad_id", ["ResNet50.moco", "resnet50", "resnet50.moco.v2", "resnet-50.moco", ".moco"])
def test_a_wrong_card_id_is_explained_in_words(tmp_path, bad_id):
    rule = (
        "not an arch.tag id: two parts joined by one dot, architecture then weights tag, each of lowercase "
        "letters, digits and underscores (e.g. resnet50.mocov2_800ep)"
    )
    path = write_card_file(tmp_path, example_card(id=bad_id))
    with pytest.raises(SSLBenchError) as in_file:
        load_card_file(path)
    with pytest.raises(SSLBenchError) as from_code:
        card_backbones([in_code(id=bad_id)], where="mine")
    for caught, source in ((in_file, str(path)), (from_code, "mine[0]")):
        message = str(caught.value)
        assert "\n" not in message and message.startswith(source) and rule in message, message
        assert "^[a-z" not in message  # the rule in words, not the regex


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab_9.-A \n", max_size=8))
def test_the_id_rule_in_words_is_the_check(candidate):
    """The sentence says what the card's id check accepts: an independent restatement, checked on arbitrary
    strings (a trailing newline included, which ``re.match`` with ``$`` would let through)."""
    parts = candidate.split(".")
    in_words = len(parts) == 2 and all(
        p and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in p) for p in parts
    )
    try:
        card_backbones([in_code(id=candidate)], where="mine")
        accepted = True
    except SSLBenchError as exc:
        assert "not an arch.tag id" in str(exc), exc
        accepted = False
    assert accepted == in_words


@pytest.mark.parametrize(
    ("hash_", "error"),
    [
        ({"kind": "sha256"}, "hash kind 'sha256' needs a value of lowercase hex digits"),
        ({"kind": "sha256", "value": "48b7cfa5"}, "a sha256 hash has 64 hex digits, not 8 (or use sha256-prefix)"),
        ({"kind": "md5-prefix", "value": "B8B06E"}, "hash kind 'md5-prefix' needs a value of lowercase hex digits"),
        ({"kind": "none", "value": "ab"}, "hash kind 'none' takes no value"),
        ({"kind": "sha256-prefix", "value": "a"}, "a sha256-prefix value has at least 6 hex digits, not 1"),
        ({"kind": "md5-prefix", "value": "0a1b2"}, "a md5-prefix value has at least 6 hex digits, not 5"),
    ],
)
def test_a_hash_that_cannot_be_checked_is_refused(hash_, error):
    with pytest.raises(SSLBenchError, match=rf"^mine\[0\].*hash.*{re.escape(error)}"):
        card_backbones([in_code(hash=hash_)], where="mine")


def test_a_relative_file_path_is_taken_from_the_card_files_folder(tmp_path, monkeypatch):
    """The example package's card (a MoCo-layout file beside it) loads from any current directory, and
    the model holds the file's encoder_q tensors, read here with torch alone."""
    monkeypatch.chdir(tmp_path)
    entries = {entry.name: entry for entry in card_backbones(EXAMPLE_CARDS)}
    entry = entries["test_vit.example_moco"]
    assert entry.card.weights[0].path == str((EXAMPLE_CARDS / "test_vit_moco.pth").absolute())
    backbone = entry.factory(CardOptions(crop=32))
    stored = torch.load(EXAMPLE_CARDS / "test_vit_moco.pth", weights_only=True)["state_dict"]
    expected = {
        key.removeprefix("module.encoder_q."): value.float()
        for key, value in stored.items()
        if key.startswith("module.encoder_q.") and ".head." not in key
    }
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())

    # the same card in a folder without the file: the message names where the card looks
    copy = write_card_file(tmp_path / "elsewhere", example_card())
    (moved,) = card_backbones(copy.parent)
    with pytest.raises(SSLBenchError) as caught:
        resolve_weights(moved.card)
    message = str(caught.value)
    assert "\n" not in message and str(copy.parent.absolute() / "test_vit_moco.pth") in message, message


def test_a_relative_file_path_in_a_card_given_in_code_is_refused(tmp_path):
    with pytest.raises(SSLBenchError) as caught:
        card_backbones([example_card()], where="my_plugin.CARDS")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("my_plugin.CARDS[0]") and "path" in message
    assert (
        "a relative path needs a card file to be resolved against: give an absolute path, or ship the card as a "
        "YAML file beside its weights" in message
    )
    (entry,) = card_backbones([in_code()])
    assert entry.card.weights[0].path == str(EXAMPLE_CARDS / "test_vit_moco.pth")


def test_card_backbones_builds_pytorch_cards_only(tmp_path):
    with pytest.raises(SSLBenchError) as caught:
        card_backbones([in_code(loader="simclrv2")], where="mine")
    assert str(caught.value) == (
        "mine: card test_vit.example_moco has loader 'simclrv2'; card_backbones builds 'pytorch' cards only"
    )
