"""The benchmark harness: rows of sides timed interleaved, medians, ratios and targets.

A *suite* belongs to one engine. It yields *rows*; each row has *sides*: callables that
do one run of the same work, either through core-inference (``ours=True``) or by calling
the engine directly. The harness warms every side up, then times them interleaved in
ABBA order (A B C, C B A, A B C, ...) so that load drifting on a shared machine hits
every side alike, and reports medians and ratios against the row's reference side.

Standard library only: engines are imported inside the suites' functions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Echo = Callable[[str], None]


class BenchError(RuntimeError):
    """A side could not do the row's work as asked (e.g. the model stopped early)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how big: the same settings reach every suite."""

    model: str | None = None  # None: the embedded default model
    threads: int = 0  # 0: every core this process may use
    runs: int = 5  # timed runs per side, after the warm-up
    warmup: int = 1  # untimed runs per side first
    quick: bool = False  # tiny sizes: proves the harness runs, measures nothing
    decode_tokens: int = 128
    ttft_prompt_tokens: int = 512
    prefill_chunks: tuple[int, ...] = (512, 128)  # the first is the backend's default
    batch_prompts: int = 16
    batch_tokens: int = 64
    classify_sentences: int = 256
    fake_tokens: int = 200_000
    load_runs: int = 5

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> BenchConfig:
        """Full sizes, or with ``quick`` the smallest that still exercise every row."""
        base: dict[str, Any] = {}
        if quick:
            base = {
                "runs": 1, "warmup": 0, "quick": True, "decode_tokens": 8, "ttft_prompt_tokens": 32,
                "prefill_chunks": (16, 32), "batch_prompts": 3, "batch_tokens": 4,
                "classify_sentences": 6, "fake_tokens": 2_000, "load_runs": 1,
            }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass(frozen=True)
class Side:
    """One way of doing a row's work; ``run`` does it once and returns the row's metric."""

    name: str
    run: Callable[[], float]
    ours: bool


@dataclass(frozen=True)
class Target:
    """A goal: ``side``'s ratio to ``against`` (or its own median when None) ``op`` ``bound``."""

    side: str
    op: str  # ">=" or "<="
    bound: float
    against: str | None = None

    def describe(self, unit: str) -> str:
        if self.against is None:
            return f"{self.side} {self.op} {self.bound:g} {unit}"
        return f"{self.side} {self.op} {self.bound:g}x {self.against}"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


@dataclass(frozen=True)
class Row:
    """One comparison: the same work done by each side, with ratios against ``reference``."""

    key: str
    title: str
    unit: str
    sides: Sequence[Side]
    reference: str
    higher_is_better: bool = True
    targets: Sequence[Target] = ()
    note: str = ""
    runs: int | None = None  # overrides BenchConfig.runs (e.g. for slow rows)
    warmup: int | None = None  # overrides BenchConfig.warmup (a row whose every run starts cold)
    info: dict[str, Any] = field(default_factory=dict)  # facts worth keeping: prompt sizes, settings
    skipped: str | None = None  # why the row was not run here (e.g. no GPU); its sides never run


@dataclass(frozen=True)
class Suite:
    """An engine's rows. ``rows`` is a generator: it may load before a row and free after it."""

    name: str
    engine: str  # what the engine-direct sides call, e.g. "llama-cpp-python"
    rows: Callable[[BenchConfig], Iterator[Row]]
    why_unavailable: Callable[[], str | None] = lambda: None
    versions: Callable[[], dict[str, str]] = dict


def timed(work: Callable[[], int], scale: float = 1.0) -> Callable[[], float]:
    """A side's ``run`` from work that returns its unit count: ``units / seconds * scale``."""

    def run() -> float:
        start = time.perf_counter()
        units = work()
        return units / (time.perf_counter() - start) * scale

    return run


def seconds(work: Callable[[], object]) -> Callable[[], float]:
    """A side's ``run`` from work whose result is its duration in seconds."""

    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


def hf_folder(cfg: BenchConfig, suite: str) -> str:
    """The Hugging Face folder a suite for HF engines measures: ``--model`` when it is one,
    else that GGUF (default: the embedded model) converted by ``core_inference.convert``,
    kept in the cache, so every engine is measured on the same weights in one ``make bench``."""
    from ..formats import GGUF, HF, sniff_format

    if cfg.model:
        path = cfg.model
    else:
        from ..default_model import default_model_path

        path = str(default_model_path(progress=False))
    kind = sniff_format(path)
    if kind == HF:
        return path
    if kind == GGUF:
        from ..convert import convert_gguf

        return str(convert_gguf(path, progress=False))
    raise BenchError(f"the {suite} suite needs a Hugging Face folder or a GGUF file, got {path!r}")


def interleaved_order(n_sides: int, round_index: int) -> list[int]:
    """Side indices for one round: forward on even rounds, reversed on odd (ABBA)."""
    order = list(range(n_sides))
    return order if round_index % 2 == 0 else order[::-1]


def measure_row(row: Row, cfg: BenchConfig, echo: Echo | None = None) -> dict[str, Any]:
    """Warm up, time every side interleaved, and summarise the row as a JSON-ready dict."""
    if row.skipped is not None:  # not an error: the row cannot run on this machine, and says why
        result = summarise(row, {s.name: [] for s in row.sides})
        if echo is not None:
            echo(_one_line(result))
        return result
    runs = max(1, row.runs if row.runs is not None else cfg.runs)
    values: dict[str, list[float]] = {s.name: [] for s in row.sides}
    names = [s.name for s in row.sides]
    if len(set(names)) != len(names) or row.reference not in values:
        raise ValueError(f"row {row.key}: side names must be unique and include {row.reference!r}")
    started = time.perf_counter()
    error = None
    try:
        for _ in range(cfg.warmup if row.warmup is None else row.warmup):
            for side in row.sides:
                side.run()
        for r in range(runs):
            for i in interleaved_order(len(row.sides), r):
                side = row.sides[i]
                values[side.name].append(float(side.run()))
    except Exception as exc:  # a failing row is reported, and the other rows still run
        error = f"{type(exc).__name__}: {exc}"
    result = summarise(row, values, error)
    result["runs"] = runs  # a row may override the config's count (slow rows run fewer)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if echo is not None:
        echo(_one_line(result))
    return result


def summarise(row: Row, values: dict[str, list[float]], error: str | None = None) -> dict[str, Any]:
    """Medians, spreads and ratios (plain and paired per round) of measured values."""
    sides = []
    complete = error is None and all(values[s.name] for s in row.sides)
    ref = values.get(row.reference, [])
    for s in row.sides:
        got = values[s.name]
        entry: dict[str, Any] = {"name": s.name, "ours": s.ours, "values": got}
        if got:
            entry.update(median=statistics.median(got), min=min(got), max=max(got))
        if complete and ref:
            entry["ratio"] = _ratio(statistics.median(got), statistics.median(ref))
            # the same round's runs ran back to back, under the same load: their ratio is steadier
            entry["paired_ratio"] = statistics.median(_ratio(a, b) for a, b in zip(got, ref, strict=False))
        sides.append(entry)
    by_name = {e["name"]: e for e in sides}
    targets = []
    for t in row.targets:
        value = None
        if complete and t.side in by_name:
            value = by_name[t.side]["median"] if t.against is None else _target_ratio(t, values)
        targets.append(
            {"text": t.describe(row.unit), "side": t.side, "against": t.against, "op": t.op,
             "bound": t.bound, "value": value, "met": None if value is None else t.met(value)}
        )
    return {
        "key": row.key, "title": row.title, "unit": row.unit, "higher_is_better": row.higher_is_better,
        "reference": row.reference, "sides": sides, "targets": targets, "note": row.note,
        "info": dict(row.info), "error": error, "skipped": row.skipped,
    }


def _target_ratio(t: Target, values: dict[str, list[float]]) -> float | None:
    if t.against not in values:
        return None
    pairs = zip(values[t.side], values[t.against], strict=False)
    return statistics.median(_ratio(a, b) for a, b in pairs)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _one_line(result: dict[str, Any]) -> str:
    if result["error"]:
        return f"  {result['key']}: FAILED: {result['error']}"
    if result.get("skipped"):
        return f"  {result['key']}: skipped: {result['skipped']}"
    parts = [f"{s['name']} {fmt(s['median'])}" for s in result["sides"] if "median" in s]
    marks = [f"[{'met' if t['met'] else 'MISSED'}: {t['text']} ({fmt(t['value'])})]"
             for t in result["targets"] if t["met"] is not None]
    line = f"  {result['key']} ({result['unit']}): " + ", ".join(parts)
    return line + (" " + " ".join(marks) if marks else "")


def fmt(value: float | None) -> str:
    """A number with about four significant digits."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


# -- the suite registry ------------------------------------------------------------------

ENTRY_POINT_GROUP = "core_inference.bench_suites"
BUILTIN_SUITES: dict[str, str] = {
    "core": "core_inference.bench.core_suite:SUITE",
    "llama_cpp": "core_inference.bench.llama_cpp_suite:SUITE",
    "llama_cpp_batching": "core_inference.bench.llama_cpp_batching:SUITE",
    "torch": "core_inference.bench.torch_suite:SUITE",
    "mlx": "core_inference.bench.mlx_suite:SUITE",
    "server": "core_inference.bench.server_suite:SUITE",
    "llama_server": "core_inference.bench.llama_server_suite:SUITE",
    "distributed": "core_inference.bench.distributed_suite:SUITE",
    "convert": "core_inference.bench.convert_suite:SUITE",
    "vllm": "core_inference.bench.vllm_suite:SUITE",  # runs in .venv-vllm; elsewhere listed as unavailable
}
_suites: dict[str, Suite | str] = dict(BUILTIN_SUITES)


def register_suite(suite: Suite | str, name: str | None = None) -> None:
    """Add a suite (or a lazy ``"module:attr"`` with ``name``); the same name replaces the old one."""
    if isinstance(suite, str):
        if not name:
            raise ValueError("register_suite('module:attr') needs name=")
        _suites[name] = suite
    else:
        _suites[name or suite.name] = suite


def suite_names() -> list[str]:
    """Registered suites in registration order (built-ins first), entry-point plugins included."""
    _load_entry_points()
    return list(_suites)


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``, imported on first use."""
    _load_entry_points()
    entry = _suites.get(name)
    if entry is None:
        raise KeyError(f"no benchmark suite {name!r}; known: {', '.join(_suites)}")
    if isinstance(entry, str):
        from ..registry import import_object

        entry = import_object(entry)
        if not isinstance(entry, Suite):
            raise TypeError(f"benchmark suite {name!r} is not a Suite: {entry!r}")
        _suites[name] = entry
    return entry


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _suites.setdefault(ep.name, ep.value)
