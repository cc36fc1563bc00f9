"""Spec validation: every mistake is one line naming the file, the YAML line and the field."""

from __future__ import annotations

import pytest

from sslbench.errors import SSLBenchError
from sslbench.spec import default_kmeans_batch_size, load_spec, overclustered_k, parse_spec, resolve_spec

GOOD = """\
name: t
models:
  - id: raw
datasets:
  - id: digits
protocol:
  k: 10
  overcluster: [1.0, 1.5]
  seeds: 3
"""


def error_of(text: str) -> str:
    with pytest.raises(SSLBenchError) as info:
        parse_spec(text, "spec.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_spec_defaults_and_sweep():
    spec = parse_spec(GOOD, "spec.yaml").spec
    assert spec.protocol.seeds == [0, 1, 2]
    assert spec.protocol.epochs == [60]
    assert spec.protocol.pca_dims == [None]
    assert spec.protocol.whiten is False
    assert spec.datasets[0].fit_split == "train"
    points = spec.protocol.points(n_classes=10)
    assert [(p.k, p.n_clusters, p.batch_size) for p in points] == [(10, 10, 2048), (10, 15, 2048)]


def test_default_seed_count_is_five():
    spec = parse_spec("models: [{id: raw}]\ndatasets: [{id: digits}]\n").spec
    assert spec.protocol.seeds == [0, 1, 2, 3, 4]


def test_paper_batch_size_rule_and_overclustering():
    assert default_kmeans_batch_size(1000) == 2048
    assert default_kmeans_batch_size(1500) == 2048
    assert default_kmeans_batch_size(3000) == 4096
    assert overclustered_k(1000, 1.5) == 1500
    assert overclustered_k(313, 1.5) == 469  # int() truncation, as the paper's code
    assert overclustered_k(1000, 1.1) == 1100


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("  k: 10", "  kk: 10"), "spec.yaml:7: protocol.kk: unknown key (did you mean 'k'?)"),
        (
            GOOD.replace("  k: 10", "  k: 0"),
            "spec.yaml:7: protocol.k: Input should be greater than or equal to 1",
        ),
        (GOOD.replace("  k: 10", "  k: ten"), "spec.yaml:7: protocol.k: Input should be a valid integer"),
        (
            GOOD.replace("[1.0, 1.5]", "[1.0, 0.5]"),
            "spec.yaml:8: protocol.overcluster[1]: Input should be greater",
        ),
        (
            GOOD.replace("seeds: 3", "seeds: 0"),
            "spec.yaml:9: protocol.seeds: a seed count must be",
        ),
        (GOOD + "  epochs: 0\n", "spec.yaml:10: protocol.epochs: Input should be greater than or equal to 1"),
        (GOOD.replace("  - id: raw", "  - idd: raw"), "spec.yaml:3: models[0]"),
        (GOOD + "device: gpu\n", "spec.yaml:10: device: String should match pattern"),
        (GOOD.replace("models:\n  - id: raw\n", ""), "spec.yaml:1: models: required key is missing"),
        ("models: [}\n", "spec.yaml:1: YAML syntax error"),
        ("- a\n- b\n", "spec.yaml: a spec must be a YAML mapping"),
        (GOOD + "protocol2: {}\n", "spec.yaml:10: protocol2: unknown key (did you mean 'protocol'?)"),
    ],
)
def test_bad_specs_name_line_and_field(text, expected):
    assert error_of(text).startswith(expected)


def test_duplicate_model_names_are_rejected():
    text = GOOD.replace("  - id: raw\n", "  - id: raw\n  - id: raw\n")
    assert "two entries are named 'raw'" in error_of(text)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SSLBenchError, match=r"spec file not found: .*nope\.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_resolve_unknown_names_suggest_close_ones(plugins):
    loaded = parse_spec(GOOD.replace("id: raw", "id: rwa"), "spec.yaml")
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(loaded, plugins)
    assert str(info.value).startswith("spec.yaml:3: models[0].id: unknown backbone 'rwa' (did you mean 'raw'?)")

    loaded = parse_spec(GOOD.replace("id: digits", "id: digit"), "spec.yaml")
    with pytest.raises(SSLBenchError, match="unknown dataset 'digit' \\(did you mean 'digits'\\?\\)"):
        resolve_spec(loaded, plugins)

    loaded = parse_spec(GOOD + "  backend: referense\n", "spec.yaml")
    with pytest.raises(SSLBenchError, match=r"spec\.yaml:10: protocol\.backend: unknown backend 'referense'"):
        resolve_spec(loaded, plugins)


def test_plugin_options_are_validated_with_the_plugins_model(plugins):
    text = GOOD.replace("  - id: raw\n", "  - id: random_cnn\n    options:\n      widht: 8\n")
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(text, "spec.yaml"), plugins)
    assert str(info.value).startswith("spec.yaml:5: models[0].options.widht: unknown key (did you mean 'width'?)")

    text = GOOD.replace("  - id: raw\n", "  - id: random_cnn\n    options: {width: 0}\n")
    with pytest.raises(SSLBenchError, match=r"models\[0\]\.options\.width: Input should be greater"):
        resolve_spec(parse_spec(text, "spec.yaml"), plugins)

    text = GOOD.replace("  - id: raw\n", "  - id: raw\n    options: {size: 3}\n")
    with pytest.raises(SSLBenchError, match=r"models\[0\]\.options\.size: unknown key"):
        resolve_spec(parse_spec(text, "spec.yaml"), plugins)


def test_bundled_quickstart_resolves(plugins):
    from sslbench.bundled import bundled_specs

    loaded = load_spec(bundled_specs()["quickstart"])
    resolve_spec(loaded, plugins)
    assert [m.id for m in loaded.spec.models] == ["raw", "random_cnn", "mobilenetv2_100.tv_in1k"]
    assert loaded.spec.models[2].optional
    assert loaded.spec.protocol.overcluster == [1.0, 1.5]


@pytest.mark.parametrize("name", ["quickstart", "paper-table1", "paper-objectnet", "modern-zoo"])
def test_every_bundled_spec_resolves(plugins, name):
    from sslbench.bundled import bundled_specs

    resolved = resolve_spec(load_spec(bundled_specs()[name]), plugins)
    assert len(resolved.transfer_options) == len(resolved.spec.datasets)


def test_paper_objectnet_spec_has_both_protocols(plugins):
    from sslbench.bundled import bundled_specs

    spec = load_spec(bundled_specs()["paper-objectnet"]).spec
    on_objectnet, imagenet = spec.datasets
    assert (on_objectnet.id, on_objectnet.fit_split, on_objectnet.eval_split) == ("objectnet", "test", "test")
    assert [(t.id, t.split, t.class_map) for t in imagenet.transfer] == [("objectnet", "test", "imagenet_classes")]


def test_transfer_options_are_validated_with_their_line(plugins):
    text = GOOD.replace(
        "  - id: digits\n",
        "  - id: digits\n    transfer:\n      - id: objectnet\n        options: {root: x, rooot: y}\n",
    )
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(text, "spec.yaml"), plugins)
    assert str(info.value).startswith("spec.yaml:8: datasets[0].transfer[0].options.rooot: unknown key"), info.value


def test_the_modern_zoo_spec_runs_every_modern_card_with_knn(plugins):
    from sslbench.bundled import bundled_specs
    from sslbench.cards import load_cards

    paper = {"mocov2", "infomin", "swav", "supervised", "offline", "simclrv2", "bigbigan"}
    spec = resolve_spec(load_spec(bundled_specs()["modern-zoo"]), plugins).spec
    assert {m.id for m in spec.models} == {c.id for c in load_cards() if c.family not in paper}
    assert [(p.id, p.options) for p in spec.probes] == [("knn", {"k": [10, 20, 200]})]
