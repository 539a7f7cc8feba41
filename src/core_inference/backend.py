"""Everything a backend author uses, in one module.

``BaseBackend`` (defined here): availability judged without importing the engine, format
sniffing, load options and errors. ``BaseModel`` and the stream helpers (re-exported):
a backend writes its raw stream once, sync or async, and one mapping of its engine's
exceptions; the rest of the contract comes from the base class. See docs/backends.md.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import BackendUnavailable, ModelLoadError
from .formats import is_url, sniff_format
from .model import close_open_models_first_at_exit
from .options import apply_load_opts
from .protocols import TextModel
from .types import LoadConfig

_LOAD_FIELDS = frozenset(f.name for f in fields(LoadConfig))


class BaseBackend:
    """Shared parts of a backend; subclasses set the class attributes and ``_load``."""

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""  # the pip extra that installs the engine
    engine_modules: ClassVar[tuple[str, ...]] = ()  # top-level modules the engine needs
    formats: ClassVar[tuple[str, ...]] = ()  # what sniff_format() must say for can_load
    engine_options: ClassVar[frozenset[str]] = frozenset()  # the engine_options keys it takes

    def why_unavailable(self) -> str | None:
        """None when usable here, else a sentence saying what is missing (no engine import)."""
        return self.missing_engine() or self.hardware_problem()

    def why_unavailable_for(self, cfg: LoadConfig) -> str | None:
        """``why_unavailable`` for a load with ``cfg``, asked when a backend is named explicitly.

        A backend whose engine options change what it needs overrides this: ``metal`` with
        ``engine_options={"device": "cpu"}`` needs MLX but no Metal GPU.
        """
        return self.why_unavailable()

    def missing_engine(self) -> str | None:
        """None when every engine module is installed, else which one is not (no import)."""
        for module in self.engine_modules:
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):  # blocked (sys.modules[name] = None) or broken
                spec = None
            if spec is None:
                return (
                    f"the Python module {module!r} is not installed "
                    f"(pip install 'core-inference[{self.extra}]')"
                )
        return None

    def hardware_problem(self) -> str | None:
        """None when the hardware is there; backends for GPUs override this."""
        return None

    def available(self) -> bool:
        """True when the engine is installed and the hardware is present."""
        return self.why_unavailable() is None

    def can_load(self, path: str | os.PathLike[str]) -> bool:
        """True when the path looks like a format this backend reads."""
        return sniff_format(path) in self.formats

    def load_model(self, path: str | os.PathLike[str], *opts: Any, **kw: Any) -> TextModel:
        """Load a model; options as ``with_x(...)`` or keywords.

        A keyword naming one of this backend's ``engine_options`` (``model=``/``api_key=``
        of ``openai``) goes into ``engine_options``; any other unknown keyword is a TypeError.
        """
        engine_kw = {k: kw.pop(k) for k in list(kw) if k in self.engine_options and k not in _LOAD_FIELDS}
        cfg = apply_load_opts(opts, **kw)
        if engine_kw:
            cfg = replace(cfg, engine_options={**cfg.engine_options, **engine_kw})
        unknown = set(cfg.engine_options) - self.engine_options
        if unknown:
            known = ", ".join(sorted(self.engine_options)) or "none"
            raise TypeError(
                f"engine_options: unknown option(s) for backend {self.name!r}: "
                f"{', '.join(sorted(unknown))} (known: {known})"
            )
        if not is_url(path) and not os.path.exists(path):
            raise ModelLoadError(f"{os.fspath(path)}: no such file or folder", path)
        try:
            model = self._load(os.fspath(path), cfg)
        except ImportError as exc:
            raise BackendUnavailable(self.name, f"cannot import its engine: {exc}", self.extra) from exc
        close_open_models_first_at_exit()
        return model

    def _load(self, path: str, cfg: LoadConfig) -> TextModel:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


if TYPE_CHECKING:  # the same names, for type checkers
    from .options import apply_load_opts

# The backend author's toolbox, imported on first touch: ``BaseModel`` brings asyncio in,
# which ``import core_inference`` (and a registry scan) must not pay for.
_AUTHOR = {
    "BaseModel": "core_inference.model",
    "to_messages": "core_inference.model",
    "check_prompts": "core_inference.model",
    "EngineLoop": "core_inference.aio",
    "MetricsRecorder": "core_inference.streaming",
    "Piece": "core_inference.streaming",
    "TokenFinisher": "core_inference.streaming",
    "BatchBook": "core_inference.streaming",
    "classify_results": "core_inference.streaming",
    "finish_tokens": "core_inference.streaming",
    "afinish_tokens": "core_inference.streaming",
    "engine_seed": "core_inference.streaming",
    "SlotQueue": "core_inference.streaming",
    "apply_generate_opts": "core_inference.options",
    "apply_load_opts": "core_inference.options",
    "builtin_template": "core_inference.templates",
    "render_jinja": "core_inference.templates",
    "no_template_error": "core_inference.templates",
    "CallResult": "core_inference.results",
}


def __getattr__(name: str) -> Any:
    module = _AUTHOR.get(name)
    if module is None:
        raise AttributeError(f"module 'core_inference.backend' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["BaseBackend", *sorted(_AUTHOR)]
