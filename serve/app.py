"""build_app(models) -> FastAPI: thin OpenAI-compatible routes over engines, SSE, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvfp4.serve.engine.types import Engine, EngineError, GenerationRequest, SamplingParams, TokenEvent
from nvfp4.serve.metrics import RequestTimer, ServerMetrics
from nvfp4.serve.protocol import ChatCompletionRequest, CompletionRequest, make_id, now

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "internal_error"), "param": param,
                      "code": code if code is not None else status}}


class Served:
    """The models behind one endpoint, addressed by alias ("student", "teacher") or real name."""

    def __init__(self, models: dict[str, Engine]):
        self.models = models
        self.by_name = {**{e.name: (a, e) for a, e in models.items()}, **{a: (a, e) for a, e in models.items()}}
        self.load_errors: dict[str, str] = {}

    def get(self, name: str) -> tuple[str, Engine]:
        if name not in self.by_name:
            raise APIError(404, f"the model `{name}` does not exist; choose one of {sorted(self.by_name)}", "model", "model_not_found")
        alias, engine = self.by_name[name]
        if not engine.ready:
            raise APIError(503, f"model `{alias}` is not ready", "model", "not_ready")
        return alias, engine

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.models.values())


def build_app(models: dict[str, Engine], api_key: str | None = None, drain_timeout: float = 30.0) -> FastAPI:
    served = Served(models)
    metrics = ServerMetrics(lambda: {alias: engine.stats() for alias, engine in models.items()})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_start(served, alias, engine)) for alias, engine in models.items()]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(e.close(drain_timeout) for e in models.values()), return_exceptions=True)

    app = FastAPI(title="nvfp4 serve", version="0.1.0", lifespan=lifespan)
    app.state.served, app.state.metrics = served, metrics
    _install_error_handlers(app, metrics)
    app.include_router(_system_router(served, metrics))
    app.include_router(_openai_router(served, metrics), dependencies=[Depends(_auth(api_key))])
    return app


async def _start(served: Served, alias: str, engine: Engine) -> None:
    try:
        await engine.start()
        log.info("model %s (%s) is ready", alias, engine.name)
    except Exception as error:  # reported by /ready; the process keeps answering /health
        log.exception("loading %s failed", alias)
        served.load_errors[alias] = f"{type(error).__name__}: {error}"


def _auth(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", None, "invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(request: Request, status: int, body: dict) -> JSONResponse:
        metrics.error(getattr(request.state, "model", None), status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return respond(request, error.status, error_body(error.status, error.message, error.param, error.code))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        return respond(request, error.status, error_body(error.status, str(error), None, type(error).__name__))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in error.errors()[:5])
        return respond(request, 400, error_body(400, message or "invalid request", ".".join(loc) or None, "invalid_parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        status = error.status_code
        return respond(request, status, error_body(status, str(error.detail), None, status))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception):
        log.exception("unhandled error")
        return respond(request, 500, error_body(500, "internal server error", None, "internal_error"))


def _system_router(served: Served, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        if served.ready:
            return JSONResponse({"status": "ready", "models": {a: e.name for a, e in served.models.items()}})
        pending = [a for a, e in served.models.items() if not e.ready]
        detail = "; ".join(f"{a}: {m}" for a, m in served.load_errors.items()) or f"loading {', '.join(pending)}"
        return JSONResponse(error_body(503, f"not ready ({detail})", None, "not_ready"), status_code=503)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _openai_router(served: Served, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models() -> dict:
        data = []
        for alias, engine in served.models.items():
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "nvfp4", "root": engine.name,
                         "nvfp4": engine.card()})
        for name, (alias, engine) in served.by_name.items():
            if name not in served.models:
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "nvfp4", "root": name, "parent": alias})
        return {"object": "list", "data": data}

    @router.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        alias, engine = _model(served, body.model, request)
        prompt = _chat_prompt(engine, body)
        return await _serve(Job(metrics, engine, alias, body, [prompt], chat=True), request)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        alias, engine = _model(served, body.model, request)
        return await _serve(Job(metrics, engine, alias, body, _completion_prompts(engine, body), chat=False), request)

    return router


def _model(served: Served, name: str, request: Request) -> tuple[str, Engine]:
    alias, engine = served.get(name)
    request.state.model = alias
    return alias, engine


def _chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model `{body.model}` has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja raises its own errors (e.g. role order the template rejects)
        raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from error
    return tokenizer.encode(text, add_special_tokens=False)


def _completion_prompts(engine: Engine, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [engine.tokenizer.encode(prompt)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [engine.tokenizer.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = len(engine.tokenizer)
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return prompts


class Job:
    """One HTTP request: n choices per prompt, each a generation on the engine."""

    def __init__(self, metrics, engine: Engine, alias: str, body, prompts: list[list[int]], chat: bool):
        self.metrics, self.engine, self.alias, self.body, self.prompts, self.chat = metrics, engine, alias, body, prompts, chat
        self.id = make_id("chatcmpl" if chat else "cmpl")
        self.created, self.arrival = now(), time.perf_counter()
        self.logprobs = body.logprob_count() if chat else body.logprobs
        self.echo = (not chat) and body.echo
        self.params = [self._params(p, i) for p in prompts for i in range(body.n)]
        self.token_text: dict[int, str] = {}

    def _params(self, prompt: list[int], index: int) -> SamplingParams:
        room = self.engine.max_model_len - len(prompt)
        limit = self.body.limit() if self.chat else self.body.max_tokens
        if room < (1 if limit is None else limit) or room <= 0:
            raise APIError(
                400, f"this model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                f"{len(prompt)} tokens and {limit or 1} completion tokens were requested", "messages" if self.chat else "prompt", "context_length_exceeded")
        scoring = self.logprobs if self.echo and self.logprobs is not None else None
        return self.body.sampling(room if limit is None else limit, self.logprobs, scoring, index)

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.body.n]

    def start(self) -> list[AsyncIterator[TokenEvent]]:
        """Submit every choice now, so a full queue fails the whole request before any output."""
        streams = []
        try:
            for i, params in enumerate(self.params):
                streams.append(self._choice(i, self.engine.generate(GenerationRequest(f"{self.id}-{i}", self.prompt_of(i), params))))
        except EngineError:
            for stream in streams:
                asyncio.ensure_future(stream.aclose())
            raise
        return streams

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
        top = [{"token": job.text_of(t), "logprob": _lp(lp), "bytes": list(job.text_of(t).encode())} for t, lp in e.top_logprobs or []]
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(job: Job, events: list[TokenEvent], prompt: list[int] | None, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    pairs = []
    if prompt is not None and events and events[0].prompt_logprobs is not None:
        pairs += [(t, lp, top) for t, (lp, top) in zip(prompt, events[0].prompt_logprobs)]
    pairs += [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None and e.logprob is not None]
    for token, logprob, top in pairs:
        text = job.text_of(token)
        tokens.append(text)
        values.append(None if logprob is None else _lp(logprob))
        tops.append({job.text_of(t): _lp(lp) for t, lp in top} if logprob is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def _serve(job: Job, request: Request):
    streams = job.start()
    if job.body.stream:
        if getattr(job.engine, "fails_after_submit", False):  # proxied engines (serve/engines/)
            streams = await _primed(streams)
        return StreamingResponse(_sse(job, streams), media_type="text/event-stream")
    return await _until_disconnect(request, _complete(job, streams))


async def _primed(streams: list[AsyncIterator[TokenEvent]]) -> list[AsyncIterator[TokenEvent]]:
    """Wait for every choice's first event before the 200 goes out: an engine whose errors surface on
    the first await (a proxied engine's HTTP error) then still answers with an OpenAI error status."""
    firsts = await asyncio.gather(*(anext(s, None) for s in streams), return_exceptions=True)
    if any(isinstance(f, BaseException) for f in firsts):
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise next(f for f in firsts if isinstance(f, BaseException))

    async def replay(first: TokenEvent | None, stream: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        try:
            if first is not None:
                yield first
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    return [replay(f, s) for f, s in zip(firsts, streams)]


async def _until_disconnect(request: Request, work):
    """Run a non-streaming request; cancel it (and its engine requests) if the client goes away."""
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
    choices = []
    for index, events in enumerate(results):
        text, last = "".join(e.text for e in events), events[-1]
        if job.chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": _chat_logprobs(job, events) if job.logprobs is not None else None,
                            "finish_reason": last.finish_reason})
        else:
            prompt_text = job.engine.tokenizer.decode(job.prompt_of(index)) if job.echo else ""
            logprobs = None
            if job.logprobs is not None:
                logprobs = _completion_logprobs(job, events, job.prompt_of(index) if job.echo else None, 0)
            choices.append({"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": last.finish_reason})
    body = {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.body.model, "choices": choices, "usage": job.usage([r[-1].num_generated for r in results])}
    return JSONResponse(body)


async def _sse(job: Job, streams) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    generated, open_streams, started = [0] * len(streams), len(streams), set()
    try:
        while open_streams:
            index, event = await queue.get()
            if event is None:
                open_streams -= 1
                continue
            generated[index] = event.num_generated
            chunk = _chunk(job, index, event, first=index not in started)
            started.add(index)
            if chunk is not None:
                yield _frame(chunk)
        if job.body.include_usage():
            yield _frame({"id": job.id, "object": _chunk_object(job), "created": job.created, "model": job.body.model,
                          "choices": [], "usage": job.usage(generated)})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


def _chunk_object(job: Job) -> str:
    return "chat.completion.chunk" if job.chat else "text_completion"


def _chunk(job: Job, index: int, event: TokenEvent, first: bool) -> dict | None:
    has_logprob = job.logprobs is not None and event.token_id is not None and event.logprob is not None
    if not event.text and not event.finish_reason and not first and not has_logprob:
        return None
    if job.chat:
        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
        choice = {"index": index, "delta": delta, "logprobs": _chat_logprobs(job, [event]) if has_logprob else None,
                  "finish_reason": event.finish_reason}
    else:
        text = event.text
        prompt = job.prompt_of(index) if job.echo and first else None
        if prompt is not None:
            text = job.engine.tokenizer.decode(prompt) + text
        logprobs = _completion_logprobs(job, [event], prompt, 0) if job.logprobs is not None else None
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
    return {"id": job.id, "object": _chunk_object(job), "created": job.created, "model": job.body.model, "choices": [choice]}


def _frame(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
