"""The native engine: packed NVFP4 (or plain) weights, KV slots, continuous batching in a thread.

Each step the scheduler admits waiting requests into free KV slots, runs one forward over every
running sequence (prompt chunks and decode tokens together), samples per request with its own
parameters and hands events to the asyncio side. Finished, aborted and disconnected requests leave
before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nvfp4.serve.native.detokenize import TextStream
from nvfp4.serve.native.kv_cache import KVCache
from nvfp4.serve.native.model import BatchedCausalLM, Chunk
from nvfp4.serve.native.sampling import apply_penalties, choose, make_generator, token_logprobs
from nvfp4.serve.interface import (
    ContextTooLong,
    Engine,
    EngineStats,
    EventStream,
    GenerationRequest,
    NotReady,
    QueueFull,
    SamplingParams,
    TokenEvent,
    _Channel,
)

log = logging.getLogger(__name__)
_LOAD_LOCK = threading.Lock()  # transformers' from_pretrained is not thread-safe (global meta-device init)
Loader = Callable[[], tuple[nn.Module, object]]  # -> (HF-architecture model, tokenizer)


@dataclass
class _Sequence:
    request: GenerationRequest
    channel: _Channel
    arrival: float
    stream: TextStream
    generator: torch.Generator | None
    slot: int | None = None
    computed: int = 0  # positions already in the KV cache
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    aborted: bool = False
    finished: bool = False
    queue_seconds: float | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids


class NativeEngine(Engine):
    def __init__(
        self,
        name: str,
        load: Loader,
        max_num_seqs: int = 16,
        max_queue: int = 256,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
    ):
        self.name = name
        self._load = load
        self.max_num_seqs, self.max_queue, self.prefill_chunk = max_num_seqs, max_queue, prefill_chunk
        self._requested_len = max_model_len
        self.max_model_len = max_model_len or 0
        self.tokenizer = None
        self.model: nn.Module | None = None
        self._ready = False
        self._accepting = True
        self._stop = False
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting

    async def start(self) -> None:
        model, tokenizer = await asyncio.to_thread(self._locked_load)
        self.model, self.tokenizer = model.eval(), tokenizer
        limit = getattr(model.config, "max_position_embeddings", 2048)
        self.max_model_len = min(self._requested_len or 2048, limit)
        num_layers, kv_heads, head_dim = BatchedCausalLM.kv_shape(model)
        embed = model.get_input_embeddings()
        device = next(embed.parameters()).device
        dtype = embed(torch.zeros(1, dtype=torch.long, device=device)).dtype  # the hidden states' dtype
        self.cache = KVCache(num_layers, self.max_num_seqs, kv_heads, self.max_model_len, head_dim, dtype)
        self.runner = BatchedCausalLM(model, self.cache)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._thread.start()
        await self._warm_up()
        self._ready = True

    def _locked_load(self):
        with _LOAD_LOCK:
            return self._load()

    async def _warm_up(self) -> None:
        request = GenerationRequest("warmup", [self.eos_ids[0] if self.eos_ids else 0] * 4, SamplingParams(max_tokens=2))
        async for _ in self._submit(request):
            pass

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if not self.ready:
            raise NotReady(f"model {self.name} is not ready")
        return self._submit(request)

    def _submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        needed = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids or needed > self.max_model_len:
            raise ContextTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens; the request needs "
                f"{len(request.prompt_ids)} prompt + {request.params.max_tokens} completion tokens"
            )
        seq = _Sequence(
            request=request,
            channel=_Channel(asyncio.get_running_loop()),
            arrival=time.perf_counter(),
            stream=TextStream(self.tokenizer, request.prompt_ids, request.params),
            generator=make_generator(request.params.seed),
        )
        with self._cond:
            free_slots = self.max_num_seqs - len(self._running)  # these join at the next step: not queued
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"the queue of {self.name} is full ({self.max_queue} waiting requests)")
            self._waiting.append(seq)
            self._cond.notify()
        return EventStream(self._events(seq), lambda: seq.finished or self.abort(seq))

    async def _events(self, seq: _Sequence) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await seq.channel.queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.abort(seq)

    def abort(self, seq: _Sequence) -> None:
        """Drops the request before the next step (client gone)."""
        seq.aborted = True
        with self._cond:
            self._cond.notify()

    def stats(self) -> EngineStats:
        if not hasattr(self, "cache"):
            return EngineStats(waiting=len(self._waiting))
        return EngineStats(len(self._running), len(self._waiting), self.cache.usage())

    async def close(self, drain_timeout: float = 0.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while (self._running or self._waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._cond:
            for seq in [*self._running, *self._waiting]:
                seq.aborted = True
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._running and not self._waiting:
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_aborted()
                self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as error:  # the batch's forward failed (a bug): fail its requests, never hang them
                    log.exception("engine step failed")
                    for seq in list(self._running):
                        self._finish(seq, TokenEvent(None, "", finish_reason="error", error=f"{type(error).__name__}: {error}"))
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, TokenEvent(None, "", finish_reason="abort"))

    def _drop_aborted(self) -> None:
        for seq in [s for s in self._waiting if s.aborted]:
            self._waiting.remove(seq)
            seq.finished = True
        for seq in [s for s in self._running if s.aborted]:
            self._release(seq)
            seq.finished = True

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.queue_seconds = time.perf_counter() - seq.arrival
            self._running.append(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.cache.release(seq.slot)

    def _step(self) -> None:
        decodes, prompts, budget = [], [], self.prefill_chunk
        for seq in self._running:
            if seq.computed < len(seq.prompt):  # prefill, chunked so decodes keep flowing
                if budget <= 0:
                    continue
                n = min(len(seq.prompt) - seq.computed, budget)
                budget -= n
                ids = seq.prompt[seq.computed : seq.computed + n]
                prompts.append((seq, Chunk(seq.slot, ids, seq.computed, all_logits=seq.params.prompt_logprobs is not None)))
            else:
                decodes.append((seq, Chunk(seq.slot, [seq.generated[-1]], seq.computed, decode=True)))
        members, chunks = zip(*(decodes + prompts))
        outputs = self.runner.forward(chunks)
        for seq, chunk, logits in zip(members, chunks, outputs):
            seq.computed += len(chunk.token_ids)
            try:
                if chunk.all_logits:
                    self._score_prompt(seq, chunk, logits)
                    logits = logits[-1]
                if seq.computed >= len(seq.prompt):
                    self._advance(seq, logits)
            except Exception as error:  # this request's sampling failed: it alone ends, the batch goes on
                log.exception("request %s failed", seq.request.request_id)
                self._finish(seq, TokenEvent(None, "", finish_reason="error", num_generated=len(seq.generated),
                                             error=f"{type(error).__name__}: {error}"))

    def _score_prompt(self, seq: _Sequence, chunk: Chunk, logits: torch.Tensor) -> None:
        if chunk.start == 0:
            seq.prompt_logprobs.append((None, []))
        for i, row in enumerate(logits):
            nxt = chunk.start + i + 1
            if nxt < len(seq.prompt):
                seq.prompt_logprobs.append(token_logprobs(row, seq.prompt[nxt], seq.params.prompt_logprobs))

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        params = seq.params
        if params.max_tokens == 0:  # prompt scoring only
            self._finish(seq, self._event(seq, None, "", None, "length"))
            return
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_ids)
        banned = stop_ids if len(seq.generated) < params.min_tokens else []
        raw = logits
        logits = apply_penalties(logits.clone(), params, seq.prompt + seq.generated, banned, seq.generated)
        token = choose(logits, params, seq.generator)
        seq.generated.append(token)
        chosen = token_logprobs(raw, token, params.logprobs) if params.logprobs is not None else None
        if token in stop_ids:
            self._finish(seq, self._event(seq, token, seq.stream.flush(), chosen, "stop"))
            return
        text, hit_stop = seq.stream.add(token, check_stop=len(seq.generated) >= params.min_tokens)
        if hit_stop:
            self._finish(seq, self._event(seq, token, text, chosen, "stop"))
        elif len(seq.generated) >= params.max_tokens or seq.computed + 1 >= self.max_model_len:
            self._finish(seq, self._event(seq, token, text + seq.stream.flush(), chosen, "length"))
        else:
            seq.channel.put(self._event(seq, token, text, chosen, None))

    def _event(self, seq: _Sequence, token: int | None, text: str, chosen, finish: str | None) -> TokenEvent:
        event = TokenEvent(token, text, finish_reason=finish, num_generated=len(seq.generated))
        if chosen is not None:
            event.logprob, event.top_logprobs = chosen
        if seq.queue_seconds is not None:  # first event only
            event.queue_seconds, seq.queue_seconds = seq.queue_seconds, None
            if seq.params.prompt_logprobs is not None:
                event.prompt_logprobs = seq.prompt_logprobs
        return event

    def _finish(self, seq: _Sequence, event: TokenEvent) -> None:
        with self._cond:
            self._release(seq)
            if seq in self._waiting:
                self._waiting.remove(seq)
        seq.finished = True
        seq.channel.put(event)


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
