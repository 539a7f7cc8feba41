"""The server's counters in Prometheus' text format (standard library only).

Requests by endpoint and status (every rejection included: 400, 401, 404, 408, 413,
429, 503, and 499 for a client that left before its answer), prompt and generated
tokens, a histogram of time to first token, and gauges of requests running and
waiting for a slot.
"""

from __future__ import annotations

import threading
from collections import Counter

ENDPOINTS = frozenset({
    "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/health",
    "/metrics",
})
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CLIENT_GONE = 499  # nginx's "client closed request": the client left before the answer began
PREFIX = "core_inference"


def endpoint_label(path: str) -> str:
    """The path as a label, or "other" (unknown paths must not grow the label set without bound)."""
    return path if path in ENDPOINTS else "other"


class ServerMetrics:
    """Counters and gauges, updated from the event loop and read by ``GET /metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.disconnects = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.running = 0
        self.waiting = 0

    def request(self, path: str, status: int) -> None:
        """Count one answered (or abandoned) request."""
        with self._lock:
            self.requests[(endpoint_label(path), status)] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        """Count one choice's tokens."""
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def first_token(self, seconds: float) -> None:
        """Record a time to first token (from the request's arrival)."""
        with self._lock:
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1
                    break
            else:
                self.ttft_counts[-1] += 1
            self.ttft_sum += seconds

    def disconnect(self) -> None:
        """Count a client that left while its generation ran."""
        with self._lock:
            self.disconnects += 1

    def rejected(self) -> int:
        """Requests answered with a 4xx or 5xx status (499 included)."""
        with self._lock:
            return sum(n for (_, status), n in self.requests.items() if status >= 400)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total HTTP requests by endpoint and status code.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{path}",status="{status}"}} {n}')
            lines += [
                f"# HELP {p}_prompt_tokens_total Prompt tokens prefilled.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Tokens generated.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generated_tokens}",
                f"# HELP {p}_client_disconnects_total Clients that left while their answer ran.",
                f"# TYPE {p}_client_disconnects_total counter",
                f"{p}_client_disconnects_total {self.disconnects}",
                f"# HELP {p}_time_to_first_token_seconds Time from a request's arrival to its first token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
            ]
            total = 0
            for bound, n in zip((*TTFT_BUCKETS, float("inf")), self.ttft_counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{p}_time_to_first_token_seconds_bucket{{le="{le}"}} {total}')
            lines += [
                f"{p}_time_to_first_token_seconds_sum {self.ttft_sum}",
                f"{p}_time_to_first_token_seconds_count {total}",
                f"# HELP {p}_requests_running Requests holding a slot.",
                f"# TYPE {p}_requests_running gauge",
                f"{p}_requests_running {self.running}",
                f"# HELP {p}_requests_waiting Requests queued for a slot.",
                f"# TYPE {p}_requests_waiting gauge",
                f"{p}_requests_waiting {self.waiting}",
            ]
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page as ``{'name{labels}': value}`` (for tests and tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
