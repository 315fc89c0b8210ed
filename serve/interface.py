"""What every engine (native or adapter) takes and yields: requests, sampling params, token events."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nvfp4.serve.structured import Constraint

GREEDY_BELOW = 1e-5  # a temperature under this samples as greedy (1/T overflows the logits long before 0)
PENALTY_RANGE = (1e-2, 1e2)  # repetition penalties are clamped into it: the penalised logits stay finite


class EngineError(Exception):
    """Base of the errors an engine raises for a request; the HTTP layer maps each to a status."""

    status = 500


class EngineStartError(RuntimeError):
    """An engine could not start (its process exited, or it was not ready in time): serve's own type, so
    that callers (the adapters' restart loop, the app's start-up) can tell a failed start from a bug."""


class QueueFull(EngineError):
    status = 429
    retry_after_s = 1


class NotReady(EngineError):
    status = 503


class ContextTooLong(EngineError):
    status = 400


class InvalidPrompt(EngineError):
    """A prompt the model cannot take (a token id past its embedding)."""

    status = 400


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens; 0 only scores the prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's rule, over the generated tokens
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = off, k = chosen token + k alternatives
    prompt_logprobs: int | None = None  # echo scoring: logprob of every prompt token
    constraint: Constraint | None = None  # the output's grammar (structured outputs, forced tool calls)

    def __post_init__(self):
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        low, high = PENALTY_RANGE
        self.repetition_penalty = min(max(self.repetition_penalty, low), high)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class TokenEvent:
    """One step of one request. `text` is the new, stop-checked text (may be empty while held back)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last event
    error: str | None = None  # with finish_reason "error": what failed (this request alone)
    error_status: int | None = None  # with finish_reason "error": 400 where the request was at fault (else a 500)
    num_generated: int = 0  # tokens generated so far (exact usage count)
    queue_seconds: float | None = None  # set on the first event: time spent waiting for a slot
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None  # first event, echo only


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV cache positions in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (a counter, as vLLM's)
    prefix_cache_hits: int = 0  # of them, tokens found cached (their prefill skipped)


class Engine(ABC):
    """The interface the HTTP layer needs; `serve/adapters/` adapters implement the same one.

    `generate` raises QueueFull / NotReady / ContextTooLong before yielding; closing the iterator
    (client gone, started or not) cancels the request.
    """

    name: str  # the real model name (served under an alias too)
    tokenizer: object
    max_model_len: int
    facts: dict = {}  # scheme, weight_bytes, heldout_kl of the served checkpoint (from report.json), if known

    def card(self) -> dict:
        """What /v1/models shows under `nvfp4`: the facts, and the chat template once the tokenizer is loaded
        (the UI scores a transcript in it)."""
        template = getattr(self.tokenizer, "chat_template", None)
        tokens = (
            {"chat_template": template, "bos_token": self.tokenizer.bos_token, "eos_token": self.tokenizer.eos_token}
            if isinstance(template, str)
            else {}
        )
        return {**self.facts, **tokens}

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    async def start(self) -> None:
        """Load and warm up; `ready` turns true at the end."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    @abstractmethod
    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, let running requests finish for up to drain_timeout s, then abort the rest."""

    def token_id_limit(self) -> int:
        """Prompt token ids must be below it: the tokenizer's size, unless the engine knows its model's."""
        return len(self.tokenizer)

    def stats(self) -> EngineStats:
        return EngineStats()


class EventStream:
    """A request's events; aclose() cancels the request whether or not iteration has started (an async
    generator that never started skips its `finally`, which would leave the request queued)."""

    def __init__(self, events: AsyncIterator[TokenEvent], cancel: Callable[[], None]):
        self._events, self._cancel, self._closed = events, cancel, False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel()
            await self._events.aclose()


@dataclass
class _Channel:
    """Hands events from the engine thread to the request's asyncio consumer."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
