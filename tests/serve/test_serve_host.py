"""DNS rebinding: a page on evil.example whose name later resolves to 127.0.0.1 drives a keyless loopback
server from the visitor's browser; the browser still sends `Host: evil.example:PORT`. A keyless `nvfp4 serve`
answers only the loopback names (monitoring paths aside); a keyed one any name."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from nvfp4.serve.cli import serve_app
from nvfp4.serve.config import ServeConfig
from support.serve import FakeEngine


def statuses(config: ServeConfig, host: str, paths=("/v1/models", "/v1/completions", "/health", "/metrics")) -> dict:
    app = serve_app(config, {"student": FakeEngine()})
    headers = {"host": host, "authorization": f"Bearer {config.api_key}" if config.api_key else ""}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as c:
            seen = {}
            for path in paths:
                if path == "/v1/completions":
                    response = await c.post(
                        path, json={"model": "student", "prompt": "hi", "max_tokens": 2}, headers=headers
                    )
                else:
                    response = await c.get(path, headers=headers)
                seen[path] = response.status_code
            return seen

    return asyncio.run(go())


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:8000",
        "evil.example",
        "127.0.0.1.evil.example:8000",
        "localhost.evil.example:8000",
        "192.168.1.5:8000",
    ],
)
def test_a_keyless_loopback_server_refuses_other_host_names(tmp_path, host):
    seen = statuses(ServeConfig(tmp_path), host)
    assert seen == {"/v1/models": 400, "/v1/completions": 400, "/health": 200, "/metrics": 200}, seen


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000", "localhost"])
def test_a_keyless_loopback_server_answers_its_loopback_names(tmp_path, host):
    seen = statuses(ServeConfig(tmp_path), host)
    assert seen == {"/v1/models": 200, "/v1/completions": 200, "/health": 200, "/metrics": 200}, seen


def test_the_refusal_says_what_to_do(tmp_path):
    app = serve_app(ServeConfig(tmp_path), {"student": FakeEngine()})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as c:
            return await c.get("/v1/models", headers={"host": "evil.example:8000"})

    error = asyncio.run(go()).json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_host"
    assert "evil.example" in error["message"] and "--api-key" in error["message"]


def test_a_keyed_server_answers_any_host_name(tmp_path):
    seen = statuses(ServeConfig(tmp_path, host="0.0.0.0", api_key="sesame"), "nvfp4.internal:8000")
    assert seen == {"/v1/models": 200, "/v1/completions": 200, "/health": 200, "/metrics": 200}, seen
