"""Echo with logprobs scores every prompt token: a 0.15 MiB request of 64 token-id prompts x 500 tokens with
logprobs 20 drew a 19 MiB answer from the tiny model (x124; 64 x 2048-token prompts: ~80 MiB). vLLM bounds
only the logprobs per token (20, as we do); the server bounds the log-probabilities an echo may return too."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from nvfp4.serve.app import ECHO_LOGPROBS_LIMIT, build_app
from support.serve import FakeEngine


def post(body: dict) -> httpx.Response:
    async def go():
        app = build_app({"student": FakeEngine()})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/v1/completions", json={"model": "student", "max_tokens": 1, **body})

    return asyncio.run(go())


def ids(prompts: int, tokens: int) -> list[list[int]]:
    return [[100 + (i + j) % 50 for j in range(tokens)] for i in range(prompts)]


@pytest.mark.parametrize(
    "body",
    [
        dict(prompt=ids(64, 2000), echo=True, logprobs=20),  # 2.7M log-probabilities
        dict(prompt=ids(16, 2000), echo=True, logprobs=5, n=4),
        dict(prompt=["x" * 4000] * 64, echo=True, logprobs=3),  # text: its UTF-8 bytes bound its tokens
    ],
    ids=["ids", "n", "text"],
)
def test_an_echo_scoring_more_than_the_limit_is_a_400_naming_the_count(body):
    response = post(body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "logprobs" and error["type"] == "invalid_request_error"
    assert str(ECHO_LOGPROBS_LIMIT) in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        dict(prompt=ids(64, 2000), echo=True, logprobs=1),  # lm-eval's loglikelihood: 256,000
        dict(prompt=ids(64, 2000), echo=True),  # no logprobs: the prompt text only
        dict(prompt=ids(64, 2000), logprobs=20),  # no echo: the generated tokens only
        dict(prompt="x" * 4000, echo=True, logprobs=20),
    ],
    ids=["lm-eval", "echo", "logprobs", "one-text"],
)
def test_echo_and_logprobs_within_the_limit_are_served(body):
    response = post(body)
    assert response.status_code == 200, response.text[:300]
