"""vLLM-named metrics beside ours (issue 38 B): vLLM's names, `model_name` label and bucket families, so that its
Grafana dashboards read `nvfp4 serve` unchanged. A scripted engine over ASGI."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nvfp4.serve.app import build_app
from nvfp4.serve.interface import EngineStats
from nvfp4.serve.metrics import VLLM_ITL_BUCKETS, VLLM_REQUEST_BUCKETS, VLLM_TTFT_BUCKETS
from support.serve import FakeEngine, metric

# vLLM's own buckets (vllm/v1/metrics/loggers.py), written out here so that a change to ours fails this test
TTFT = [
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
]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST = [
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
]
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": ITL,
    "vllm:e2e_request_latency_seconds": REQUEST,
    "vllm:request_queue_time_seconds": REQUEST,
}


class _BusyEngine(FakeEngine):
    def stats(self) -> EngineStats:
        return EngineStats(running=3, waiting=2, kv_cache_usage=0.25, prefix_cache_queries=10, prefix_cache_hits=4)


def scrape_after(engine: FakeEngine, *requests: dict) -> str:
    async def go():
        app = build_app({"student": engine})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for body in requests:
                assert (await client.post("/v1/completions", json=body)).status_code == 200
            return (await client.get("/metrics")).text

    return asyncio.run(go())


def buckets(exposition: str, name: str) -> list[float]:
    family = next(f for f in text_string_to_metric_families(exposition) if f.name == name)
    bounds = [
        s.labels["le"] for s in family.samples if s.name == name + "_bucket" and s.labels["model_name"] == "student"
    ]
    return [float(b) for b in bounds if b != "+Inf"]


def test_the_bucket_families_are_vllms():
    assert (list(VLLM_TTFT_BUCKETS), list(VLLM_ITL_BUCKETS), list(VLLM_REQUEST_BUCKETS)) == (TTFT, ITL, REQUEST)
    exposition = scrape_after(FakeEngine())
    for name, expected in HISTOGRAMS.items():
        assert buckets(exposition, name) == expected, name


def test_every_series_exists_at_zero_before_any_request():
    exposition = scrape_after(FakeEngine())
    for name in HISTOGRAMS:
        assert f'{name}_count{{model_name="student"}} 0.0' in exposition, name
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f'{name}{{model_name="student"}} 0.0' in exposition, name
    assert metric(exposition, "vllm:request_success_total", finished_reason="stop", model_name="student") == 0
    assert 'vllm:request_success_total{finished_reason="length",model_name="student"} 0.0' in exposition


def test_requests_feed_the_vllm_series_as_they_feed_ours():
    body = {"model": "student", "prompt": "hey", "max_tokens": 4}
    exposition = scrape_after(FakeEngine(), body, {**body, "stream": True}, {**body, "n": 2})
    student = {"model_name": "student"}
    assert (
        metric(exposition, "vllm:prompt_tokens_total", **student)
        == 4 * 3
        == metric(exposition, "nvfp4_prompt_tokens_total", model="student")
    )
    assert metric(exposition, "vllm:generation_tokens_total", **student) == 4 * 4
    assert metric(exposition, "vllm:request_success_total", finished_reason="length", **student) == 4
    assert metric(exposition, "vllm:time_to_first_token_seconds_count", **student) == 4
    assert metric(exposition, "vllm:inter_token_latency_seconds_count", **student) == 4 * 3
    assert metric(exposition, "vllm:e2e_request_latency_seconds_count", **student) == 4
    assert metric(exposition, "nvfp4_requests_total", finish_reason="length", model="student") == 4  # ours stay


def test_engine_gauges_under_vllms_names():
    exposition = scrape_after(_BusyEngine())
    student = {"model_name": "student"}
    assert metric(exposition, "vllm:num_requests_running", **student) == 3
    assert metric(exposition, "vllm:num_requests_waiting", **student) == 2
    assert metric(exposition, "vllm:kv_cache_usage_perc", **student) == 0.25
    assert metric(exposition, "vllm:prefix_cache_queries_total", **student) == 10
    assert metric(exposition, "vllm:prefix_cache_hits_total", **student) == 4
    assert metric(exposition, "nvfp4_num_requests_running", model="student") == 3  # ours stay
    families = [f.name for f in text_string_to_metric_families(exposition)]
    assert len(families) == len(set(families))  # each family registered once
