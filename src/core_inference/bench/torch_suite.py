"""Rows for the ``torch`` backend (transformers on the CPU) against transformers called directly.

Both sides use the same loaded ``AutoModelForCausalLM`` (our backend's own module object:
the same weights, dtype and torch threads), in the same process, interleaved. The model is
a Hugging Face folder (``--model DIR``); a GGUF file, or no model (the default one), is
measured converted (``core_inference.convert``, kept in the cache): the same weights the
llama.cpp rows use, dequantised.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target, hf_folder, timed
from .llama_cpp_suite import BATCH_PROMPTS, DECODE_PROMPT, _sentences


def _why_unavailable() -> str | None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'core-inference[torch]')"
    return None


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}



OURS_DECODE = "ours: generate"
HF_GENERATE = "model.generate(do_sample=False)"


def _decode_row(model: Any, cfg: BenchConfig) -> Row:
    import torch

    n, prompt = cfg.decode_tokens, DECODE_PROMPT
    hf, tok = model._model, model._tok
    ids = torch.tensor([model.tokenize(prompt)], device=model.device)

    def ours() -> int:
        got = sum(1 for _ in model.generate(prompt, max_tokens=n))
        if got != n:
            raise BenchError(f"generate stopped after {got} of {n} tokens; pick another prompt")
        return n

    def hf_generate() -> int:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=model._pad)
        got = out.shape[1] - ids.shape[1]
        if got != n:
            raise BenchError(f"transformers' generate gave {got} of {n} tokens")
        return n

    def forward_loop() -> int:
        """The bare engine: our cache and forward calls, a fixed token fed back, no sampling."""
        from transformers import DynamicCache

        kw = {model._cache_kw: DynamicCache(config=hf.config), "use_cache": True, "logits_to_keep": 1}
        with torch.inference_mode():
            hf(input_ids=ids, **kw)
            step = ids[:, -1:]
            for _ in range(n - 1):
                hf(input_ids=step, **kw)
        return n

    loop_name = "forward loop with DynamicCache, no sampling"
    return Row(
        key="decode",
        title=f"Streaming decode, {n} greedy tokens",
        unit="tokens/s",
        sides=[Side(OURS_DECODE, timed(ours), True), Side(HF_GENERATE, timed(hf_generate), False),
               Side(loop_name, timed(forward_loop), False)],
        reference=HF_GENERATE,
        targets=[Target(OURS_DECODE, ">=", 0.97, HF_GENERATE)],
        note=f"prompt {DECODE_PROMPT!r}; tokens/s = {n} / wall time of the call (prefill included); "
        "transformers' generate gets min_new_tokens so it never stops early; the forward loop is the "
        "ceiling (no sampling, no text)",
        info={"prompt_tokens": int(ids.shape[1]), "tokenizer": type(tok).__name__},
    )


def _batch_row(model: Any, cfg: BenchConfig) -> Row:
    import torch

    prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
               for i in range(cfg.batch_prompts)]
    n = cfg.batch_tokens
    hf = model._model
    seen: dict[str, Any] = {"prompts": len(prompts), "max_tokens": n}
    rows = [model.tokenize(p) for p in prompts]
    ids, mask, _ = model._padded(rows)

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

    def hf_batched() -> int:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=model._pad)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    sides = [
        Side("ours: batch_generate", timed(ours_batch), True),
        Side(f"ours: {len(prompts)} x generate, one after another", timed(ours_sequential), True),
        Side("model.generate on the left-padded batch", timed(hf_batched), False),
    ]
    ref = "model.generate on the left-padded batch"
    return Row(
        key="batch_generate",
        title=f"batch_generate, {len(prompts)} prompts x {n} tokens",
        unit="tokens/s",
        sides=sides,
        reference=ref,
        targets=[Target("ours: batch_generate", ">=", 0.97, ref)],
        note="aggregate generated tokens/s; ours drops a row from the batch when it ends (end of text); "
        "transformers' sides always generate max_tokens per prompt",
        info=seen,
    )


CLASSIFY_OURS = "ours: classify (batched)"


def _classify_sides(model: Any, sentences: list[str], seen: dict[str, Any]) -> tuple[Side, Side]:
    """Ours and the reference (what a user writes with transformers: the tokenizer pads the
    batch on the left, one forward pass with ``logits_to_keep=1``, argmax), on the same rows per
    batch. Each records its greedy ids; ``seen["same_greedy_token"]`` counts where they agree."""
    import torch

    from ..backends.transformers.model import CLASSIFY_ROWS

    hf, tok = model._model, model._tok
    groups = [sentences[i : i + CLASSIFY_ROWS] for i in range(0, len(sentences), CLASSIFY_ROWS)]
    picks: dict[str, list[int]] = {}

    def agree(side: str, ids: list[int]) -> int:
        picks[side] = ids
        if len(picks) == 2:
            a, b = picks.values()
            seen["same_greedy_token"] = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"
        return len(ids)

    def ours() -> int:
        return agree("ours", [r.token.id for r in model.classify(sentences)])

    def engine() -> int:
        ids: list[int] = []
        with torch.inference_mode():
            for group in groups:
                batch = tok(group, padding=True, padding_side="left", return_tensors="pt").to(model.device)
                pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = hf(**batch, position_ids=pos, logits_to_keep=1).logits
                ids += logits[:, -1].argmax(-1).tolist()
        return agree("engine", ids)

    name = f"tokenizer(batch, padding left) + forward, batches of {CLASSIFY_ROWS}, argmax"
    return Side(CLASSIFY_OURS, timed(ours), True), Side(name, timed(engine), False)


def _classify_row(model: Any, cfg: BenchConfig) -> Row:
    sentences = _sentences(cfg.classify_sentences)
    lengths = [len(model.tokenize(s)) for s in sentences]
    seen: dict[str, Any] = {"sentences": len(sentences), "mean_tokens": sum(lengths) / len(lengths)}
    ours, engine = _classify_sides(model, sentences, seen)

    def ours_each() -> int:
        return sum(len(model.classify([s])) for s in sentences)

    return Row(
        key="classify",
        title=f"classify, {len(sentences)} sentences of ~{sum(lengths) / len(lengths):.0f} tokens",
        unit="sentences/s",
        sides=[ours, Side("ours: classify, one sentence per call", timed(ours_each), True), engine],
        reference=engine.name,
        targets=[Target(CLASSIFY_OURS, ">=", 0.97, engine.name)],
        note="both sides tokenize, pad on the left, run one forward pass per batch and pick the greedy "
        "token; ours also sorts prompts by length (less padding) and builds a Token per sentence",
        info=seen,
    )


# -- the cuda rows: on an NVIDIA GPU (bfloat16); elsewhere listed as not run, with the reason ----

CUDA_CLASSIFY_RATE = 5000.0  # sentences/s: the rate the seed's classification consumer needs
CUDA_CLASSIFY_SENTENCES = 4096  # a GPU at 5,000/s takes under a second per run
CUDA_BATCH_PROMPTS, CUDA_BATCH_TOKENS = 64, 128
CUDA_BATCH_OURS, GENERATE_BATCH = "ours: batch_generate", "model.generate_batch (continuous batching)"


def _not_run(name: str) -> Side:
    def run() -> float:
        raise BenchError(f"{name}: this row is not run here")

    return Side(name, run, name.startswith("ours"))


def _cuda_classify_row(model: Any | None, cfg: BenchConfig, why: str | None = None) -> Row:
    """classify on the GPU against the same forward pass written with transformers, and against
    5,000 sentences/s. ``model`` None: the row is listed as not run, ``why``."""
    from ..backends.transformers.model import CLASSIFY_ROWS

    n = cfg.classify_sentences if cfg.quick else max(cfg.classify_sentences, CUDA_CLASSIFY_SENTENCES)
    sentences = _sentences(n)
    seen: dict[str, Any] = {"sentences": n, "dtype": "bfloat16 (the cuda backend's default)"}
    ref = f"tokenizer(batch, padding left) + forward, batches of {CLASSIFY_ROWS}, argmax"
    if model is None:
        sides: tuple[Side, Side] = (_not_run(CLASSIFY_OURS), _not_run(ref))
    else:
        sides = _classify_sides(model, sentences, seen)
        lengths = [len(model.tokenize(s)) for s in sentences]
        seen.update(mean_tokens=sum(lengths) / len(lengths), dtype=str(model.dtype), device=str(model.device))
    return Row(
        key="cuda_classify",
        title=f"cuda: classify, {n} sentences",
        unit="sentences/s",
        sides=list(sides),
        reference=sides[1].name,
        targets=[Target(CLASSIFY_OURS, ">=", CUDA_CLASSIFY_RATE),
                 Target(CLASSIFY_OURS, ">=", 0.97, sides[1].name)],
        note="on an NVIDIA GPU in bfloat16: the seed's classification consumer needs 5,000 sentences/s; "
        "the reference is the same left-padded forward pass written with transformers directly",
        info=seen,
        skipped=why if model is None else None,
    )


def _cuda_batch_row(model: Any | None, cfg: BenchConfig, why: str | None = None) -> Row:
    """batch_generate on the GPU against transformers' continuous batching (``generate_batch``).
    ``model`` None: the row is listed as not run, ``why``."""
    k = cfg.batch_prompts if cfg.quick else max(cfg.batch_prompts, CUDA_BATCH_PROMPTS)
    n = cfg.batch_tokens if cfg.quick else max(cfg.batch_tokens, CUDA_BATCH_TOKENS)
    prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
               for i in range(k)]
    seen: dict[str, Any] = {"prompts": k, "max_tokens": n}
    if model is None:
        sides = [_not_run(CUDA_BATCH_OURS), _not_run(GENERATE_BATCH)]
    else:
        sides = _cuda_batch_sides(model, prompts, n, seen)
    return Row(
        key="cuda_batch_generate",
        title=f"cuda: batch_generate, {k} prompts x {n} tokens",
        unit="tokens/s",
        sides=sides,
        reference=GENERATE_BATCH,
        targets=[Target(CUDA_BATCH_OURS, ">=", 0.97, GENERATE_BATCH)],
        note="aggregate generated tokens/s, greedy, on an NVIDIA GPU in bfloat16; both sides stop a "
        "prompt at the model's end-of-text ids or max_tokens; generate_batch is called as a user "
        "would (a manager per call, its default warm-up)",
        info=seen,
        skipped=why if model is None else None,
    )


def _cuda_batch_sides(model: Any, prompts: list[str], n: int, seen: dict[str, Any]) -> list[Side]:
    import torch
    from transformers import GenerationConfig

    hf = model._model
    rows = [model.tokenize(p) for p in prompts]
    gen_cfg: Any = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=n, do_sample=False, eos_token_id=sorted(model._stops), pad_token_id=model._pad
    )

    def ours() -> int:
        results = model.batch_generate(prompts, max_tokens=n)
        errors = [r.err for r in results if r.err is not None]
        if errors:
            raise BenchError(f"batch_generate: {errors[0]}")
        counts = [len(r.tokens) for r in results]
        seen["batch_generate_tokens"] = sum(counts)
        return sum(counts)

    def continuous() -> int:
        with torch.inference_mode():
            out = hf.generate_batch(inputs=rows, generation_config=gen_cfg, progress_bar=False)
        # its outputs keep the end-of-text id that ended a request; ours does not count it
        counts = [sum(1 for t in r.generated_tokens if t not in model._stops) for r in out.values()]
        seen["generate_batch_tokens"] = sum(counts)
        return sum(counts)

    return [Side(CUDA_BATCH_OURS, timed(ours), True), Side(GENERATE_BATCH, timed(continuous), False)]


def _cuda_rows(model: Any, cfg: BenchConfig) -> list[Row]:
    """The cuda rows on ``model`` where it runs on a GPU, else both listed as not run, saying why."""
    why = None
    if model.device.type != "cuda":
        why = "no CUDA device here (" + _gpu_note().removeprefix("no GPU: ") + ")"
    on = model if why is None else None
    return [_cuda_classify_row(on, cfg, why), _cuda_batch_row(on, cfg, why)]


def _concurrent_row(path: str, cfg: BenchConfig) -> Row:
    """k streams at once on a model with k slots: shared forward passes against taking turns."""
    import threading

    import torch

    k = max(2, min(cfg.batch_prompts, 8))
    n = cfg.batch_tokens
    prompts = list(BATCH_PROMPTS[:k])
    model: Any = _backend().load_model(path, threads=cfg.threads, parallel_slots=k)
    batcher = model._batcher
    if batcher is None:
        model.close()
        raise BenchError("continuous batching is off for this model (no position_ids, or a recurrent cache)")
    ids, mask, _ = model._padded([model.tokenize(p) for p in prompts])

    def streams(shared: bool) -> Callable[[], int]:
        def work() -> int:
            model._batcher = batcher if shared else None
            counts = [0] * k

            def one(i: int) -> None:
                counts[i] = sum(1 for _ in model.generate(prompts[i], max_tokens=n))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(counts)

        return work

    def hf_batched() -> int:
        with torch.inference_mode():
            out = model._model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=model._pad)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    ours = f"ours: {k} concurrent generate streams, parallel_slots={k} (shared steps)"
    turns = f"ours: {k} concurrent generate streams, taking turns (continuous_batching=False)"
    ref = "model.generate on the left-padded batch"
    row = Row(
        key="concurrent",
        title=f"{k} concurrent streams x {n} tokens",
        unit="tokens/s",
        sides=[Side(ours, timed(streams(True)), True), Side(turns, timed(streams(False)), True),
               Side(ref, timed(hf_batched), False)],
        reference=ref,
        targets=[Target(ours, ">=", 1.5, turns)],
        note="aggregate tokens/s of k threads each streaming one prompt; the engine side decodes the same "
        "prompts as one batch (the ceiling for shared steps)",
        info={"streams": k, "max_tokens": n},
    )
    row.info["close"] = model.close  # freed by _rows after the row is measured
    return row


def _backend() -> Any:
    """The GPU backend where one is available (``cuda``, then ``rocm``), else ``torch`` on the CPU."""
    from ..backends.transformers import CudaBackend, RocmBackend, TorchBackend

    for backend in (CudaBackend(), RocmBackend()):
        if backend.available():
            return backend
    return TorchBackend()


def _gpu_note() -> str:
    """Which GPU the rows ran on, or why none (the results file says so)."""
    from ..backends.transformers import CudaBackend, RocmBackend

    why = {b.name: b.why_unavailable() for b in (CudaBackend(), RocmBackend())}
    used = [name for name, reason in why.items() if reason is None]
    if used:
        return f"ran on {used[0]}"
    return "no GPU: " + "; ".join(f"{name}: {reason}" for name, reason in why.items())


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    path = hf_folder(cfg, "torch")  # a GGUF (the default one too) is measured converted
    with _backend().load_model(path, threads=cfg.threads) as model:
        facts = {"model": os.path.basename(os.path.normpath(path)), "threads": cfg.threads,
                 "backend": model.backend_name, "dtype": str(model.dtype), "device": str(model.device),
                 "gpu": _gpu_note()}
        for make in (_decode_row, _batch_row, _classify_row):
            row = make(model, cfg)
            row.info.update(facts)
            yield row
        for row in _cuda_rows(model, cfg):
            row.info.update(facts)
            yield row
    row = _concurrent_row(path, cfg)  # its own model (k slots), loaded after the first is freed
    close = row.info.pop("close")
    try:
        row.info.update(facts)
        yield row
    finally:
        close()


SUITE = Suite(
    name="torch",
    engine="transformers (AutoModelForCausalLM.generate / forward) on torch: cuda or rocm where "
    "available, else the CPU",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)
