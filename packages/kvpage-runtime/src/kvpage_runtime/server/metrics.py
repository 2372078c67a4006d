"""Prometheus metrics: engine gauges read at scrape time, request counters and latency histograms.

Each app owns its registry, so several servers (or tests) in one process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "kvpage:"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)

# (metric suffix, EngineStats attribute, help)
_ENGINE_GAUGES = (
    ("num_requests_running", "num_running", "Requests in the running batch."),
    ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
    ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)."),
    (
        "prefix_cache_hit_rate",
        "prefix_cache_hit_rate",
        "Prefix-cache hit rate over queried tokens (0..1).",
    ),
    ("kv_blocks_total", "num_total_blocks", "KV-cache blocks in the pool."),
    (
        "kv_blocks_free",
        "num_free_blocks",
        "KV-cache blocks free (including evictable cached ones).",
    ),
    ("kv_blocks_held", "num_blocks_held", "KV-cache blocks referenced by requests."),
)


# Counters kept by the engine (vLLM's names; the exposition adds "_total").
_ENGINE_COUNTERS = (
    ("num_preemptions", "num_preemptions", "Requests preempted (their KV freed, to recompute)."),
    (
        "prefix_cache_queries",
        "prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
    ),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    (
        "engine_step_failures",
        "num_failed_steps",
        "Engine steps that raised (their requests failed; the engine recovered).",
    ),
    (
        "spec_decode_num_draft_tokens",
        "spec_decode_num_draft_tokens",
        "Speculative decoding: tokens drafted.",
    ),
    (
        "spec_decode_num_accepted_tokens",
        "spec_decode_num_accepted_tokens",
        "Speculative decoding: drafted tokens the target accepted.",
    ),
)


class EngineStatsCollector(Collector):
    """Reads ``engine.stats()`` at every scrape, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._stats()
        for family, table in ((GaugeMetricFamily, _ENGINE_GAUGES),
                              (CounterMetricFamily, _ENGINE_COUNTERS)):
            for suffix, attr, doc in table:
                value = getattr(snapshot, attr, None)
                if value is not None:
                    yield family(PREFIX + suffix, doc, value=float(value))


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine_stats))
        reg = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", registry=reg
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", registry=reg
        )
        self.requests = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive outputs of a request.",
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Request latency, arrival to end.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Follows one engine request's cumulative outputs and records its latencies and counts."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._start = time.monotonic()
        self._last: float | None = None
        self._tokens = 0
        self._prompt_tokens = 0
        self._reasons: list[str] = []

    def observe(self, output: Any) -> None:
        self._prompt_tokens = len(output.prompt_token_ids or ())
        tokens = sum(len(o.token_ids) for o in output.outputs)
        if tokens > self._tokens:
            now = time.monotonic()
            if self._last is None:
                self._m.ttft.observe(now - self._start)
            else:
                self._m.itl.observe(now - self._last)
            self._last, self._tokens = now, tokens
        if output.finished:
            self._reasons = [o.finish_reason or "abort" for o in output.outputs]

    def fail(self) -> None:
        """The request ended with an error."""
        self._reasons = ["error"]

    def close(self) -> None:
        """Called once when the request ends (finished, failed or aborted)."""
        self._m.prompt_tokens.inc(self._prompt_tokens)
        self._m.generation_tokens.inc(self._tokens)
        self._m.e2e.observe(time.monotonic() - self._start)
        for reason in self._reasons or ["abort"]:
            self._m.requests.labels(finished_reason=reason).inc()
