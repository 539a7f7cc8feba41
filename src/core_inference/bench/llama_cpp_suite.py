"""Rows for the ``llama_cpp`` backend against llama-cpp-python called directly.

Both sides run the same GGUF file with the same context settings (context length,
batch sizes, flash attention, SWA cache, threads), in the same process, interleaved.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target, seconds, timed

DECODE_PROMPT = "Once upon a time"  # greedy, the default model writes far past 128 tokens from here
BATCH_PROMPTS = (
    "Once upon a time", "The history of the Roman Empire", "A recipe for bread:",
    "The best way to learn a language is", "In the year 2050, cities will", "Dear diary, today I",
    "The rules of chess are", "Photosynthesis is the process", "My favourite holiday was",
    "How to fix a bicycle tyre:", "The ocean is home to", "Ten tips for better sleep:",
    "The first computers were", "Once there was a small village", "A letter to my future self:",
    "The science of volcanoes",
)
PARAGRAPH = (
    "The river wound slowly through the valley, past farms and orchards and the old stone mill "
    "where the miller's children played each summer. Travellers stopped at the inn by the bridge "
    "to rest their horses, trade news from the capital, and argue about the price of grain. "
)
SUBJECTS = ("The old farmer", "A young student", "My neighbour", "The tired nurse", "Our teacher",
            "The lost tourist", "A quiet engineer", "The baker")
VERBS = ("found", "painted", "repaired", "sold", "described", "carried", "ignored", "admired")
NOUNS = ("bicycle", "garden", "letter", "window", "violin", "lantern", "boat", "map")
PLACES = ("station", "market", "library", "harbour")
MOODS = ("broken", "beautiful", "strange", "expensive")


def _why_unavailable() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'core-inference[llama-cpp]')"
    return None


def _versions() -> dict[str, str]:
    import llama_cpp
    from llama_cpp import llama_cpp as L

    info = L.llama_print_system_info()
    return {
        "llama-cpp-python": str(llama_cpp.__version__),
        "llama.cpp system": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info),
    }


# -- the engine called directly ----------------------------------------------------------


def _engine(path: str, n_ctx: int, threads: int) -> Any:
    """llama-cpp-python's ``Llama`` with our backend's context settings (see backends/llama_cpp/engine.py)."""
    from llama_cpp import Llama

    return Llama(
        path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=-1, flash_attn=True, swa_full=False, verbose=False,
    )


ENGINE_SETTINGS = (
    "Llama(n_ctx=<ours>, n_batch=512, n_ubatch=512, n_threads=n_threads_batch=<threads>, "
    "flash_attn=True, swa_full=False): the settings our backend gives llama.cpp "
    "(its flash_attn 'auto' resolves to enabled on CPU)"
)




# -- rows ------------------------------------------------------------------------------


OURS_DECODE = "ours: generate"
COMPLETION = "Llama.create_completion(stream=True)"
EVAL_LOOP = "Llama.eval([token]) loop, no sampling"


def _decode_work(model: Any, llm: Any, cfg: BenchConfig) -> dict[str, tuple[Callable[[], int], bool]]:
    """Each way of streaming ``decode_tokens`` greedy tokens: name -> (work, ours)."""
    from llama_cpp import llama_cpp as L

    n, prompt = cfg.decode_tokens, DECODE_PROMPT
    eos = llm.token_eos()

    def ours() -> int:
        got = sum(1 for _ in model.generate(prompt, max_tokens=n))
        if got != n:
            raise BenchError(f"generate stopped after {got} of {n} tokens; pick another prompt")
        return n

    def completion() -> int:
        llm.reset()  # no prompt-cache reuse: every side prefills the prompt
        finish = None
        for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
            finish = chunk["choices"][0]["finish_reason"] or finish
        if finish != "length":
            raise BenchError(f"create_completion finished ({finish}) before {n} tokens; pick another prompt")
        return n

    def low_level() -> int:
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        for got, token in enumerate(llm.generate(tokens, temp=0.0), 1):
            if token == eos:
                raise BenchError(f"Llama.generate reached end of text after {got - 1} tokens")
            if got == n:
                break
        return n

    def eval_only() -> int:
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.eval(tokens)
        fixed = [tokens[-1]]  # no sampling: the same token fed back every step
        for _ in range(n - 1):
            llm.eval(fixed)
        return n

    def c_decode() -> int:
        llm.reset()
        L.llama_memory_clear(L.llama_get_memory(llm.ctx), True)
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        arr = (L.llama_token * len(tokens))(*tokens)
        _check(L.llama_decode(llm.ctx, L.llama_batch_get_one(arr, len(tokens))))
        one = (L.llama_token * 1)(tokens[-1])
        batch = L.llama_batch_get_one(one, 1)
        for _ in range(n - 1):
            _check(L.llama_decode(llm.ctx, batch))
        return n

    return {
        OURS_DECODE: (ours, True),
        COMPLETION: (completion, False),
        "Llama.generate loop": (low_level, False),
        EVAL_LOOP: (eval_only, False),
        "llama_decode loop (C API), no sampling": (c_decode, False),
    }


def _decode_row(model: Any, llm: Any, cfg: BenchConfig) -> Row:
    n = cfg.decode_tokens
    work = _decode_work(model, llm, cfg)
    return Row(
        key="decode",
        title=f"Streaming decode, {n} greedy tokens",
        unit="tokens/s",
        sides=[Side(name, timed(fn), ours) for name, (fn, ours) in work.items()],
        reference=EVAL_LOOP,
        targets=[Target(OURS_DECODE, ">=", 0.97, EVAL_LOOP), Target(OURS_DECODE, ">=", 1.0, COMPLETION)],
        note=f"prompt {DECODE_PROMPT!r}; tokens/s = {n} / wall time of the call (prompt prefill "
        "included); every side prefills the prompt afresh",
        info={"prompt_tokens": len(llm.tokenize(DECODE_PROMPT.encode(), add_bos=True, special=True))},
    )


class _DecodeClock:
    """Times every ``llama_decode`` call, whoever makes it (our backend and llama-cpp-python
    both call it through the ``llama_cpp.llama_cpp`` module), while installed."""

    def __init__(self) -> None:
        from llama_cpp import llama_cpp as L

        self.L, self.real, self.seconds = L, L.llama_decode, 0.0

    def _timed(self, ctx: Any, batch: Any) -> int:
        start = time.perf_counter()
        try:
            return int(self.real(ctx, batch))
        finally:
            self.seconds += time.perf_counter() - start

    def install(self) -> None:
        self.L.llama_decode = self._timed

    def remove(self) -> None:
        self.L.llama_decode = self.real

    def outside(self, work: Callable[[], int]) -> Callable[[], float]:
        """A side returning microseconds per token spent outside ``llama_decode``."""

        def run() -> float:
            self.seconds = 0.0
            start = time.perf_counter()
            units = work()
            return (time.perf_counter() - start - self.seconds) / units * 1e6

        return run


def _overhead_row(model: Any, llm: Any, cfg: BenchConfig, stack: ExitStack) -> Row:
    clock = _DecodeClock()
    clock.install()
    stack.callback(clock.remove)
    work = _decode_work(model, llm, cfg)
    return Row(
        key="decode_overhead",
        title=f"Time outside llama_decode while streaming {cfg.decode_tokens} tokens",
        unit="us/token",
        sides=[Side(name, clock.outside(fn), ours) for name, (fn, ours) in work.items()],
        reference=EVAL_LOOP,
        higher_is_better=False,
        note="the same work as the decode row, minus the time inside llama.cpp's llama_decode: what "
        "each wrapper adds per token (tokenizing, batches, sampling, text, Token objects). Steadier "
        "than tokens/s on a busy machine; ours includes the greedy pick over the logits",
    )


def _check(rc: int) -> None:
    if rc != 0:
        raise BenchError(f"llama_decode returned {rc}")


def first_token_ms(model: Any, prompt: str, ctx: Any = None) -> float:
    """Milliseconds from ``generate(prompt)`` to its first token (the stream is closed then)."""
    start = time.perf_counter()
    stream = model.generate(prompt, max_tokens=1, ctx=ctx)
    next(stream)
    elapsed = time.perf_counter() - start
    stream.close()
    return elapsed * 1e3


def _prompt_of(llm: Any, n_tokens: int) -> tuple[str, list[int]]:
    """Text of exactly ``n_tokens`` tokens (BOS included) where the tokenizer allows, else just under."""
    words = (PARAGRAPH * (n_tokens // 20 + 2)).split()

    def count(k: int) -> int:
        return len(llm.tokenize(" ".join(words[:k]).encode(), add_bos=True, special=True))

    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose tokens fit
        mid = (lo + hi + 1) // 2
        if count(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, llm.tokenize(text.encode(), add_bos=True, special=True)


def _ttft_row(model: Any, llm: Any, cfg: BenchConfig, stack: ExitStack, path: str) -> Row:
    from .. import Context, load_model
    from ..backends.llama_cpp.model import PREFILL_CHUNK

    text, tokens = _prompt_of(llm, cfg.ttft_prompt_tokens)

    def first_token(m: Any, cancellable: bool = False) -> Callable[[], float]:
        def run() -> float:
            return first_token_ms(m, text, Context.background().with_timeout(3600) if cancellable else None)

        return run

    def engine_eval() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        return (time.perf_counter() - start) * 1e3

    sides = []
    default_name = ""
    for chunk in cfg.prefill_chunks:
        m = model
        if chunk != getattr(model, "prefill_chunk", PREFILL_CHUNK):
            m = stack.enter_context(
                load_model(path, backend="llama_cpp", threads=cfg.threads,
                           engine_options={"prefill_chunk": chunk, "prefix_cache": False})
            )
        name = f"ours: generate, prefill_chunk={chunk}" + (" (default)" if m is model else "")
        default_name = default_name or name
        sides.append(Side(name, first_token(m), True))
        if m is model:
            watched = f"ours: generate, prefill_chunk={chunk}, with a deadline (prefill watched)"
            sides.append(Side(watched, first_token(m, cancellable=True), True))
    # no prefix cache there either: every timed call prefills the whole prompt
    invariant = _invariant_worker(model, stack, prefix_cache=False)
    sides.append(Side(INVARIANT_GENERATE, lambda: invariant.timed("first_token", [text])[1] * 1e3, True))
    eval_name = "Llama.eval(prompt tokens)"
    sides.append(Side(eval_name, engine_eval, False))
    return Row(
        key="ttft",
        title=f"Time to first token, {len(tokens)}-token prompt",
        unit="ms",
        sides=sides,
        reference=eval_name,
        higher_is_better=False,
        targets=[Target(default_name, "<=", 1.02, eval_name)],
        note="ours: generate() call to first Token (tokenize, chunked prefill, first sample); with "
        "a deadline, a watcher thread stands ready to abort the running decode; engine: Llama.eval "
        "of the same, already tokenized, tokens (no sampling)",
        info={"prompt_tokens": len(tokens), "prefill_chunks": list(cfg.prefill_chunks)},
    )


def _batch_row(model: Any, llm: Any, cfg: BenchConfig, stack: ExitStack) -> Row:
    prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
               for i in range(cfg.batch_prompts)]
    n = cfg.batch_tokens
    seen: dict[str, Any] = {"prompts": len(prompts), "max_tokens": n}

    def ours_batch() -> int:
        results = model.batch_generate(prompts, max_tokens=n)
        errors = [r.err for r in results if r.err is not None]
        if errors:
            raise BenchError(f"batch_generate: {errors[0]}")
        counts = [len(r.tokens) for r in results]
        seen["batch_generate_tokens"] = counts
        return sum(counts)

    def ours_sequential() -> int:
        counts = [sum(1 for _ in model.generate(p, max_tokens=n)) for p in prompts]
        seen["generate_tokens"] = counts
        return sum(counts)

    exact = _exact_model(model, stack)

    def ours_exact() -> int:
        return sum(len(r.tokens) for r in exact.batch_generate(prompts, max_tokens=n))

    invariant = _invariant_worker(model, stack)

    engine = _BatchDecoder(llm, cfg.threads, prompts, n)
    stack.callback(engine.free)
    seq_name = f"ours: {len(prompts)} x generate, one after another"
    return Row(
        key="batch_generate",
        title=f"batch_generate, {len(prompts)} prompts x {n} tokens",
        unit="tokens/s",
        sides=[
            Side("ours: batch_generate", timed(ours_batch), True),
            Side(seq_name, timed(ours_sequential), True),
            Side(EXACT_BATCH, timed(ours_exact), True),
            Side(INVARIANT_BATCH, lambda: invariant.run("batch_generate", prompts, n), True),
            Side("llama_decode batched loop (C API), no sampling", timed(engine.run), False),
        ],
        reference=seq_name,
        targets=[Target("ours: batch_generate", ">=", 2.5, seq_name)],
        note="aggregate generated tokens/s; the engine row packs the same prompts as sequences of one "
        "batch and feeds back a fixed token per sequence (the ceiling: no sampling, no text); "
        "shared_decode=False runs each prompt as a generate of it alone, batch_invariant packs them on "
        "kernels whose rows do not depend on their neighbours (in a process of its own, timed there): "
        "both give answers independent of the batch, docs/reliability.md",
        info=seen,
    )


EXACT_BATCH = "ours: batch_generate, shared_decode=False (each prompt as alone)"
EXACT_CLASSIFY = "ours: classify, shared_decode=False (each sentence as alone)"
INVARIANT_BATCH = "ours: batch_generate, batch_invariant=True (packed, invariant kernels)"
INVARIANT_CLASSIFY = "ours: classify, batch_invariant=True (packed, invariant kernels)"
INVARIANT_GENERATE = "ours: generate, batch_invariant=True (invariant kernels)"


def _invariant_worker(model: Any, stack: ExitStack, **options: Any) -> Any:
    """The same model with ``batch_invariant=True`` (and ``options``), in a worker process,
    stopped with the row."""
    from .invariant_worker import InvariantWorker

    worker = InvariantWorker(model.path, model.threads, **options)
    stack.callback(worker.close)
    return worker


def _exact_model(model: Any, stack: ExitStack) -> Any:
    """The same model with nothing shared, freed with the row: what exact answers cost."""
    from .. import load_model

    return stack.enter_context(load_model(model.path, backend="llama_cpp", threads=model.threads,
                                          engine_options={"prefix_cache": False, "shared_decode": False}))


class _BatchDecoder:
    """The bare engine's batched decoding: packed prefill, then one batch of n_seq tokens per step."""

    def __init__(self, llm: Any, threads: int, prompts: list[str], n_tokens: int) -> None:
        from llama_cpp import llama_cpp as L

        self.L, self.llm, self.prompts, self.n_tokens = L, llm, prompts, n_tokens
        longest = max(len(llm.tokenize(p.encode(), add_bos=True, special=True)) for p in prompts)
        per_seq = (longest + n_tokens + 1 + 63) // 64 * 64  # as our backend sizes its batch context
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max = per_seq * len(prompts), len(prompts)
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.swa_full, params.kv_unified = False, False
        self.ctx = L.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise BenchError("llama.cpp could not create the batch context")
        self.batch = L.llama_batch_init(512, 0, 1)

    def _add(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    def _decode(self, n: int) -> None:
        self.batch.n_tokens = n
        _check(self.L.llama_decode(self.ctx, self.batch))

    def run(self) -> int:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        encoded = [self.llm.tokenize(p.encode(), add_bos=True, special=True) for p in self.prompts]
        flat = [(seq, pos, t, pos == len(toks) - 1) for seq, toks in enumerate(encoded)
                for pos, t in enumerate(toks)]
        for start in range(0, len(flat), 512):
            part = flat[start : start + 512]
            for i, (seq, pos, t, last) in enumerate(part):
                self._add(i, t, pos, seq, last)
            self._decode(len(part))
        positions = [len(toks) for toks in encoded]
        for _ in range(self.n_tokens - 1):
            for seq, toks in enumerate(encoded):
                self._add(seq, toks[-1], positions[seq], seq, True)
                positions[seq] += 1
            self._decode(len(encoded))
        return len(encoded) * self.n_tokens

    def free(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None


def _sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b, c = SUBJECTS[i % 8], VERBS[(i // 8) % 8], NOUNS[(i // 64) % 8]
        out.append(f"{a} {b} the {MOODS[i % 4]} {c} near the {PLACES[(i // 4) % 4]} yesterday in the rain.")
    return out


def _classify_row(model: Any, llm: Any, cfg: BenchConfig, stack: ExitStack) -> Row:
    sentences = _sentences(cfg.classify_sentences)
    lengths = [len(llm.tokenize(s.encode(), add_bos=True, special=True)) for s in sentences]
    exact = _exact_model(model, stack)

    def exact_packed() -> int:
        return len(exact.classify(sentences))

    invariant = _invariant_worker(model, stack)

    def packed() -> int:
        return len(model.classify(sentences))

    def one_at_a_time() -> int:
        return sum(len(model.classify([s])) for s in sentences)

    def engine_each() -> int:
        for s in sentences:
            llm.reset()
            llm.eval(llm.tokenize(s.encode(), add_bos=True, special=True))
        return len(sentences)

    eval_name = "Llama.eval per sentence, after reset"
    return Row(
        key="classify",
        title=f"classify, {len(sentences)} sentences of ~{sum(lengths) / len(lengths):.0f} tokens",
        unit="sentences/s",
        sides=[
            Side("ours: classify (packed)", timed(packed), True),
            Side("ours: classify, one sentence per call", timed(one_at_a_time), True),
            Side(EXACT_CLASSIFY, timed(exact_packed), True),
            Side(INVARIANT_CLASSIFY, lambda: invariant.run("classify", sentences), True),
            Side(eval_name, timed(engine_each), False),
        ],
        reference=eval_name,
        targets=[Target("ours: classify (packed)", ">=", 1.3, eval_name)],
        note="ours samples the last position of every sentence (greedy); the engine row only prefills",
        info={"sentences": len(sentences), "mean_tokens": sum(lengths) / len(lengths),
              "min_tokens": min(lengths), "max_tokens": max(lengths)},
    )


def _load_row(path: str, n_ctx: int, cfg: BenchConfig) -> Row:
    from .. import load_model

    def ours() -> None:
        load_model(path, backend="llama_cpp", threads=cfg.threads).close()

    def engine() -> None:
        _engine(path, n_ctx, cfg.threads).close()

    return Row(
        key="load",
        title="Warm load + close of the model",
        unit="s",
        sides=[Side("ours: load_model + close", seconds(ours), True),
               Side("Llama(...) + close", seconds(engine), False)],
        reference="Llama(...) + close",
        higher_is_better=False,
        targets=[Target("ours: load_model + close", "<=", 1.0)],
        note="file already assembled and in the page cache; ours also validates the GGUF header first",
        runs=cfg.load_runs,
        info={"model_bytes": os.path.getsize(path)},
    )


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    from .. import load_model
    from ..default_model import default_model_path

    path = cfg.model or str(default_model_path(progress=False))
    with ExitStack() as stack:
        # no prefix cache: every timed call prefills its whole prompt, as Llama.eval after reset does
        model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                               engine_options={"prefix_cache": False}))
        n_ctx = int(model.context_len)
        llm = _engine(path, n_ctx, cfg.threads)
        stack.callback(llm.close)
        facts = {"model": os.path.basename(path), "n_ctx": n_ctx, "threads": cfg.threads,
                 "engine_settings": ENGINE_SETTINGS}
        makers: list[Callable[[ExitStack], Row]] = [
            lambda s: _decode_row(model, llm, cfg),
            lambda s: _overhead_row(model, llm, cfg, s),
            lambda s: _ttft_row(model, llm, cfg, s, path),
            lambda s: _batch_row(model, llm, cfg, s),
            lambda s: _classify_row(model, llm, cfg, s),
        ]
        for make in makers:
            with ExitStack() as row_stack:  # what a row loads is freed before the next row
                row = make(row_stack)
                row.info.update(facts)
                yield row
    yield _load_row(path, n_ctx, cfg)  # alone, with the other models freed


SUITE = Suite(
    name="llama_cpp",
    engine="llama-cpp-python (Llama and the llama.cpp C API)",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)
