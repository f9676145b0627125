"""The plugin manager: finds plugins through entry points, isolates failures, builds registries.

Plugins are modules (or objects) implementing the hooks of ``mslim_core.hookspecs``. They
are found through the ``mslim.plugins`` entry-point group, first-party ones included.
The manager is the only piece of global state in mslim (``get_plugin_manager``).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pluggy

from mslim_core import hookspecs
from mslim_core.config import PrunerConfig
from mslim_core.errors import PluginError

ENTRY_POINT_GROUP = "mslim.plugins"
STRICT_ENV = "MSLIM_STRICT_PLUGINS"
DISABLE_ENV = "MSLIM_DISABLE_PLUGINS"
HOOK_NAMES = ("mslim_register_pruners", "mslim_register_importances", "mslim_register_fusers")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")

Status = Literal["loaded", "failed", "disabled"]


@dataclass
class PluginRecord:
    """What the manager knows of one plugin: where it came from, what it provides, how it went."""

    name: str
    distribution: str | None = None
    version: str | None = None
    status: Status = "loaded"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    pruners: list[str] = field(default_factory=list)
    importances: list[str] = field(default_factory=list)
    fusers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class Registry:
    """Everything the loaded plugins registered, by name."""

    pruners: dict[str, type] = field(default_factory=dict)
    importances: dict[str, Any] = field(default_factory=dict)
    fusers: list[Any] = field(default_factory=list)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)


def _validate_pruner(obj: Any) -> str:
    from mslim_core.pruner import Pruner

    if not (inspect.isclass(obj) and issubclass(obj, Pruner)):
        raise PluginError(f"register() for pruners takes a mslim_core.Pruner subclass, got {obj!r}")
    if not isinstance(obj.name, str) or not _NAME_RE.match(obj.name):
        raise PluginError(
            f"pruner class {obj.__name__} has name {obj.name!r}; it needs a lower-case name "
            "(letters, digits, '_' or '-', starting with a letter)"
        )
    if not (inspect.isclass(obj.Config) and issubclass(obj.Config, PrunerConfig)):
        raise PluginError(f"pruner {obj.name!r} has Config {obj.Config!r}; it must subclass mslim_core.PrunerConfig")
    return obj.name


def _validate_importance(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"importance criterion {obj!r} needs a lower-case string `name`, has {name!r}")
    if not callable(getattr(obj, "scores", None)):
        raise PluginError(f"importance criterion {name!r} needs a `scores` method")
    return name


def _validate_fuser(obj: Any) -> str:
    pattern = getattr(obj, "pattern", None)
    if not (isinstance(pattern, tuple) and pattern and all(inspect.isclass(t) for t in pattern)):
        raise PluginError(f"fusion rule {obj!r} needs a non-empty tuple `pattern` of module classes")
    if not callable(getattr(obj, "fuse", None)):
        raise PluginError(f"fusion rule {obj!r} needs a callable `fuse`")
    return str(getattr(obj, "name", "") or "+".join(t.__name__ for t in pattern))


_KINDS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "mslim_register_pruners": ("pruners", _validate_pruner),
    "mslim_register_importances": ("importances", _validate_importance),
    "mslim_register_fusers": ("fusers", _validate_fuser),
}


class PluginManager:
    """A typed facade over pluggy's manager: loading, per-plugin isolation, registries."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._records: dict[str, PluginRecord] = {}
        self._registry: Registry | None = None
        self._lock = threading.RLock()
        if load_entry_points:
            self.load_entry_points()

    @staticmethod
    def strict() -> bool:
        """Whether ``MSLIM_STRICT_PLUGINS`` asks for failures to be errors."""
        return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}

    @staticmethod
    def disabled() -> set[str]:
        """Plugin names blocked through ``MSLIM_DISABLE_PLUGINS`` (comma-separated)."""
        return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}

    def load_entry_points(self) -> None:
        """Load every plugin of the ``mslim.plugins`` entry-point group, isolating failures."""
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
            )
            if ep.name in self.disabled():
                record.status = "disabled"
                self._records[ep.name] = record
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break mslim
                self._fail(record, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._add(plugin, record)

    def register(
        self, plugin: object, name: str | None = None, distribution: str | None = None, version: str | None = None
    ) -> PluginRecord:
        """Register an in-process plugin (a module or object with hook implementations)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self._records and self._records[name].status == "loaded":
            raise PluginError(f"a plugin named {name!r} is already registered; pick another name")
        record = PluginRecord(name=name, distribution=distribution, version=version)
        if name in self.disabled():
            record.status = "disabled"
            self._records[name] = record
            return record
        self._add(plugin, record)
        if self.strict() and record.status == "failed":
            raise PluginError(record.error or "")
        return record

    def unregister(self, name: str) -> None:
        """Remove a plugin by name (mostly for tests)."""
        with self._lock:
            plugin = self._pm.get_plugin(name)
            if plugin is not None:
                self._pm.unregister(plugin, name=name)
            self._records.pop(name, None)
            self._registry = None

    def records(self) -> list[PluginRecord]:
        """Every plugin seen, loaded or not; registering builds the registry first."""
        self.registry()
        return list(self._records.values())

    def registry(self) -> Registry:
        """The registry of pruners, importances and fusers (built once, rebuilt after changes)."""
        with self._lock:
            if self._registry is None:
                self._registry = self._build_registry()
            return self._registry

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, record: PluginRecord, message: str) -> None:
        where = f" (distribution {record.distribution} {record.version})" if record.distribution else ""
        record.status = "failed"
        record.error = message
        self._records[record.name] = record
        if self.strict():
            raise PluginError(f"plugin {record.name!r}{where} failed: {message}")

    def _add(self, plugin: object, record: PluginRecord) -> None:
        with self._lock:
            try:
                self._pm.register(plugin, name=record.name)
            except Exception as exc:  # pluggy's validation of hook signatures
                self._fail(record, f"invalid hook implementation: {exc}")
                return
            unknown = [c.name for c in self._pm.get_hookcallers(plugin) or [] if c.spec is None]
            if unknown:
                self._pm.unregister(plugin, name=record.name)
                self._fail(
                    record,
                    f"implements unknown hook(s) {', '.join(unknown)}; known hooks: {', '.join(HOOK_NAMES)}",
                )
                return
            record.hooks = sorted(c.name for c in self._pm.get_hookcallers(plugin) or [])
            self._records[record.name] = record
            self._registry = None

    def _collect(self, record: PluginRecord) -> dict[str, list[tuple[str, Any]]]:
        """Call one plugin's hooks and validate what it registers."""
        collected: dict[str, list[tuple[str, Any]]] = {kind: [] for kind, _ in _KINDS.values()}
        for hook_name in record.hooks:
            kind, validate = _KINDS[hook_name]
            impls = [i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin_name == record.name]

            def register(obj: Any, _kind: str = kind, _validate: Callable[[Any], str] = validate) -> None:
                collected[_kind].append((_validate(obj), obj))

            for impl in impls:
                impl.function(*[register for _ in impl.argnames])
        return collected

    def _build_registry(self) -> Registry:
        registry = Registry()
        for record in list(self._records.values()):
            if record.status != "loaded":
                continue
            try:
                collected = self._collect(record)
            except Exception as exc:  # invalid registrations or a hook that raises
                self._pm.unregister(name=record.name)
                self._fail(record, f"registration failed: {type(exc).__name__}: {exc}")
                continue
            for kind, items in collected.items():
                setattr(record, kind, [n for n, _ in items])
                for item_name, obj in items:
                    owner = registry.owners.get((kind, item_name))
                    if owner is not None and kind != "fusers":
                        raise PluginError(
                            f"{kind[:-1]} {item_name!r} is registered by two plugins: {owner!r} and "
                            f"{record.name!r}. Uninstall one or block it with {DISABLE_ENV}={record.name}"
                        )
                    registry.owners[(kind, item_name)] = record.name
                    if kind == "fusers":
                        registry.fusers.append(obj)
                    else:
                        getattr(registry, kind)[item_name] = obj
        return registry


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager so the next use reloads plugins (after changing the environment)."""
    global _manager
    with _manager_lock:
        _manager = None


def get_registry() -> Registry:
    """The registry of the process-wide plugin manager."""
    return get_plugin_manager().registry()
