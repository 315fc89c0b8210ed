"""Serve helpers: tiny engines, a live uvicorn server on a free port, a scripted fake engine, greedy parity."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import httpx
import torch
import uvicorn

from nvfp4.serve.adapters.base import UpstreamError, free_port  # noqa: F401 (free_port: re-exported for the tests)
from nvfp4.serve.app import build_app
from nvfp4.serve.interface import (
    Engine,
    EngineStats,
    EventStream,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
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


async def generate_tokens(engine, ids, n, delay=0.0, **params) -> tuple[list[int], str]:
    await asyncio.sleep(delay)
    tokens, text = [], ""
    # min_tokens masks EOS as transformers' min_new_tokens does
    request = GenerationRequest(
        "t", ids, SamplingParams(**{"max_tokens": n, "temperature": 0, "min_tokens": n, **params})
    )
    async for event in engine.generate(request):
        tokens.append(event.token_id)
        text += event.text
    return tokens, text


def greedy_reference(model, ids, n) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[
        0, len(ids) :
    ].tolist()


def check_parity(model, tokenizer, prompts, n, max_num_seqs=4, prefill_chunk=512):
    """Requests arriving at staggered times (joining a running batch, long prompts chunked) = HF generate alone."""

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk)
        await engine.start()
        try:
            return await asyncio.gather(*(generate_tokens(engine, p, n, delay=0.02 * i) for i, p in enumerate(prompts)))
        finally:
            await engine.close()

    for ids, (tokens, text) in zip(prompts, asyncio.run(run())):
        expected = greedy_reference(model, ids, n)
        assert tokens == expected
        assert text == tokenizer.decode(expected, skip_special_tokens=True)


class CharTokenizer:
    """Characters are tokens (ids = code points); enough for routes, templates and stop strings."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
    bos_token, eos_token, eos_token_id = "<s>", "</s>", 0
    specials = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")

    def __len__(self) -> int:
        return 0x110000 + len(self.specials)

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            if special and not split_special_tokens:
                ids.append(0x110000 + self.specials.index(special))
                i += len(special)
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int], **_) -> str:
        return "".join(self.specials[t - 0x110000] if t >= 0x110000 else chr(t) for t in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **extra) -> str:
        from jinja2 import Template

        return Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **extra
        )


class FakeEngine(Engine):
    """Yields `reply` one character a step; `fail_after` raises UpstreamError after that many events (a proxied
    engine dying mid-stream); `full_after` raises QueueFull on that submission. Tracks what is still open."""

    def __init__(
        self,
        reply: str = "hello world",
        delay: float = 0.0,
        fail_after: int | None = None,
        full_after: int | None = None,
        finish: str = "length",
    ):
        self.name, self.tokenizer, self.max_model_len = "fake", CharTokenizer(), 4096
        self.finish = finish  # the last event's finish_reason
        self.reply, self.delay, self.fail_after, self.full_after = reply, delay, fail_after, full_after
        self.submitted: list[GenerationRequest] = []
        self.open: set[str] = set()

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self, drain_timeout: float = 0.0) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.open))

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.full_after is not None and len(self.submitted) >= self.full_after:
            raise QueueFull("full")
        self.submitted.append(request)
        self.open.add(request.request_id)
        return EventStream(self._events(request), lambda: self.open.discard(request.request_id))

    async def _events(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        text = self.reply[: request.params.max_tokens]
        for i, char in enumerate(text):
            if self.fail_after is not None and i == self.fail_after:
                raise UpstreamError(502, "the engine went away")
            await asyncio.sleep(self.delay)
            last = i == len(text) - 1
            yield TokenEvent(ord(char), char, finish_reason=(self.finish if last else None), num_generated=i + 1)
        self.open.discard(request.request_id)


# Qwen2.5's tool-calling chat template, abridged (its tool prompt, <tool_call> calls and <tool_response> answers)
QWEN_TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}{% for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def load_with_template(model_dir, chat_template: str):
    """The tiny model (unpacked) with another chat template."""
    model, tokenizer = load_tiny(model_dir, packed=False)
    tokenizer.chat_template = chat_template
    return model, tokenizer
