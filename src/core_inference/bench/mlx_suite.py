"""Rows for the ``metal`` backend against mlx-lm called directly, on the same loaded model.

Both sides use one model and tokenizer in memory (ours, loaded by mlx-lm), the same MLX
stream and device (the Metal GPU where there is one, else MLX's CPU device) and the same
prefill step and batch sizes, in the same process, interleaved. The model is a Hugging
Face folder (``--model DIR``); a GGUF file, or no model (the default one), is measured
converted (``core_inference.convert``, kept in the cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target, hf_folder, timed
from .llama_cpp_suite import BATCH_PROMPTS, DECODE_PROMPT, _sentences


def _why_unavailable() -> str | None:
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
        return "mlx-lm is not installed (pip install 'core-inference[mlx]')"
    return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("mlx", "mlx-lm", "mlx-metal"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _device() -> str:
    from ..backends.mlx import metal_problem

    return "gpu" if metal_problem() is None else "cpu"


def _on_engine(model: Any, work: Callable[[], int]) -> Callable[[], int]:
    """``work`` run on the model's MLX engine thread (all MLX work of the process runs there)."""
    return lambda: int(model._on_engine(work))


# -- rows ------------------------------------------------------------------------------------

OURS_DECODE = "ours: generate"
STREAM = "mlx_lm.stream_generate"


def _decode_row(model: Any, cfg: BenchConfig) -> Row:
    gen: Any = importlib.import_module("mlx_lm.generate")
    mx: Any = importlib.import_module("mlx.core")
    n, prompt = cfg.decode_tokens, DECODE_PROMPT
    engine, tokenizer, stream = model._model, model._tokenizer, model._stream
    tokens = model.tokenize(prompt)

    def ours() -> int:
        got = sum(1 for _ in model.generate(prompt, max_tokens=n))
        if got != n:
            raise BenchError(f"generate stopped after {got} of {n} tokens; pick another prompt")
        return n

    def stream_generate() -> int:
        last = None
        for response in gen.stream_generate(engine, tokenizer, prompt, max_tokens=n, stream=stream,
                                            prefill_step_size=model.prefill_step_size):
            last = response
        if last is None or last.finish_reason != "length" or last.generation_tokens != n:
            why = last.finish_reason if last is not None else "no tokens"
            raise BenchError(f"stream_generate stopped early ({why}); pick another prompt")
        return n

    def steps() -> int:
        steps = gen.generate_step(mx.array(tokens), engine, stream, max_tokens=n,
                                  prefill_step_size=model.prefill_step_size)
        return sum(1 for _ in steps)

    # the engine's sides run on the model's engine thread and stream, where its arrays live
    stream_generate, steps = _on_engine(model, stream_generate), _on_engine(model, steps)

    step_name = "mlx_lm.generate_step loop (ids only, no EOS check, no text)"
    return Row(
        key="decode",
        title=f"Streaming decode, {n} greedy tokens",
        unit="tokens/s",
        sides=[Side(OURS_DECODE, timed(ours), True), Side(STREAM, timed(stream_generate), False),
               Side(step_name, timed(steps), False)],
        reference=STREAM,
        targets=[Target(OURS_DECODE, ">=", 0.97, STREAM)],
        note=f"prompt {prompt!r}; tokens/s = {n} / wall time of the call (prefill included); the same "
        "model object, stream and prefill step on every side",
        info={"prompt_tokens": len(tokens)},
    )


def _batch_row(model: Any, cfg: BenchConfig) -> Row:
    from ..backends.mlx.model import BATCH_SEQS, PREFILL_SEQS

    gen: Any = importlib.import_module("mlx_lm.generate")
    prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
               for i in range(cfg.batch_prompts)]
    n = cfg.batch_tokens
    encoded = [model.tokenize(p) for p in prompts]
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
        return sum(sum(1 for _ in model.generate(p, max_tokens=n)) for p in prompts)

    def engine_batch() -> int:
        out = gen.batch_generate(
            model._model, model._tokenizer, encoded, max_tokens=n, return_token_ids=True,
            stream=model._stream, completion_batch_size=BATCH_SEQS,
            prefill_batch_size=min(PREFILL_SEQS, len(encoded)), prefill_step_size=model.prefill_step_size,
        )
        counts = [len(ids) for ids in out.token_ids]
        seen["mlx_lm_batch_generate_tokens"] = counts
        return sum(counts)

    engine_batch = _on_engine(model, engine_batch)
    ours_name, engine_name = "ours: batch_generate", "mlx_lm.batch_generate"
    return Row(
        key="batch_generate",
        title=f"batch_generate, {len(prompts)} prompts x {n} tokens",
        unit="tokens/s",
        sides=[
            Side(ours_name, timed(ours_batch), True),
            Side(f"ours: {len(prompts)} x generate, one after another", timed(ours_sequential), True),
            Side(engine_name, timed(engine_batch), False),
        ],
        reference=engine_name,
        targets=[Target(ours_name, ">=", 0.97, engine_name)],
        note="aggregate generated tokens/s, greedy; both batched sides run mlx-lm's BatchGenerator with "
        "the same batch sizes (ours adds per-token text, stop matching and Token objects)",
        info=seen,
    )


def _classify_row(model: Any, cfg: BenchConfig) -> Row:
    from ..backends.mlx.model import CLASSIFY_SEQS

    mx: Any = importlib.import_module("mlx.core")
    sentences = _sentences(cfg.classify_sentences)
    encoded = [model.tokenize(s) for s in sentences]
    lengths = [len(e) for e in encoded]
    caches: Any = importlib.import_module("mlx_lm.models.cache")
    pad = model._pad

    def packed() -> int:
        return len(model.classify(sentences))

    def one_at_a_time() -> int:
        return sum(len(model.classify([s])) for s in sentences)

    def engine_batched() -> int:
        """mlx-lm's model called directly: left-padded batches, a batch cache per layer, argmax.

        Runs on the engine thread, on the model's stream (``_on_engine``).
        """
        engine = model._model
        done = 0
        for start in range(0, len(encoded), CLASSIFY_SEQS):
            group = encoded[start : start + CLASSIFY_SEQS]
            width = max(map(len, group))
            padding = [width - len(p) for p in group]
            rows = [caches.make_prompt_cache(engine) for _ in group]
            cache = [type(layer).merge([r[i] for r in rows]) for i, layer in enumerate(rows[0])]
            for layer in cache:
                layer.prepare(left_padding=padding)
            x = mx.array([[pad] * k + p for k, p in zip(padding, group, strict=True)])
            picks = mx.argmax(engine(x, cache=cache)[:, -1, :], axis=-1)
            done += len(picks.tolist())
        return done

    engine_batched = _on_engine(model, engine_batched)
    engine_name = "mlx-lm model, left-padded batches, argmax"
    return Row(
        key="classify",
        title=f"classify, {len(sentences)} sentences of ~{sum(lengths) / len(lengths):.0f} tokens",
        unit="sentences/s",
        sides=[
            Side("ours: classify (batched)", timed(packed), True),
            Side("ours: classify, one sentence per call", timed(one_at_a_time), True),
            Side(engine_name, timed(engine_batched), False),
        ],
        reference=engine_name,
        targets=[Target("ours: classify (batched)", ">=", 0.97, engine_name)],
        note=f"batches of {CLASSIFY_SEQS}; the engine side is the same forward pass written against "
        "mlx-lm directly (mlx-lm has no classify call of its own)",
        info={"sentences": len(sentences), "mean_tokens": sum(lengths) / len(lengths),
              "min_tokens": min(lengths), "max_tokens": max(lengths)},
    )


# MLX's CPU device computes about 4-5 tokens/s here whatever the batch (measured: decode 4.1
# tokens/s, 16 prompts batched 4.1, a 64-sentence classify pass about 4 minutes), so the full
# sizes would take hours; on the CPU the rows keep their sides and targets at these sizes
CPU_SIZES = {"decode_tokens": 32, "batch_prompts": 4, "batch_tokens": 16, "classify_sentences": 8}


def _sized_for(device: str, cfg: BenchConfig) -> tuple[BenchConfig, str | None]:
    """``cfg`` with the CPU sizes on MLX's CPU device (not in --quick), and a note saying so."""
    if device != "cpu" or cfg.quick:
        return cfg, None
    smaller = {k: min(v, getattr(cfg, k)) for k, v in CPU_SIZES.items()}
    note = ("reduced on MLX's CPU device, which computes about 4 tokens/s here whatever the batch: "
            + ", ".join(f"{k}={v}" for k, v in smaller.items()))
    return dataclasses.replace(cfg, **smaller), note


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    from ..backends.mlx import MlxBackend

    folder = hf_folder(cfg, "mlx")  # a GGUF (the default one too) is measured converted
    device = _device()
    cfg, sizes = _sized_for(device, cfg)
    model: Any = MlxBackend().load_model(folder, engine_options={"device": device})
    try:
        facts = {"model": os.path.basename(os.path.normpath(folder)), "device": device,
                 "prefill_step_size": model.prefill_step_size,
                 "threads": "MLX has no thread setting: every side runs on the one MLX engine thread"}
        if sizes:
            facts["sizes"] = sizes
        makers: list[Callable[[], Row]] = [
            lambda: _decode_row(model, cfg),
            lambda: _batch_row(model, cfg),
            lambda: _classify_row(model, cfg),
        ]
        for make in makers:
            row = make()
            row.info.update(facts)
            yield row
    finally:
        model.close()


SUITE = Suite(
    name="mlx",
    engine="mlx-lm (stream_generate, generate_step, batch_generate, its model called directly)",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)
