"""Helpers for the serve tests: tiny engines and a live uvicorn server on a free port (no tests here)."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from nvfp4.serve.app import build_app
from nvfp4.serve.adapters.base import free_port  # noqa: F401 (re-exported for the tests)
from nvfp4.serve.native import NativeEngine


def wait_ready(url: str, process, deadline_s: float = 180.0) -> None:
    """Poll url/ready until 200; fail at once when the server process (a Popen) has exited."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early with {process.returncode}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {deadline_s} s")


def load_tiny(model_dir, packed: bool):
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.serve.native.loader import pack_model

    model, tokenizer, _ = load_causal_lm(model_dir)
    return (pack_model(model) if packed else model), tokenizer


def tiny_engines(model_dir, **kwargs) -> dict[str, NativeEngine]:
    return {
        "student": NativeEngine("tiny-nvfp4", lambda: load_tiny(model_dir, packed=True), **kwargs),
        "teacher": NativeEngine("tiny-bf16", lambda: load_tiny(model_dir, packed=False), **kwargs),
    }


class LiveServer:
    """uvicorn in a thread (vLLM's RemoteOpenAIServer, in process): polls /health, then /ready."""

    def __init__(self, app, wait_ready: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app, self.wait_ready = app, wait_ready
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    def __enter__(self) -> LiveServer:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self._poll("/health")
        if self.wait_ready:
            self._poll("/ready")
        return self

    def _poll(self, path: str, deadline_s: float = 120.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("server exited early")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not OK after {deadline_s} s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def openai(self, api_key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_openai(self, api_key: str = "none"):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def serve_tiny(model_dir, api_key: str | None = None, **kwargs) -> LiveServer:
    return LiveServer(build_app(tiny_engines(model_dir, **kwargs), api_key=api_key))


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    for line in text.splitlines():
        if line.startswith(name + "{") and line.split("}")[0][len(name) + 1 :] == want:
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
