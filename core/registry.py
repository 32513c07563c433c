"""The plugin manager: finds plugins, registers their classes by kind and name, isolates failures.

Built-ins are the modules named in ``registry.toml``; third parties are modules named by entry points in the
``graft`` group. Both go through the same path: import the module in its own try, register it with pluggy,
then call each of its hooks in its own try. A plugin that fails is recorded as broken and everything else
keeps working. Two plugins registering one name make that name unusable, with an error naming both.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.metadata
import importlib.resources
import os

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import pluggy

from . import hookspecs
from .errors import GraftError, did_you_mean
from .interfaces import Adapter, Backbone, DataSource, Logger, Loss, Strategy
from .task import Task

ENTRY_POINT_GROUP = "graft"

#: kind (also the config table) -> (hook name, base class)
KINDS = {
    "backbone": ("register_backbones", Backbone),
    "strategy": ("register_strategies", Strategy),
    "loss": ("register_losses", Loss),
    "data": ("register_datasources", DataSource),
    "adapter": ("register_adapters", Adapter),
    "logger": ("register_loggers", Logger),
    "task": ("register_tasks", Task),
}
KIND_ALIASES = {"backbones": "backbone", "strategies": "strategy", "losses": "loss", "datasource": "data",
                "datasources": "data", "dataset": "data", "adapters": "adapter", "loggers": "logger",
                "tasks": "task"}


@dataclasses.dataclass
class PluginInfo:
    name: str
    module: str
    source: str  # "built-in" or "entry point"
    version: str
    status: str = "ok"  # ok, broken, disabled
    error: str = ""


@dataclasses.dataclass
class Entry:
    kind: str
    name: str
    cls: type
    plugin: str
    summary: str


def summary_of(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def canonical_kind(kind: str) -> str:
    k = KIND_ALIASES.get(kind, kind)
    if k not in KINDS:
        raise GraftError(f"Unknown plugin kind {kind!r}.{did_you_mean(kind, KINDS)} Kinds: {', '.join(KINDS)}.")
    return k


def builtin_catalogue() -> dict:
    """registry.toml, which ships inside the package."""
    text = importlib.resources.files("graft").joinpath("registry.toml").read_text()
    return tomllib.loads(text)


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get("GRAFT_DISABLE_PLUGINS", "").split(",") if p.strip()}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class Registry:
    def __init__(self):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.conflicts: dict[tuple[str, str], list[Entry]] = {}
        self._load()

    # -- discovery -------------------------------------------------------------------------------------
    def _load(self):
        disabled = _disabled()
        version = _dist_version("graftkit")
        modules = []
        for kind, table in builtin_catalogue().items():
            for name, spec in table.items():
                if spec["module"] not in modules:
                    modules.append(spec["module"])
        candidates = [(m.rsplit(".", 1)[-1], m, "built-in", version, None) for m in modules]
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            candidates.append((ep.name, ep.value, "entry point", dist.version if dist else "?", ep))
        for name, module, source, ver, ep in candidates:
            info = PluginInfo(name=name, module=module, source=source, version=ver)
            if name in self.plugins:
                info.name = f"{name} ({module})"
            self.plugins[info.name] = info
            if name in disabled or module in disabled:
                info.status = "disabled"
                continue
            try:
                obj = ep.load() if ep is not None else importlib.import_module(module)
                self.pm.register(obj, name=info.name)
            except BaseException as e:  # noqa: BLE001 - any failure of a plugin's import must stay contained
                if isinstance(e, KeyboardInterrupt):
                    raise
                info.status, info.error = "broken", _error_text(e)
        for kind, (hook, base) in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                info = self.plugins[impl.plugin_name]
                try:
                    impl.function(register=self._registrar(kind, base, info))
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    info.status, info.error = "broken", f"{hook} failed: {_error_text(e)}"

    def _registrar(self, kind, base, info: PluginInfo):
        def register(cls, name: str | None = None, summary: str | None = None):
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{cls!r} is not a subclass of graft.{base.__name__}")
            if not dataclasses.is_dataclass(cls.Options):
                raise TypeError(f"{cls.__name__}.Options must be a dataclass")
            name = name or cls.name or cls.__name__.lower()
            entry = Entry(kind, name, cls, info.name, summary or summary_of(cls))
            existing = self.entries[kind].get(name)
            if existing is not None or (kind, name) in self.conflicts:
                self.conflicts.setdefault((kind, name), [existing] if existing else []).append(entry)
                self.entries[kind].pop(name, None)
                return cls
            self.entries[kind][name] = entry
            return cls

        return register

    # -- lookup ----------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name``; the error lists what exists, or names both sources of a clash."""
        kind = canonical_kind(kind)
        if (kind, name) in self.conflicts:
            sources = " and ".join(f"plugin {e.plugin!r} ({self.plugins[e.plugin].module})"
                                   for e in self.conflicts[(kind, name)])
            raise GraftError(f"The {kind} name {name!r} is registered twice, by {sources}. Uninstall one, or "
                             f"skip one with GRAFT_DISABLE_PLUGINS=<plugin name>.")
        entry = self.entries[kind].get(name)
        if entry is None:
            known = sorted(self.entries[kind])
            broken = [p.name for p in self.plugins.values() if p.status == "broken"]
            hint = f" Broken plugins that may have provided it: {', '.join(broken)} (see `graft plugins`)." \
                if broken else ""
            raise GraftError(f"Unknown {kind} {name!r}.{did_you_mean(name, known)} Available: "
                             f"{', '.join(known) or '(none)'}.{hint}")
        return entry.cls

    def list(self, kind: str | None = None, pattern: str | None = None) -> list[Entry]:
        kinds = [canonical_kind(kind)] if kind else list(KINDS)
        out = []
        for k in kinds:
            for name in sorted(self.entries[k]):
                if pattern is None or fnmatch.fnmatch(name, pattern):
                    out.append(self.entries[k][name])
        return out


def _entry_points():
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # pragma: no cover - broken metadata of some unrelated distribution
        return []


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    global _registry
    if _registry is None or reload:
        _registry = Registry()
    return _registry
