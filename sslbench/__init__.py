"""sslbench: how well do a model's frozen features cluster images without labels?

The public API for plugin authors and for SSL papers' eval suites. Everything not re-exported here is
internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sslbench.errors import PluginError, SSLBenchError
from sslbench.hookspecs import PLUGIN_KINDS, hookimpl

if TYPE_CHECKING:
    from sslbench.evaluate import evaluate_features, evaluate_model
    from sslbench.events import Event
    from sslbench.interfaces import (
        Backbone,
        BackboneEntry,
        BackendEntry,
        Clusterer,
        ClustererConfig,
        Dataset,
        DatasetEntry,
        MetricEntry,
        NoOptions,
        ProbeData,
        ProbeEntry,
        ProbeOutcome,
        Reducer,
        ReducerConfig,
        ReportContext,
        Reporter,
        ReporterEntry,
        ScoringContext,
        Split,
    )
    from sslbench.plugins import Plugins, load_plugins
    from sslbench.results import MetricInfo, Results, load_results

# Where each public name lives. They are imported on first use (PEP 562), so that `sslbench --help`
# and the listing commands do not pay for numpy, pydantic and the protocol's modules up front.
_LAZY = {
    "evaluate_features": "sslbench.evaluate",
    "evaluate_model": "sslbench.evaluate",
    "Event": "sslbench.events",
    **dict.fromkeys(
        [
            *(kind.entry for kind in PLUGIN_KINDS),
            "Backbone",
            "Clusterer",
            "ClustererConfig",
            "Dataset",
            "NoOptions",
            "ProbeData",
            "ProbeOutcome",
            "Reducer",
            "ReducerConfig",
            "ReportContext",
            "Reporter",
            "ScoringContext",
            "Split",
        ],
        "sslbench.interfaces",
    ),
    "Plugins": "sslbench.plugins",
    "load_plugins": "sslbench.plugins",
    "MetricInfo": "sslbench.results",
    "Results": "sslbench.results",
    "load_results": "sslbench.results",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from sslbench.results import sslbench_version

        return sslbench_version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sslbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


#: The installed distribution's version (``0+unknown`` when run from a source tree without metadata).
__version__: str

__all__ = sorted(
    [*_LAZY, "PluginError", "SSLBenchError", "__version__", "hookimpl"], key=lambda name: (name[0].islower(), name)
)
