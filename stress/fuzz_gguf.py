"""Fuzz the model-file checks: 10,000 inputs through ``check_model_path``.

Inputs are mutations of four seeds: a small hand-built GGUF file with tensors, a
small safetensors file in a Hugging Face folder, the first 256 KiB of the real
default model (its real metadata, cut short), and, for 2% of the inputs, the real
model's whole header region (metadata and tensor table, about 6.5 MB, cut at the
tensor data: about 0.4 s to check each). Every input must either pass or raise
``ModelLoadError`` naming the file (in its message and its ``path``); any other exception, or a
crash of the process, is a finding.

With atheris installed (``pip install atheris``) it runs coverage-guided by libFuzzer;
without it, a plain random-mutation loop (bit flips, byte sets, interesting integers
at 8-byte aligned offsets, truncations, splices) runs the same count.

Usage::

    python stress/fuzz_gguf.py                    # 10,000 inputs, atheris if available
    python stress/fuzz_gguf.py --runs 2000 --plain
    python stress/fuzz_gguf.py --out stress/results/fuzz_gguf.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from core_inference import ModelLoadError
from core_inference.formats.validate import _headers, check_model_path

WEIGHTS = (40, 30, 28, 2)  # how often each seed is picked (gguf, safetensors, real prefix, real header)
INTERESTING = [
    0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 2**16, 2**24, 2**31 - 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1
]
HEADER_CAP = 256 * 1024  # mutate within the first bytes of the big seed: where the structure is


def gguf_seed() -> bytes:
    """A small valid GGUF: a few keys, an array, two F32 tensors with data."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("gemma3"),
        s("gemma3.block_count") + struct.pack("<II", 4, 2),
        s("general.alignment") + struct.pack("<II", 4, 32),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("<bos>") + s("a") + s("b"),
    ]
    tensors = [
        s("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0),
        s("output_norm.weight") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 128),
    ]
    body = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * ((-len(body)) % 32)
    return body + bytes(range(128)) + b"\1" * 32


def safetensors_seed() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 24


def real_header() -> bytes | None:
    try:
        from core_inference.default_model import default_model_path
        from core_inference.formats.validate import gguf_header

        path = default_model_path(progress=False)
        end = gguf_header(path).data_offset
        with open(path, "rb") as fh:
            return fh.read(end)
    except Exception as exc:  # the default-model extra is optional
        print(f"no real seed ({type(exc).__name__}: {exc}); using the small seeds only", file=sys.stderr)
        return None


def mutate(data: bytes, rng: random.Random, limit: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        span = min(len(buf), limit) or 1
        op = rng.randrange(6)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(span)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[rng.randrange(span)] = rng.randrange(256)
        elif op == 2 and len(buf) >= 8:  # an interesting integer at an aligned offset
            i = rng.randrange(0, max(1, min(len(buf), limit) - 8)) & ~7 if rng.random() < 0.5 else (
                rng.randrange(max(1, min(len(buf), limit) - 8))
            )
            width = rng.choice((4, 8))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[i : i + width] = value.to_bytes(width, "little")
        elif op == 3:  # truncate
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 4 and buf:  # splice a random run of bytes
            i = rng.randrange(span)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 5 and buf:  # delete a run
            i = rng.randrange(span)
            del buf[i : i + rng.randint(1, 32)]
    return bytes(buf)


class Target:
    """Writes an input where ``check_model_path`` looks, runs it, records what happened."""

    def __init__(self, workdir: Path) -> None:
        self.gguf = workdir / "fuzz.gguf"
        self.folder = workdir / "hf"
        self.folder.mkdir(exist_ok=True)
        (self.folder / "config.json").write_text('{"model_type": "llama"}')
        self.shard = self.folder / "model.safetensors"
        self.outcomes: dict[str, int] = {"ok": 0, "ModelLoadError": 0}
        self.findings: list[dict[str, Any]] = []
        self.runs = 0

    def run(self, kind: str, data: bytes) -> None:
        self.runs += 1
        path = self.shard if kind == "safetensors" else self.gguf
        path.write_bytes(data)
        target = self.folder if kind == "safetensors" else self.gguf
        _headers.clear()  # the header cache is keyed by mtime: never let it answer for a new input
        try:
            check_model_path(target)
        except ModelLoadError as exc:
            self.outcomes["ModelLoadError"] += 1
            if os.fspath(path) not in str(exc) and os.fspath(target) not in str(exc):
                self._finding(kind, data, f"message does not name the file: {exc}")
            elif exc.path not in (os.fspath(path), os.fspath(target), os.fspath(self.folder / "config.json")):
                self._finding(kind, data, f"ModelLoadError.path is {exc.path!r}: {exc}")
        except Exception as exc:
            self._finding(kind, data, "".join(traceback.format_exception_only(type(exc), exc)).strip())
        else:
            self.outcomes["ok"] += 1

    def _finding(self, kind: str, data: bytes, what: str) -> None:
        self.outcomes["finding"] = self.outcomes.get("finding", 0) + 1
        if len(self.findings) < 20:
            self.findings.append(
                {"kind": kind, "what": what, "input_hex": data[:256].hex(), "size": len(data)}
            )


def pick(seeds: list[tuple[str, bytes, int]], r: int) -> tuple[str, bytes, int]:
    """The seed for a number in [0, 100) by ``WEIGHTS`` (only the seeds that are there)."""
    weights = WEIGHTS[: len(seeds)]
    r %= sum(weights)
    for item, w in zip(seeds, weights, strict=False):
        if r < w:
            return item
        r -= w
    return seeds[-1]


def run_plain(target: Target, seeds: list[tuple[str, bytes, int]], runs: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(runs):
        kind, base, limit = pick(seeds, rng.randrange(100))
        target.run(kind, mutate(base, rng, limit))


def run_atheris(
    target: Target, seeds: list[tuple[str, bytes, int]], runs: int, seed: int, done: Any
) -> None:
    """libFuzzer drives; it ends the process itself after ``runs`` inputs, so ``done``
    (which writes the report) is called from inside the last input's run."""
    import atheris

    rng = random.Random(seed)

    def one(data: bytes) -> None:
        # the first byte picks the seed; the next 8 steer the mutation; libFuzzer's
        # remaining bytes overwrite the mutated seed at an offset of their choosing
        if data:
            kind, base, limit = pick(seeds, data[0])
            rng.seed(data[1:9])
            mutated = mutate(base, rng, limit)
            tail = data[9:]
            if tail:
                at = int.from_bytes(data[1:5].ljust(4, b"\0"), "little") % max(1, min(len(mutated), limit))
                mutated = mutated[:at] + tail + mutated[at + len(tail) :]
            target.run(kind, mutated)
        if target.runs >= runs:
            done()

    atheris.instrument_all()  # coverage feedback from the checkers (validate, gguf), already imported
    atheris.Setup([sys.argv[0], f"-runs={runs + 10}", f"-seed={seed + 1}", "-max_len=4096"], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain", action="store_true", help="the random-mutation loop even if atheris is here")
    ap.add_argument("--no-real-seed", action="store_true", help="skip the default model's header seeds")
    ap.add_argument("--out", default=str(here / "results" / "fuzz_gguf.json"))
    args = ap.parse_args(argv)

    seeds: list[tuple[str, bytes, int]] = [
        ("gguf", gguf_seed(), 1 << 30),
        ("safetensors", safetensors_seed(), 1 << 30),
    ]
    real = None if args.no_real_seed else real_header()
    if real is not None:
        seeds.append(("gguf", real[:HEADER_CAP], HEADER_CAP))
        seeds.append(("gguf", real, HEADER_CAP))

    engine = "plain"
    if not args.plain:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            print("atheris is not installed: running the plain random-mutation loop", file=sys.stderr)

    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="fuzz-gguf-")
    target = Target(Path(tmp))

    def done() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        result = {
            "engine": engine,
            "runs": target.runs,
            "seconds": round(time.perf_counter() - t0, 1),
            "seeds": [{"kind": k, "bytes": len(b)} for k, b, _ in seeds],
            "seed_weights_pct": list(WEIGHTS[: len(seeds)]),
            "outcomes": target.outcomes,
            "findings": target.findings,
            "passed": not target.findings,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "findings"}, indent=2), flush=True)
        for f in target.findings[:5]:
            print("FINDING:", f["kind"], f["what"], file=sys.stderr)
        sys.stderr.flush()
        if engine == "atheris":  # libFuzzer would otherwise go on to its own end
            os._exit(0 if result["passed"] else 1)
        raise SystemExit(0 if result["passed"] else 1)

    if engine == "atheris":
        run_atheris(target, seeds, args.runs, args.seed, done)
    else:
        run_plain(target, seeds, args.runs, args.seed)
    done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
