"""The documentation covers the contract: every hook, every spec field, every results key."""

from __future__ import annotations

import difflib
import inspect
import os

import pytest
from pydantic import BaseModel

from sslbench import docgen, hookspecs
from sslbench.results import ProbeRecord, Results, Run, RunProtocol, SummaryRow, Timings
from sslbench.spec import DatasetSpec, ExtractionSpec, ModelSpec, ProbeSpec, ProtocolSpec, Spec, TransferSpec

from conftest import REPO

HOOKS = [(name, fn) for name, fn in vars(hookspecs).items() if name.startswith("sslbench_") and inspect.isfunction(fn)]


def test_every_hook_is_documented_in_the_contract_and_contributing():
    contributing = (REPO / "CONTRIBUTING.md").read_text()
    # Every hook is a declared plugin kind, and every kind has its hook and its entry class.
    assert [name for name, _ in HOOKS] == [kind.hook for kind in hookspecs.PLUGIN_KINDS]
    for kind in hookspecs.PLUGIN_KINDS:
        assert f"`{kind.entry}`" in contributing, kind
    for name, fn in HOOKS:
        doc = inspect.getdoc(fn) or ""
        assert ":param register:" in doc and "versionadded" in doc, name
        signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert signature in contributing, signature


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def test_every_spec_field_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for model in (Spec, ModelSpec, DatasetSpec, ProtocolSpec, ExtractionSpec, ProbeSpec):
        for field in _fields(model):
            assert f"{field}:" in readme or f"`{field}`" in readme or f".{field}" in readme, (model, field)


def test_every_results_key_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for model in (Results, Run, RunProtocol, Timings, SummaryRow, ProbeRecord):
        for field in _fields(model):
            assert f"`{field}`" in readme, (model.__name__, field)


# ------------------------------------------------------------------------------------------------
# The generated references (sslbench/docgen.py): checked in, and never stale.


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return docgen.generate()


@pytest.mark.parametrize("name", [docgen.SPEC_REFERENCE, docgen.PLUGIN_REFERENCE])
def test_checked_in_reference_is_up_to_date(generated, name):
    path = REPO / "docs" / name
    assert path.is_file(), f"docs/{name} is missing: run {docgen.REGENERATE}"
    checked_in = path.read_text(encoding="utf-8")
    if checked_in != generated[name]:
        diff = difflib.unified_diff(
            checked_in.splitlines(), generated[name].splitlines(), f"docs/{name}", "generated", lineterm="", n=1
        )
        excerpt = "\n".join(list(diff)[:30])
        pytest.fail(f"docs/{name} is stale: run {docgen.REGENERATE}\n{excerpt}", pytrace=False)


def test_spec_reference_has_every_field_and_every_builtin_option(generated, plugins):
    text = generated[docgen.SPEC_REFERENCE]
    for model, prefix in (
        (Spec, ""),
        (ModelSpec, "models[]."),
        (DatasetSpec, "datasets[]."),
        (TransferSpec, "datasets[].transfer[]."),
        (ProtocolSpec, "protocol."),
        (ExtractionSpec, "extraction."),
    ):
        for field in model.model_fields:
            assert f"| `{prefix}{field}` |" in text, (model.__name__, field)
    for registry, prefix in (
        (plugins.backbones, "models[].options."),
        (plugins.datasets, "datasets[].options."),
        (plugins.backends, "protocol.backend_options."),
    ):
        for entry in registry:
            if plugins.plugin_of(registry, entry.name).distribution != "sslbench":
                continue  # third-party plugins installed here are not documented by sslbench
            assert f"`{entry.name}`" in text, entry.name
            for field in entry.options.model_fields:
                assert f"| `{prefix}{field}` |" in text, (entry.name, field)
    # Third-party plugins installed in this environment (the example) stay out of sslbench's docs.
    assert "pooled_pixels" not in text and "purity" not in text


def test_spec_reference_shows_constraints_and_defaults(generated):
    text = generated[docgen.SPEC_REFERENCE]
    assert "| `device` | `string` | `auto` | matches `^(auto\\|cpu\\|cuda(:[0-9]{1,4})?\\|mps)$`" in text
    assert "| `extraction.on_error` | `fail \\| skip` | `fail` | one of `fail`, `skip` |" in text
    assert "| `protocol.overcluster` | `list[number]` | `[1.0]` | items ≥ 1.0, items ≤ 16777216, items finite, " in text
    assert (
        "| `protocol.seeds` | `list[integer]` | `[0, 1, 2, 3, 4]` | items ≥ 0, items ≤ 2147483647, not empty, "
        "no repeated values |" in text
    )


def test_machine_dependent_defaults_are_documented_as_their_rule():
    """The generated files are the same on every machine: a default computed from the machine is
    documented as its rule, which must still be the rule the code uses."""
    assert ExtractionSpec.model_fields["workers"].default == min(4, os.cpu_count() or 1)
    assert docgen.MACHINE_DEFAULTS[("ExtractionSpec", "workers")] == "min(4, CPU cores)"


def test_plugin_reference_has_every_hook_and_interface(generated):
    text = generated[docgen.PLUGIN_REFERENCE]
    for name, fn in HOOKS:
        assert f"### `{name}`" in text and docgen.rst_to_markdown(inspect.getdoc(fn) or "").splitlines()[0] in text, (
            name
        )
    import sslbench
    from sslbench import events, interfaces

    for module in (interfaces, events):
        for name, obj in vars(module).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                assert f"### `{name}`" in text, name
    for name in ("preprocess", "embed", "to", "torch_modules", "fingerprint", "describe", "train_assignment"):
        assert f"- `{name}" in text, name
    assert {"Backbone", "Split", "ScoringContext", "ReportContext", "Event"} <= set(sslbench.__all__)


def test_generated_text_is_deterministic_and_machine_free(generated):
    assert docgen.generate() == generated
    for text in generated.values():
        assert " at 0x" not in text and "/work/" not in text and "/tmp/" not in text
        assert "0.1.0" not in text  # no versions: a release must not make the docs stale


def test_docgen_check_reports_stale_files(tmp_path, capsys):
    assert docgen.main(["--out", str(tmp_path), "--check"]) == 1
    assert f"{tmp_path / docgen.SPEC_REFERENCE} is stale: run python -m sslbench.docgen" in capsys.readouterr().err
    assert docgen.main(["--out", str(tmp_path)]) == 0
    assert docgen.main(["--out", str(tmp_path), "--check"]) == 0


def test_rst_to_markdown():
    text = """Intro with ``code`` and :class:`~sslbench.interfaces.Backbone`::

    [section]
    key = 1

:param register: one line
    and its continuation.
:raises PluginError: when it breaks.

.. versionadded:: 0.1"""
    markdown = docgen.rst_to_markdown(text, lambda target: "#backbone" if target.endswith("Backbone") else None)
    assert markdown == (
        "Intro with `code` and [`Backbone`](#backbone):\n\n```\n[section]\nkey = 1\n```\n\n"
        "- **register**: one line and its continuation.\n- **raises** `PluginError`: when it breaks.\n\n"
        "*New in version 0.1.*"
    )


# ------------------------------------------------------------------------------------------------
# The card schema in the plugin reference


def test_plugin_reference_documents_every_card_field_and_kind(generated):
    """Every field of every model a card file holds is in a table; every value of a `kind` with a choice
    is described in its model's section (a new weights source or hash kind must come with its words)."""
    import typing

    from sslbench.cards import CardFile

    text = generated[docgen.PLUGIN_REFERENCE]
    headings = docgen.schema_headings(CardFile, "(a card file)")
    for model, prefix in docgen.schema_models(CardFile):
        section = text.split(f"### {headings[model]}\n", 1)[1].split("\n### ", 1)[0]
        for name, info in model.model_fields.items():
            assert f"| `{prefix}{name}` |" in section, (model.__name__, name)
            if name == "kind" and typing.get_origin(info.annotation) is typing.Literal:
                values = typing.get_args(info.annotation)
                for value in values if len(values) > 1 else ():
                    assert f"\n- `{value}`" in section, (model.__name__, value)
    assert "two parts joined by one dot, architecture then weights tag" in text  # the id rule in words
    assert "### `card_backbones`" in text and "- **where**:" in text and "package data" in text


def test_the_documented_card_file_is_the_example_packages_and_valid():
    from sslbench.cards import load_card_file

    path = REPO / docgen.CARD_FILE_EXAMPLE_PATH
    assert path.read_text(encoding="utf-8") == docgen.CARD_FILE_EXAMPLE
    cards = load_card_file(path)
    assert [card.weights[0].kind for card in cards] == ["file", "package"]
    assert cards[0].layout.strip_prefixes == ["module.encoder_q."]
    pyproject = (path.parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'sslbench_example = ["cards/*.yaml", "cards/*.pth", "weights/*.pth"]' in pyproject
