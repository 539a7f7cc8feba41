"""The backend registry: built-ins named lazily, plugins from entry points, deterministic choice."""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from .errors import (
    BackendNotRegistered,
    BackendUnavailable,
    InferenceError,
    NoBackendAvailable,
)
from .options import apply_load_opts
from .protocols import Backend, TextModel

LOGGER_NAME = "core_inference"  # ``logging`` is imported only when there is something to log

ENTRY_POINT_GROUP = "core_inference.backends"
ENV_BACKEND = "CORE_INFERENCE_BACKEND"
PREFERENCE = ("metal", "cuda", "rocm", "llama_cpp")

# Built-in backends, imported only when asked for.
BUILTINS: dict[str, str] = {
    "llama_cpp": "core_inference.backends.llama_cpp:LlamaCppBackend",
}

_lock = threading.RLock()
_entries: dict[str, Backend | str] = dict(BUILTINS)  # name -> instance or "module:Class"
_broken: dict[str, str] = {}  # name -> why it could not be loaded
_plugins_loaded = False


def import_object(spec: str) -> Any:
    """Import ``"module:attr"`` and return the attribute."""
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _instantiate(obj: Any) -> Backend:
    backend = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{obj!r} is not a Backend (it lacks name/available/can_load/load_model)")
    return backend


def register(backend: Backend | str, name: str | None = None) -> None:
    """Add a backend (an instance, or a lazy ``"module:Class"`` with ``name``); same name replaces."""
    with _lock:
        if isinstance(backend, str):
            if not name:
                raise ValueError("register('module:Class') needs name=")
            key = name
        else:
            key = name or backend.name
        _entries.pop(key, None)
        _entries[key] = backend
        _broken.pop(key, None)


def unregister(name: str) -> None:
    """Remove a backend; unknown names are ignored."""
    with _lock:
        _entries.pop(name, None)
        _broken.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _entries:
            continue
        try:
            _entries[ep.name] = _instantiate(ep.load())
        except Exception as exc:  # a broken plugin must not break the library
            reason = f"{type(exc).__name__}: {exc}"
            _broken[ep.name] = reason
            import logging

            logging.getLogger(LOGGER_NAME).warning(
                "skipping broken core-inference backend plugin %r: %s", ep.name, reason
            )


def reload_plugins() -> None:
    """Scan the entry-point group again (after installing a plugin in this process)."""
    global _plugins_loaded
    with _lock:
        _plugins_loaded = False
        _load_plugins()


def _resolve(name: str) -> Backend:
    entry = _entries[name]
    if isinstance(entry, str):
        try:
            backend = _instantiate(import_object(entry))
        except Exception as exc:
            _broken[name] = f"{type(exc).__name__}: {exc}"
            raise InferenceError(f"backend {name!r} failed to import: {exc}") from exc
        _entries[name] = backend
        return backend
    return entry


def get(name: str) -> Backend:
    """The backend registered as ``name``; ``BackendNotRegistered`` lists the known names."""
    with _lock:
        _load_plugins()
        if name not in _entries:
            raise BackendNotRegistered(name, list(_entries))
        return _resolve(name)


def list_backends() -> list[str]:
    """Names of every registered backend, sorted."""
    with _lock:
        _load_plugins()
        return sorted(_entries)


def broken_backends() -> dict[str, str]:
    """Backends (plugins or built-ins) that failed to load, with the reason."""
    with _lock:
        _load_plugins()
        return dict(_broken)


def preference_order() -> list[str]:
    """Every registered name in choice order: metal, cuda, rocm, llama_cpp, then others."""
    with _lock:
        _load_plugins()
        names = list(_entries)
    return [n for n in PREFERENCE if n in names] + [n for n in names if n not in PREFERENCE]


def _usable(name: str, path: str | os.PathLike[str] | None) -> tuple[Backend | None, str]:
    try:
        backend = get(name)
    except InferenceError as exc:
        return None, str(exc)
    reason = backend.why_unavailable()
    if reason is not None:
        return None, reason
    if path is not None and not backend.can_load(path):
        return None, f"cannot load {os.fspath(path)!r}"
    return backend, ""


def default_backend(path: str | os.PathLike[str] | None = None) -> Backend:
    """The first available backend in preference order (that can load ``path``, if given)."""
    reasons: dict[str, str] = {}
    for name in preference_order():
        backend, reason = _usable(name, path)
        if backend is not None:
            return backend
        reasons[name] = reason
    what = f" for {os.fspath(path)!r}" if path is not None else ""
    detail = "\n".join(f"  {n}: {r}" for n, r in reasons.items()) or "  (no backends registered)"
    raise NoBackendAvailable(f"no backend available{what}:\n{detail}", reasons)


def choose_backend(path: str | os.PathLike[str], name: str = "") -> Backend:
    """The backend ``load_model`` would use: ``name``, else $CORE_INFERENCE_BACKEND, else the default."""
    name = name or os.environ.get(ENV_BACKEND, "")
    if not name:
        return default_backend(path)
    backend = get(name)
    reason = backend.why_unavailable()
    if reason is not None:
        raise BackendUnavailable(name, reason, getattr(backend, "extra", None))
    return backend


def load_model(
    path: str | os.PathLike[str] | None = None, *opts: Any, **kw: Any
) -> TextModel:
    """Load a model with the chosen backend; no path loads the embedded default model."""
    cfg = apply_load_opts(opts, **kw)
    if path is None:
        from .default_model import default_model_path

        path = default_model_path()
    from .validate import check_model_path  # missing, corrupt or truncated files: ModelLoadError

    check_model_path(path)  # URLs pass unchecked
    backend = choose_backend(path, cfg.backend)
    return backend.load_model(path, cfg)


