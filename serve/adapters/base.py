"""A real engine's OpenAI server as a child process, behind our Engine interface.

`ProxyEngine` starts the engine server on a free local port (under `nvfp4.serve.adapters.reaper`, so no
engine process outlives ours), waits for its readiness, restarts it with backoff when it dies
(`ready` is false meanwhile, so /ready answers 503), and turns each GenerationRequest into one
streamed /v1/completions call whose chunks become TokenEvents as they arrive. Our routes,
aliases and metrics therefore stay the same for every engine; the engine's own /metrics is
fetched on demand for /metrics/engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from nvfp4.serve.interface import (
    Engine,
    EngineError,
    EngineStartError,
    EngineStats,
    GenerationRequest,
    NotReady,
    SamplingParams,
    TokenEvent,
)

log = logging.getLogger(__name__)
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


class UpstreamError(EngineError):
    """An error answer of the engine server, with its status (the message keeps its text)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_message(status: int, body: bytes) -> str:
    """The message of an OpenAI-shaped (or FastAPI `detail`) error body, else the raw text."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body.decode(errors="replace")[:500] or f"engine answered HTTP {status}"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(data)


class ProxyEngine(Engine):
    """Subclasses say how to start the engine and how to phrase a request for it."""

    kind = "engine"  # engine name in logs and errors
    health_path = "/health"
    metrics_path: str | None = "/metrics"
    stats_series: dict[str, str] = {}  # EngineStats field -> the engine's own gauge, polled from metrics_path
    fails_after_submit = True  # errors arrive with the engine's answer: the app waits for it before a 200

    def __init__(
        self,
        name: str,
        model: str,
        tokenizer,
        max_model_len: int,
        *,
        executable: str | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 600.0,
        env: dict[str, str] | None = None,
        max_num_seqs: int = 16,
    ):
        self.name, self.model, self.tokenizer, self.max_model_len = name, model, tokenizer, max_model_len
        self.executable = executable or sys.executable  # what command() runs: the engine's binary, or a Python
        self.extra_args, self.ready_timeout, self.env = tuple(extra_args), ready_timeout, env or {}
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0
        self._ready = False
        self._closing = False
        self._inflight = 0  # sent to the engine
        self._waiting = 0  # admitted by the app, waiting here for one of the max_num_seqs upstream slots
        self.max_num_seqs = max_num_seqs
        self._slots = asyncio.Semaphore(max_num_seqs)  # binds to the running loop on first use
        self._watcher: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._stats = EngineStats()
        # a new file only we can read, never one someone placed (or linked) at a guessable name
        handle, path = tempfile.mkstemp(prefix=f"nvfp4-{self.kind}-", suffix=".log")
        os.close(handle)
        self.log_path = Path(path)

    # --- what an engine subclass provides -------------------------------------------------------
    @classmethod
    def for_student(cls, out: Path, name: str, opts) -> ProxyEngine:
        """The engine on OUT's student in this engine's format (opts: adapters.EngineOptions)."""
        raise NotImplementedError

    @classmethod
    def for_teacher(cls, source: str | None, name: str, opts) -> ProxyEngine | None:
        """The engine on the teacher (None = the embedded default), or None where it cannot read its format."""
        raise NotImplementedError

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- Engine interface -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None, pool=None),
            limits=httpx.Limits(max_connections=self.max_num_seqs + 4),
        )
        await self._launch()
        self._watcher = asyncio.create_task(self._watch())
        self._poller = asyncio.create_task(self._poll_stats()) if self.stats_series else None

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if not self.ready:
            raise NotReady(f"the {self.kind} engine process for `{self.name}` is not ready")
        if request.params.prompt_logprobs is not None:
            raise UpstreamError(400, f"echo with logprobs is not supported on --engine {self.kind}")
        return self._stream(request)

    def stats(self) -> EngineStats:
        """Running = our in-flight requests; waiting and KV use come from the engine where it exports them."""
        return EngineStats(
            running=self._inflight,
            waiting=self._waiting + self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
        )

    async def close(self, drain_timeout: float = 0.0) -> None:
        self._closing = True
        deadline = time.monotonic() + drain_timeout
        while (self._inflight or self._waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in (self._watcher, self._poller):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self._stop_process)
        if self._client is not None:
            await self._client.aclose()

    async def engine_metrics(self) -> str:
        """The engine's own Prometheus exposition (empty when it has none or is down)."""
        if self.metrics_path is None or not self.ready or self._client is None:
            return ""
        try:
            response = await self._client.get(self.url + self.metrics_path)
        except httpx.HTTPError:
            return ""
        return response.text if response.status_code == 200 else ""

    async def _poll_stats(self, period_s: float = 2.0) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        while not self._closing:
            await asyncio.sleep(period_s)
            try:
                text = await self.engine_metrics()
                values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            except ValueError:  # not Prometheus text: keep the last values
                continue
            for field, series in self.stats_series.items():
                if series in values:
                    setattr(self._stats, field, values[series])

    # --- process lifecycle ----------------------------------------------------------------------
    def _spawn(self) -> None:
        self.port = free_port()
        argv = self.command(self.port)
        log.info("starting %s: %s", self.kind, " ".join(argv))
        # PYTHONSAFEPATH: a `python -m` engine never imports from the working directory (a source checkout's
        # top-level kernels/ would shadow Hugging Face's `kernels`, which transformers imports)
        env = {**os.environ, **self.env, "NVFP4_REAPER_PARENT": str(os.getpid()), "PYTHONSAFEPATH": "1"}
        logfile = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nvfp4.serve.adapters.reaper", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
        finally:
            logfile.close()

    async def _launch(self) -> None:
        self._spawn()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineStartError(
                    f"{self.kind} exited with code {self.process.returncode} before it was ready; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if (await self._client.get(self.url + self.health_path, timeout=2.0)).status_code == 200:
                    self._ready = True
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
        await asyncio.to_thread(self._stop_process)
        raise EngineStartError(
            f"{self.kind} not ready after {self.ready_timeout:.0f} s; log: {self.log_path}\n{self.log_tail()}"
        )

    async def _watch(self) -> None:
        """Restart a dead engine with exponential backoff; healthy for a minute resets the backoff."""
        failures, healthy_since = 0, time.monotonic()
        while not self._closing:
            await asyncio.sleep(0.25)
            if self.process.poll() is None:
                if time.monotonic() - healthy_since > 60:
                    failures = 0
                continue
            self._ready = False
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            log.error(
                "%s for %s exited with code %s; restarting in %.0f s",
                self.kind,
                self.name,
                self.process.returncode,
                delay,
            )
            await asyncio.sleep(delay)
            try:
                await self._launch()
                self.restarts += 1
                healthy_since = time.monotonic()
                log.info("%s for %s is back (restart %d)", self.kind, self.name, self.restarts)
            except EngineStartError as error:
                log.error("restarting %s failed: %s", self.kind, error)
            failures += 1

    def _stop_process(self) -> None:
        process, self._ready = self.process, False
        if process is None or process.poll() is not None:
            return
        process.terminate()  # the reaper ends the engine's whole process group
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- proxying -------------------------------------------------------------------------------
    async def _stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        body = {**self.request_body(request.prompt_ids, request.params), "stream": True}
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._inflight += 1
        answered = False
        try:
            async with self._client.stream("POST", self.url + "/v1/completions", json=body) as response:
                answered = True
                if response.status_code != 200:
                    raise UpstreamError(
                        response.status_code, error_message(response.status_code, await response.aread())
                    )
                async for event in self._events(response, request.params):
                    yield event
        except httpx.TransportError as error:
            if answered:  # it answered, then cut the stream (llama-cpp-python does, at times, on a failed generation)
                raise self._unfinished(type(error).__name__) from error
            raise NotReady(
                f"the {self.kind} engine process for `{self.name}` went away: {type(error).__name__}"
            ) from error
        finally:
            self._inflight -= 1
            self._slots.release()

    async def _events(self, response: httpx.Response, params: SamplingParams) -> AsyncIterator[TokenEvent]:
        generated, held = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise UpstreamError(int(chunk["error"].get("code") or 500), error_message(500, data.encode()))
            if chunk.get("usage") and held is not None:
                held.num_generated = chunk["usage"].get("completion_tokens", held.num_generated)
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or ""
                generated += bool(text)  # one token a chunk; the usage chunk (where sent) corrects the total
                event = TokenEvent(None, text, finish_reason=choice.get("finish_reason"), num_generated=generated)
                if event.finish_reason:
                    if event.finish_reason == "length":
                        event.num_generated = params.max_tokens
                    held = event  # wait for the usage chunk (exact token count) before the last event
                else:
                    yield event
        if held is None:  # e.g. llama-cpp-python answers 200 and then an empty stream when generation fails
            raise self._unfinished()
        yield held

    def _unfinished(self, cause: str = "") -> UpstreamError:
        how = f" ({cause})" if cause else ""
        log.warning(
            "%s ended a stream unfinished%s; its log: %s", self.kind, how, self.log_path
        )  # clients never see paths
        return UpstreamError(502, f"the {self.kind} engine ended the stream without finishing the request{how}")
