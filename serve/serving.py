"""Chat and completion serving: a request becomes a Job of n choices per prompt on an engine, answered as one
JSON body or as an SSE stream; every exit path of a request closes its job (its choices leave the engine)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nvfp4.serve.interface import Engine, GenerationRequest, SamplingParams, TokenEvent
from nvfp4.serve.limits import Admission, Limits
from nvfp4.serve.metrics import RequestTimer, ServerMetrics
from nvfp4.serve.prompts import (
    PromptEncoder,
    chat_prompt,
    check_chat_fits,
    check_completion_fits,
    completion_prompts,
    on_prompt_workers,
)
from nvfp4.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    error_body,
    make_id,
    now,
)
from nvfp4.serve.structured import Constraint, ConstraintError, can_compile_for, check, compile_constraint
from nvfp4.serve.tools import ToolPlan, tool_plan

log = logging.getLogger(__name__)
_CONSTRAINT_PARAM = {"regex": "structured_outputs", "choice": "structured_outputs", "grammar": "structured_outputs"}


class ServingChat:
    """POST /v1/chat/completions: checked against the context, admitted, the chat template rendered on the prompt
    workers, then one job."""

    def __init__(self, metrics: ServerMetrics, limits: Limits):
        self.metrics, self.limits = metrics, limits

    async def create(
        self, body: ChatCompletionRequest, alias: str, engine: Engine, admission: Admission, request: Request
    ) -> Response:
        _check_limits(self.limits, body, 1)
        check_chat_fits(engine, body)
        arrival = time.perf_counter()

        async def job() -> Job:
            prompt, plan, constraint = await on_prompt_workers(_chat_inputs, engine, body)
            return Job(
                self.metrics,
                engine,
                alias,
                body,
                [prompt],
                chat=True,
                admission=admission,
                arrival=arrival,
                constraint=constraint,
                tool_plan=plan,
            )

        return await _serve(await _admitted(admission, body.n, job), request)


class ServingCompletion:
    """POST /v1/completions: one or more prompts (text or token ids), checked against the context, admitted,
    tokenized on the prompt workers."""

    def __init__(self, metrics: ServerMetrics, limits: Limits):
        self.metrics, self.limits = metrics, limits

    async def create(
        self, body: CompletionRequest, alias: str, engine: Engine, admission: Admission, request: Request
    ) -> Response:
        _check_limits(self.limits, body, body.prompt_count())
        check_completion_fits(engine, body)
        arrival = time.perf_counter()

        async def job() -> Job:
            prompts, constraint = await on_prompt_workers(_completion_inputs, engine, body)
            return Job(
                self.metrics,
                engine,
                alias,
                body,
                prompts,
                chat=False,
                admission=admission,
                arrival=arrival,
                constraint=constraint,
            )

        return await _serve(await _admitted(admission, body.prompt_count() * body.n, job), request)


class ServingTokenization:
    """vLLM's POST /tokenize and /detokenize: the ids the completion or chat routes would send the model (a text
    that cannot fit the context is refused before any tokenizing), and the text of ids; on the prompt workers."""

    async def tokenize(self, body: TokenizeRequest, engine: Engine) -> TokenizeResponse:
        if body.messages is not None:
            check_chat_fits(engine, body)
        else:
            check_completion_fits(engine, body)
        ids = await on_prompt_workers(_tokenized, engine, body)
        strs = await on_prompt_workers(_token_strs, engine.tokenizer, ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest, engine: Engine) -> DetokenizeResponse:
        limit = engine.token_id_limit()
        if body.tokens and not 0 <= min(body.tokens) <= max(body.tokens) < limit:
            raise APIError(400, f"token ids must be in [0, {limit})", "tokens", "invalid_token_id")
        if len(body.tokens) > engine.max_model_len:
            raise APIError(
                400,
                f"at most {engine.max_model_len} token ids (the context length)",
                "tokens",
                "context_length_exceeded",
            )
        return DetokenizeResponse(prompt=await on_prompt_workers(engine.tokenizer.decode, body.tokens))


def _tokenized(engine: Engine, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return chat_prompt(engine, body, add_generation_prompt=body.add_generation_prompt)
    return PromptEncoder(engine.tokenizer).encode(body.prompt, add_special_tokens=body.add_special_tokens)


def _token_strs(tokenizer, ids: list[int]) -> list[str]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(token) for token in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([token]) for token in ids]


async def _admitted(admission: Admission, choices: int, make_job) -> Job:
    """Admission before any rendering or tokenizing (a full model answers 429 having done no work); the choices
    go back if no job comes of it (a prompt refused, a client gone meanwhile)."""
    admission.take(choices)
    try:
        return await make_job()
    except BaseException:
        admission.give_back(choices)
        raise


def _chat_inputs(engine: Engine, body: ChatCompletionRequest) -> tuple[list[int], ToolPlan | None, Constraint | None]:
    """On a prompt worker: the tool plan, the output's constraint (checked, compiled ahead for the engine) and the
    prompt (with the tools where the template shows them)."""
    plan = tool_plan(body, getattr(engine.tokenizer, "chat_template", None))
    constraint = body.output_constraint()
    if plan is not None and plan.constraint is not None:
        if constraint is not None:
            raise APIError(
                400,
                f"tool_choice {plan.mode} constrains the output already: send no `response_format` "
                "or structured output beside it",
                "tool_choice",
            )
        constraint = plan.constraint
    _prepare(engine, constraint)
    return chat_prompt(engine, body, plan.tools if plan else None), plan, constraint


def _completion_inputs(engine: Engine, body: CompletionRequest) -> tuple[list[list[int]], Constraint | None]:
    constraint = body.output_constraint()
    _prepare(engine, constraint)
    return completion_prompts(engine, body), constraint


def _prepare(engine: Engine, constraint: Constraint | None) -> None:
    """A spec that makes no grammar is a 400 on every engine; for the native engine (the one that constrains
    decoding itself) the grammar is compiled here, off its thread (cached per spec)."""
    if constraint is None:
        return
    try:
        if not getattr(engine, "fails_after_submit", False) and can_compile_for(engine.tokenizer):
            compile_constraint(engine.tokenizer, engine.token_id_limit(), constraint)
        else:
            check(constraint)
    except ConstraintError as error:
        raise APIError(400, str(error), _CONSTRAINT_PARAM.get(constraint.kind, "response_format")) from error


def _check_limits(limits: Limits, body, prompts: int) -> None:
    """Before any tokenization: the request's choices and stop strings within the server's limits."""
    if prompts * body.n > limits.max_choices:
        raise APIError(
            400,
            f"{prompts} prompt(s) x n={body.n} is over the limit of {limits.max_choices} choices "
            f"per request (--max-choices)",
            "n",
            "too_many_choices",
        )
    if any(len(stop) > limits.max_stop_chars for stop in body.stops()):
        raise APIError(400, f"a stop string is over the limit of {limits.max_stop_chars} characters", "stop")


class Job:
    """One HTTP request: n choices per prompt, each a generation on the engine."""

    def __init__(
        self,
        metrics,
        engine: Engine,
        alias: str,
        body,
        prompts: list[list[int]],
        chat: bool,
        admission: Admission,
        arrival: float,
        constraint: Constraint | None = None,
        tool_plan: ToolPlan | None = None,
    ):
        """`admission` holds this job's choices already; close() gives them back."""
        self.constraint, self.tool_plan = constraint, tool_plan
        self.held_text: dict[int, tuple[str, int]] = {}  # choice -> (its text so far, characters sent), with tools
        self.metrics, self.engine, self.alias, self.body, self.prompts, self.chat = (
            metrics,
            engine,
            alias,
            body,
            prompts,
            chat,
        )
        self.id = make_id("chatcmpl" if chat else "cmpl")
        self.created, self.arrival = now(), arrival
        self.logprobs = body.logprob_count() if chat else body.logprobs
        self.echo = (not chat) and body.echo
        self.params = [self._params(p, i) for p in prompts for i in range(body.n)]
        self.token_text: dict[int, str] = {}
        self.streams: list = []  # the engine's, for close()
        self.admission: Admission | None = admission

    def _params(self, prompt: list[int], index: int) -> SamplingParams:
        room = self.engine.max_model_len - len(prompt)
        limit = self.body.limit() if self.chat else self.body.max_tokens
        if room < (1 if limit is None else limit) or room <= 0:
            raise APIError(
                400,
                f"this model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                f"{len(prompt)} tokens and {limit or 1} completion tokens were requested",
                "messages" if self.chat else "prompt",
                "context_length_exceeded",
            )
        scoring = self.logprobs if self.echo and self.logprobs is not None else None
        return self.body.sampling(room if limit is None else limit, self.logprobs, scoring, index, self.constraint)

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.body.n]

    def start(self) -> list[AsyncIterator[TokenEvent]]:
        """Submit every choice now, so an engine refusing one fails the whole request before any output."""
        for i, params in enumerate(self.params):
            self.streams.append(self.engine.generate(GenerationRequest(f"{self.id}-{i}", self.prompt_of(i), params)))
        return [self._choice(i, stream) for i, stream in enumerate(self.streams)]

    async def close(self) -> None:
        """Every exit path of the request ends here: its choices leave the engine (finished or not, started
        or not) and give their admission back."""
        streams, self.streams = self.streams, []
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        if self.admission is not None:
            self.admission.give_back(len(self.params))
            self.admission = None

    async def _choice(self, index: int, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        timer, reason, generated = RequestTimer(self.metrics, self.alias, self.arrival), "abort", 0
        try:
            async for event in events:
                timer.token(event.queue_seconds)
                generated = event.num_generated
                yield event
                if event.finish_reason:
                    reason = event.finish_reason
        finally:
            await events.aclose()
            timer.finish(len(self.prompt_of(index)), generated, reason)

    def text_of(self, token: int) -> str:
        if token not in self.token_text:
            self.token_text[token] = self.engine.tokenizer.decode([token])
        return self.token_text[token]

    def usage(self, generated: list[int]) -> dict:
        prompt = sum(len(self.prompt_of(i)) for i in range(len(self.params)))
        return {"prompt_tokens": prompt, "completion_tokens": sum(generated), "total_tokens": prompt + sum(generated)}


def _lp(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf


def _chat_logprobs(job: Job, events: list[TokenEvent]) -> dict:
    content = []
    for e in events:
        if e.token_id is None or e.logprob is None:
            continue
        text = job.text_of(e.token_id)
        top = [
            {"token": job.text_of(t), "logprob": _lp(lp), "bytes": list(job.text_of(t).encode())}
            for t, lp in e.top_logprobs or []
        ]
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(job: Job, events: list[TokenEvent], prompt: list[int] | None, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    pairs = []
    if prompt is not None and events and events[0].prompt_logprobs is not None:
        pairs += [(t, lp, top) for t, (lp, top) in zip(prompt, events[0].prompt_logprobs)]
    pairs += [
        (e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None and e.logprob is not None
    ]
    for token, logprob, top in pairs:
        text = job.text_of(token)
        tokens.append(text)
        values.append(None if logprob is None else _lp(logprob))
        tops.append({job.text_of(t): _lp(lp) for t, lp in top} if logprob is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class _JobStream(StreamingResponse):
    """An SSE response that closes its job however the stream ends, even when the client left before the
    first byte (then the body iterator never starts and its own `finally` never runs)."""

    def __init__(self, job: Job, body: AsyncIterator[str]):
        super().__init__(body, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.job.close()


async def _serve(job: Job, request: Request):
    try:
        streams = job.start()
        if job.body.stream:
            if getattr(job.engine, "fails_after_submit", False):  # proxied engines (serve/adapters/)
                streams = await _primed(streams)
            return _JobStream(job, _sse(job, streams))
    except BaseException:
        await job.close()
        raise
    try:
        return await _until_disconnect(request, _complete(job, streams))
    finally:
        await job.close()


async def _primed(streams: list[AsyncIterator[TokenEvent]]) -> list[AsyncIterator[TokenEvent]]:
    """Wait for the first event of any choice before the 200 goes out: an engine whose errors surface on the
    first await (a proxied engine's HTTP error) then still answers with an OpenAI error status. Waiting for
    every choice would stall an engine that serves choices one after another (llama.cpp); errors of the later
    choices arrive as error frames."""
    firsts = [asyncio.ensure_future(anext(s, None)) for s in streams]
    done, _ = await asyncio.wait(firsts, return_when=asyncio.FIRST_COMPLETED)
    failed = [f for f in done if f.exception() is not None]
    if failed:
        for future in firsts:
            future.cancel()
        raise failed[0].exception()

    async def replay(first: asyncio.Future, stream: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        event = await first
        if event is not None:
            yield event
            async for event in stream:
                yield event

    return [replay(f, s) for f, s in zip(firsts, streams)]


async def _until_disconnect(request: Request, work):
    """Run a non-streaming request; cancel it if the client goes away (the caller closes the job)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)


async def _collect(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


async def _complete(job: Job, streams) -> JSONResponse:
    results = await asyncio.gather(*(_collect(s) for s in streams))
    failed = next((events[-1] for events in results if events[-1].finish_reason == "error"), None)
    if failed is not None:
        raise APIError(failed.error_status or 500, f"generation failed: {failed.error}", None, "generation_error")
    choices = []
    for index, events in enumerate(results):
        text, last = "".join(e.text for e in events), events[-1]
        if job.chat:
            message, finish = _chat_message(job, text, last.finish_reason)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": _chat_logprobs(job, events) if job.logprobs is not None else None,
                    "finish_reason": finish,
                }
            )
        else:
            prompt_text = job.engine.tokenizer.decode(job.prompt_of(index)) if job.echo else ""
            logprobs = None
            if job.logprobs is not None:
                logprobs = _completion_logprobs(job, events, job.prompt_of(index) if job.echo else None, 0)
            choices.append(
                {"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": last.finish_reason}
            )
    body = {
        "id": job.id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.body.model,
        "choices": choices,
        "usage": job.usage([r[-1].num_generated for r in results]),
    }
    model = ChatCompletionResponse if job.chat else CompletionResponse
    return JSONResponse(model.model_validate(body).model_dump())


def _chat_message(job: Job, text: str, finish: str | None) -> tuple[dict, str | None]:
    """The assistant message of a finished choice: its tool calls (finish_reason "tool_calls") where the request
    has tools and the answer holds well-formed calls; else its text. A choice cut by max_tokens stays text."""
    plan = job.tool_plan
    if plan is None or not plan.parses_calls or finish != "stop":
        return {"role": "assistant", "content": text}, finish
    content, calls = plan.parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": content, "tool_calls": [call.as_openai() for call in calls]}, "tool_calls"


def _streamed_delta(job: Job, index: int, event: TokenEvent) -> tuple[dict, str | None]:
    """A chat chunk's delta and finish_reason. With tools, text that may begin a tool call is held back until it
    cannot (auto) or the choice ends (a forced call): its calls then arrive whole in the last chunk, one delta each,
    as the OpenAI client accumulates them."""
    plan = job.tool_plan
    if plan is None or not plan.parses_calls:
        return {"content": event.text}, event.finish_reason
    text, sent = job.held_text.get(index, ("", 0))
    text += event.text
    if event.finish_reason is None:
        release = max(plan.releasable(text), sent)
        job.held_text[index] = (text, release)
        return {"content": text[sent:release]}, None
    job.held_text.pop(index, None)
    message, finish = _chat_message(job, text, event.finish_reason)
    if "tool_calls" not in message:
        return {"content": text[sent:]}, finish
    calls = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
    return {"content": None if sent else message["content"], "tool_calls": calls}, finish


async def _sse(job: Job, streams) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as error:  # a proxied engine failing mid-stream: an error frame, never a silent end
            status = getattr(error, "status", 500)
            await queue.put(
                (index, TokenEvent(None, "", finish_reason="error", error=f"{error}", num_generated=generated[index]))
            )
            log.warning("choice %d of %s failed mid-stream (%s): %s", index, job.id, status, error)
        finally:
            await queue.put((index, None))

    generated = [0] * len(streams)
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams, started = len(streams), set()
    try:
        while open_streams:
            index, event = await queue.get()
            if event is None:
                open_streams -= 1
                continue
            generated[index] = event.num_generated
            if event.finish_reason == "error":  # vLLM's shape: an error object in the stream, then the choice ends
                status = event.error_status or 500
                job.metrics.error(job.alias, status)
                yield _frame(error_body(status, f"generation failed: {event.error}", None, "generation_error"))
            chunk = _chunk(job, index, event, first=index not in started)
            started.add(index)
            if chunk is not None:
                yield _frame(chunk)
        if job.body.include_usage():
            yield _frame(
                {
                    "id": job.id,
                    "object": _chunk_object(job),
                    "created": job.created,
                    "model": job.body.model,
                    "choices": [],
                    "usage": job.usage(generated),
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


def _chunk_object(job: Job) -> str:
    return "chat.completion.chunk" if job.chat else "text_completion"


def _chunk(job: Job, index: int, event: TokenEvent, first: bool) -> dict | None:
    has_logprob = job.logprobs is not None and event.token_id is not None and event.logprob is not None
    if job.chat:
        delta, finish = _streamed_delta(job, index, event)
        if not delta.get("content") and not finish and not first and not has_logprob:
            return None
        delta = {"role": "assistant", **delta} if first else delta
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": _chat_logprobs(job, [event]) if has_logprob else None,
            "finish_reason": finish,
        }
    else:
        if not event.text and not event.finish_reason and not first and not has_logprob:
            return None
        text = event.text
        prompt = job.prompt_of(index) if job.echo and first else None
        if prompt is not None:
            text = job.engine.tokenizer.decode(prompt) + text
        logprobs = _completion_logprobs(job, [event], prompt, 0) if job.logprobs is not None else None
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
    return {
        "id": job.id,
        "object": _chunk_object(job),
        "created": job.created,
        "model": job.body.model,
        "choices": [choice],
    }


def _frame(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
