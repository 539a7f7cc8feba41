"""The backend registry: built-ins named lazily, plugins from entry points, deterministic choice.

Shaped like fsspec's registry: the table of built-ins is read-only (``BUILTINS``), each
entry a lazy ``"module:Class"`` and the pip extra that installs its engine; what is
registered lives in private state that ``registered()`` shows read-only. Plugins (the
entry-point group ``core_inference.backends``) are imported when the registry is first
asked, never at ``import core_inference``. A backend that fails (on import, or in its own
``why_unavailable()`` or ``can_load()``) is logged, listed by ``broken_backends()`` and
passed over by the automatic choice: it never takes the other backends down with it.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any, NamedTuple

from .errors import (
    BackendNotRegistered,
    BackendUnavailable,
    InferenceError,
    NoBackendAvailable,
)
from .options import apply_load_opts
from .protocols import Backend, TextModel
from .types import LoadConfig

LOGGER_NAME = "core_inference"  # ``logging`` is imported only when there is something to log

ENTRY_POINT_GROUP = "core_inference.backends"
ENV_BACKEND = "CORE_INFERENCE_BACKEND"
PREFERENCE = ("metal", "cuda", "rocm", "llama_cpp")


class BuiltinBackend(NamedTuple):
    """A built-in backend: its class as ``"module:Class"`` (imported when chosen) and its pip extra."""

    spec: str
    extra: str

    @property
    def install_hint(self) -> str:
        """The command that installs the engine, e.g. ``pip install 'core-inference[llama-cpp]'``."""
        return f"pip install 'core-inference[{self.extra}]'"


BUILTINS: Mapping[str, BuiltinBackend] = MappingProxyType(
    {
        "llama_cpp": BuiltinBackend("core_inference.backends.llama_cpp:LlamaCppBackend", "llama-cpp"),
        "cuda": BuiltinBackend("core_inference.backends.transformers:CudaBackend", "torch"),
        "rocm": BuiltinBackend("core_inference.backends.transformers:RocmBackend", "torch"),
        "torch": BuiltinBackend("core_inference.backends.transformers:TorchBackend", "torch"),
        "metal": BuiltinBackend("core_inference.backends.mlx:MlxBackend", "mlx"),
        "openai": BuiltinBackend("core_inference.backends.openai:OpenAIBackend", "openai"),
        "vllm": BuiltinBackend("core_inference.backends.vllm:VllmBackend", "vllm"),
    }
)

_lock = threading.RLock()
_entries: dict[str, Backend | str] = {n: b.spec for n, b in BUILTINS.items()}  # instance or "module:Class"
_broken: dict[str, str] = {}  # name -> why it is broken (a plugin or a backend that failed)
_plugins: dict[str, str] = {}  # plugin name -> its entry point's value, once loaded
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _mark_broken(name: str, reason: str) -> None:
    """Record (and log, once per reason) that ``name`` is broken."""
    with _lock:
        if _broken.get(name) == reason:
            return
        _broken[name] = reason
    import logging

    logging.getLogger(LOGGER_NAME).warning("core-inference backend %r is broken: %s", name, reason)


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


def _is_builtin(name: str) -> bool:
    """True while ``name`` still holds the built-in backend (lazy or imported)."""
    builtin, entry = BUILTINS.get(name), _entries.get(name)
    if builtin is None or entry is None:
        return False
    if isinstance(entry, str):
        return entry == builtin.spec
    module, _, attr = builtin.spec.partition(":")
    return type(entry) is getattr(sys.modules.get(module), attr, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    try:
        found = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # unreadable metadata of some installed distribution
        _mark_broken(f"({ENTRY_POINT_GROUP})", f"cannot read the entry points: {_describe(exc)}")
        return
    seen: dict[str, str] = {}
    for ep in found:
        dist = getattr(getattr(ep, "dist", None), "name", None)
        label = f"entry point '{ep.name} = {ep.value}'" + (f" of {dist}" if dist else "")
        if ep.name in seen:
            _mark_broken(f"{ep.name} (plugin)", f"{label} is ignored: {seen[ep.name]} already has that name")
            continue
        seen[ep.name] = label
        if _plugins.get(ep.name) == ep.value and ep.name in _entries:
            continue  # loaded by an earlier scan
        if ep.name in _entries:
            owner = "the built-in backend" if _is_builtin(ep.name) else "a backend registered in this process"
            _mark_broken(
                f"{ep.name} (plugin)",
                f"{label} is ignored: {ep.name!r} is the name of {owner}, which is kept "
                "(register() the plugin to replace it)",
            )
            continue
        try:
            _entries[ep.name] = _instantiate(ep.load())
        except Exception as exc:  # a broken plugin must not break the library
            _mark_broken(ep.name, _describe(exc))
            continue
        _plugins[ep.name] = ep.value
        _broken.pop(ep.name, None)


def reload_plugins() -> None:
    """Scan the entry-point group again (after installing a plugin in this process)."""
    global _plugins_loaded
    with _lock:
        _plugins_loaded = False
        _load_plugins()


def _resolve(name: str) -> Backend:
    entry = _entries[name]
    if not isinstance(entry, str):
        return entry
    try:
        backend = _instantiate(import_object(entry))
    except Exception as exc:
        _mark_broken(name, _describe(exc))
        builtin = BUILTINS.get(name)
        if builtin is not None and entry == builtin.spec and isinstance(exc, ImportError):
            raise BackendUnavailable(name, f"cannot import {entry}: {exc}", builtin.extra) from exc
        raise InferenceError(f"backend {name!r} failed to import: {exc}") from exc
    _entries[name] = backend
    _broken.pop(name, None)
    return backend


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


def registered() -> Mapping[str, Backend | str]:
    """A read-only live view: name -> backend, or its ``"module:Class"`` while not yet imported."""
    with _lock:
        _load_plugins()
        return MappingProxyType(_entries)


def broken_backends() -> dict[str, str]:
    """Backends and plugins that failed (to import, or in their own checks), with the reason."""
    with _lock:
        _load_plugins()
        return dict(_broken)


def preference_order() -> list[str]:
    """Every registered name in choice order: metal, cuda, rocm, llama_cpp, then others."""
    with _lock:
        _load_plugins()
        names = list(_entries)
    return [n for n in PREFERENCE if n in names] + [n for n in names if n not in PREFERENCE]


def _extra(name: str, backend: Backend | None) -> str | None:
    extra = getattr(backend, "extra", None) if backend is not None else None
    if not extra and name in BUILTINS:
        extra = BUILTINS[name].extra
    return extra or None


def _failed_check(name: str, method: str, exc: Exception) -> str:
    reason = f"its {method}() raised {_describe(exc)}"
    _mark_broken(name, reason)
    return reason


def _check(name: str, backend: Backend, path: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(status, detail): "available", "unavailable" or "broken" (a check of its own raised)."""
    try:
        reason = backend.why_unavailable()
    except Exception as exc:
        return "broken", _failed_check(name, "why_unavailable", exc)
    if reason is not None:
        return "unavailable", reason
    if path is None:
        return "available", ""
    try:
        loads = backend.can_load(path)
    except Exception as exc:
        return "broken", _failed_check(name, "can_load", exc)
    return ("available", "") if loads else ("unavailable", f"cannot load {os.fspath(path)!r}")


def backend_status() -> list[tuple[str, str, str]]:
    """(name, status, detail) per backend in preference order, then broken plugins not registered.

    Status is "available", "unavailable" (detail: why) or "broken" (detail: what failed).
    """
    rows = []
    for name in preference_order():
        try:
            backend = get(name)
        except InferenceError as exc:
            rows.append((name, "broken", broken_backends().get(name, str(exc))))
            continue
        status, detail = _check(name, backend, None)
        rows.append((name, status, detail))
    listed = {row[0] for row in rows}
    rows += [(name, "broken", why) for name, why in broken_backends().items() if name not in listed]
    return rows


def env_backend() -> str:
    """``$CORE_INFERENCE_BACKEND`` ("" when unset); ``BackendNotRegistered`` when it names no backend."""
    name = os.environ.get(ENV_BACKEND, "").strip()
    if name:
        with _lock:
            _load_plugins()
            if name not in _entries:
                err = BackendNotRegistered(name, list(_entries))
                err.args = (f"${ENV_BACKEND}={name}: {err}",)
                raise err
    return name


def default_backend(path: str | os.PathLike[str] | None = None) -> Backend:
    """The first available backend in preference order (that can load ``path``, if given)."""
    reasons: dict[str, str] = {}
    for name in preference_order():
        try:
            backend = get(name)
        except InferenceError as exc:
            reasons[name] = str(exc)
            continue
        status, reasons[name] = _check(name, backend, path)
        if status == "available":
            return backend
    what = f" for {os.fspath(path)!r}" if path is not None else ""
    detail = "\n".join(f"  {n}: {r}" for n, r in reasons.items()) or "  (no backends registered)"
    raise NoBackendAvailable(f"no backend available{what}:\n{detail}", reasons)


def choose_backend(path: str | os.PathLike[str], name: str = "", cfg: LoadConfig | None = None) -> Backend:
    """The backend ``load_model`` would use: ``name``, else $CORE_INFERENCE_BACKEND, else the default.

    A backend named explicitly is judged for the load at hand (``why_unavailable_for(cfg)``
    where it has one): ``metal`` asked for MLX's CPU device needs no Metal GPU.
    """
    name = name or env_backend()
    if not name:
        return default_backend(path)
    backend = get(name)
    check_for = getattr(backend, "why_unavailable_for", None) if cfg is not None else None
    try:
        reason = check_for(cfg) if check_for is not None else backend.why_unavailable()
    except Exception as exc:
        reason = _failed_check(name, "why_unavailable", exc)
        raise BackendUnavailable(name, reason, _extra(name, backend)) from exc
    if reason is not None:
        # the install hint only where the engine is missing: more pip will not add a GPU
        missing = getattr(backend, "missing_engine", None)
        hardware = missing is not None and missing() is None
        raise BackendUnavailable(name, reason, None if hardware else _extra(name, backend))
    return backend


def load_model(
    path: str | os.PathLike[str] | None = None, *opts: Any, **kw: Any
) -> TextModel:
    """Load a model with the chosen backend; no path loads the embedded default model.

    Keywords that are not load options (``model=``/``api_key=`` of ``openai``) go to the
    chosen backend, which takes those it names in ``engine_options`` (others: TypeError).
    """
    load_fields = {f.name for f in fields(LoadConfig)}
    engine_kw = {k: kw.pop(k) for k in list(kw) if k not in load_fields}
    cfg = apply_load_opts(opts, **kw)
    if path is None:
        from .default_model import default_model_path

        path = default_model_path()
    from .formats.validate import check_model_path  # missing, corrupt or truncated files: ModelLoadError

    check_model_path(path)  # URLs pass unchecked
    backend = choose_backend(path, cfg.backend, cfg)
    return backend.load_model(path, cfg, **engine_kw)
