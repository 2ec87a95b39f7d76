"""Plugin discovery and the per-run plugin manager."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

import pluggy

from . import hookimpl, hookspecs
from .algorithms import defaults
from .config import ConfigError
from .data import DataError

ALGORITHMS = "posttrain.algorithms"
EXTENSIONS = "posttrain.extensions"


class PluginError(RuntimeError):
    """An algorithm or extension could not be found or loaded. ``key`` is the config key that
    selected it (``algorithm.name`` or ``extensions``)."""

    def __init__(self, message: str, key: str = "algorithm.name"):
        super().__init__(message)
        self.key = key


# Set on an exception raised by an installed plugin's hook: which hook of which plugin, one line.
HOOK_ATTR = "posttrain_hook"


@dataclass(frozen=True)
class InstalledPlugin:
    name: str
    group: str
    module: str  # entry-point target, e.g. "posttrain_hpt.plugin"
    distribution: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}"


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def installed(group: str = ALGORITHMS) -> dict[str, InstalledPlugin]:
    """Installed plugins of a group, read from metadata only (nothing is imported)."""
    out = {}
    for name, ep in sorted(_entry_points(group).items()):
        dist = ep.dist
        out[name] = InstalledPlugin(name, group, ep.value, dist.name if dist else "?", dist.version if dist else "?")
    return out


def installed_algorithms() -> list[str]:
    return sorted(installed(ALGORITHMS))


def load_plugin_module(name: str, group: str = ALGORITHMS) -> Any:
    """Import exactly one plugin by entry-point name, with errors that name the fix."""
    eps = _entry_points(group)
    kind = "algorithm" if group == ALGORITHMS else "extension"
    key = "algorithm.name" if group == ALGORITHMS else "extensions"
    if name not in eps:
        names = sorted(eps)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PluginError(
            f"Unknown {kind} '{name}'. Installed: {', '.join(names) or '(none)'}.{hint} "
            f"First-party plugins install with: pip install -e plugins/<name>", key
        )
    ep = eps[name]
    info = installed(group)[name]
    try:
        return ep.load()
    except Exception as e:  # any import-time failure of third-party code: name the plugin
        raise PluginError(f'Error importing {kind} plugin "{name}" ({info.label}, {ep.value}): {type(e).__name__}: {e}', key) from e


def make_plugin_manager(algorithm: str, extensions: Iterable[str] = (), plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    """A fresh manager per run: hookspecs, defaults, exactly one algorithm, listed extensions.

    ``plugins`` registers in-process objects or modules (tests, notebooks) after the rest.
    """
    pm = pluggy.PluginManager("posttrain")
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="posttrain.defaults")
    _register(pm, _registrable(load_plugin_module(algorithm, ALGORITHMS)), f"algorithm:{algorithm}", "algorithm.name")
    for ext in extensions:
        _register(pm, _registrable(load_plugin_module(ext, EXTENSIONS)), f"extension:{ext}", "extensions")
    for i, p in enumerate(plugins):
        _register(pm, _registrable(p), f"inline:{i}:{getattr(p, '__name__', type(p).__name__)}", "plugins", name_errors=False)
    _check_hook_names(pm)  # a misspelt hook name fails here, not at step 3,000
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, key: str, *, name_errors: bool = True) -> None:
    """Register, turning pluggy's validation error into a PluginError; entry-point plugins' hooks
    get errors that name the plugin (``name_errors``; in-process ones raise as they are)."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:  # e.g. a hook taking an argument its spec lacks
        raise PluginError(f"{name}: {e}", key) from None
    if name_errors:
        for caller in pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _naming_errors(impl.function, caller.name, name)


def _naming_errors(fn: Any, hook: str, plugin: str) -> Any:
    kind, _, short = plugin.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            # The exception itself is re-raised, type and traceback unchanged (torch uses exceptions
            # for control flow, e.g. activation checkpointing); it only learns where it came from.
            if not isinstance(e, (ConfigError, DataError)) and not hasattr(e, HOOK_ATTR):
                setattr(e, HOOK_ATTR, f'hook {hook} of {kind} plugin "{short}" raised {type(e).__name__}: {e}')
                if hasattr(e, "add_note"):  # Python 3.11+: shown under the traceback outside the CLI too
                    e.add_note(f'(in hook {hook} of {kind} plugin "{short}")')
            raise

    return call


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()`` with the plugin's config key and the closest real hook name."""
    specs = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "posttrain_spec"))
    for name, caller in vars(pm.hook).items():
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            close = difflib.get_close_matches(name, specs, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Hooks: {', '.join(specs)}."
            owner = impl.plugin_name
            key = {"algorithm": "algorithm.name", "extension": "extensions"}.get(owner.partition(":")[0], "plugins")
            raise PluginError(f"{owner}: unknown hook '{name}' (no such hook in posttrain.hookspecs).{hint}", key)


# --- plugin instances ------------------------------------------------------------------------
#
# An entry point (or an inline plugin) may be a class instead of a module. Its instance holds
# the algorithm's state for one stage: it is created from the validated config by
# ``bind_plugins`` and its ``state_dict()`` is saved in every checkpoint. Until then a stand-in
# answers ``algorithm_config`` (a staticmethod on the class: it is called before any instance
# exists, to validate the config the instance is created with).


class _Pending:
    """Registered in place of a plugin class until ``bind_plugins`` creates its instance."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    @hookimpl
    def algorithm_config(self):
        fn = getattr(self.factory, "algorithm_config", None)
        return fn() if fn is not None else None


def _registrable(obj: Any) -> Any:
    return _Pending(obj) if isinstance(obj, type) else obj


def bind_plugins(pm: pluggy.PluginManager, config: Any) -> None:
    """Create every class plugin's instance from the validated algorithm ``config``.

    Plugins registered after a class keep their place (pluggy calls later registrations
    first), so everything from the first pending plugin on is registered again, in order.
    """
    order = [(name, p) for name, p in pm.list_name_plugin() if p is not None]
    first = next((i for i, (_, p) in enumerate(order) if isinstance(p, _Pending)), None)
    if first is None:
        return
    for name, p in order[first:]:
        pm.unregister(p, name=name)
    for name, p in order[first:]:
        if isinstance(p, _Pending):
            try:
                p = p.factory(config)
            except Exception as e:  # the plugin's own constructor: name it
                raise PluginError(f"{name}: creating {getattr(p.factory, '__name__', p.factory)}(config) raised "
                                  f"{type(e).__name__}: {e}") from e
        kind = name.partition(":")[0]
        _register(pm, p, name, {"algorithm": "algorithm.name", "extension": "extensions"}.get(kind, "plugins"),
                  name_errors=kind != "inline")
    _check_hook_names(pm)


def stateful_plugins(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered plugin instances with ``state_dict`` / ``load_state_dict``, by registration name."""
    return {name: p for name, p in pm.list_name_plugin()
            if p is not None and not isinstance(p, type) and callable(getattr(p, "state_dict", None))
            and callable(getattr(p, "load_state_dict", None))}


def plugin_state(pm: pluggy.PluginManager) -> dict[str, Any]:
    return {name: p.state_dict() for name, p in stateful_plugins(pm).items()}


def load_plugin_state(pm: pluggy.PluginManager, state: dict[str, Any]) -> None:
    for name, p in stateful_plugins(pm).items():
        if name in state:
            p.load_state_dict(state[name])


def overridden_hooks(module: Any) -> list[str]:
    """Names of the hooks a plugin module (or class) implements; a PluginError names a misspelt one."""
    if isinstance(module, type):  # a class: its hookimpls, read without creating an instance
        return sorted(n for n in dir(module) if hasattr(getattr(module, n, None), "posttrain_impl")
                      and hasattr(hookspecs, n))
    pm = pluggy.PluginManager("posttrain")
    pm.add_hookspecs(hookspecs)
    pm.register(module, name=getattr(module, "__name__", "plugin"))  # pluggy's own error for a bad signature
    _check_hook_names(pm)
    return sorted(h.name for h in pm.get_hookcallers(module) or [])


def build_registry(pm: pluggy.PluginManager, hook_name: str) -> dict[str, Any]:
    """Collect factories from a ``register_*`` hook into a dict name → factory."""
    found: dict[str, Any] = {}

    def register(name: str, factory: Any) -> None:
        found.setdefault(name, factory)  # later (lower priority) registrations don't override

    getattr(pm.hook, hook_name)(register=register)
    return found


def pick(registry: dict[str, Any], name: str, key: str) -> Any:
    """The factory registered as ``name``, or an error naming the config key and what is registered."""
    if name not in registry:
        raise KeyError(f"{key}: '{name}' is not registered. Available: {', '.join(sorted(registry))}")
    return registry[name]


def import_module(name: str) -> Any:
    return importlib.import_module(name)


def unregistered_names(pm: pluggy.PluginManager, run: Any) -> list[str]:
    """Config problems for names the plugins' ``register_*`` hooks do not provide (checked
    before the model loads, where a lookup would otherwise fail after it)."""
    problems = []
    for key, value, hook in (("verifier.name", run.verifier.name, "register_verifiers"),
                             ("rollout.engine", run.rollout.engine, "register_rollout_engines"),
                             ("trainer.backend", run.trainer.backend, "register_trainer_backends")):
        names = sorted(build_registry(pm, hook))
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            problems.append(f"{key}: '{value}' is not registered; use one of {' | '.join(names)}."
                            + (f" Did you mean '{close[0]}'?" if close else ""))
    return problems
