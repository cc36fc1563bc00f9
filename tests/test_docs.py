"""The documentation covers the contract: every hook, every spec field, every results key."""

from __future__ import annotations

import inspect

from pydantic import BaseModel

from sslbench import hookspecs
from sslbench.results import Results, Run, RunProtocol, SummaryRow, Timings
from sslbench.spec import DatasetSpec, ExtractionSpec, ModelSpec, ProtocolSpec, Spec

from conftest import REPO

HOOKS = [(name, fn) for name, fn in vars(hookspecs).items() if name.startswith("sslbench_") and inspect.isfunction(fn)]


def test_every_hook_is_documented_in_the_contract_and_contributing():
    contributing = (REPO / "CONTRIBUTING.md").read_text()
    assert len(HOOKS) == 5
    for name, fn in HOOKS:
        doc = inspect.getdoc(fn) or ""
        assert ":param register:" in doc and "versionadded" in doc, name
        signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert signature in contributing, signature


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def test_every_spec_field_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for model in (Spec, ModelSpec, DatasetSpec, ProtocolSpec, ExtractionSpec):
        for field in _fields(model):
            assert f"{field}:" in readme or f"`{field}`" in readme or f".{field}" in readme, (model, field)


def test_every_results_key_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for model in (Results, Run, RunProtocol, Timings, SummaryRow):
        for field in _fields(model):
            assert f"`{field}`" in readme, (model.__name__, field)
