"""Hostile traffic against ``core-inference serve``: it stays up, leaks no slot, counts every rejection.

All at once, against one server:

- ``malformed``: 1,000 bad requests (bad JSON, wrong types, huge numbers, unknown roles,
  10 MB bodies, invalid UTF-8, deep nesting, unknown routes and methods);
- ``killed``:    streaming clients whose connection is reset after a few events;
- ``slow``:      a body sent one byte a second (the server answers 408 when its
                 ``--body-timeout`` runs out);
- ``flood``:     10 x ``--parallel`` concurrent streaming requests (the server runs
                 ``--parallel``, queues ``--queue`` and answers 429 to the rest);
- ``health``:    ``GET /health`` every 0.2 s throughout; every probe must answer 200.

At the end: no request running or waiting (no slot leaked), a new request is admitted
at once (nothing waits) and answered, every 4xx the clients saw is counted in
``/metrics`` under its status, no 5xx, no connection error outside the killed clients.

Usage::

    python stress/server_storm.py                       # -> stress/results/server_storm.json
    python stress/server_storm.py --malformed 100 --out /tmp/s.json

The test suite imports ``run_server_storm`` from this file and runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from core_inference.server.metrics import parse as parse_metrics
from core_inference.server.process import ServerProcess

CHAT = [{"role": "user", "content": "Tell me a story."}]
BIG = 10 * 2**20  # a 10 MB body


def malformed_requests(n: int, seed: int = 0) -> list[tuple[str, str, bytes, int]]:
    """``n`` bad requests: (method, path, body, the status the server must answer)."""
    rng = random.Random(seed)
    good = {"messages": CHAT, "max_tokens": 4}

    def with_(**kw: Any) -> bytes:
        return json.dumps({**good, **kw}).encode()

    kinds: list[tuple[str, str, bytes, int]] = [
        ("POST", "/v1/chat/completions", b"{", 400),
        ("POST", "/v1/chat/completions", b'{"messages": [', 400),
        ("POST", "/v1/completions", b"not json at all", 400),
        ("POST", "/v1/completions", b"", 400),
        ("POST", "/v1/completions", b"[1, 2, 3]", 400),
        ("POST", "/v1/completions", b'"a string"', 400),
        ("POST", "/v1/completions", b'{"prompt": NaN}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": Infinity}', 400),
        ("POST", "/v1/chat/completions", b"\xff\xfe\xfd{}", 400),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
        ("POST", "/v1/completions", b"[" * 200_000 + b"]" * 200_000, 400),
        ("POST", "/v1/chat/completions", with_(messages="hello"), 400),
        ("POST", "/v1/chat/completions", with_(messages={"role": "user"}), 400),
        ("POST", "/v1/chat/completions", with_(messages=[]), 400),
        ("POST", "/v1/chat/completions", with_(messages=[{"role": "wizard", "content": "hi"}]), 400),
        ("POST", "/v1/chat/completions", with_(messages=[{"role": "tool", "content": "hi"}]), 400),
        ("POST", "/v1/chat/completions", with_(messages=[{"role": "user", "content": 42}]), 400),
        ("POST", "/v1/chat/completions", with_(messages=[{"role": "user", "content": [{"type": "x"}]}]), 400),
        ("POST", "/v1/chat/completions", with_(max_tokens="many"), 400),
        ("POST", "/v1/chat/completions", with_(max_tokens=10**100), 400),
        ("POST", "/v1/chat/completions", with_(max_tokens=-1), 400),
        ("POST", "/v1/chat/completions", with_(temperature=1e308), 400),
        ("POST", "/v1/chat/completions", with_(temperature=[]), 400),
        ("POST", "/v1/chat/completions", with_(top_p=2), 400),
        ("POST", "/v1/chat/completions", with_(n=10**9), 400),
        ("POST", "/v1/chat/completions", with_(seed=10**30), 400),
        ("POST", "/v1/chat/completions", with_(stop=5), 400),
        ("POST", "/v1/chat/completions", with_(stop=["a"] * 100), 400),
        ("POST", "/v1/chat/completions", with_(stream="yes"), 400),
        ("POST", "/v1/chat/completions", with_(stream_options=[]), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": 12}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "logprobs": 99}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "model": 7}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "model": "other"}).encode(), 404),
        ("POST", "/detokenize", json.dumps({"tokens": [10**9]}).encode(), 400),
        ("POST", "/detokenize", json.dumps({"tokens": [-1]}).encode(), 400),
        ("POST", "/detokenize", json.dumps({"tokens": "abc"}).encode(), 400),
        ("POST", "/tokenize", json.dumps({"prompt": ["x"]}).encode(), 400),
        ("POST", "/v1/nothing", b"{}", 404),
        ("GET", "/v1/chat/completions", b"", 405),
        ("DELETE", "/v1/models", b"", 405),
    ]
    out = []
    for i in range(n):
        if i % 100 == 50:  # one in a hundred: a 10 MB body
            out.append(("POST", "/v1/chat/completions", b'{"messages": "' + b"x" * BIG + b'"}', 413))
        else:
            out.append(kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds))
    return out


async def _health(base: str, stop: asyncio.Event, result: dict[str, Any]) -> None:
    async with httpx2.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            began = time.monotonic()
            try:
                r = await c.get(base + "/health")
                ok = r.status_code == 200
            except httpx2.HTTPError:
                ok = False
            result["probes"] += 1
            result["failed"] += 0 if ok else 1
            result["slowest_s"] = max(result["slowest_s"], time.monotonic() - began)
            await asyncio.sleep(0.2)


async def _malformed(base: str, requests: list[tuple[str, str, bytes, int]], seen: Counter[int],
                     problems: list[str], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with httpx2.AsyncClient(timeout=120, limits=httpx2.Limits(max_connections=concurrency)) as c:
        async def one(method: str, path: str, body: bytes, want: int) -> None:
            async with gate:
                try:
                    r = await c.request(method, base + path, content=body or None,
                                        headers={"content-type": "application/json"})
                except httpx2.HTTPError as exc:
                    problems.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                    return
                seen[r.status_code] += 1
                if r.status_code != want:
                    problems.append(f"{method} {path} {body[:60]!r}: {r.status_code}, expected {want}")
                elif want != 405 and "error" not in r.json():
                    problems.append(f"{method} {path}: no error object")

        await asyncio.gather(*(one(*req) for req in requests))


def _raw_request(host: str, path: str, body: bytes, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


async def _killed(base: str, n: int, seen: Counter[int], problems: list[str], concurrency: int) -> int:
    """Streaming clients whose connection is reset after a few events; returns how many were killed."""
    host, port = urlsplit(base).hostname or "127.0.0.1", urlsplit(base).port or 80
    body = json.dumps({"messages": CHAT, "max_tokens": 500, "stream": True}).encode()
    gate = asyncio.Semaphore(concurrency)
    killed = 0

    async def one(i: int) -> None:
        nonlocal killed
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_raw_request(host, "/v1/chat/completions", body))
                await writer.drain()
                got = b""
                while got.count(b"data: ") < 1 + i % 4:
                    chunk = await asyncio.wait_for(reader.read(65536), 120)
                    if not chunk:
                        break
                    got += chunk
                status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
                if status == 200:
                    killed += 1
                else:
                    seen[status] += 1
                    if status != 429:
                        problems.append(f"killed client {i}: status {status}")
            except (OSError, asyncio.TimeoutError) as exc:
                problems.append(f"killed client {i}: {type(exc).__name__}: {exc}")
            finally:
                sock = writer.get_extra_info("socket")
                if sock is not None:  # a reset, as when the client process is killed
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

    await asyncio.gather(*(one(i) for i in range(n)))
    return killed


async def _slow(base: str, n: int, limit_s: float, seen: Counter[int], problems: list[str]) -> None:
    """Bodies sent one byte a second: the server must answer 408 once its body timeout runs out."""
    host, port = urlsplit(base).hostname or "127.0.0.1", urlsplit(base).port or 80

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_raw_request(host, "/v1/completions", b"", length=10_000))
            await writer.drain()
            began = time.monotonic()
            answer = b""
            while time.monotonic() - began < limit_s:
                try:
                    answer = await asyncio.wait_for(reader.read(65536), 1.0)
                    break
                except asyncio.TimeoutError:
                    writer.write(b" ")  # one byte a second
                    await writer.drain()
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
            seen[status] += 1
            if status != 408:
                problems.append(f"slow body {i}: status {status} after {time.monotonic() - began:.0f} s")
        except OSError as exc:
            problems.append(f"slow body {i}: {type(exc).__name__}: {exc}")
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))


async def _flood(base: str, n: int, seen: Counter[int], served: Counter[str], problems: list[str]) -> None:
    body = {"messages": CHAT, "max_tokens": 8, "stream": True}
    async with httpx2.AsyncClient(timeout=300, limits=httpx2.Limits(max_connections=n)) as c:
        async def one(i: int) -> None:
            try:
                async with c.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    text = (await r.aread()).decode()
                    if r.status_code == 200:
                        served["done" if text.rstrip().endswith("data: [DONE]") else "cut"] += 1
                    else:
                        seen[r.status_code] += 1
                        if r.status_code != 429:
                            problems.append(f"flood {i}: status {r.status_code}: {text[:200]}")
            except httpx2.HTTPError as exc:
                problems.append(f"flood {i}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(n)))


async def _storm(base: str, malformed: int, killed: int, slow: int, flood: int, slow_limit_s: float,
                 concurrency: int, parallel: int, seed: int) -> dict[str, Any]:
    seen: Counter[int] = Counter()  # 4xx and 5xx the clients saw, by status
    served: Counter[str] = Counter()
    problems: list[str] = []
    health = {"probes": 0, "failed": 0, "slowest_s": 0.0}
    stop = asyncio.Event()
    prober = asyncio.ensure_future(_health(base, stop, health))
    began = time.monotonic()
    try:
        async def streams() -> int:  # the killed clients, then the flood (else one starves the other)
            n = await _killed(base, killed, seen, problems, parallel)  # each one is admitted
            await _flood(base, flood, seen, served, problems)
            return n

        results = await asyncio.gather(
            streams(),
            _malformed(base, malformed_requests(malformed, seed), seen, problems, concurrency),
            _slow(base, slow, slow_limit_s, seen, problems),
        )
    finally:
        stop.set()
        await prober
    return {"seen": seen, "served": served, "problems": problems, "health": health,
            "killed": results[0], "storm_s": time.monotonic() - began}


def run_server_storm(
    base: str, *, malformed: int = 1000, killed: int = 50, slow: int = 2, flood: int = 40,
    body_timeout: float = 30.0, concurrency: int = 32, parallel: int = 4, seed: int = 0,
) -> dict[str, Any]:
    """Run the storm against the server at ``base`` (``http://host:port``); return what it found.

    ``ok`` is True when the server stayed up and healthy, leaked no slot, answered a
    request at once afterwards and counted every rejection the clients saw.
    """
    before = parse_metrics(httpx2.get(base + "/metrics").text)
    out = asyncio.run(_storm(base, malformed, killed, slow, flood, body_timeout + 15, concurrency, parallel,
                             seed))
    # the killed clients' engines stop at their next token: give the server a moment to see it
    deadline = time.monotonic() + 60
    while True:
        after = parse_metrics(httpx2.get(base + "/metrics").text)
        idle = after["core_inference_requests_running"] == 0 and after["core_inference_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    probe = httpx2.post(base + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
    final = parse_metrics(httpx2.get(base + "/metrics").text)

    def delta(status: int) -> int:
        return int(sum(v - before.get(k, 0) for k, v in after.items()
                       if k.startswith("core_inference_requests_total{") and f'status="{status}"' in k))

    seen: Counter[int] = out["seen"]
    counted = {status: delta(status) for status in sorted(seen)}
    uncounted = {s: (n, counted[s]) for s, n in seen.items() if counted[s] != n}
    report = {
        "requests": {"malformed": malformed, "killed": killed, "slow": slow, "flood": flood},
        "rejections_seen": {str(k): v for k, v in sorted(seen.items())},
        "rejections_counted": {str(k): v for k, v in counted.items()},
        "uncounted": {str(k): v for k, v in uncounted.items()},
        "server_errors": sum(n for s, n in seen.items() if s >= 500),
        "killed_mid_stream": out["killed"],
        "disconnects_counted": int(after["core_inference_client_disconnects_total"]
                                   - before["core_inference_client_disconnects_total"]),
        "flood_served": dict(out["served"]),
        "health": out["health"],
        "idle_after": idle,
        "slots_after": {"running": after["core_inference_requests_running"],
                        "waiting": after["core_inference_requests_waiting"]},
        "probe_status": probe.status_code,
        "probe_waited": final["core_inference_requests_waiting"] != 0,
        "problems": out["problems"][:50],
        "problem_count": len(out["problems"]),
        "storm_s": round(out["storm_s"], 1),
    }
    report["ok"] = (
        not out["problems"] and not uncounted and report["server_errors"] == 0
        and out["health"]["failed"] == 0 and idle and probe.status_code == 200
        and report["disconnects_counted"] >= out["killed"]
        and out["served"].get("cut", 0) == 0
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--malformed", type=int, default=1000)
    ap.add_argument("--killed", type=int, default=50)
    ap.add_argument("--slow", type=int, default=2)
    ap.add_argument("--body-timeout", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", help="model to serve (default: the instruct model)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_storm.json"))
    args = ap.parse_args(argv)
    serve_args = ["--parallel", str(args.parallel), "--queue", str(args.queue),
                  "--body-timeout", str(args.body_timeout), "--threads", str(args.threads)]
    if args.model:
        serve_args += ["--model", args.model]
    with ServerProcess(serve_args) as server:
        report = run_server_storm(server.base, malformed=args.malformed, killed=args.killed, slow=args.slow,
                                  flood=10 * args.parallel, body_timeout=args.body_timeout,
                                  parallel=args.parallel)
        report["exit_status"] = server.stop()
    report["ok"] = report["ok"] and report["exit_status"] == 0
    report["server"] = serve_args
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
