"""sslbench: how well do a model's frozen features cluster images without labels?

The public API for plugin authors and for SSL papers' eval suites. Everything not re-exported here is
internal.
"""

from __future__ import annotations

from sslbench.errors import PluginError, SSLBenchError
from sslbench.evaluate import evaluate_features
from sslbench.events import Event
from sslbench.hookspecs import hookimpl
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
    Reducer,
    ReducerConfig,
    ReportContext,
    Reporter,
    ReporterEntry,
    ScoringContext,
    Split,
)
from sslbench.plugins import Plugins, load_plugins
from sslbench.results import Results, load_results
from sslbench.results import sslbench_version as _sslbench_version

#: The installed distribution's version (``0+unknown`` when run from a source tree without metadata).
__version__: str = _sslbench_version()

__all__ = [
    "Backbone",
    "BackboneEntry",
    "BackendEntry",
    "Clusterer",
    "ClustererConfig",
    "Dataset",
    "DatasetEntry",
    "Event",
    "MetricEntry",
    "NoOptions",
    "PluginError",
    "Plugins",
    "Reducer",
    "ReducerConfig",
    "ReportContext",
    "Reporter",
    "ReporterEntry",
    "Results",
    "SSLBenchError",
    "ScoringContext",
    "Split",
    "__version__",
    "evaluate_features",
    "hookimpl",
    "load_plugins",
    "load_results",
]
