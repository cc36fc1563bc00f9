"""Hostile specs: whatever the file holds, the loader answers fast, with a spec or with one line that
names the problem (exit 2 on the command line), never a traceback, a hang or a silent loss."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sslbench.spec as spec_module
from sslbench.errors import SSLBenchError
from sslbench.spec import (
    MAX_CLUSTERS,
    MAX_EPOCHS,
    MAX_PCA_DIMS,
    MAX_SEED,
    MAX_SEEDS,
    MAX_SPEC_BYTES,
    MAX_YAML_DEPTH,
    load_spec,
    missing_paths,
    parse_spec,
    resolve_spec,
)

from conftest import run_cli

BASE = "models: [{id: raw}]\ndatasets: [{id: digits}]\n"

#: A generous sanity bound, not a benchmark: every refusal below takes well under a second with
#: libyaml on an idle machine.
SECONDS = 5.0


def refusal(text: str, source: str = "spec.yaml") -> str:
    """The error of ``text``: one line, short."""
    with pytest.raises(SSLBenchError) as info:
        parse_spec(text, source)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message == message.strip() and len(message) < 2500, message[:3000]
    return message


def one_line_error(call) -> str:
    with pytest.raises(SSLBenchError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(message) < 2500, message
    return message


@pytest.fixture(params=["libyaml", "pure"])
def loader(request, monkeypatch) -> str:
    """Every hostile input through libyaml's parser (the default) and through PyYAML's own."""
    if request.param == "libyaml":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML was built without libyaml")
        monkeypatch.setattr(spec_module, "_Loader", spec_module._loader_class(yaml.CSafeLoader))
    else:
        monkeypatch.setattr(spec_module, "_Loader", spec_module._loader_class(yaml.SafeLoader))
    return request.param


def laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The YAML itself


def test_billion_laughs_is_refused_at_once(loader):
    text = laughs()
    assert len(text) < 1100  # 9^9 values in one kilobyte
    started = time.perf_counter()
    message = refusal(text)
    assert time.perf_counter() - started < SECONDS
    assert message.startswith("spec.yaml:6: the spec stands for more than 100000 values by here"), message


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\n",
        "a: &a {b: *a}\n",
        "a: &a {b: [1, {c: *a}]}\n",
        "a: &a {<<: *a}\n",
    ],
)
def test_recursive_aliases_are_refused(loader, text):
    assert refusal(text) == "spec.yaml:1: YAML alias *a is inside its own anchor"


def test_unknown_alias_is_one_line(loader):
    assert "spec.yaml:1:" in refusal("a: *nowhere\n")


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 3000 + "]" * 3000 + "\n",
        "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n",
        "a:\n" + "".join(" " * i + "- \n" for i in range(1, 400)),
        "- " * 3000 + "x\n",
        "a: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1) + "\n",
        # through aliases: each anchor nests the one before
        "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, MAX_YAML_DEPTH + 2)),
    ],
    ids=["flow-lists", "flow-maps", "block-lists", "one-line-block", "just-too-deep", "aliases"],
)
def test_deep_nesting_is_refused(loader, text):
    message = refusal(text)
    assert ("nested" in message and "deep" in message) or "nesting depth" in message, message


def test_nesting_up_to_the_limit_is_read(loader):
    levels = MAX_YAML_DEPTH - 4  # under the root, models, the model and its options
    inner = "[" * levels + "1" + "]" * levels
    spec = parse_spec(f"models: [{{id: raw, options: {{a: {inner}}}}}]\ndatasets: [{{id: digits}}]\n").spec
    value = spec.models[0].options["a"]
    for _ in range(levels - 1):
        value = value[0]
    assert value == [1]
    deeper = "[" + inner + "]"
    assert "nested" in refusal(f"models: [{{id: raw, options: {{a: {deeper}}}}}]\ndatasets: [{{id: digits}}]\n")


@pytest.mark.parametrize(
    "value",
    [
        "!!timestamp 2024-01-01",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
        "!!omap [a: 1]",
        "!!pairs [a: 1]",
        "!!python/object:os.system {}",
        "!!python/name:os.system",
        "!custom thing",
        "!<tag:example.com,2024:x> thing",
        "!!str {a: 1}",
        "!!map [1]",
    ],
)
def test_tags_outside_json_types_are_refused(loader, value):
    message = refusal(BASE + f"name: {value}\n")
    assert message.startswith("spec.yaml:3: YAML tag ") and "is not allowed" in message, message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("protocol: {k: !!int abc}", "spec.yaml:3: 'abc' is not an integer"),
        ("protocol: {overcluster: !!float abc}", "spec.yaml:3: 'abc' is not a number"),
        ("extraction: {amp: !!bool maybe}", "spec.yaml:3: 'maybe' is not a boolean"),
        ("name: !!null abc", "spec.yaml:3: 'abc' is not null"),
        ("protocol: {seeds: " + "9" * 5000 + "}", "is too long for an integer (5000 characters)"),
        ("protocol: {overcluster: !!float " + "9" * 5000 + "}", "is too long for a number"),
    ],
)
def test_scalars_that_are_not_their_tag_are_one_line(loader, value, expected):
    assert expected in refusal(BASE + value + "\n")


@pytest.mark.parametrize("date", ["2024-02-30", "2024-01-01", "2001-12-14t21:59:43.10-05:00"])
def test_dates_are_strings(loader, date):
    assert parse_spec(BASE + f"name: {date}\n").spec.name == date


def test_explicit_json_tags_are_read(loader):
    spec = parse_spec(BASE + "name: !!str 2024\nprotocol: {k: !!int '10', overcluster: !!float 1.5}\n").spec
    assert spec.name == "2024" and spec.protocol.k == [10] and spec.protocol.overcluster == [1.5]


def test_duplicate_keys_are_refused(loader):
    message = refusal(BASE + "protocol:\n  k: 10\n  k: 20\n")
    assert message == "spec.yaml:5: key 'k' appears twice in one mapping (first at line 4)"


def test_several_documents_and_bad_keys_are_one_line(loader):
    assert refusal(BASE + "---\nname: x\n").startswith("spec.yaml:3: ")
    assert refusal(BASE + "? [a, b]\n: 1\n").startswith("spec.yaml:3: a mapping key must be a plain value")
    assert refusal(BASE + "name: a\x00b\n").startswith("spec.yaml")  # the YAML reader refuses NUL
    assert refusal("") == "spec.yaml: a spec must be a YAML mapping with `models` and `datasets`"


def test_anchors_aliases_and_merges_still_work(loader):
    text = """\
defaults: &defaults {id: random_cnn, options: {width: 8}}
models:
  - <<: *defaults
    name: cnn a
  - {<<: [{name: ignored, id: raw}, *defaults], name: cnn b}
datasets: [{id: digits}]
"""
    # a spec has no free keys: anchors live where they are first used
    with pytest.raises(SSLBenchError, match=r"^spec\.yaml:1: defaults: unknown key"):
        parse_spec(text, "spec.yaml")
    text = """\
models:
  - &cnn {id: random_cnn, name: cnn a, options: {width: 8}}
  - {<<: *cnn, name: cnn b}
  - {<<: [{name: ignored, id: raw}, *cnn], name: cnn c}
datasets: [{id: digits}]
"""
    spec = parse_spec(text, "spec.yaml").spec
    assert [(m.id, m.label, m.options) for m in spec.models] == [
        ("random_cnn", "cnn a", {"width": 8}),
        ("random_cnn", "cnn b", {"width": 8}),
        ("raw", "cnn c", {"width": 8}),  # the first mapping listed wins
    ]


def test_errors_in_merged_values_point_at_their_line(loader, plugins):
    text = (
        "models:\n  - &cnn {id: random_cnn, options: {widht: 8}}\n  - {<<: *cnn, name: b}\ndatasets: [{id: digits}]\n"
    )
    with pytest.raises(SSLBenchError, match=r"^spec\.yaml:2: models\[0\]\.options\.widht: unknown key"):
        resolve_spec(parse_spec(text, "spec.yaml"), plugins)
    text = "models:\n  - {id: raw, name: b, <<: 1}\ndatasets: [{id: digits}]\n"
    assert refusal(text) == "spec.yaml:2: `<<` merges a mapping or a list of mappings"


def _fill(head: str, unit: str, tail: str = "", size: int = 1_000_000) -> str:
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


#: One megabyte of each kind of hostile input, and what refuses it.
MEGABYTE = {
    "laughs": (
        "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 30000)),
        "100000 values",
    ),
    "fan-out": (_fill("x: &x [1, 2, 3]\ny: [", "*x, ", "*x]\n"), "100000 values"),
    "flat-list": (_fill(BASE + "protocol: {seeds: [", "1,", "1]}\n"), "100000 values"),
    "many-keys": ("".join(f"k{i}: {i}\n" for i in range(200_000))[:1_000_000], "100000 values"),
    "many-models": (_fill("datasets: [{id: digits}]\nmodels:\n", "  - {id: raw, name: x}\n"), "100000 values"),
    "many-anchors": (_fill(BASE + "x: [", "&a 1, ", "1]\n"), "100000 values"),
    "deep-flow": (_fill("a: ", "["), "nest"),
    "deep-block": (_fill("", "- ", "x\n"), "nest"),
    "long-number": (_fill(BASE + "protocol: {seeds: ", "7", "}\n"), "too long for an integer"),
    "long-string": (_fill(BASE + "name: ", "a", "\n"), "name: String should have at most 100 characters"),
    "long-key": (_fill(BASE + "? ", "k", "\n: 1\n"), "unknown key"),
    "tags": (_fill(BASE + "x: [", "!!python/object:os.system {}, ", "1]\n"), "is not allowed"),
    "duplicate-keys": (_fill(BASE + "name: a\n" * 40_000, "#", "\n"), "appears twice"),
    "escapes": (_fill(BASE + 'name: "', "\\x01\\n", '"\n'), "name: "),
    "bad-utf8-escapes": (_fill(BASE + 'name: "', "\\uD800", '"\n'), "spec.yaml"),
}


@pytest.mark.parametrize("kind", list(MEGABYTE))
def test_a_megabyte_of_hostile_yaml_is_refused_fast(kind):
    text, expected = MEGABYTE[kind]
    assert 900_000 < len(text.encode()) <= MAX_SPEC_BYTES
    started = time.perf_counter()
    message = refusal(text)
    elapsed = time.perf_counter() - started
    assert expected in message, message[:500]
    assert elapsed < SECONDS, (kind, elapsed)


@pytest.mark.parametrize("kind", ["laughs", "fan-out", "deep-flow", "deep-block", "long-number", "tags"])
def test_a_megabyte_through_pure_pyyaml(kind, monkeypatch):
    monkeypatch.setattr(spec_module, "_Loader", spec_module._loader_class(yaml.SafeLoader))
    text, expected = MEGABYTE[kind]
    started = time.perf_counter()
    assert expected in refusal(text)
    assert time.perf_counter() - started < 6 * SECONDS  # PyYAML's own parser is the slow fallback


@pytest.mark.parametrize(("command", "kind"), [("validate", "many-models"), ("run", "laughs")])
def test_a_megabyte_of_hostile_yaml_through_the_command_line(tmp_path, command, kind):
    (tmp_path / "spec.yaml").write_text(MEGABYTE[kind][0])
    assert_one_line_error(run_cli(command, "spec.yaml", cwd=tmp_path), "100000 values")


def test_spec_files_larger_than_the_limit_are_not_read(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * MAX_SPEC_BYTES + "\n")
    message = one_line_error(lambda: load_spec(big))
    assert message == f"{big}: a spec file is at most {MAX_SPEC_BYTES} bytes; this one is larger"
    if Path("/dev/zero").exists():  # endless: only the first mebibyte is read
        assert "at most" in one_line_error(lambda: load_spec("/dev/zero"))
    assert "at most" in one_line_error(lambda: parse_spec("#" * (MAX_SPEC_BYTES + 1)))


def test_unreadable_spec_paths(tmp_path):
    from sslbench.bundled import find_spec

    assert "cannot read spec file" in one_line_error(lambda: load_spec(tmp_path))
    too_long = "a" * 5000
    assert find_spec(too_long) == Path(too_long)
    assert "cannot read spec file" in one_line_error(lambda: load_spec(find_spec(too_long)))
    assert "cannot read spec file" in one_line_error(lambda: load_spec("a\x00b.yaml"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    assert one_line_error(lambda: load_spec(latin)).endswith("not UTF-8 text (byte 9)")


# --------------------------------------------------------------------------------------------------
# Values that validate must refuse because a run could not use them


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        (f"seeds: [{MAX_SEED + 1}]", "protocol.seeds[0]: Input should be less than or equal to 2147483647"),
        (f"seeds: [0, {2**64}]", "protocol.seeds[1]: Input should be less than or equal to 2147483647"),
        ("seeds: [-1]", "protocol.seeds[0]: Input should be greater than or equal to 0"),
        ("seeds: 1000000000", "protocol.seeds: a seed count must be at most 10000"),
        (f"seeds: {10**400}", "spec.yaml:4: '1000000000000000000000000000000000000000000000000000000000… is too long"),
        (f"seeds: [{', '.join(map(str, range(MAX_SEEDS + 1)))}]", "at most 10000 seeds, got a list of 10001"),
        ("batch_size: 1000000000000000000000000000000", "protocol.batch_size: Input should be less than or equal"),
        (f"k: {MAX_CLUSTERS + 1}", "protocol.k: Input should be less than or equal to 16777216"),
        (f"pca_dims: {MAX_PCA_DIMS + 1}", "protocol.pca_dims: Input should be less than or equal to 1048576"),
        (f"epochs: {MAX_EPOCHS + 1}", "protocol.epochs: Input should be less than or equal to 1048576"),
        ("overcluster: 1.0e+300", "protocol.overcluster: Input should be less than or equal to 16777216"),
        ("overcluster: .inf", "protocol.overcluster: Input should be a finite number"),
        ("{k: 10000000, overcluster: 2}", "protocol.overcluster: int(overcluster × k) = 20000000 clusters"),
        (
            "{pca_dims: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], k: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "
            "epochs: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], overcluster: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}",
            "protocol.pca_dims: the sweep has 11000 protocol points",
        ),
    ],
)
def test_protocol_values_a_run_cannot_use(protocol, expected):
    text = BASE + ("protocol: " + protocol if protocol.startswith("{") else "protocol:\n  " + protocol) + "\n"
    started = time.perf_counter()
    message = refusal(text)
    assert time.perf_counter() - started < SECONDS
    assert expected in message, message


@pytest.mark.parametrize(
    ("extraction", "expected"),
    [
        ("batch_size: 100000000", "extraction.batch_size: Input should be less than or equal to 16777216"),
        ("commit_every: 100000000", "extraction.commit_every: Input should be less than or equal to 16777216"),
        ("workers: 257", "extraction.workers: Input should be less than or equal to 256"),
        ("workers: -1", "extraction.workers: Input should be greater than or equal to 0"),
    ],
)
def test_extraction_values_a_run_cannot_use(extraction, expected):
    assert expected in refusal(BASE + "extraction:\n  " + extraction + "\n")


def test_largest_accepted_values():
    text = BASE + (
        f"protocol: {{seeds: {MAX_SEEDS}, k: {MAX_CLUSTERS}, pca_dims: {MAX_PCA_DIMS}, epochs: {MAX_EPOCHS}}}\n"
        "extraction: {batch_size: 16777216, workers: 256, commit_every: 16777216}\n"
    )
    protocol = parse_spec(text).spec.protocol
    assert len(protocol.seeds) == MAX_SEEDS and protocol.seeds[-1] == MAX_SEEDS - 1
    assert parse_spec(BASE + f"protocol: {{seeds: [0, {MAX_SEED}]}}\n").spec.protocol.seeds == [0, MAX_SEED]


def test_clusters_from_the_number_of_classes_are_bounded_at_run_time():
    protocol = parse_spec(BASE + "protocol: {overcluster: 10000}\n").spec.protocol
    assert protocol.points(n_classes=1000)[0].n_clusters == 10_000_000
    with pytest.raises(SSLBenchError, match=r"^protocol: int\(overcluster × k\) = 20000000 clusters"):
        protocol.points(n_classes=2000)


@pytest.mark.parametrize(
    ("device", "cuda", "count", "mps", "expected"),
    [
        ("cuda", False, 0, False, "spec.yaml:3: device: 'cuda' was asked for but torch sees no CUDA GPU"),
        ("cuda:0", False, 0, False, "'cuda:0' was asked for but torch sees no CUDA GPU"),
        ("cuda:1", True, 1, False, "'cuda:1' was asked for but torch sees 1 CUDA GPU(s), numbered from 0"),
        ("mps", False, 0, False, "spec.yaml:3: device: 'mps' was asked for but torch has no MPS device here"),
        ("cuda:0", True, 1, False, None),
        ("mps", False, 0, True, None),
        ("cpu", False, 0, False, None),
        ("auto", False, 0, False, None),
    ],
)
def test_the_device_must_be_there(plugins, monkeypatch, device, cuda, count, mps, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    loaded = parse_spec(BASE + f"device: {device}\n", "spec.yaml")
    if expected is None:
        resolve_spec(loaded, plugins)
    else:
        assert expected in one_line_error(lambda: resolve_spec(loaded, plugins))


def test_device_names_are_ascii():
    assert "device: String should match pattern" in refusal(BASE + "device: cuda:٣\n")
    assert "device: String should match pattern" in refusal(BASE + "device: 'cuda:0\n'\n")


# --------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            "models: [{id: raw, name: a b}, {id: raw, name: a-b}]\ndatasets: [{id: digits}]",
            "spec.yaml:1: models[1].name: 'a b' (models[0]) and 'a-b' (models[1]) would write the same "
            "predictions files ('a-b__…'); give one a distinct `name`",
        ),
        (
            "models: [{id: raw, name: Raw}, {id: raw}]\ndatasets: [{id: digits}]",
            "models[1].id: 'Raw' (models[0]) and 'raw' (models[1]) would write the same predictions files",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits, name: 'd/1'}, {id: digits, name: 'd:1'}]",
            "datasets[1].name: 'd/1' (datasets[0]) and 'd:1' (datasets[1]) would write the same predictions",
        ),
        (
            "models: [{id: raw}]\ndatasets:\n  - {id: digits, name: 'x → y'}\n  - {id: digits, name: x, transfer: [{id: digits, name: y}]}",
            "spec.yaml:4: datasets[1].transfer[0].name: two entries are named 'x → y' (datasets[0] and "
            "datasets[1].transfer[0])",
        ),
        (
            "models: [{id: raw}]\ndatasets:\n  - {id: digits, name: 'x y'}\n  - {id: digits, name: x, transfer: [{id: digits, name: y}]}",
            "datasets[1].transfer[0].name: 'x y' (datasets[0]) and 'x → y' (datasets[1].transfer[0]) would "
            "write the same predictions files ('x-y__…')",
        ),
        (
            "models: [{id: raw, name: a__b}]\ndatasets: [{id: digits}]",
            "models[0].name: 'a__b' made file-safe is 'a__b', which has `__` or an outer `_`",
        ),
        (
            "models: [{id: raw, name: _a}]\ndatasets: [{id: digits}]",
            "models[0].name: '_a' made file-safe is '_a', which has `__` or an outer `_`",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits, name: 'a _'}]",
            "datasets[0].name: 'a _' made file-safe is 'a-_', which has `__` or an outer `_`",
        ),
        (
            f"models: [{{id: raw, name: {'m' * 120}}}]\ndatasets: [{{id: digits, name: {'d' * 120}}}]",
            "make predictions file names of up to 294 characters, more than 242: give shorter `name`s",
        ),
    ],
)
def test_names_that_would_share_or_break_predictions_files(entries, expected):
    assert expected in refusal(entries + "\n"), refusal(entries + "\n")


def test_distinct_file_names_pass():
    text = "models: [{id: raw, name: a b}, {id: raw, name: a-c}, {id: random_cnn}]\ndatasets: [{id: digits}]\n"
    assert [m.label for m in parse_spec(text).spec.models] == ["a b", "a-c", "random_cnn"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('models: [{id: "raw\\nx"}]', "models[0].id: must not contain control characters (found '\\n')"),
        ('models: [{id: raw, name: "a\\rb"}]', "models[0].name: must not contain control characters"),
        ('models: [{id: raw, name: "a\\u2028b"}]', "models[0].name: must not contain control characters"),
        ('models: [{id: raw, name: "a\\x1bb"}]', "models[0].name: must not contain control characters"),
        ('models: [{id: raw, name: ""}]', "models[0].name: String should have at least 1 character"),
        ('models: [{id: raw}]\nprotocol: {backend: "torch\\n"}', "protocol.backend: must not contain"),
    ],
)
def test_control_characters_in_names_are_refused(line, expected):
    text = line + ("\ndatasets: [{id: digits}]\n" if "datasets" not in line else "\n")
    assert expected in refusal(text)


@pytest.mark.parametrize(
    "name", ["../../X", "a/b", "a\\\\b", "..", ".", "x" * 101, "\\0", "a\\tb"], ids=lambda n: n[:10]
)
def test_the_run_name_is_a_plain_file_name(name):
    assert "spec.yaml:3: name: " in refusal(BASE + f'name: "{name}"\n')


def test_a_spec_files_stem_must_name_the_run_when_there_is_no_name():
    assert "cannot name the run; give the spec a `name`" in refusal(BASE, "..yaml")
    assert parse_spec(BASE + "name: ok\n", "..yaml").name == "ok"


@pytest.mark.parametrize("key", ["output_dir", "cache_dir"])
def test_folders_with_nul_are_refused(key):
    assert f"spec.yaml:3: {key}: must not contain a NUL character" in refusal(BASE + f'{key}: "a\\0b"\n')
    assert f"spec.yaml:3: {key}: String should have at least 1 character" in refusal(BASE + f'{key}: ""\n')


def test_unknown_keys_with_control_characters_stay_on_one_line():
    message = refusal(BASE + '"a\\nb\\u2029c": 1\n')
    assert message.startswith("spec.yaml:3: a\\nb\\u2029c: unknown key"), message


# --------------------------------------------------------------------------------------------------
# Several errors


def test_every_error_is_shown_on_one_line():
    message = refusal(BASE + "protocol: {k: 0, epochs: 0}\n")
    assert message == (
        "spec.yaml:3: protocol.k: Input should be greater than or equal to 1 (got 0); "
        "spec.yaml:3: protocol.epochs: Input should be greater than or equal to 1 (got 0)"
    )


def test_more_than_five_errors_are_counted():
    keys = "".join(f"x{i}: 1\n" for i in range(8))
    message = refusal(BASE + keys)
    assert message.count("unknown key") == 5 and message.endswith(" (and 3 more)"), message


def test_many_errors_are_counted_fast():
    text = BASE + "".join(f"k{i}: 1\n" for i in range(45_000))
    started = time.perf_counter()
    message = refusal(text)
    assert time.perf_counter() - started < SECONDS
    assert message.endswith(" (and 44995 more)"), message[-100:]


# --------------------------------------------------------------------------------------------------
# Paths that do not exist: warnings of `validate`


def test_missing_dataset_paths_are_warned_about(tmp_path, plugins):
    (tmp_path / "train.npy").write_bytes(b"")
    (tmp_path / "images" / "train").mkdir(parents=True)
    text = f"""\
models: [{{id: raw}}]
datasets:
  - id: features
    options:
      splits:
        train: {{features: {tmp_path}/train.npy, labels: {tmp_path}/nowhere.npy}}
  - id: imagefolder
    options: {{root: {tmp_path}/images, splits: {{train: train, val: val}}}}
  - id: imagefolder
    name: gone
    options: {{root: {tmp_path}/gone}}
    transfer:
      - {{id: features, options: {{file: {tmp_path}/t.npz}}}}
"""
    warnings = missing_paths(resolve_spec(parse_spec(text, "spec.yaml"), plugins))
    assert warnings == [
        f"spec.yaml:6: datasets[0].options.splits.train.labels: no such file or folder: {tmp_path}/nowhere.npy",
        f"spec.yaml:8: datasets[1].options.splits.val: no such file or folder: {tmp_path}/images/val",
        f"spec.yaml:11: datasets[2].options.root: no such file or folder: {tmp_path}/gone",
        f"spec.yaml:13: datasets[2].transfer[0].options.file: no such file or folder: {tmp_path}/t.npz",
    ]


def test_many_missing_paths_are_counted(plugins):
    splits = ", ".join(f"s{i}: {{features: f{i}.npy, labels: l{i}.npy}}" for i in range(20))
    text = f"models: [{{id: raw}}]\ndatasets: [{{id: features, options: {{splits: {{{splits}}}}}}}]\n"
    warnings = missing_paths(resolve_spec(parse_spec(text, "spec.yaml"), plugins))
    assert len(warnings) == 11 and warnings[-1] == "spec.yaml: 30 more dataset paths do not exist"


def test_validate_warns_and_exits_0(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "models: [{id: raw}]\ndatasets:\n  - id: features\n    options: {file: missing.npz}\n"
    )
    proc = run_cli("validate", "spec.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "sslbench: warning: spec.yaml:4: datasets[0].options.file: no such file or folder: missing.npz"
    ]
    assert "spec.yaml: ok: 1 model(s)" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Property tests: random mutations of a valid spec


VALID = {
    "name": "t",
    "models": [{"id": "raw"}, {"id": "random_cnn", "name": "cnn", "options": {"width": 8}}],
    "datasets": [{"id": "digits", "fit_split": "train", "eval_split": "val"}],
    "protocol": {"k": 10, "overcluster": [1.0, 1.5], "seeds": 3, "epochs": [2], "pca_dims": [4, None]},
    "extraction": {"batch_size": 64, "workers": 0, "on_error": "skip"},
    "device": "cpu",
}

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31, 2**32, 2**64, 10**30, -1, 0, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Zl", "Zp", "Cf", "Lu"]), max_size=8),
    st.sampled_from(["", "..", "../../x", "a b", "a-b", "a__b", "cuda:7", "mps", "2024-02-30", "~", "<<"]),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


@st.composite
def mutated_specs(draw) -> str:
    import copy

    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["delete", "replace", "add", "nest"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(hostile_values)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(hostile_values)
        elif action == "nest":
            depth = draw(st.integers(min_value=1, max_value=80))
            value = parent[path[-1]]
            for _ in range(depth):
                value = [value]
            parent[path[-1]] = value
    text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()), sort_keys=False)
    edit = draw(st.sampled_from(["none", "tag", "alias", "laughs", "text"]))
    lines = text.splitlines()
    at = draw(st.integers(min_value=0, max_value=max(0, len(lines) - 1)))
    if edit == "tag" and ": " in lines[at]:
        tag = draw(st.sampled_from(["!!timestamp", "!!binary", "!!set", "!!int", "!!float", "!!python/tuple", "!x"]))
        key, _, value = lines[at].partition(": ")
        lines[at] = f"{key}: {tag} {value}"
    elif edit == "alias" and ": " in lines[at]:
        key, _, value = lines[at].partition(": ")
        lines[at] = f"{key}: &a {value}"
        lines.append("x: *a")
    elif edit == "laughs":
        lines.extend(laughs(draw(st.integers(min_value=1, max_value=9))).splitlines())
    elif edit == "text":
        position = draw(st.integers(min_value=0, max_value=len(text)))
        return text[:position] + draw(st.text(max_size=10)) + text[position:]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_specs())
def test_mutated_specs_load_or_fail_in_one_line(plugins, text):
    try:
        loaded = parse_spec(text, "spec.yaml")
    except SSLBenchError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1 and message.startswith("spec.yaml"), message
        return
    try:
        resolved = resolve_spec(loaded, plugins)
    except SSLBenchError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return
    assert all(len(w.splitlines()) == 1 for w in missing_paths(resolved))
    spec = resolved.spec
    assert all(0 <= s <= MAX_SEED for s in spec.protocol.seeds) and len(spec.protocol.seeds) <= MAX_SEEDS


def test_valid_base_of_the_mutations_is_valid(plugins):
    resolve_spec(parse_spec(yaml.safe_dump(VALID, sort_keys=False)), plugins)


def assert_one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sslbench: error: "), proc.stderr[:3000]
    assert expected in lines[0], lines[0]


@settings(max_examples=2, deadline=None, derandomize=True, database=None)
@given(mutated_specs())
def test_mutated_specs_through_the_command_line(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "spec.yaml").write_text(text, encoding="utf-8")
    proc = run_cli("validate", "spec.yaml", cwd=folder)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2), (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("sslbench: warning: ")]
    if proc.returncode == 0:
        assert errors == [] and "ok:" in proc.stdout
    else:
        assert len(errors) == 1 and errors[0].startswith("sslbench: error: spec.yaml"), proc.stderr


def test_an_empty_tagged_number_is_one_line():
    """Found by the mutation test: PyYAML's int constructor indexes into the text (IndexError on '')."""
    from sslbench.spec import parse_spec

    with pytest.raises(SSLBenchError) as caught:
        parse_spec("models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {k: !!int ''}\n", "spec.yaml")
    assert "\n" not in str(caught.value) and "spec.yaml:3" in str(caught.value)
