"""Prometheus metrics, measured at the HTTP/engine boundary so they hold for every engine.

One CollectorRegistry per app: tests can build several apps in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nvfp4.serve.interface import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
NO_MODEL = "none"  # label of errors raised before a known model is named
ERROR_STATUSES = ("400", "401", "404", "411", "413", "429", "499", "500", "502", "503")  # series that exist at 0


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, EngineStats]], models: list[str] = ()):
        self.registry = CollectorRegistry()
        labels, r = ["model"], self.registry
        self.ttft = Histogram("nvfp4_time_to_first_token_seconds", "Request arrival to first token", labels, registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("nvfp4_inter_token_latency_seconds", "Time between consecutive tokens of a request", labels, registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("nvfp4_e2e_request_latency_seconds", "Request arrival to last token", labels, registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("nvfp4_request_queue_time_seconds", "Time waiting for a batch slot", labels, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_len = Histogram("nvfp4_request_prompt_tokens", "Prompt length per request", labels, registry=r, buckets=TOKEN_BUCKETS)
        self.gen_len = Histogram("nvfp4_request_generation_tokens", "Generated tokens per request", labels, registry=r, buckets=TOKEN_BUCKETS)
        self.prompt_tokens = Counter("nvfp4_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("nvfp4_generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter("nvfp4_requests", "Finished requests (one per choice) by finish reason", ["model", "finish_reason"], registry=r)
        self.errors = Counter("nvfp4_request_errors", "Error responses by HTTP status", ["model", "status"], registry=r)
        r.register(_EngineGauges(stats))
        for model in [*models, NO_MODEL]:  # a healthy server shows 0 errors, not "no data"
            for status in ERROR_STATUSES:
                self.errors.labels(model, status)

    def error(self, model: str | None, status: int) -> None:
        self.errors.labels(model or NO_MODEL, str(status)).inc()


class _EngineGauges:
    """Running / waiting requests, KV cache use and prefix cache counters, read from each engine at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, EngineStats]], models: list[str] = ()):
        self.stats = stats

    def collect(self):
        running = GaugeMetricFamily("nvfp4_num_requests_running", "Requests in the running batch", labels=["model"])
        waiting = GaugeMetricFamily("nvfp4_num_requests_waiting", "Requests waiting for a batch slot", labels=["model"])
        kv = GaugeMetricFamily("nvfp4_kv_cache_usage_ratio", "Fraction of KV cache positions in use", labels=["model"])
        for model, s in self.stats().items():
            running.add_metric([model], s.running)
            waiting.add_metric([model], s.waiting)
            kv.add_metric([model], s.kv_cache_usage)
        yield from (running, waiting, kv, *self._prefix_cache())

    def _prefix_cache(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        """vLLM's names and label (counted in prompt tokens), so that its dashboards read them unchanged."""
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=["model_name"])
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels=["model_name"])
        for model, s in self.stats().items():
            queries.add_metric([model], s.prefix_cache_queries)
            hits.add_metric([model], s.prefix_cache_hits)
        return queries, hits


class RequestTimer:
    """Timestamps of one generation (one choice): feeds TTFT, ITL, queue and end-to-end latency."""

    def __init__(self, metrics: ServerMetrics, model: str, arrival: float):
        self.metrics, self.model, self.arrival = metrics, model, arrival
        self.last: float | None = None

    def token(self, queue_seconds: float | None) -> None:
        now = time.perf_counter()
        if queue_seconds is not None:
            self.metrics.queue.labels(self.model).observe(queue_seconds)
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.arrival)
        else:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now

    def finish(self, prompt_tokens: int, generated: int, reason: str) -> None:
        m, model = self.metrics, self.model
        m.e2e.labels(model).observe(time.perf_counter() - self.arrival)
        m.prompt_len.labels(model).observe(prompt_tokens)
        m.gen_len.labels(model).observe(generated)
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        m.generation_tokens.labels(model).inc(generated)
        m.requests.labels(model, reason).inc()
