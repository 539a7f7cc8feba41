"""``BaseBackend``: availability without importing the engine, format sniffing, load errors."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, ClassVar

from .errors import BackendUnavailable, ModelLoadError
from .formats import is_url, sniff_format
from .options import apply_load_opts
from .protocols import TextModel
from .types import LoadConfig


class BaseBackend:
    """Shared parts of a backend; subclasses set the class attributes and ``_load``."""

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""  # the pip extra that installs the engine
    engine_modules: ClassVar[tuple[str, ...]] = ()  # top-level modules the engine needs
    formats: ClassVar[tuple[str, ...]] = ()  # what sniff_format() must say for can_load

    def why_unavailable(self) -> str | None:
        """None when usable here, else a sentence saying what is missing (no engine import)."""
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
        return self.hardware_problem()

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
        """Load a model; options as ``with_x(...)`` or keywords."""
        cfg = apply_load_opts(opts, **kw)
        if not is_url(path) and not os.path.exists(path):
            raise ModelLoadError(f"{os.fspath(path)}: no such file or folder")
        try:
            return self._load(os.fspath(path), cfg)
        except ImportError as exc:
            raise BackendUnavailable(self.name, f"cannot import its engine: {exc}", self.extra) from exc

    def _load(self, path: str, cfg: LoadConfig) -> TextModel:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
