"""Loading plugins and collecting what they register.

Built-in plugins (the ``sslbench_plugins`` package, shipped from ``plugins/``) and third-party
plugins are both entry points in the group ``sslbench``; nothing here treats them differently.

Environment knobs:

``SSLBENCH_DISABLE_PLUGINS``
    Comma-separated plugin (entry-point) names not to load.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from sslbench import hookspecs
from sslbench.errors import PluginError, SSLBenchError, did_you_mean
from sslbench.interfaces import (
    BackboneEntry,
    ClustererEntry,
    DatasetEntry,
    MetricEntry,
    ReducerEntry,
    ReporterEntry,
)

ENTRY_POINT_GROUP = "sslbench"
DISABLE_ENV = "SSLBENCH_DISABLE_PLUGINS"

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, each remembered with the plugin that registered it."""

    def __init__(self, kind: str, entry_type: type[T]) -> None:
        self.kind = kind
        self.entry_type = entry_type
        self._entries: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def add(self, entry: T, plugin: str) -> None:
        if not isinstance(entry, self.entry_type):
            raise PluginError(
                f"plugin '{plugin}' registered a {type(entry).__name__} as a {self.kind}; "
                f"expected {self.entry_type.__name__}"
            )
        name: str = entry.name  # type: ignore[attr-defined]
        if not name or not isinstance(name, str):
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} without a name")
        if name in self._entries:
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{self._origin[name]}' and by plugin '{plugin}'"
            )
        self._entries[name] = entry
        self._origin[name] = plugin

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise SSLBenchError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; known: {known}"
            ) from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``sslbench plugins`` lists it."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


# Registration hook name → (attribute of Plugins, entry type, human name of the kind).
_REGISTRATION_HOOKS: dict[str, tuple[str, type, str]] = {
    "sslbench_register_backbones": ("backbones", BackboneEntry, "backbone"),
    "sslbench_register_datasets": ("datasets", DatasetEntry, "dataset"),
    "sslbench_register_reducers": ("reducers", ReducerEntry, "reducer"),
    "sslbench_register_clusterers": ("clusterers", ClustererEntry, "clusterer"),
    "sslbench_register_metrics": ("metrics", MetricEntry, "metric"),
    "sslbench_register_reporters": ("reporters", ReporterEntry, "reporter"),
}


@dataclass
class Plugins:
    """The loaded plugin set: one registry per kind of entry, and what each plugin contributed."""

    backbones: Registry[BackboneEntry]
    datasets: Registry[DatasetEntry]
    reducers: Registry[ReducerEntry]
    clusterers: Registry[ClustererEntry]
    metrics: Registry[MetricEntry]
    reporters: Registry[ReporterEntry]
    plugins: list[PluginInfo]

    def backend_names(self) -> list[str]:
        """Backends usable in a spec: names with both a reducer and a clusterer."""
        return [name for name in self.reducers.names() if name in self.clusterers]

    def backend(self, name: str) -> tuple[ReducerEntry, ClustererEntry]:
        backends = self.backend_names()
        if name not in backends:
            raise SSLBenchError(
                f"unknown backend '{name}'{did_you_mean(name, backends)}; "
                f"known: {', '.join(sorted(backends)) or 'none'}"
            )
        return self.reducers.get(name), self.clusterers.get(name)

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error is not None]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: ep.name)


def _disabled_names() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def load_plugins(
    *,
    entry_points: bool = True,
    extra: Iterable[tuple[str, object]] = (),
    warn: Callable[[str], None] | None = None,
) -> Plugins:
    """Load plugins and call their registration hooks.

    :param entry_points: load the installed entry points of group ``sslbench`` (built-ins included).
    :param extra: ``(name, plugin)`` pairs registered after the entry points; how tests and Python
        API users add a plugin object without installing a distribution.
    :param warn: receives one line per plugin that failed to import (default: print to stderr).
    :raises PluginError: a hook implementation with an unknown name, or a conflicting registration.
    """
    warn = warn or (lambda line: print(f"sslbench: warning: {line}", file=sys.stderr))
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    disabled = _disabled_names()

    if entry_points:
        for ep in _entry_points():
            if ep.name in disabled or pm.has_plugin(ep.name):
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - whatever a broken plugin raises is reported
                info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                warn(
                    f"plugin '{ep.name}' ({info.distribution or 'unknown distribution'}) failed to import: {info.error}"
                )
                infos.append(info)
                continue
            pm.register(module, name=ep.name)
            infos.append(info)

    for name, plugin in extra:
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, None, None))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        hook_names = [name for name, caller in vars(pm.hook).items() if caller.spec is not None]
        unknown = _unknown_hook_name(pm, exc.plugin)
        hint = did_you_mean(unknown, hook_names, n=1)
        raise PluginError(f"plugin '{pm.get_name(exc.plugin)}' implements unknown hook '{unknown}'{hint}") from None

    registries: dict[str, Registry[Any]] = {
        attr: Registry(kind, entry_type) for attr, entry_type, kind in _REGISTRATION_HOOKS.values()
    }
    for info in infos:
        if info.error is not None:
            continue
        plugin = pm.get_plugin(info.name)
        info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        for hook_name, (attr, _, _kind) in _REGISTRATION_HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                registry = registries[attr]

                def register(entry: Any, _registry: Registry[Any] = registry, _p: str = info.name) -> None:
                    _registry.add(entry, _p)

                impl.function(**{arg: register for arg in impl.argnames})
        for attr, _, kind in _REGISTRATION_HOOKS.values():
            names = [n for n in registries[attr].names() if registries[attr].origin(n) == info.name]
            if names:
                info.registered[kind] = names

    return Plugins(plugins=infos, **registries)


def _unknown_hook_name(pm: pluggy.PluginManager, plugin: object) -> str:
    for name, caller in vars(pm.hook).items():
        if caller.spec is None and any(impl.plugin is plugin for impl in caller.get_hookimpls()):
            return name
    return "?"


@functools.cache
def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded once from the installed entry points."""
    return load_plugins()
