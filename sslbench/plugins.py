"""Loading plugins and collecting what they register.

Built-in plugins (the ``sslbench_plugins`` package, shipped from ``plugins/``) and third-party
plugins are both entry points in the group ``sslbench``; the only difference is how a broken one is
treated. A built-in that fails to import, or whose registration hook raises, is an error (the
installation is broken). A third-party one that fails to import, or whose registration hook raises or
registers an unusable entry (wrong type, no name), is *disabled*: one warning line, everything it
registered in any hook withdrawn (half a plugin is worse than none), no further hook of it called,
and ``sslbench plugins`` lists it as failed with the reason. A spec naming what it would have
provided (the names it registered before failing; the ids in card files it could not load, see
:class:`~sslbench.errors.CardError`) is told "X is provided by plugin P (distribution D), which
failed to load: reason"; any other unknown name mentions every failed plugin. Plugins passed as
``extra`` fail hard: whoever passed them wants to know.

Every hook is called through pluggy, one plugin at a time, so that every registered name is
attributed to the plugin that registered it. Within a plugin, pluggy's semantics apply as documented:
wrappers (``wrapper=True``, or the older ``hookwrapper=True``) run around the plugin's other
implementations of the hook, and ``tryfirst``/``trylast`` order them. Across plugins, the plugins
whose implementation is ``tryfirst`` are called first and those whose implementation is ``trylast``
last; otherwise plugins are called in load order: entry points sorted by name, then the ``extra``
plugins in the order given. That order is also the order of the entries in each registry.

Nothing is silently shadowed. A built-in's names are taken for good: a third-party entry point named
like a built-in one is left out before import, and a third-party plugin registering a name a built-in
registers is disabled as above, each with one warning telling it to rename (a built-in cannot be the
culprit, and the rest of sslbench keeps working). Between third parties, which one a spec means is not
the loader's to guess: two plugins registering one name are an error naming both, and two entry points
with one name are both left out. A hook implementation with an unknown name or argument is an error too; a
function named like a hook without ``@hookimpl`` is a warning (pluggy would ignore it). Every error or
warning about a plugin names its distribution and version (what to uninstall) and how to disable it,
and keeps the plugin's exception message whole on one line (:func:`~sslbench.errors.exception_line`).

Environment knobs:

``SSLBENCH_DISABLE_PLUGINS``
    Comma-separated entry points not to load (not even import). Each item is one of

    ``NAME``
        every entry point named ``NAME``, whichever distribution declares it;
    ``DIST:NAME``
        only the entry point ``NAME`` of the distribution ``DIST`` (how to keep a built-in and drop
        a third-party plugin that took the same name: ``SSLBENCH_DISABLE_PLUGINS=other-dist:metrics``);
    ``DIST:*``
        every entry point of the distribution ``DIST``.

    Distribution names compare as pip compares them (case, ``-``, ``_`` and ``.`` do not matter).
    ``extra`` plugins given to :func:`load_plugins` are never disabled: the caller chose them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from sslbench import hookspecs, interfaces
from sslbench.errors import CardError, PluginError, SSLBenchError, did_you_mean, exception_line
from sslbench.hookspecs import PLUGIN_KINDS

ENTRY_POINT_GROUP = "sslbench"
DISABLE_ENV = "SSLBENCH_DISABLE_PLUGINS"
#: The distribution whose entry points are the built-in plugins.
BUILTIN_DISTRIBUTION = "sslbench"

T = TypeVar("T")


def _default_describe(plugin: str) -> str:
    return f"plugin '{plugin}'"


class Registry(Generic[T]):
    """Named entries of one kind, each remembered with the plugin that registered it.

    :param describe: how errors name a plugin (the loader adds its distribution and version).
    """

    def __init__(self, kind: str, entry_type: type[T], describe: Callable[[str], str] = _default_describe) -> None:
        self.kind = kind
        self.entry_type = entry_type
        self._describe = describe
        self._entries: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        # What failed plugins would have registered (name → who and why), and every failure, for get().
        self._unavailable: dict[str, str] = {}
        self._failures: list[str] = []

    def problem(self, entry: object) -> str | None:
        """What is wrong with ``entry`` by itself (``"registered a … as a …"``), or None."""
        if not isinstance(entry, self.entry_type):
            return f"registered a {type(entry).__name__} as a {self.kind}; expected {self.entry_type.__name__}"
        name = getattr(entry, "name", None)
        if not name or not isinstance(name, str):
            return f"registered a {self.kind} without a name"
        return None

    def add(self, entry: T, plugin: str) -> None:
        """Add ``entry``, registered by ``plugin``.

        :raises PluginError: the entry has the wrong type or no name, or its name is taken.
        """
        problem = self.problem(entry)
        if problem is not None:
            raise PluginError(f"{self._describe(plugin)} {problem}")
        name: str = entry.name  # type: ignore[attr-defined]
        if name in self._entries:
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by {self._describe(self._origin[name])} "
                f"and by {self._describe(plugin)}"
            )
        self._entries[name] = entry
        self._origin[name] = plugin

    def get(self, name: str) -> T:
        """The entry named ``name``.

        :raises SSLBenchError: no plugin registered it: the plugin that would have, when one failed to
            load (:meth:`unavailable`), else the closest known names and every plugin that failed.
        """
        try:
            return self._entries[name]
        except KeyError:
            pass
        why = self.unavailable(name)
        if why is not None:
            raise SSLBenchError(why)
        # The failures before the (long) list of known names: a message may be cut to a length.
        notes = "".join(f"; note: {failure}" for failure in self._failures)
        known = ", ".join(sorted(self._entries)) or "none"
        raise SSLBenchError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}{notes}; known: {known}")

    def unavailable(self, name: str) -> str | None:
        """``"<kind> 'name' is provided by plugin …, which failed to load: …"`` when a plugin that would
        have registered ``name`` failed (see :meth:`mark_failed`); else None."""
        if name in self._entries or name not in self._unavailable:
            return None
        return f"{self.kind} '{name}' is provided by {self._unavailable[name]}"

    def withdraw(self, plugin: str) -> list[str]:
        """Remove every entry ``plugin`` registered (a plugin that failed part-way); their names."""
        names = [name for name, origin in self._origin.items() if origin == plugin]
        for name in names:
            del self._entries[name], self._origin[name]
        return names

    def mark_failed(self, plugin: str, failure: str, names: Iterable[str]) -> None:
        """Remember that ``plugin`` (as errors name it) failed to load (``failure``: ``"failed to …: why"``)
        and would have registered ``names`` (those no other plugin registered), for :meth:`get`'s message."""
        self._failures.append(f"{plugin} {failure}")
        for name in names:
            if name not in self._entries:
                self._unavailable.setdefault(name, f"{plugin}, which {failure}")

    def origin(self, name: str) -> str:
        """The name of the plugin that registered ``name``."""
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
    #: Why the plugin failed (``"ModuleNotFoundError: …"``, ``"hook 'h' raised KeyError: …"``); None: loaded.
    error: str | None = None
    #: Where it failed: ``"name"`` (its entry point's name is another's), ``"import"`` or ``"registration"``
    #: (None: loaded).
    stage: str | None = None
    #: What a plugin that failed in a registration hook would have registered, as far as known: the
    #: names it registered before failing (withdrawn) and the ids in card files it could not load.
    would_register: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How messages about its code name it: ``plugin 'p' from dist 1.0``."""
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin '{self.name}' from {dist}"

    @property
    def failure(self) -> str | None:
        """``"failed to import: …"`` or ``"failed to load: …"``; None for a loaded plugin."""
        if self.error is None:
            return None
        if self.stage == "name":
            return f"left out: {self.error}"
        return f"failed to {'import' if self.stage == 'import' else 'load'}: {self.error}"


# Registration hook name → (attribute of Plugins, entry type, human name of the kind), from the one
# declaration of the kinds (:data:`sslbench.hookspecs.PLUGIN_KINDS`).
_REGISTRATION_HOOKS: dict[str, tuple[str, type, str]] = {
    kind.hook: (kind.attribute, getattr(interfaces, kind.entry), kind.kind) for kind in PLUGIN_KINDS
}


@dataclass
class Plugins:
    """The loaded plugin set: one registry per kind of entry (``plugins.backbones``, ``plugins.probes``,
    one attribute per :data:`~sslbench.hookspecs.PLUGIN_KINDS` entry), and what each plugin contributed."""

    registries: dict[str, Registry[Any]]
    plugins: list[PluginInfo]

    def __getattr__(self, attribute: str) -> Registry[Any]:
        # Only reached for attributes not set on the instance: the registries by kind.
        registries = self.__dict__.get("registries", {})
        if attribute in registries:
            return registries[attribute]
        raise AttributeError(f"'Plugins' object has no attribute {attribute!r}")

    def plugin_of(self, registry: Registry[Any], name: str) -> PluginInfo:
        """The plugin (with its distribution and version) that registered ``name`` in ``registry``."""
        origin = registry.origin(name)
        return next(p for p in self.plugins if p.name == origin and p.error is None)

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error is not None]


# ------------------------------------------------------------------------------------------------
# Entry points, and which of them SSLBENCH_DISABLE_PLUGINS switches off.


def _normalize(distribution: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the group, in load order."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # The distribution breaks ties between equal names, so that the order (and which side of a
    # name conflict is reported first) does not depend on sys.path.
    return sorted(eps, key=lambda ep: (ep.name, _normalize(ep.dist.name) if ep.dist else ""))


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> object:
    """Import the object an entry point names (a seam for tests that simulate a broken install)."""
    return ep.load()


@dataclass(frozen=True)
class _DisableRule:
    """One item of SSLBENCH_DISABLE_PLUGINS."""

    distribution: str | None  # normalized; None: any distribution
    name: str  # "*": any name

    @classmethod
    def parse(cls, item: str) -> _DisableRule:
        distribution, colon, name = item.rpartition(":")
        distribution, name = distribution.strip(), name.strip()
        if not name or (colon and not distribution) or ":" in distribution:
            raise PluginError(f"{DISABLE_ENV}: cannot read '{item}'; expected NAME, DIST:NAME or DIST:*")
        return cls(_normalize(distribution) if colon else None, name)

    def matches(self, ep: importlib.metadata.EntryPoint) -> bool:
        if self.name not in ("*", ep.name):
            return False
        return self.distribution is None or (ep.dist is not None and _normalize(ep.dist.name) == self.distribution)


def _disable_rules() -> list[_DisableRule]:
    return [_DisableRule.parse(item.strip()) for item in os.environ.get(DISABLE_ENV, "").split(",") if item.strip()]


# ------------------------------------------------------------------------------------------------
# One plugin on its way through loading.


@dataclass
class _Candidate:
    info: PluginInfo
    entry_point: importlib.metadata.EntryPoint | None  # None: an ``extra`` plugin
    plugin: object = None
    # One manager per plugin rather than pm.subset_hook_caller on a shared one: subset callers keep
    # plugins in a set, and plugin objects need not be hashable (a SimpleNamespace, a dataclass).
    manager: pluggy.PluginManager | None = None

    @property
    def builtin(self) -> bool:
        return self.info.distribution is not None and _normalize(self.info.distribution) == BUILTIN_DISTRIBUTION

    @property
    def distribution_label(self) -> str:
        """``"NAME VERSION"`` of the distribution (what to uninstall)."""
        if self.info.distribution is None:
            return "unknown distribution"
        return f"{self.info.distribution} {self.info.version}"

    @property
    def label(self) -> str:
        """How errors name the plugin."""
        if self.entry_point is None:
            # Whoever passed it to load_plugins knows where it is; its name is what they gave.
            return f"plugin '{self.info.name}'"
        if self.info.distribution is None:
            return f"plugin '{self.info.name}' (unknown distribution)"
        return f"plugin '{self.info.name}' (distribution {self.distribution_label})"

    @property
    def disable_item(self) -> str | None:
        """The SSLBENCH_DISABLE_PLUGINS item that disables this plugin alone (None for an extra)."""
        if self.entry_point is None:
            return None
        if self.info.distribution is None:
            return self.info.name
        return f"{self.info.distribution}:{self.info.name}"


def _how_to_disable(candidates: Sequence[_Candidate]) -> str:
    """``"SSLBENCH_DISABLE_PLUGINS=…"`` settings that each disable one of ``candidates`` ("" if none can be).

    When a third-party plugin is involved, only it is offered: disabling a built-in would lose a
    part of sslbench to keep a plugin that conflicts with it.
    """
    from_entry_points = [c for c in candidates if c.entry_point is not None]
    offered = [c for c in from_entry_points if not c.builtin] or from_entry_points
    items = dict.fromkeys(c.disable_item for c in offered if c.disable_item)
    return " or ".join(f"{DISABLE_ENV}={item}" for item in items)


def _disable_advice(candidates: Sequence[_Candidate]) -> str:
    """``"; disable it with …"`` to end an error about ``candidates``."""
    how = _how_to_disable(candidates)
    if not how:
        return ""
    return f"; disable {'it' if len(candidates) == 1 else 'one'} with {how}"


# ------------------------------------------------------------------------------------------------
# Loading.


def load_plugins(
    *,
    entry_points: bool = True,
    extra: Iterable[tuple[str, object]] = (),
    warn: Callable[[str], None] | None = None,
    trace: Callable[[str], None] | None = None,
) -> Plugins:
    """Load plugins and call their registration hooks.

    :param entry_points: load the installed entry points of group ``sslbench`` (built-ins included).
    :param extra: ``(name, plugin)`` pairs registered after the entry points; how tests and Python
        API users add a plugin object without installing a distribution.
    :param warn: receives one line per third-party plugin that failed to import or to register, and
        per function named like a hook without ``@hookimpl`` (default: print to stderr).
    :param trace: receives pluggy's trace of every hook call (pluggy's ``enable_tracing``); for
        debugging a plugin.
    :raises PluginError: a built-in plugin that fails to import; two plugins with the same name; a
        hook implementation with an unknown name or unknown arguments; a name registered twice; an
        exception raised by (or a mistyped registration from) the registration hook of a built-in or an
        ``extra`` plugin (a third-party plugin's is a warning, and the plugin is left out).
    """
    warn = warn or (lambda line: print(f"sslbench: warning: {line}", file=sys.stderr))
    candidates = _candidates(entry_points, extra, warn)

    for candidate in candidates:
        if candidate.info.error is not None:  # left out before import (a name it cannot have)
            continue
        if candidate.entry_point is not None:
            _import(candidate, warn)
        if candidate.info.error is None:
            candidate.manager = _manager(candidate, trace, warn)

    by_name = {c.info.name: c for c in candidates if c.info.stage != "name"}
    registries: dict[str, Registry[Any]] = {
        attr: Registry(kind, entry_type, describe=lambda plugin: by_name[plugin].label)
        for attr, entry_type, kind in _REGISTRATION_HOOKS.values()
    }

    def disable(candidate: _Candidate, fault: _HookFault) -> None:
        _disable(candidate, fault, registries)
        warn(f"{candidate.label} {candidate.info.failure}{_disable_advice([candidate])}")

    for hook_name, (attr, _, _kind) in _REGISTRATION_HOOKS.items():
        for candidate in _call_order(candidates, hook_name):
            if candidate.manager is None:  # evicted during this hook by a built-in's registration
                continue
            fault = _call_registration_hook(candidate, hook_name, registries[attr], by_name, disable)
            if fault is None:
                continue
            if candidate.builtin or candidate.entry_point is None:
                # A broken built-in is a broken installation; an ``extra`` plugin's caller wants to know.
                raise fault.error from fault.cause
            disable(candidate, fault)

    for candidate in candidates:
        info = candidate.info
        if info.error is not None:
            for attr, _, kind in _REGISTRATION_HOOKS.values():
                registries[attr].mark_failed(candidate.label, info.failure or "", info.would_register.get(kind, ()))
            continue
        for attr, _, kind in _REGISTRATION_HOOKS.values():
            names = [n for n in registries[attr].names() if registries[attr].origin(n) == info.name]
            if names:
                info.registered[kind] = names
    return Plugins(registries=registries, plugins=[c.info for c in candidates])


def _disable(candidate: _Candidate, fault: _HookFault, registries: dict[str, Registry[Any]]) -> None:
    """Take out a third-party plugin whose registration hook failed: everything it registered, in
    every hook so far, is withdrawn (half a plugin is worse than none) and no further hook is called."""
    info = candidate.info
    info.error, info.stage = f"hook '{fault.hook}' {fault.what}", "registration"
    candidate.manager = None
    would: dict[str, list[str]] = {}
    for attr, _, kind in _REGISTRATION_HOOKS.values():
        withdrawn = registries[attr].withdraw(info.name)
        if withdrawn:
            would[kind] = withdrawn
    # Cards it could not load: their ids, read from the files as far as they could be.
    cause: BaseException | None = fault.cause
    while cause is not None:
        if isinstance(cause, CardError):
            would["backbone"] = list(dict.fromkeys([*would.get("backbone", []), *cause.card_ids]))
            break
        cause = cause.__cause__ or cause.__context__
    info.would_register = would


def _candidates(
    entry_points: bool, extra: Iterable[tuple[str, object]], warn: Callable[[str], None]
) -> list[_Candidate]:
    """The plugins to load, in load order, after checking that their names are unique."""
    candidates: list[_Candidate] = []
    if entry_points:
        rules = _disable_rules()
        for ep in _entry_points():
            if any(rule.matches(ep) for rule in rules):
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
            candidates.append(_Candidate(info, ep))
    # Before anything is imported: a plugin that would be rejected must not run import-time code.
    candidates = _without_collisions(candidates, warn)
    taken = {c.info.name: c for c in candidates if c.info.error is None}
    for name, plugin in extra:
        candidate = _Candidate(PluginInfo(name, None, None), None, plugin)
        if name in taken:
            how = _how_to_disable([taken[name]])
            raise PluginError(
                f"plugin name '{name}' of a plugin passed to load_plugins(extra=...) is already taken by "
                f"{taken[name].label}; rename it" + (f", or disable that one with {how}" if how else "")
            )
        taken[name] = candidate
        candidates.append(candidate)
    return candidates


def _without_collisions(candidates: list[_Candidate], warn: Callable[[str], None]) -> list[_Candidate]:
    """Two entry points with one name: pluggy keeps one plugin per name, so one would vanish. The
    third-party ones are left out, with one warning each and listed as failed by ``sslbench plugins``
    (a built-in keeps its name: it cannot be the culprit); two built-ins are a broken installation."""
    groups: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.info.name, []).append(candidate)
    for name, group in groups.items():
        if len(group) < 2:
            continue
        sides = " and ".join(f"{c.distribution_label} ({c.entry_point.value if c.entry_point else '?'})" for c in group)
        message = (
            f"plugin name '{name}' is declared by {len(group)} entry points of group '{ENTRY_POINT_GROUP}': "
            f"{sides}; {_collision_advice(group)}"
        )
        third_party = [c for c in group if not c.builtin]
        if len(third_party) < len(group) - 1:
            raise PluginError(message)
        for candidate in third_party:
            candidate.info.error, candidate.info.stage = message, "name"
            warn(f"{candidate.label} is left out: {message}")
    return candidates


def _collision_advice(group: Sequence[_Candidate]) -> str:
    """How to resolve entry points sharing a name: rename the third party's (a built-in's name is
    taken for good), uninstall one, or disable one."""
    third_party = [c for c in group if not c.builtin]
    how = _how_to_disable(group)
    disable = f", or disable {'it' if len(third_party) == 1 else 'one'} with {how}" if how else ""
    where = f"in its pyproject's [project.entry-points.{ENTRY_POINT_GROUP}], e.g. after its package"
    if len(third_party) < len(group):
        dists = " and ".join(c.distribution_label for c in third_party)
        return (
            f"'{group[0].info.name}' is a built-in plugin's name: rename the entry point of {dists} ({where}){disable}"
        )
    return f"rename the entry point of one ({where}), or uninstall one{disable}"


def _import(candidate: _Candidate, warn: Callable[[str], None]) -> None:
    assert candidate.entry_point is not None
    try:
        candidate.plugin = _load_entry_point(candidate.entry_point)
    except Exception as exc:  # whatever a broken plugin raises is reported, in one line
        candidate.info.error, candidate.info.stage = exception_line(exc), "import"
        message = f"{candidate.label} failed to import: {candidate.info.error}"
        if candidate.builtin:
            # A missing built-in would only surface later as a confusing "unknown backend 'torch'".
            how = _how_to_disable([candidate])
            raise PluginError(f"built-in {message}; reinstall sslbench to repair it, or disable it with {how}") from exc
        warn(message + _disable_advice([candidate]))


def _manager(
    candidate: _Candidate, trace: Callable[[str], None] | None, warn: Callable[[str], None]
) -> pluggy.PluginManager:
    """A plugin manager holding this plugin alone, its hook implementations validated."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if trace is not None:
        pm.trace.root.setwriter(trace)
        pm.enable_tracing()
    plugin, name = candidate.plugin, candidate.info.name
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(_validation_message(pm, candidate, exc)) from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        hook_names = [hook for hook, caller in vars(pm.hook).items() if caller.spec is not None]
        unknown = _unknown_hook_name(pm, plugin)
        hint = did_you_mean(unknown, hook_names, n=1)
        raise PluginError(
            f"{candidate.label} implements unknown hook '{unknown}'{hint}{_disable_advice([candidate])}"
        ) from None
    candidate.info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
    _warn_unmarked_hooks(pm, candidate, warn)
    return pm


def _warn_unmarked_hooks(pm: pluggy.PluginManager, candidate: _Candidate, warn: Callable[[str], None]) -> None:
    """One warning per function named like a hook (``sslbench_register_…``) that lacks ``@hookimpl``:
    pluggy ignores it, so its plugin would silently register nothing."""
    plugin = candidate.plugin
    hook_names = [hook for hook, caller in vars(pm.hook).items() if caller.spec is not None]
    for attr in dir(plugin):
        if attr not in hook_names and not attr.startswith("sslbench_register"):
            continue
        if not inspect.isroutine(getattr(plugin, attr, None)) or pm.parse_hookimpl_opts(plugin, attr) is not None:
            continue
        hint = "" if attr in hook_names else did_you_mean(attr, hook_names, n=1)
        warn(
            f"{candidate.label} defines {attr}(){hint} without @hookimpl, so sslbench never calls it; "
            f"decorate it: `from sslbench import hookimpl`, then `@hookimpl` above `def {attr}`"
        )


def _validation_message(pm: pluggy.PluginManager, candidate: _Candidate, exc: pluggy.PluginValidationError) -> str:
    """One line for pluggy's multi-line validation error, naming the bad argument when that is the fault."""
    plugin = candidate.plugin
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        caller = getattr(pm.hook, (opts.get("specname") if opts else None) or attr, None)
        if opts is None or caller is None or caller.spec is None:
            continue
        valid = [*caller.spec.argnames, *caller.spec.kwargnames]
        bad = [arg for arg in _required_arguments(getattr(plugin, attr)) if arg not in valid]
        if bad:
            hint = did_you_mean(bad[0], valid, n=1)
            quoted = ", ".join(f"'{arg}'" for arg in bad)
            return (
                f"{candidate.label} implements hook '{caller.name}' with unknown argument {quoted}{hint}; "
                f"the hook's arguments are: {', '.join(valid)}{_disable_advice([candidate])}"
            )
    detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{candidate.label} has an invalid hook implementation: {detail}{_disable_advice([candidate])}"


def _required_arguments(function: Callable[..., object]) -> list[str]:
    """The arguments pluggy passes by name: positional parameters without a default."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    # A function defined in a class and looked up on the class still lists its implicit first
    # parameter, which pluggy does not pass.
    if names and names[0] in ("self", "cls") and "." in getattr(function, "__qualname__", ""):
        names = names[1:]
    return names


def _unknown_hook_name(pm: pluggy.PluginManager, plugin: object) -> str:
    for name, caller in vars(pm.hook).items():
        if caller.spec is None and any(impl.plugin is plugin for impl in caller.get_hookimpls()):
            return name
    return "?"


def _call_order(candidates: Sequence[_Candidate], hook_name: str) -> list[_Candidate]:
    """The plugins implementing ``hook_name``, in the order their hooks are called.

    pluggy orders implementations within one manager; across plugins this applies the same rule
    (``tryfirst`` first, ``trylast`` last), with ties in load order rather than pluggy's
    last-registered-first, so that registries list entries in the documented order.
    """
    ranked: list[tuple[int, int, _Candidate]] = []
    for index, candidate in enumerate(candidates):
        if candidate.manager is None:
            continue
        impls = getattr(candidate.manager.hook, hook_name).get_hookimpls()
        if not impls:
            continue
        # A wrapper's tryfirst orders it among wrappers, not the plugin among plugins.
        plain = [impl for impl in impls if not (impl.wrapper or impl.hookwrapper)] or impls
        rank = min(0 if impl.tryfirst else 2 if impl.trylast else 1 for impl in plain)
        ranked.append((rank, index, candidate))
    return [candidate for _, _, candidate in sorted(ranked, key=lambda item: item[:2])]


@dataclass
class _HookFault:
    """What one plugin's registration hook did wrong by itself: raised, or registered an unusable entry."""

    hook: str
    #: ``"raised KeyError: 'x'"``, ``"registered a MetricEntry as a backbone; expected BackboneEntry"``
    what: str
    #: The one-line error a built-in or an ``extra`` plugin fails with.
    error: PluginError
    cause: BaseException | None = None


def _call_registration_hook(
    candidate: _Candidate,
    hook_name: str,
    registry: Registry[Any],
    by_name: dict[str, _Candidate],
    evict: Callable[[_Candidate, _HookFault], None],
) -> _HookFault | None:
    """Call one plugin's implementations of a registration hook through pluggy.

    :param evict: takes out a third-party plugin that registered a name a built-in registers too
        (called when the built-in comes second; a third party that comes second gets the fault).
    :returns: what the plugin's hook did wrong by itself (an exception, an entry of the wrong type or
        without a name, a name a built-in registers), or None.
    :raises PluginError: a name another third-party plugin registered already (which of the two is
        meant is not the loader's to guess), even when the plugin swallowed the error ``register`` raised.
    """
    assert candidate.manager is not None
    conflicts: list[PluginError] = []
    faults: list[_HookFault] = []
    accepting = True

    def register(entry: Any) -> None:
        if not accepting:
            raise PluginError(
                f"{candidate.label} called register after its hook '{hook_name}' returned{_disable_advice([candidate])}"
            )
        problem = registry.problem(entry)
        if problem is not None:
            error = PluginError(f"{candidate.label} {problem}{_disable_advice([candidate])}")
            # Kept for after the call: a wrapper or a try/except in the plugin may swallow it.
            faults.append(_HookFault(hook_name, problem, error))
            raise error
        try:
            registry.add(entry, candidate.info.name)
        except PluginError as exc:
            other = by_name[registry.origin(entry.name)]
            if other is candidate:  # the same name twice from one plugin: its own fault alone
                error = PluginError(f"{exc}{_disable_advice([candidate])}")
                faults.append(_HookFault(hook_name, f"registered {registry.kind} '{entry.name}' twice", error))
                raise error from None
            third_party = _third_party_side(other, candidate)
            if third_party is not None:  # a built-in's name is taken for good: the third party goes
                builtin = candidate if third_party is other else other
                what = f"registered {registry.kind} '{entry.name}', which built-in {builtin.label} registers; rename it"
                fault = _HookFault(hook_name, what, PluginError(f"{exc}{_disable_advice([third_party])}"))
                if third_party is candidate:
                    faults.append(fault)
                    raise fault.error from None
                evict(other, fault)
                registry.add(entry, candidate.info.name)
                return
            error = PluginError(f"{exc}{_disable_advice([other, candidate])}")
            # Kept for after the call: a swallowed duplicate would leave the other plugin's entry
            # silently in place.
            conflicts.append(error)
            raise error from None

    try:
        getattr(candidate.manager.hook, hook_name)(register=register)
    except Exception as exc:  # noqa: BLE001 - whatever a broken plugin raises is its fault, told in one line
        if conflicts:
            raise conflicts[0] from None
        if faults:
            return faults[0]
        what = f"raised {exception_line(exc)}"
        error = PluginError(
            f"{candidate.label} raised an exception in hook '{hook_name}': {exception_line(exc)}"
            f"{_disable_advice([candidate])}"
        )
        return _HookFault(hook_name, what, error, exc)
    finally:
        accepting = False
    if conflicts:
        raise conflicts[0]
    return faults[0] if faults else None


def _third_party_side(one: _Candidate, other: _Candidate) -> _Candidate | None:
    """Of two plugins registering one name, the third-party entry point when the other is a built-in."""
    for third_party, builtin in ((one, other), (other, one)):
        if builtin.builtin and not third_party.builtin and third_party.entry_point is not None:
            return third_party
    return None


@functools.cache
def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded once from the installed entry points."""
    return load_plugins()
