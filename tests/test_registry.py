"""The backend registry: registration, deterministic choice, errors, lazy built-ins, plugins."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import core_inference as ci
from core_inference import (
    BackendNotRegistered,
    BackendUnavailable,
    InferenceError,
    LoadConfig,
    ModelLoadError,
    NoBackendAvailable,
    registry,
)
from core_inference.backend import BaseBackend
from core_inference.protocols import TextModel
from core_inference.testing import FakeBackend, FakeModel

ENV = "CORE_INFERENCE_BACKEND"


@pytest.fixture(autouse=True)
def isolated_registry(empty_registry: None) -> None:
    """Each test starts from an empty registry (no built-ins, no plugins) and no env override."""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """The smallest valid GGUF file: version 3, no tensors, one key (the architecture)."""
    path = tmp_path / "model.gguf"
    key, value = b"general.architecture", b"gemma3"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    return path


class Recorder(FakeBackend):
    """A fake backend that records every question the registry asks it."""

    def __init__(self, name: str, available: bool = True, loads: bool = True) -> None:
        super().__init__(name, available)
        self.loads = loads
        self.asked: list[str] = []

    def why_unavailable(self) -> str | None:
        self.asked.append("why_unavailable")
        return super().why_unavailable()

    def can_load(self, path: str | os.PathLike[str]) -> bool:
        self.asked.append("can_load")
        return self.loads


class NeedsEngine(BaseBackend):
    """A real BaseBackend whose engine module is not installed."""

    name = "needs_engine"
    extra = "llama-cpp"
    engine_modules = ("core_inference_test_no_such_engine_module",)
    formats = ("gguf",)


class ImportFailsOnLoad(BaseBackend):
    """Looks available, but its engine fails to import when loading."""

    name = "import_fails"
    extra = "mlx"
    formats = ("gguf",)

    def _load(self, path: str, cfg: LoadConfig) -> TextModel:
        raise ImportError("libengine.so: cannot open shared object file")


def load_and_close(path: Any, *opts: Any, **kw: Any) -> TextModel:
    model = ci.load_model(path, *opts, **kw)
    model.close()
    return model


# -- register / get / list -------------------------------------------------------------


def test_register_get_and_sorted_list() -> None:
    b, a = FakeBackend("zebra"), FakeBackend("aardvark")
    ci.register(b)
    ci.register(a)
    assert ci.list_backends() == ["aardvark", "zebra"]
    assert ci.get("zebra") is b and ci.get("aardvark") is a


def test_same_name_replaces() -> None:
    first, second = FakeBackend("dup"), FakeBackend("dup")
    ci.register(first)
    ci.register(second)
    assert ci.list_backends() == ["dup"]
    assert ci.get("dup") is second


def test_register_under_another_name_and_unregister() -> None:
    ci.register(FakeBackend("fake"), name="alias")
    assert ci.list_backends() == ["alias"]
    ci.unregister("alias")
    ci.unregister("never-there")
    assert ci.list_backends() == []


def test_lazy_string_needs_a_name() -> None:
    with pytest.raises(ValueError):
        ci.register("some.module:Backend")


def test_unknown_name_lists_the_known_ones() -> None:
    ci.register(FakeBackend("beta"))
    ci.register(FakeBackend("alpha"))
    with pytest.raises(BackendNotRegistered) as info:
        ci.get("gamma")
    assert isinstance(info.value, InferenceError) and isinstance(info.value, LookupError)
    assert "gamma" in str(info.value) and "alpha, beta" in str(info.value)
    assert info.value.known == ["alpha", "beta"]


def test_registering_a_non_backend_fails_on_get() -> None:
    ci.register("builtins:object", name="notabackend")
    with pytest.raises(InferenceError):
        ci.get("notabackend")
    assert "notabackend" in ci.broken_backends()


# -- choice ----------------------------------------------------------------------------


def test_preference_order_regardless_of_registration_order(model_file: Path) -> None:
    for name in ["zeta", "llama_cpp", "alpha", "rocm", "cuda", "omega", "metal"]:
        ci.register(Recorder(name))
    assert ci.preference_order() == ["metal", "cuda", "rocm", "llama_cpp", "zeta", "alpha", "omega"]
    assert ci.default_backend(model_file).name == "metal"
    assert ci.default_backend().name == "metal"


@pytest.mark.parametrize(
    ("unavailable", "expected"),
    [
        (["metal"], "cuda"),
        (["metal", "cuda"], "rocm"),
        (["metal", "cuda", "rocm"], "llama_cpp"),
        (["metal", "cuda", "rocm", "llama_cpp"], "first_other"),
        (["metal", "cuda", "rocm", "llama_cpp", "first_other"], "second_other"),
    ],
)
def test_unavailable_backends_are_skipped(model_file: Path, unavailable: list[str], expected: str) -> None:
    for name in ["first_other", "llama_cpp", "rocm", "second_other", "cuda", "metal"]:
        ci.register(Recorder(name, available=name not in unavailable))
    assert ci.default_backend(model_file).name == expected
    model = load_and_close(model_file)
    assert isinstance(model, FakeModel)
    assert registry.get(expected).loaded == [str(model_file)]  # type: ignore[attr-defined]


def test_backends_that_cannot_load_the_path_are_skipped(model_file: Path) -> None:
    ci.register(Recorder("metal", loads=False))
    ci.register(Recorder("llama_cpp", loads=True))
    assert ci.default_backend(model_file).name == "llama_cpp"
    assert ci.default_backend().name == "metal"  # no path: can_load is not asked


def test_choice_is_deterministic(model_file: Path) -> None:
    for name in ["b", "c", "a"]:
        ci.register(Recorder(name))
    assert {ci.default_backend(model_file).name for _ in range(20)} == {"b"}


def test_env_override(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ci.register(Recorder("metal"))
    ci.register(Recorder("chosen", loads=False))  # the env choice is not second-guessed
    monkeypatch.setenv(ENV, "chosen")
    load_and_close(model_file)
    assert ci.get("chosen").loaded == [str(model_file)]  # type: ignore[attr-defined]
    assert ci.get("metal").loaded == []  # type: ignore[attr-defined]


def test_explicit_backend_wins_over_env(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["metal", "from_env", "explicit"]:
        ci.register(Recorder(name))
    monkeypatch.setenv(ENV, "from_env")
    load_and_close(model_file, backend="explicit")
    load_and_close(model_file, ci.with_backend("explicit"))
    assert len(ci.get("explicit").loaded) == 2  # type: ignore[attr-defined]
    assert ci.get("from_env").loaded == []  # type: ignore[attr-defined]


def test_env_naming_an_unknown_backend(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ci.register(Recorder("metal"))
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(BackendNotRegistered, match="metal"):
        ci.load_model(model_file)


def test_unavailable_explicit_backend_says_what_to_install(model_file: Path) -> None:
    ci.register(NeedsEngine())
    assert not ci.get("needs_engine").available()
    with pytest.raises(InferenceError) as info:  # catchable as the base error
        ci.load_model(model_file, backend="needs_engine")
    err = info.value
    assert isinstance(err, BackendUnavailable)
    assert "pip install 'core-inference[llama-cpp]'" in str(err)
    assert str(err).count("pip install") == 1
    assert err.name == "needs_engine" and err.extra == "llama-cpp"


def test_unavailable_explicit_fake_backend(model_file: Path) -> None:
    ci.register(FakeBackend("off", available=False))
    with pytest.raises(BackendUnavailable, match="off"):
        ci.load_model(model_file, backend="off")


def test_engine_import_failure_chains_the_real_cause(model_file: Path) -> None:
    ci.register(ImportFailsOnLoad())
    with pytest.raises(BackendUnavailable) as info:
        ci.load_model(model_file, backend="import_fails")
    assert isinstance(info.value.__cause__, ImportError)
    assert "libengine.so" in str(info.value)
    assert "pip install 'core-inference[mlx]'" in str(info.value)


def test_no_backend_available_lists_every_reason(model_file: Path) -> None:
    ci.register(Recorder("metal", available=False))
    ci.register(Recorder("picky", loads=False))
    ci.register(NeedsEngine())
    with pytest.raises(NoBackendAvailable) as info:
        ci.load_model(model_file)
    text = str(info.value)
    assert isinstance(info.value, InferenceError)
    assert "metal: the fake backend was made unavailable" in text
    assert "picky: cannot load" in text
    assert "needs_engine: the Python module 'core_inference_test_no_such_engine_module'" in text


def test_no_backends_registered() -> None:
    with pytest.raises(NoBackendAvailable, match="no backends registered"):
        ci.default_backend()


@pytest.mark.parametrize("backend", ["", "metal", "not_registered"])
def test_missing_path_fails_before_any_backend_is_chosen(tmp_path: Path, backend: str) -> None:
    rec = Recorder("metal")
    ci.register(rec)
    missing = tmp_path / "no" / "such.gguf"
    with pytest.raises(ModelLoadError) as info:
        ci.load_model(missing, backend=backend)
    assert str(missing) in str(info.value)
    assert rec.asked == [] and rec.loaded == []


def test_urls_are_not_checked_on_disk() -> None:
    ci.register(Recorder("remote"))
    model = load_and_close("http://localhost:9/v1")
    assert isinstance(model, FakeModel)
    assert ci.get("remote").loaded == ["http://localhost:9/v1"]  # type: ignore[attr-defined]


def test_load_options_reach_the_backend(model_file: Path) -> None:
    ci.register(FakeBackend("metal"))
    model = ci.load_model(model_file, parallel_slots=3)
    try:
        assert isinstance(model, FakeModel) and model._slots.size == 3
    finally:
        model.close()
    with pytest.raises(TypeError, match="bogus"):
        ci.load_model(model_file, bogus=1)


# -- laziness --------------------------------------------------------------------------


def test_lazy_string_is_imported_only_on_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "core_inference_lazy_test_backend"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from core_inference.testing import FakeBackend

            class LazyBackend(FakeBackend):
                def __init__(self):
                    super().__init__(name="lazy")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    try:
        ci.register(f"{module}:LazyBackend", name="lazy")
        assert ci.list_backends() == ["lazy"]
        assert ci.preference_order() == ["lazy"]
        assert module not in sys.modules
        backend = ci.get("lazy")
        assert module in sys.modules
        assert isinstance(backend, FakeBackend) and backend.name == "lazy"
        assert ci.get("lazy") is backend  # instantiated once
    finally:
        sys.modules.pop(module, None)


def test_broken_lazy_backend_is_reported_and_skipped(model_file: Path) -> None:
    ci.register("core_inference_no_such_module_xyz:Backend", name="ghost")
    ci.register(Recorder("other"))
    with pytest.raises(InferenceError, match="ghost"):
        ci.get("ghost")
    assert "ModuleNotFoundError" in ci.broken_backends()["ghost"]
    assert ci.default_backend(model_file).name == "other"
    ci.unregister("other")
    with pytest.raises(NoBackendAvailable, match="ghost"):
        ci.default_backend(model_file)


def test_builtins_table_is_read_only_with_lazy_spec_and_extra() -> None:
    entry = registry.BUILTINS["llama_cpp"]
    assert entry.spec == "core_inference.backends.llama_cpp:LlamaCppBackend"
    assert entry.extra == "llama-cpp"
    assert entry.install_hint == "pip install 'core-inference[llama-cpp]'"
    with pytest.raises(TypeError):
        registry.BUILTINS["evil"] = entry  # type: ignore[index]
    with pytest.raises(TypeError):
        del registry.BUILTINS["llama_cpp"]  # type: ignore[attr-defined]
    ci.register(FakeBackend("shown"))
    view = registry.registered()
    assert list(view) == ["shown"]
    with pytest.raises(TypeError):
        view["other"] = FakeBackend("other")  # type: ignore[index]


def test_builtin_llama_cpp_is_a_lazy_string() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import core_inference
        from core_inference import registry
        names = core_inference.list_backends()
        order = core_inference.preference_order()
        print(json.dumps({
            "names": names,
            "order": order,
            "entry_is_str": isinstance(registry._entries["llama_cpp"], str),
            "imported": "core_inference.backends.llama_cpp" in sys.modules,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert "llama_cpp" in state["names"] and "llama_cpp" in state["order"]
    assert state["entry_is_str"] is True
    assert state["imported"] is False


# -- plugins ---------------------------------------------------------------------------

PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "core-inference-test-tinyplug"
version = "0.1.0"

[project.entry-points."core_inference.backends"]
tinyplug = "ci_tinyplug_backend:TinyBackend"
brokenplug = "ci_brokenplug_backend:Backend"

[tool.setuptools]
py-modules = ["ci_tinyplug_backend", "ci_brokenplug_backend"]
"""

TINY_MODULE = """\
from core_inference.testing import FakeBackend


class TinyBackend(FakeBackend):
    name = "tinyplug"

    def __init__(self) -> None:
        super().__init__(name="tinyplug")
"""

BROKEN_MODULE = """\
raise ImportError("tinyplug test: the engine of brokenplug is not installed")
"""

PLUGIN_CHECK = """\
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="LOG %(name)s %(message)s")
import core_inference as ci

names = ci.list_backends()
broken = ci.broken_backends()
model = ci.load_model(sys.argv[1], backend="tinyplug", parallel_slots=1)
tokens = [t.text for t in model.generate("Hello world", max_tokens=3)]
model.close()
print(json.dumps({"names": names, "broken": broken, "tokens": tokens,
                  "backend_type": type(ci.get("tinyplug")).__name__}))
"""


def _pip_install(src: Path, target: Path) -> None:
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
            "--target", str(target)]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    first = subprocess.run([*base, str(src)], capture_output=True, text=True, env=env, timeout=120)
    if first.returncode == 0:
        return
    # no network for build isolation: build with the setuptools already installed here
    second = subprocess.run(
        [*base, "--no-build-isolation", str(src)], capture_output=True, text=True, env=env, timeout=120
    )
    assert second.returncode == 0, f"pip failed:\n{first.stderr}\n---\n{second.stderr}"


def test_entry_point_plugins_working_and_broken(tmp_path: Path, model_file: Path) -> None:
    src = tmp_path / "plugin_src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "ci_tinyplug_backend.py").write_text(TINY_MODULE)
    (src / "ci_brokenplug_backend.py").write_text(BROKEN_MODULE)
    target = tmp_path / "site"
    _pip_install(src, target)
    assert any(p.name.endswith(".dist-info") for p in target.iterdir())

    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(target), env.get("PYTHONPATH", "")] if p)
    out = subprocess.run(
        [sys.executable, "-c", PLUGIN_CHECK, str(model_file)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "tinyplug" in result["names"]
    assert "brokenplug" not in result["names"]
    assert result["backend_type"] == "TinyBackend"
    assert len(result["tokens"]) == 3
    assert "brokenplug" in result["broken"]
    assert "ImportError" in result["broken"]["brokenplug"]
    assert "engine of brokenplug is not installed" in result["broken"]["brokenplug"]
    # logged, once, on the library's logger
    logged = [line for line in out.stderr.splitlines() if line.startswith("LOG core_inference")]
    assert len(logged) == 1 and "brokenplug" in logged[0], out.stderr


# -- backends that fail their own checks; plugins that take a built-in's name -----------


class RaisingBackend(FakeBackend):
    """A plugin backend whose own availability or format check raises."""

    def __init__(self, name: str, method: str) -> None:
        super().__init__(name)
        self.method = method

    def why_unavailable(self) -> str | None:
        if self.method == "why_unavailable":
            raise RuntimeError(f"{self.name}: probing the GPU driver crashed")
        return None

    def can_load(self, path: str | os.PathLike[str]) -> bool:
        if self.method == "can_load":
            raise RuntimeError(f"{self.name}: sniffing the file crashed")
        return True


@pytest.mark.parametrize("method", ["why_unavailable", "can_load"])
def test_a_backend_whose_check_raises_is_reported_and_skipped(model_file: Path, method: str) -> None:
    ci.register(RaisingBackend("metal", method))
    ci.register(Recorder("llama_cpp"))
    model = load_and_close(model_file)  # the failing "metal" no longer sinks every load
    assert isinstance(model, FakeModel)
    assert ci.get("llama_cpp").loaded == [str(model_file)]  # type: ignore[attr-defined]
    reason = ci.broken_backends()["metal"]
    assert f"{method}() raised RuntimeError" in reason and "crashed" in reason
    assert ci.default_backend(model_file).name == "llama_cpp"
    ci.unregister("llama_cpp")
    with pytest.raises(NoBackendAvailable) as info:
        ci.load_model(model_file)
    assert f"{method}() raised RuntimeError" in info.value.reasons["metal"]


def test_a_backend_whose_check_raises_shows_as_broken_in_the_status() -> None:
    ci.register(RaisingBackend("metal", "why_unavailable"))
    ci.register(FakeBackend("off", available=False))
    ci.register(FakeBackend("on"))
    rows = {name: (status, detail) for name, status, detail in registry.backend_status()}
    assert rows["metal"][0] == "broken" and "probing the GPU driver crashed" in rows["metal"][1]
    assert rows["off"] == ("unavailable", "the fake backend was made unavailable")
    assert rows["on"] == ("available", "")
    assert ci.default_backend().name == "on"


def test_an_explicit_backend_whose_check_raises_is_unavailable(model_file: Path) -> None:
    ci.register(RaisingBackend("shaky", "why_unavailable"))
    with pytest.raises(BackendUnavailable, match="why_unavailable\\(\\) raised RuntimeError") as info:
        ci.load_model(model_file, backend="shaky")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "shaky" in ci.broken_backends()


def test_env_naming_an_unknown_backend_says_it_is_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    ci.register(FakeBackend("metal"))
    monkeypatch.setenv(ENV, "junk")
    with pytest.raises(BackendNotRegistered) as info:
        registry.env_backend()
    assert str(info.value).startswith(f"${ENV}=junk: backend 'junk' is not registered")
    assert info.value.known == ["metal"]
    monkeypatch.setenv(ENV, "metal")
    assert registry.env_backend() == "metal"


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]) -> None:
    """Make the registry's next scan see these (name, "module:attr") entry points."""
    from importlib import metadata

    eps = [metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in specs]

    def entry_points(**kw: Any) -> list[metadata.EntryPoint]:
        return eps if kw.get("group") == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_plugins", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)


def test_a_plugin_that_takes_a_builtins_name_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    builtin = registry.BUILTINS["llama_cpp"].spec
    registry._entries["llama_cpp"] = builtin  # the empty registry, with the built-in back
    module = "core_inference_shadow_plugin_test"
    _fake_entry_points(
        monkeypatch, ("llama_cpp", f"{module}:Backend"), ("extra", "core_inference.testing:FakeBackend")
    )
    with caplog.at_level("WARNING", logger=registry.LOGGER_NAME):
        names = ci.list_backends()
    assert names == ["extra", "llama_cpp"]
    assert registry.registered()["llama_cpp"] == builtin  # the built-in is kept, still not imported
    assert module not in sys.modules  # the shadowing plugin is not even imported
    reason = ci.broken_backends()["llama_cpp (plugin)"]
    assert f"entry point 'llama_cpp = {module}:Backend'" in reason
    assert "built-in backend" in reason and "kept" in reason
    assert "llama_cpp" not in ci.broken_backends()  # the built-in itself is fine
    assert any("llama_cpp (plugin)" in r.getMessage() for r in caplog.records)
    rows = [row for row in registry.backend_status() if row[0] == "llama_cpp (plugin)"]
    assert rows == [("llama_cpp (plugin)", "broken", reason)]
    registry.reload_plugins()  # a second scan neither reports "extra" as a clash nor loses it
    assert set(ci.broken_backends()) == {"llama_cpp (plugin)"} and "extra" in ci.list_backends()


def test_a_plugin_that_takes_a_registered_name_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = FakeBackend("mine")
    ci.register(mine)
    _fake_entry_points(monkeypatch, ("mine", "core_inference.testing:FakeBackend"))
    assert ci.get("mine") is mine
    assert "registered in this process" in ci.broken_backends()["mine (plugin)"]


def test_plugins_are_imported_when_the_registry_is_first_asked(tmp_path: Path) -> None:
    (tmp_path / "ci_lazyplug_backend.py").write_text(
        "from core_inference.testing import FakeBackend\n\n"
        "def make():\n    return FakeBackend('lazyplug')\n"
    )
    dist = tmp_path / "ci_lazyplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ci-lazyplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[core_inference.backends]\nlazyplug = ci_lazyplug_backend:make\n")
    code = textwrap.dedent(
        """
        import json, sys
        import core_inference
        before = "ci_lazyplug_backend" in sys.modules
        names = core_inference.list_backends()
        print(json.dumps({"before": before, "after": "ci_lazyplug_backend" in sys.modules, "names": names}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tmp_path), env.get("PYTHONPATH", "")] if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["before"] is False and state["after"] is True
    assert "lazyplug" in state["names"] and "llama_cpp" in state["names"]
