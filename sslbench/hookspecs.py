"""The sslbench plugin contract: every hook a plugin may implement.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl` and named after
the hooks below. Built-in plugins and third-party plugins are loaded the same way: each is an
entry point in the group ``sslbench`` of an installed distribution::

    [project.entry-points.sslbench]
    my_models = "my_package.sslbench_plugin"

**When hooks are called.** Every registration hook is called exactly once per plugin, when the
plugin set is loaded (:func:`sslbench.plugins.load_plugins`: on start-up of every CLI command and on
the first call of the Python API), in the order the plugins were loaded: entry points sorted by name.
Hooks are called **through pluggy**, one plugin at a time, so that every registered name is
attributed to the plugin that registered it: a plugin's ``wrapper=True`` (or old-style
``hookwrapper=True``) implementation runs around its own implementation of the hook, and plugins
with a ``tryfirst`` implementation are called before the others, ``trylast`` after.

**The ``register`` callable.** Each hook receives ``register``, a function taking one entry object
(see :mod:`sslbench.interfaces`) and returning ``None``. ``register`` raises
:class:`~sslbench.errors.PluginError` when the entry has the wrong type or when its name is already
taken; that error names both plugins. Registering the same name twice is never silently allowed:
a benchmark whose backbone was quietly replaced reports wrong numbers. A third-party plugin that
takes a name a built-in registers is disabled (one warning); two third-party plugins taking one name
are an error.

**Validation.** An implementation whose name matches no hook below, or that asks for an argument
the hook does not have, fails start-up with a one-line error naming the plugin, its distribution and
the closest valid name; a function named like a hook but lacking ``@hookimpl`` is a warning (it would
never be called). An implementation may accept fewer arguments than its hook: new arguments can be
added to a hook without breaking plugins. Every plugin error names the plugin's distribution and how
to disable it (``SSLBENCH_DISABLE_PLUGINS=dist:name``).

**Failures.** When a third-party plugin's registration hook raises, or registers an entry of the
wrong type or without a name, the plugin is disabled as one that fails to import is: one warning
line (the exception's type and whole message), everything it registered in *any* hook withdrawn, none
of its later hooks called, and ``sslbench plugins`` lists it as failed with the reason (exit status
0). A spec naming a backbone, dataset, backend, metric, probe or reporter it would have provided fails with
"X is provided by plugin P (distribution D), which failed to load: reason" (the names it registered
before failing, and the card ids of card files it could not load, are known). A built-in plugin's
failure is an error (the installation is broken); so is a name that two plugins register.

All hooks return ``None``; what a hook returns is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from sslbench.interfaces import (
        BackboneEntry,
        BackendEntry,
        DatasetEntry,
        MetricEntry,
        ProbeEntry,
        ReporterEntry,
    )

PROJECT_NAME = "sslbench"


@dataclass(frozen=True)
class PluginKind:
    """One kind of entry plugins register: everything the loader, :class:`~sslbench.plugins.Plugins`,
    ``sslbench plugins``, the generated reference and ``sslbench``'s exports know about it."""

    #: The registration hook below.
    hook: str
    #: The entry class in :mod:`sslbench.interfaces`, by name (this module imports nothing heavy).
    entry: str
    #: How messages and ``sslbench plugins`` name one entry.
    kind: str
    #: The registry's attribute on :class:`~sslbench.plugins.Plugins`.
    attribute: str


#: Every kind of plugin entry, in the order their hooks are called. A new kind is declared here, by its
#: hook below and by its entry class in :mod:`sslbench.interfaces`; nothing else names it.
PLUGIN_KINDS: tuple[PluginKind, ...] = (
    PluginKind("sslbench_register_backbones", "BackboneEntry", "backbone", "backbones"),
    PluginKind("sslbench_register_datasets", "DatasetEntry", "dataset", "datasets"),
    PluginKind("sslbench_register_backends", "BackendEntry", "backend", "backends"),
    PluginKind("sslbench_register_metrics", "MetricEntry", "metric", "metrics"),
    PluginKind("sslbench_register_probes", "ProbeEntry", "probe", "probes"),
    PluginKind("sslbench_register_reporters", "ReporterEntry", "reporter", "reporters"),
)

#: Marks a hook specification (used only in this module).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a plugin's hook implementation: ``@sslbench.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ------------------------------------------------------------------------------------------------
# Registration hooks: called once per plugin at load time.


@hookspec
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    """Register feature extractors that a spec names under ``models[].id``.

    :param register: call with one :class:`~sslbench.interfaces.BackboneEntry` per backbone.
        The entry's ``factory`` receives the validated instance of the entry's ``options`` model
        and returns a :class:`~sslbench.interfaces.Backbone`; it is called only when a spec uses
        the backbone, so heavy imports (timm, TensorFlow) belong inside it.

    .. versionadded:: 0.1
    """


@hookspec
def sslbench_register_datasets(register: Callable[[DatasetEntry], None]) -> None:
    """Register datasets that a spec names under ``datasets[].id``.

    :param register: call with one :class:`~sslbench.interfaces.DatasetEntry` per dataset. Its
        ``factory`` receives the validated options and returns a
        :class:`~sslbench.interfaces.Dataset` whose splits the spec selects with ``fit_split`` and
        ``eval_split``; a dataset without class labels has no classes (and its ``labeled`` callable
        says so from the options, for ``sslbench validate``). A factory that cannot find its files raises
        :class:`~sslbench.errors.SSLBenchError` naming the path and how to obtain the data.

    .. versionadded:: 0.1
    """


@hookspec
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    """Register PCA + k-means implementations that a spec names under ``protocol.backend``.

    :param register: call with one :class:`~sslbench.interfaces.BackendEntry` per backend: its
        ``pca`` factory receives a :class:`~sslbench.interfaces.ReducerConfig` and returns a
        :class:`~sslbench.interfaces.Reducer`; its ``kmeans`` factory receives a
        :class:`~sslbench.interfaces.ClustererConfig` (clusters, epochs, batch size, seed, device,
        ranks: the protocol always hands one process every row) and returns a
        :class:`~sslbench.interfaces.Clusterer` that makes every random choice from the seed; its
        ``options`` model validates ``protocol.backend_options`` once for both.
        Inputs are memory-mapped float32 files that may exceed RAM: read them in row chunks.

    .. versionadded:: 0.1
    """


@hookspec
def sslbench_register_metrics(register: Callable[[MetricEntry], None]) -> None:
    """Register metrics computed for every run.

    :param register: call with one :class:`~sslbench.interfaces.MetricEntry` per metric. Its
        ``fn`` receives a :class:`~sslbench.interfaces.ScoringContext` (train and eval cluster
        predictions, labels and contingency tables, the train assignment of clusters to classes, and
        the eval split in the space the clusters were fitted in and as raw features, for label-free
        scores; on data without labels only the entries with ``needs_labels=False`` are called)
        and returns a float, stored as returned (a fraction for ``unit="percent"``) and averaged over
        seeds in the summary. Its ``label``, ``unit``, ``better``, ``needs_labels`` and ``decimals``
        say how every report shows it; results.json records them, so reports rendered without the
        plugin show it the same.

    .. versionadded:: 0.1
    """


@hookspec
def sslbench_register_probes(register: Callable[[ProbeEntry], None]) -> None:
    """Register probes: evaluations that learn from the train features' labels and score the eval split
    (the weighted kNN, the linear probe), which a spec names under ``probes[].id``.

    :param register: call with one :class:`~sslbench.interfaces.ProbeEntry` per probe. Its ``options``
        model validates the spec's ``probes[].options``; ``metrics`` names and describes what it records
        for those options; ``run`` receives a :class:`~sslbench.interfaces.ProbeData` (the raw train and
        eval features, possibly memory-mapped and larger than RAM, their labels, the device) and the
        validated options, and returns a :class:`~sslbench.interfaces.ProbeOutcome`. A probe runs once
        per model × dataset, before the clustering (it depends on no k-means seed); results.json stores
        it once, with its options, time and notes, and every report shows its values beside the card's
        published ones (``published``).

    .. versionadded:: 0.2
    """


@hookspec
def sslbench_register_reporters(register: Callable[[ReporterEntry], None]) -> None:
    """Register report formats, each a rendering of a results file.

    :param register: call with one :class:`~sslbench.interfaces.ReporterEntry` per format. Its
        name is what ``sslbench report --format NAME`` selects; ``sslbench run`` shows the
        ``rich`` report and writes the ``md`` and ``csv`` ones next to results.json.

    .. versionadded:: 0.1
    """
