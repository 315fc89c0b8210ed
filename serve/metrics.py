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
# vLLM's bucket families (vllm/v1/metrics/loggers.py), so that its dashboards' quantiles read the same
VLLM_TTFT_BUCKETS = (
    0.001,
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
    160.0,
    640.0,
    2560.0,
)
VLLM_ITL_BUCKETS = (
    0.01,
    0.025,
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
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
VLLM_REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)  # end-to-end and queue time
VLLM_FINISH_REASONS = ("stop", "length", "abort")  # series that exist at 0
ERROR_STATUSES = ("400", "401", "404", "411", "413", "429", "499", "500", "502", "503")  # series that exist at 0


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, EngineStats]], models: list[str] = ()):
        self.registry = CollectorRegistry()
        labels, r = ["model"], self.registry
        self.ttft = Histogram(
            "nvfp4_time_to_first_token_seconds",
            "Request arrival to first token",
            labels,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "nvfp4_inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            labels,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "nvfp4_e2e_request_latency_seconds",
            "Request arrival to last token",
            labels,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.queue = Histogram(
            "nvfp4_request_queue_time_seconds",
            "Time waiting for a batch slot",
            labels,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.prompt_len = Histogram(
            "nvfp4_request_prompt_tokens", "Prompt length per request", labels, registry=r, buckets=TOKEN_BUCKETS
        )
        self.gen_len = Histogram(
            "nvfp4_request_generation_tokens", "Generated tokens per request", labels, registry=r, buckets=TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter("nvfp4_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("nvfp4_generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter(
            "nvfp4_requests",
            "Finished requests (one per choice) by finish reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.errors = Counter("nvfp4_request_errors", "Error responses by HTTP status", ["model", "status"], registry=r)
        self.vllm = VllmMetrics(r, models)
        r.register(_EngineGauges(stats))
        for model in [*models, NO_MODEL]:  # a healthy server shows 0 errors, not "no data"
            for status in ERROR_STATUSES:
                self.errors.labels(model, status)

    def error(self, model: str | None, status: int) -> None:
        self.errors.labels(model or NO_MODEL, str(status)).inc()


class VllmMetrics:
    """vLLM's request series beside ours: its names, its `model_name` label (our alias) and its buckets, so that a
    vLLM Grafana dashboard reads `nvfp4 serve` unchanged. Its gauges and prefix cache counters: _EngineGauges."""

    def __init__(self, registry: CollectorRegistry, models: list[str] = ()):
        labels, r = ["model_name"], registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=r,
            buckets=VLLM_TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            registry=r,
            buckets=VLLM_ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            registry=r,
            buckets=VLLM_REQUEST_BUCKETS,
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            registry=r,
            buckets=VLLM_REQUEST_BUCKETS,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        for model in models:  # every series exists from the start, as vLLM's do
            for metric in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens):
                metric.labels(model)
            for reason in VLLM_FINISH_REASONS:
                self.success.labels(model, reason)


class _EngineGauges:
    """Running / waiting requests, KV cache use and prefix cache counters, read from each engine at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, EngineStats]], models: list[str] = ()):
        self.stats = stats

    def collect(self):
        running = GaugeMetricFamily("nvfp4_num_requests_running", "Requests in the running batch", labels=["model"])
        waiting = GaugeMetricFamily("nvfp4_num_requests_waiting", "Requests waiting for a batch slot", labels=["model"])
        kv = GaugeMetricFamily("nvfp4_kv_cache_usage_ratio", "Fraction of KV cache positions in use", labels=["model"])
        stats = self.stats()
        for model, s in stats.items():
            running.add_metric([model], s.running)
            waiting.add_metric([model], s.waiting)
            kv.add_metric([model], s.kv_cache_usage)
        yield from (running, waiting, kv, *self._vllm_gauges(stats), *self._prefix_cache())

    @staticmethod
    def _vllm_gauges(stats: dict[str, EngineStats]) -> tuple[GaugeMetricFamily, ...]:
        """vLLM's names and label for the same three readings (kv_cache_usage_perc is a fraction, as vLLM's is)."""
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=["model_name"]
        )
        kv = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=["model_name"]
        )
        for model, s in stats.items():
            running.add_metric([model], s.running)
            waiting.add_metric([model], s.waiting)
            kv.add_metric([model], s.kv_cache_usage)
        return running, waiting, kv

    def _prefix_cache(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        """vLLM's names and label (counted in prompt tokens), so that its dashboards read them unchanged."""
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=["model_name"]
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels=["model_name"]
        )
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
        now, m, vllm = time.perf_counter(), self.metrics, self.metrics.vllm
        if queue_seconds is not None:
            m.queue.labels(self.model).observe(queue_seconds)
            vllm.queue.labels(self.model).observe(queue_seconds)
        first, latency = self.last is None, now - (self.arrival if self.last is None else self.last)
        (m.ttft if first else m.itl).labels(self.model).observe(latency)
        (vllm.ttft if first else vllm.itl).labels(self.model).observe(latency)
        self.last = now

    def finish(self, prompt_tokens: int, generated: int, reason: str) -> None:
        m, vllm, model, e2e = self.metrics, self.metrics.vllm, self.model, time.perf_counter() - self.arrival
        m.e2e.labels(model).observe(e2e)
        m.prompt_len.labels(model).observe(prompt_tokens)
        m.gen_len.labels(model).observe(generated)
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        m.generation_tokens.labels(model).inc(generated)
        m.requests.labels(model, reason).inc()
        vllm.e2e.labels(model).observe(e2e)
        vllm.prompt_tokens.labels(model).inc(prompt_tokens)
        vllm.generation_tokens.labels(model).inc(generated)
        vllm.success.labels(model, reason).inc()
