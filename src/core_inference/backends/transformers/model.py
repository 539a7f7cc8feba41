"""``TransformersModel``: a Hugging Face folder on ``AutoModelForCausalLM``, decoded step by step.

Generation is a manual loop over the model's forward pass with a ``DynamicCache`` that
this module owns (``logits_to_keep=1``: only the last position's logits are computed),
so each token is streamed the moment it is sampled, the prompt is prefilled in chunks
with the call's context checked between them, and the same forward pass serves
``classify`` (one left-padded batch) and ``batch_generate`` (one left-padded batch whose
finished rows are dropped from the cache). Imported only when a model loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelClosed, ModelLoadError
from ...formats.hf import HFFolder
from ...memory import cpu_count, process_memory
from ...model import BaseModel
from ...streaming import BatchBook, MetricsRecorder, Piece, TokenFinisher, classify_results
from ...templates import builtin_template, no_template_error, render_jinja
from ...types import (
    BatchResult,
    ClassifyResult,
    GenerateConfig,
    LoadConfig,
    Message,
    ModelInfo,
    Token,
)
from .batcher import StepBatcher, can_batch
from .sampling import Sampler, TokenPieces

DEFAULT_CONTEXT = 8192  # used when the model's own is larger and none is asked for
PREFILL_CHUNK = 512  # prompt tokens per forward pass; the context is checked between them
CLASSIFY_ROWS = 64  # prompts in one classify forward pass ...
CLASSIFY_TOKENS = 16384  # ... and at most this many tokens, padding included
BATCH_ROWS = 64  # prompts decoded together by batch_generate ...
BATCH_TOKENS = 16384  # ... and at most this many prompt tokens, padding included
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_threads() -> int:
    """CPU threads for torch when none are asked for: the cores not already busy, at least one.

    torch's thread pool spins at every barrier, so a thread whose core another process
    holds stalls every op: on 2 cores with the other one busy, 2 threads ran 8x slower
    than 1. The 1-minute load average says how many cores are taken.
    """
    cores = cpu_count()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def _positive_int(options: Any, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"engine_options: {key} must be a positive integer, got {value!r}")
    return value


class TransformersModel(BaseModel):
    """A Hugging Face causal LM on torch (CPU, CUDA or ROCm), serving ``parallel_slots`` calls."""

    def __init__(self, folder: HFFolder, cfg: LoadConfig, device: str, backend: str) -> None:
        opts = cfg.engine_options  # checked before the base class exists: a bad option leaves nothing
        self.prefill_chunk = _positive_int(opts, "prefill_chunk", PREFILL_CHUNK)
        dtype = opts.get("dtype") or ("bfloat16" if device == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"engine_options: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        continuous = opts.get("continuous_batching", True)
        if not isinstance(continuous, bool):
            raise ValueError(f"engine_options: continuous_batching must be True or False, got {continuous!r}")
        super().__init__(cfg.parallel_slots or 1)
        self.dtype = DTYPES[dtype]
        self.folder = folder
        self.path = folder.path
        self.backend_name = backend
        self.model_type = folder.model_type or "unknown"
        self.device = torch.device(device)
        # torch's CPU thread count is one setting for the whole process: the last load sets it
        self.threads = cfg.threads or default_threads()
        self._engine_lock = threading.Lock()  # one forward pass at a time on this model
        self._model: Any = None
        self._tok: Any = None
        self._batcher: StepBatcher | None = None
        try:
            torch.set_num_threads(self.threads)
            self._tok, self._model = self._load_engine()
            params = inspect.signature(self._model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
            self._positions = "position_ids" in params
            self._keep = "logits_to_keep" in params
            self._piece = TokenPieces(self._tok)
            train = folder.context_length or DEFAULT_CONTEXT
            self.context_len = cfg.context_len or min(train, DEFAULT_CONTEXT)
            self._bos_text = self._tok.bos_token or ""
            pads = (self._tok.pad_token_id, self._tok.eos_token_id)
            self._pad = next((i for i in pads if i is not None), 0)
            eos = set(folder.eos_token_ids)
            if self._tok.eos_token_id is not None:
                eos.add(int(self._tok.eos_token_id))
            self._stops = frozenset(eos)
            self._template = (
                None if folder.chat_template else builtin_template(self.model_type, self._has_token)
            )
            turn = self._template.end_of_turn if self._template is not None else ()
            self._chat_stops = self._stops | {self._tok.convert_tokens_to_ids(t) for t in turn}
            self._n_params = sum(p.numel() for p in self._model.parameters())
            # concurrent streams share each decode step; rows need explicit positions for that
            self._batcher = (
                StepBatcher(self)
                if self._slots.size > 1 and self._positions and continuous and can_batch(self._new_cache())
                else None
            )
        except BaseException:
            self._closed.set()  # a model that never was: free now, and no "not closed" warning
            self._free()
            raise

    def _load_engine(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.path
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path}: transformers could not load the tokenizer: {exc}", path) from exc
        kw: dict[str, Any] = {"local_files_only": True, "dtype": self.dtype}
        if self.device.type != "cpu":
            kw["device_map"] = {"": self.device}
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(path, **kw)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: transformers could not load the model (model_type {self.folder.model_type!r}): "
                f"{type(exc).__name__}: {exc}",
                path,
            ) from exc
        model.eval()
        return tok, model

    def _has_token(self, text: str) -> bool:
        return text in self._tok.get_vocab()

    # -- prompts and templates ---------------------------------------------------------

    def _render_chat(self, messages: list[Message]) -> str:
        source = self.folder.chat_template
        if source:
            return render_jinja(source, messages, self._bos_text, self._tok.eos_token or "")
        if self._template is None:
            raise no_template_error(self.path, self.model_type)
        return str(self._template.render(messages))

    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens; the tokenizer's BOS is added unless the text begins with it."""
        bos = self._bos_text
        add = not (bos and text.startswith(bos))
        return list(self._tok(text, add_special_tokens=add)["input_ids"])

    def _detokenize(self, ids: Sequence[int]) -> str:
        if self._piece.exact:
            return b"".join(self._piece(i) for i in ids).decode("utf-8", "replace")
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self._tokenize(text)
        if not tokens:
            raise ValueError("prompt: no tokens to decode (an empty prompt, and the tokenizer adds no BOS)")
        if len(tokens) + 1 > self.context_len:
            raise ContextLengthExceeded(len(tokens), self.context_len)
        return tokens

    # -- the forward pass --------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """The last position's logits, (batch, vocab), for ``ids`` after what ``cache`` holds."""
        kw: dict[str, Any] = {"input_ids": ids, "use_cache": cache is not None}
        if cache is not None:
            kw[self._cache_kw] = cache
        if mask is not None:
            kw["attention_mask"] = mask
            if self._positions and positions is not None:
                kw["position_ids"] = positions
        if self._keep:
            kw["logits_to_keep"] = 1
        logits: torch.Tensor = self._model(**kw).logits
        return logits[:, -1]

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._model.config)

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, attention mask and position ids (counted from each row's first token).

        RoPE models need only the mask to match single runs; absolute-position models
        (GPT-2, OPT...) also need the positions, so they are always given where taken.
        """
        width, pad = max(map(len, rows)), self._pad
        # one tensor from padded lists: a tensor and two slice writes per row cost more than the
        # forward pass of a small batch on a GPU
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        dev = self.device
        ids, mask = ids.to(dev), mask.to(dev)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _raise_if_ended(self, ctx: Context, when: str) -> None:
        ctx.raise_if_done()
        if self._closed.is_set():
            raise ModelClosed(f"model closed {when}")

    def _memory(self) -> tuple[int, int]:
        """(active, peak) bytes: the GPU's allocator on a GPU, the process's resident set on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        return process_memory()

    # -- streaming generation ----------------------------------------------------------

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prompt, self._stops, cfg, ctx, rec)

    def _engine_chat(
        self, prepared: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prepared, self._chat_stops, cfg, ctx, rec)

    def _decode_stream(
        self, text: str, stops: frozenset[int], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        tokens = self._prompt_tokens(text)
        sampler = Sampler(cfg, tokens, self.device)
        cache = self._new_cache()
        clock = time.perf_counter
        batcher, joined = self._batcher, False
        try:
            tid = self._prefill(tokens, cache, sampler, ctx, rec)
            rec.prefill_done(len(tokens))
            room = self.context_len - len(tokens)
            limit = min(cfg.max_tokens, room)
            decode = 0.0  # this call's own forward passes, never the waits for its turn
            rec.decode_duration = 0.0
            piece, lock, dev = self._piece, self._engine_lock, self.device
            pos = len(tokens)
            if batcher is not None:
                batcher.joined()
                joined = True
            for n in range(1, limit + 1):
                if tid in stops:
                    break
                yield tid, piece(tid)
                if n == limit:
                    if limit == room:
                        rec.finish_reason = "context_full"
                    break
                if batcher is not None:  # one forward pass with the other streams' steps
                    tid, spent = batcher.step(tid, cache, pos, sampler)
                    decode += spent
                else:
                    with lock, torch.inference_mode():
                        t = clock()
                        logits = self._forward(torch.tensor([[tid]], device=dev), cache)
                        tid = sampler.sample(logits[0])
                        decode += clock() - t
                pos += 1
                rec.decode_duration = decode
        finally:
            if joined and batcher is not None:
                batcher.left()
            del cache
            rec.active_memory_bytes, rec.peak_memory_bytes = self._memory()

    def _prefill(
        self, tokens: list[int], cache: Any, sampler: Sampler, ctx: Context, rec: MetricsRecorder
    ) -> int:
        """Run the prompt through the model in ``prefill_chunk`` pieces; sample the first token."""
        clock = time.perf_counter
        rec.prefill_duration = 0.0
        step = self.prefill_chunk
        tid = -1
        for start in range(0, len(tokens), step):
            self._raise_if_ended(ctx, "during prefill")
            chunk = tokens[start : start + step]
            with self._engine_lock, torch.inference_mode():
                t = clock()
                logits = self._forward(torch.tensor([chunk], device=self.device), cache)
                if start + step >= len(tokens):
                    tid = sampler.sample(logits[0])
                rec.prefill_duration += clock() - t
            rec.prompt_tokens = start + len(chunk)  # how far prefill got, if it is cut short
        return tid

    # -- classify and batch generation -------------------------------------------------

    def _encode_all(self, prompts: list[str]) -> tuple[dict[int, list[int]], dict[int, BaseException]]:
        """Every prompt's tokens, in one tokenizer call per add-BOS choice; a bad prompt's error
        is kept for its own result (one bad prompt does not sink the batch)."""
        encoded: dict[int, list[int]] = {}
        errors: dict[int, BaseException] = {}
        bos = self._bos_text
        for add in (True, False):
            keys = [i for i, p in enumerate(prompts) if (not (bos and p.startswith(bos))) == add]
            if not keys:
                continue
            ids = self._tok([prompts[i] for i in keys], add_special_tokens=add)["input_ids"]
            for i, tokens in zip(keys, ids, strict=True):
                if not tokens:
                    errors[i] = ValueError("prompt: no tokens to decode (an empty prompt, and the "
                                           "tokenizer adds no BOS)")
                elif len(tokens) + 1 > self.context_len:
                    errors[i] = ContextLengthExceeded(len(tokens), self.context_len)
                else:
                    encoded[i] = list(tokens)
        return encoded, errors

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        encoded, errors = self._encode_all(prompts)
        done: dict[int, tuple[Token, Any]] = {}
        clock = time.perf_counter
        rec.prefill_duration = 0.0
        for group in _groups(encoded, CLASSIFY_ROWS, CLASSIFY_TOKENS):
            self._raise_if_ended(ctx, "during classify")
            rows = [encoded[k] for k in group]
            with self._engine_lock, torch.inference_mode():
                t = clock()
                if len(rows) == 1:
                    logits = self._forward(torch.tensor(rows, device=self.device), None)
                else:
                    ids, mask, positions = self._padded(rows)
                    logits = self._forward(ids, None, mask, positions)
                if cfg.greedy and cfg.repeat_penalty in (0.0, 1.0):  # one argmax for the whole batch
                    picks = logits.argmax(-1).tolist()
                else:
                    picks = [Sampler(cfg, r, self.device).sample(logits[i]) for i, r in enumerate(rows)]
                table = logits.float().cpu().numpy() if cfg.return_logits else None
                for i, key in enumerate(group):
                    tid = picks[i]
                    row = table[i] if table is not None else None
                    done[key] = (Token(tid, self._piece(tid).decode("utf-8", "replace")), row)
                rec.prefill_duration += clock() - t
            rec.first_token = rec.first_token or clock()
        rec.prefill_end = clock()
        rec.active_memory_bytes, rec.peak_memory_bytes = self._memory()
        return classify_results(len(prompts), encoded, errors, done, rec)

    def _batch_generate(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[BatchResult]:
        encoded, errors = self._encode_all(prompts)
        book = BatchBook(encoded, errors, cfg, rec)
        if encoded and cfg.max_tokens:
            for group in _groups(encoded, BATCH_ROWS, BATCH_TOKENS):
                self._decode_together(group, encoded, book.finishers, book.tokens, cfg, ctx, rec)
        rec.active_memory_bytes, rec.peak_memory_bytes = self._memory()
        return book.results(len(prompts))

    def _decode_together(
        self,
        group: list[int],
        encoded: dict[int, list[int]],
        finishers: dict[int, TokenFinisher],
        tokens: dict[int, list[Token]],
        cfg: GenerateConfig,
        ctx: Context,
        rec: MetricsRecorder,
    ) -> None:
        """Decode a group of prompts as one left-padded batch, one forward pass per step.

        Each row's tokens go through its own ``TokenFinisher`` as they are sampled, so a
        row ends at its stop string or id the step it appears, as ``generate`` would; a
        finished row leaves the batch (and the cache) before the next step.
        """
        rows = [encoded[k] for k in group]
        samplers = [Sampler(cfg, r, self.device) for r in rows]
        clock = time.perf_counter
        dev = self.device
        cache = self._new_cache()
        try:
            ids, mask, positions = self._padded(rows)
            width, chunk = ids.shape[1], self.prefill_chunk
            for start in range(0, width, chunk):  # the padded prompts, a chunk of columns at a time
                self._raise_if_ended(ctx, "during batch_generate")
                end = min(start + chunk, width)
                with self._engine_lock, torch.inference_mode():
                    t = clock()
                    logits = self._forward(ids[:, start:end], cache, mask[:, :end], positions[:, start:end])
                    if end == width:
                        picks = self._pick(samplers, logits, range(len(rows)))
                    rec.prefill_duration = (rec.prefill_duration or 0.0) + clock() - t
            rec.prefill_done(rec.prompt_tokens + sum(map(len, rows)))
            live = list(range(len(rows)))  # batch row -> index in the group
            next_pos = [len(r) for r in rows]
            while True:
                keep, feed = [], []
                for b, gi in enumerate(live):
                    key, tid = group[gi], picks[b]
                    fin = finishers[key]
                    if tid in self._stops:
                        tokens[key] += fin.end()
                        continue
                    tokens[key] += fin.push(tid, self._piece(tid))
                    if fin.finish_reason is not None:
                        continue
                    if fin.count >= self.context_len - len(rows[gi]):
                        tokens[key] += fin.end("context_full")
                        continue
                    keep.append(b)
                    feed.append(tid)
                if not keep:
                    return
                self._raise_if_ended(ctx, "during batch_generate")
                with self._engine_lock, torch.inference_mode():
                    t = clock()
                    if len(keep) < len(live):
                        sel = torch.tensor(keep, device=dev)
                        cache.batch_select_indices(sel)
                        mask = mask[sel]
                        live = [live[b] for b in keep]
                    mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                    positions = torch.tensor([[next_pos[gi]] for gi in live], device=dev)
                    for gi in live:
                        next_pos[gi] += 1
                    step = torch.tensor([[x] for x in feed], device=dev)
                    logits = self._forward(step, cache, mask, positions)
                    picks = self._pick(samplers, logits, live)
                    rec.decode_duration = (rec.decode_duration or 0.0) + clock() - t
        finally:
            del cache

    @staticmethod
    def _pick(samplers: list[Sampler], logits: torch.Tensor, rows: Sequence[int]) -> list[int]:
        """The next token of each batch row (``rows[b]``: the sampler of batch row ``b``)."""
        if all(samplers[gi].plain_greedy for gi in rows):  # one argmax for the whole batch
            picks: list[int] = logits.argmax(-1).tolist()
            return picks
        return [samplers[gi].sample(logits[b]) for b, gi in enumerate(rows)]

    # -- errors --------------------------------------------------------------------------

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        """torch's and transformers' failures as contract errors: the one place they are mapped."""
        name = f"{self.backend_name} (transformers)"
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return EngineError(
                f"{name}: out of GPU memory ({str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                "try a shorter context, fewer prompts per batch, or a smaller dtype"
            )
        if isinstance(exc, MemoryError):
            return EngineError(f"{name}: out of host memory")
        text = str(exc)
        if isinstance(exc, RuntimeError) and any(k in text for k in ("CUDA", "HIP", "cuBLAS", "cuDNN")):
            return EngineError(f"{name}: GPU error: {text}")
        return EngineError(f"{name}: {type(exc).__name__}: {text}")

    # -- description and teardown ------------------------------------------------------

    def _describe(self) -> ModelInfo:
        f = self.folder
        return ModelInfo(
            architecture=self.model_type,
            vocab_size=f.vocab_size or len(self._tok),
            num_layers=f.num_layers,
            hidden_size=f.hidden_size,
            context_length=f.context_length,
            quant_bits=f.quant_bits,
            quant_group=f.quant_group,
            quant_type=f.quantisation or str(self.dtype).removeprefix("torch."),
            parameters=self._n_params,
        )

    def _close_engine(self) -> None:
        with self._engine_lock:
            self._model = None
            self._tok = None
        gc.collect()  # the modules' parameters go now, not when the collector next runs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        _trim_host_heap()


def _groups(encoded: dict[int, list[int]], max_rows: int, max_tokens: int) -> Iterator[list[int]]:
    """Prompt keys in groups of similar length (less padding): at most ``max_rows`` rows and
    ``max_tokens`` padded tokens each."""
    keys = sorted(encoded, key=lambda k: len(encoded[k]))
    group: list[int] = []
    for k in keys:
        width = len(encoded[k])  # sorted: the newest is the longest
        if group and (len(group) >= max_rows or (len(group) + 1) * width > max_tokens):
            yield group
            group = []
        group.append(k)
    if group:
        yield group


def _trim_host_heap() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise); no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


__all__ = ["TransformersModel", "default_threads"]
