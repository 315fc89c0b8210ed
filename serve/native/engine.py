"""The native engine: packed NVFP4 (or plain) weights, KV slots, continuous batching in a thread.

Each step the scheduler admits waiting requests into free KV slots, runs one decode step for every
sequence past its prompt and one prefill for the prompt chunks, samples every request at once (each
with its own parameters) and hands events to the asyncio side. Finished, aborted and disconnected
requests leave before the next step.
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

from nvfp4.serve.interface import (
    ContextTooLong,
    Engine,
    EngineStats,
    EventStream,
    GenerationRequest,
    InvalidPrompt,
    NotReady,
    QueueFull,
    SamplingParams,
    TokenEvent,
    _Channel,
)
from nvfp4.serve.native.detokenize import TextStream
from nvfp4.serve.native.kv_cache import BLOCK_SIZE, KVCache, PrefixCache, block_hashes
from nvfp4.serve.native.model import BatchedCausalLM, Chunk
from nvfp4.serve.native.sampling import apply_penalties, make_generator, needs_penalties, sample, token_logprobs
from nvfp4.serve.structured import GrammarStuck, Guide

log = logging.getLogger(__name__)
_FAILED = object()  # what _guarded returns for a request that failed
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
    block_keys: list[bytes] = field(default_factory=list)  # the prompt's full blocks, for the prefix cache
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    aborted: bool = False
    finished: bool = False
    queue_seconds: float | None = None
    guide: Guide | None = None  # the output's grammar (structured outputs, forced tool calls)

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
        compile: bool = False,
        prefix_caching: bool = True,
        prefix_cache_tokens: int | None = None,
    ):
        """prefix_cache_tokens: the prefix pool's size (None: a quarter of the slots' positions, at least one
        max_model_len)."""
        self.name = name
        self._load = load
        self.compile = compile
        self.prefix_caching, self._prefix_cache_tokens = prefix_caching, prefix_cache_tokens
        self.prefix_cache: PrefixCache | None = None
        self.max_num_seqs, self.max_queue, self.prefill_chunk = max_num_seqs, max_queue, prefill_chunk
        self._requested_len = max_model_len
        self.max_model_len = max_model_len or 0
        self.embedding_rows = 0  # the model's, once loaded: prompt token ids stay below it
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
        """Load and start the engine thread; that one thread does all of this model's torch work (loading
        included): OpenMP gives each thread that computes its own pool, and beyond one worker per core the
        pools stop spinning between kernels (decode measured 1.6x slower)."""
        loaded = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name=f"engine-{self.name}", daemon=True)
        self._thread.start()
        await loaded
        await self._warm_up()
        self._ready = True

    def _run(self, loaded: asyncio.Future) -> None:
        loop = loaded.get_loop()
        try:
            self._set_up()
        except BaseException as error:
            loop.call_soon_threadsafe(lambda failure=error: loaded.done() or loaded.set_exception(failure))
            return
        loop.call_soon_threadsafe(lambda: loaded.done() or loaded.set_result(None))
        self._loop()

    def _set_up(self) -> None:
        with _LOAD_LOCK:
            model, tokenizer = self._load()
        self.model, self.tokenizer = model.eval(), tokenizer
        limit = getattr(model.config, "max_position_embeddings", 2048)
        self.max_model_len = min(self._requested_len or 2048, limit)
        num_layers, kv_heads, head_dim = BatchedCausalLM.kv_shape(model)
        embed = model.get_input_embeddings()
        self.embedding_rows = getattr(embed, "num_embeddings", None) or next(embed.parameters()).shape[0]
        device = next(embed.parameters()).device
        dtype = embed(torch.zeros(1, dtype=torch.long, device=device)).dtype  # the hidden states' dtype
        self.cache = KVCache(num_layers, self.max_num_seqs, kv_heads, self.max_model_len, head_dim, dtype, device)
        self.runner = BatchedCausalLM(model, self.cache)
        if self.prefix_caching:
            tokens = self._prefix_cache_tokens or max(self.max_model_len, self.max_num_seqs * self.max_model_len // 4)
            self.prefix_cache = PrefixCache(self.cache, tokens // BLOCK_SIZE)
        if self.compile:
            self.runner.compile()
        self.eos_ids = _eos_ids(model, tokenizer)

    async def _warm_up(self) -> None:
        """Two short requests: a prefill, decode steps of two sequences and of one (a compiled decode step builds
        its graphs for one and for several sequences here, not on a client's request)."""

        async def one(max_tokens: int) -> None:
            prompt = [self.eos_ids[0] if self.eos_ids else 0] * 4
            async for _ in self._submit(
                GenerationRequest("warmup", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            ):
                pass

        await asyncio.gather(*(one(3 + i) for i in range(min(2, self.max_num_seqs))))

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
        if not 0 <= min(request.prompt_ids) <= max(request.prompt_ids) < self.embedding_rows:
            # never past the embedding: on CUDA such an index fails the device for every request
            raise InvalidPrompt(f"prompt token ids must be in [0, {self.embedding_rows})")
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

    def token_id_limit(self) -> int:
        return self.embedding_rows

    def stats(self) -> EngineStats:
        if not hasattr(self, "cache"):
            return EngineStats(waiting=len(self._waiting))
        pool = self.prefix_cache
        return EngineStats(
            len(self._running),
            len(self._waiting),
            self.cache.usage(),
            prefix_cache_queries=pool.queries if pool else 0,
            prefix_cache_hits=pool.hits if pool else 0,
        )

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
                        self._finish(
                            seq, TokenEvent(None, "", finish_reason="error", error=f"{type(error).__name__}: {error}")
                        )
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
            if self.prefix_cache is not None:
                self._guarded(seq, self._reuse_prefix, seq)

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """The prompt's cached leading blocks into the sequence's slot: its prefill starts after them. A request for
        prompt logprobs computes its whole prompt (a cached block has no logits), as vLLM does."""
        seq.block_keys = block_hashes(seq.prompt)
        if seq.params.prompt_logprobs is None:
            seq.computed = self.prefix_cache.load(seq.slot, seq.block_keys, len(seq.prompt))

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.cache.release(seq.slot)

    def _step(self) -> None:
        members, chunks, logits, spans = self._forward(self._chunks())
        choosing = []  # (sequence, its logits row) for every sequence past its prompt
        for seq, chunk, span in zip(members, chunks, spans):
            seq.computed += len(chunk.token_ids)
            if not chunk.decode and self.prefix_cache and self._guarded(seq, self._keep_prefix, seq) is _FAILED:
                continue
            if chunk.all_logits and self._guarded(seq, self._score_prompt, seq, chunk, logits[span]) is _FAILED:
                continue
            if seq.computed >= len(seq.prompt):
                if seq.params.max_tokens == 0:  # prompt scoring only
                    self._finish(seq, self._event(seq, None, "", None, "length"))
                else:
                    choosing.append((seq, span.stop - 1))
        if choosing:
            self._choose(choosing, logits)

    def _keep_prefix(self, seq: _Sequence) -> None:
        self.prefix_cache.store(seq.slot, seq.block_keys, seq.computed)

    def _chunks(self) -> list[tuple[_Sequence, Chunk]]:
        """This step's work: a decode chunk for every sequence past its prompt (first), then prompt chunks within
        the prefill budget."""
        decodes, prompts, budget = [], [], self.prefill_chunk
        for seq in self._running:
            if seq.computed < len(seq.prompt):  # prefill, chunked so decodes keep flowing
                if budget <= 0:
                    continue
                n = min(len(seq.prompt) - seq.computed, budget)
                budget -= n
                ids = seq.prompt[seq.computed : seq.computed + n]
                prompts.append(
                    (seq, Chunk(seq.slot, ids, seq.computed, all_logits=seq.params.prompt_logprobs is not None))
                )
            else:
                decodes.append((seq, Chunk(seq.slot, [seq.generated[-1]], seq.computed, decode=True)))
        return decodes + prompts

    def _forward(self, work: list[tuple[_Sequence, Chunk]]) -> tuple[list, list, torch.Tensor, list[slice]]:
        """One forward for every chunk -> (sequences, chunks, logits, each chunk's rows). Should it fail, each chunk
        alone, so that only a sequence whose own forward fails ends (the KV positions a failed forward wrote are
        written again, with the same values)."""
        members, chunks = (list(column) for column in zip(*work))
        try:
            logits, spans = self.runner.forward(chunks)
            return members, chunks, logits, spans
        except Exception:
            log.exception("a forward of %d sequences failed; running them one by one", len(chunks))
        kept, parts, spans, rows = [], [], [], 0
        for seq, chunk in work:
            result = self._guarded(seq, self.runner.forward, [chunk])
            if result is not _FAILED:
                logits, (span,) = result
                kept.append((seq, chunk))
                parts.append(logits)
                spans.append(slice(span.start + rows, span.stop + rows))
                rows += len(logits)
        members, chunks = ([s for s, _ in kept], [c for _, c in kept])
        return members, chunks, torch.cat(parts) if parts else torch.empty(0), spans

    def _guarded(self, seq: _Sequence, fn, *args):
        """fn(*args) for one request; if it fails, that request alone ends (with the error), the batch goes on, and
        the result is _FAILED."""
        try:
            return fn(*args)
        except Exception as error:
            log.exception("request %s failed", seq.request.request_id)
            self._fail(seq, f"{type(error).__name__}: {error}")
            return _FAILED

    def _fail(self, seq: _Sequence, error: str, status: int | None = None) -> None:
        """End `seq` alone with an error (`status`: a client's mistake's HTTP status; None: the engine's failure)."""
        event = TokenEvent(
            None, "", finish_reason="error", num_generated=len(seq.generated), error=error, error_status=status
        )
        self._finish(seq, event)

    def _choose(self, choosing: list[tuple[_Sequence, int]], logits: torch.Tensor) -> None:
        """Next tokens for every sequence at once: penalties on the rows that have them, then one batched sampler;
        should the batch fail, each row alone, so that only the failing request ends."""
        raw = {}  # rows before penalties, for the logprobs of penalised requests
        ready = []
        for seq, row in choosing:
            params = seq.params
            banned = self._stop_ids(params) if len(seq.generated) < params.min_tokens else []
            if needs_penalties(params, banned):
                if params.logprobs is not None:
                    raw[row] = logits[row].clone()
                if self._guarded(seq, self._penalise, logits, row, seq, banned) is _FAILED:
                    continue
            if params.constraint is not None:
                if params.logprobs is not None and row not in raw:
                    raw[row] = logits[row].clone()
                if self._guarded(seq, self._constrain, logits, row, seq) is not True:  # failed, or finished
                    continue
            ready.append((seq, row))
        if not ready:
            return
        rows = [row for _, row in ready]
        try:
            tokens = sample(logits[rows], [s.params for s, _ in ready], [s.generator for s, _ in ready])
        except Exception:
            tokens = [
                self._guarded(seq, sample, logits[row][None], [seq.params], [seq.generator]) for seq, row in ready
            ]
            tokens = [t if t is _FAILED else t[0] for t in tokens]
        for (seq, row), token in zip(ready, tokens):
            if token is not _FAILED:
                self._guarded(seq, self._advance, seq, token, raw.get(row, logits[row]))

    def _constrain(self, logits: torch.Tensor, row: int, seq: _Sequence) -> bool:
        """Mask the row to the tokens the sequence's grammar allows; False (the sequence finished) once its grammar
        has ended on a token that is no stop token here (ignore_eos)."""
        if seq.guide is None:
            stops = tuple(self._stop_ids(seq.params) or self.eos_ids)
            seq.guide = Guide(self.tokenizer, logits.shape[-1], stops, seq.params.constraint)
        if seq.guide.done:
            self._finish(seq, self._event(seq, None, seq.stream.flush(), None, "stop"))
            return False
        try:
            seq.guide.mask(logits[row])
        except GrammarStuck as error:  # the client's grammar, not a failure of the engine
            self._fail(seq, str(error), error.status)
            return False
        return True

    def _penalise(self, logits: torch.Tensor, row: int, seq: _Sequence, banned: list[int]) -> None:
        logits[row] = apply_penalties(logits[row], seq.params, seq.prompt + seq.generated, banned, seq.generated)

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        return list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_ids)

    def _score_prompt(self, seq: _Sequence, chunk: Chunk, logits: torch.Tensor) -> None:
        if chunk.start == 0:
            seq.prompt_logprobs.append((None, []))
        for i, row in enumerate(logits):
            nxt = chunk.start + i + 1
            if nxt < len(seq.prompt):
                seq.prompt_logprobs.append(token_logprobs(row, seq.prompt[nxt], seq.params.prompt_logprobs))

    def _advance(self, seq: _Sequence, token: int, raw: torch.Tensor) -> None:
        params = seq.params
        if seq.guide is not None and not seq.guide.accept(token):
            raise RuntimeError(f"the grammar refused the sampled token {token}")
        seq.generated.append(token)
        chosen = token_logprobs(raw, token, params.logprobs) if params.logprobs is not None else None
        if token in self._stop_ids(params):
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
