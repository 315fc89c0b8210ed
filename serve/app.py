"""build_app(models) -> FastAPI: thin OpenAI-compatible routes over the serving classes, auth, limits, errors,
metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvfp4.serve.config import ConnectionLimits
from nvfp4.serve.interface import Engine, EngineError, EngineStartError, QueueFull
from nvfp4.serve.limits import Admission, Limits
from nvfp4.serve.metrics import ServerMetrics
from nvfp4.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    error_body,
    openapi_responses,
)
from nvfp4.serve.serving import ServingChat, ServingCompletion, ServingTokenization

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/ready")  # never keyed; they reveal no paths or logs
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# log-probabilities one echo may return for its prompts (~30 bytes of JSON each: ~15 MiB); vLLM bounds only
# the logprobs per token (20, as protocol.MAX_LOGPROBS does), and 64 prompts x 2048 tokens x 21 drew ~80 MiB
ECHO_LOGPROBS_LIMIT = 2**19
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client's X-Request-Id echoed as is; else one of ours
BODY_PATHS = ("/tokenize", "/detokenize")  # POST bodies read under the limit besides /v1/'s


class Served:
    """The models behind one endpoint, addressed by alias ("student", "teacher") or real name."""

    def __init__(self, models: dict[str, Engine], limits: Limits):
        self.models, self.limits = models, limits
        self.admission = {alias: Admission(alias, limits) for alias in models}
        self.by_name = {**{e.name: (a, e) for a, e in models.items()}, **{a: (a, e) for a, e in models.items()}}
        self.failed: set[str] = set()  # aliases whose engine failed to start (the log has why)

    def get(self, name: str) -> tuple[str, Engine]:
        if name not in self.by_name:
            raise APIError(
                404,
                f"the model `{name}` does not exist; choose one of {sorted(self.by_name)}",
                "model",
                "model_not_found",
            )
        alias, engine = self.by_name[name]
        if not engine.ready:
            raise APIError(503, f"model `{alias}` is not ready", "model", "not_ready")
        return alias, engine

    def get_or_first(self, name: str | None) -> tuple[str, Engine]:
        """vLLM's /tokenize rule: no model named means the first one served."""
        return self.get(next(iter(self.models)) if name is None else name)

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.models.values())


def build_app(
    models: dict[str, Engine],
    api_key: str | None = None,
    drain_timeout: float = 30.0,
    limits: Limits = Limits(),
    open_metrics: bool = True,
    body_timeout: float = ConnectionLimits.body_timeout,
    local_names_only: bool = False,
) -> FastAPI:
    """The endpoint. With api_key, every path but /health and /ready (and /metrics while open_metrics) needs it,
    pages mounted later (/ui) included. A /v1 body must arrive within body_timeout seconds. With
    local_names_only (a keyless server on loopback), only a Host naming loopback is answered there."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    served = Served(models, limits)
    metrics = ServerMetrics(lambda: {alias: engine.stats() for alias, engine in models.items()}, list(models))

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
    app.include_router(_openai_router(served, metrics))
    app.include_router(_tokenize_router(served))
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes, timeout=body_timeout, metrics=metrics)
    if api_key is not None:
        app.add_middleware(
            _KeyCheck, api_key=api_key, open_paths=OPEN_PATHS + (("/metrics",) if open_metrics else ()), metrics=metrics
        )
    if local_names_only:
        app.add_middleware(_LocalNamesOnly, open_paths=OPEN_PATHS + ("/metrics",), metrics=metrics)
    app.add_middleware(_RequestId)  # outermost: every answer of the middlewares above carries it too
    return app


async def _start(served: Served, alias: str, engine: Engine) -> None:
    try:
        await engine.start()
        log.info("model %s (%s) is ready", alias, engine.name)
    except EngineStartError as error:  # /ready reports it; the process keeps answering /health
        log.error("loading %s failed: %s", alias, error)
        served.failed.add(alias)
    except Exception:  # a bug, or a load that raised: its traceback goes to the log
        log.exception("loading %s failed", alias)
        served.failed.add(alias)


def _key_of(headers: dict[bytes, bytes]) -> str:
    """The key a request carries: `Bearer KEY`, or HTTP Basic with KEY as the password (what a browser sends)."""
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


def request_id(scope) -> str:
    """The request's id: the client's X-Request-Id where it is 1-128 safe characters, else a new one (kept in the
    scope's state, which every layer of the app shares)."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        given = dict(scope.get("headers", ())).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        state["request_id"] = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return state["request_id"]


class _RequestId:
    """Every HTTP answer carries X-Request-Id (vLLM's header): the client's own value, or one made here."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        value = request_id(scope).encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _KeyCheck:
    """One key check in front of everything (routes, /metrics/engine, the mounted /ui and Gradio's API): a
    pure ASGI middleware, so mounts added after build_app are covered too."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...], metrics: ServerMetrics):
        self.app, self.key, self.open_paths, self.metrics = app, api_key.encode(), open_paths, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        if secrets.compare_digest(_key_of(dict(scope["headers"])).encode(), self.key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        self.metrics.error(None, 401)
        body = error_body(401, "missing or invalid API key (send Authorization: Bearer KEY)", None, "invalid_api_key")
        browser = (
            {"WWW-Authenticate": 'Basic realm="nvfp4", charset="UTF-8"'} if scope["path"].startswith("/ui") else {}
        )
        await JSONResponse(body, status_code=401, headers=browser)(scope, receive, send)


class _LocalNamesOnly:
    """A keyless server on loopback answers a Host of localhost, 127.0.0.1 or [::1] only: DNS rebinding (a page
    on evil.example whose name comes to resolve to 127.0.0.1) reaches it from a browser, which still sends
    `Host: evil.example:PORT`. Any port: the browser names the one it connected to, and a container's is
    published under another. Monitoring (open_paths, /metrics/...) answers any name, Prometheus's included."""

    def __init__(self, app, open_paths: tuple[str, ...], metrics: ServerMetrics):
        self.app, self.open_paths, self.metrics = app, open_paths, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(self.open_paths):
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        if not host or name in LOOPBACK_NAMES:  # no Host: not a browser
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        self.metrics.error(None, 400)
        message = (
            f"this server answers Host: localhost, 127.0.0.1 or [::1], not {host!r}: it has no key and is "
            f"reachable from this machine only (start it with --api-key to serve other names)"
        )
        await JSONResponse(error_body(400, message, None, "invalid_host"), status_code=400)(scope, receive, send)


class _BodyLimit:
    """A /v1 body is read here, counted as it arrives, before any of it is parsed: 413 once it passes the limit,
    411 without Content-Length, 400 with Content-Length beside Transfer-Encoding (the framing the server follows
    is not the length the limit read), 408 when it takes over `timeout` seconds. The route then gets the body
    read."""

    def __init__(self, app, limit: int, timeout: float, metrics: ServerMetrics):
        self.app, self.limit, self.timeout, self.metrics = app, limit, timeout, metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not (path.startswith("/v1/") or path in BODY_PATHS):
            return await self.app(scope, receive, send)
        refusal = self._refusal(dict(scope["headers"]))
        if refusal is None:
            body, refusal = await self._body(receive)
            if body is not None:
                return await self.app(scope, _replay(body, receive), send)
        if refusal is not None:  # else the client left
            status, message, code = refusal
            self.metrics.error(None, status)
            answer = error_body(status, message, None, code)
            answer["error"]["type"] = "invalid_request_error"  # a client's mistake (error_body has no type for 408)
            if status != 408:
                await self._drain(receive)
            # whatever is left of the body is not read: the connection closes with the answer
            await JSONResponse(answer, status_code=status, headers={"connection": "close"})(scope, receive, send)

    async def _drain(self, receive, seconds: float = 2.0) -> None:
        """Read and drop what the client still sends, up to four limits' bytes and `seconds` (a lingering close,
        as web servers make one): a client that sends a body before it reads the answer then reads its 4xx
        instead of a reset, which HTTP clients retry; a flood past that is cut off. Nothing read is kept."""

        async def drain() -> None:
            left = 4 * self.limit
            while left > 0:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                left -= len(message.get("body", b""))

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drain(), seconds)

    def _refusal(self, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        length = headers.get(b"content-length")
        if length is not None and b"transfer-encoding" in headers:
            return 400, "send Content-Length or Transfer-Encoding, not both", "ambiguous_length"
        if length is None:
            return 411, "send a Content-Length header", "length_required"
        if not length.isdigit() or int(length) > self.limit:
            return 413, self._over_limit(), "body_too_large"
        return None

    def _over_limit(self) -> str:
        return f"the request body is over the limit of {self.limit} bytes (--max-body-bytes)"

    async def _body(self, receive) -> tuple[bytes | None, tuple[int, str, str] | None]:
        """(the body, None); (None, a refusal) past the limit or the deadline; (None, None): the client left."""
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            return None, (
                408,
                f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                "body_timeout",
            )
        if body is not None and len(body) > self.limit:
            return None, (413, self._over_limit(), "body_too_large")
        return body, None

    async def _read(self, receive) -> bytes | None:
        """The body, its bytes counted as they arrive: reading stops one message past the limit."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit or not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive):
    """The receive the route gets: the body read already, then the client's own (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(request: Request, status: int, body: dict) -> JSONResponse:
        metrics.error(getattr(request.state, "model", None), status)
        # a 500 is answered outside the middlewares (Starlette's ServerErrorMiddleware): its id is set here
        return JSONResponse(body, status_code=status, headers={"X-Request-Id": request_id(request.scope)})

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return respond(request, error.status, error_body(error.status, error.message, error.param, error.code))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        response = respond(request, error.status, error_body(error.status, str(error), None, type(error).__name__))
        if isinstance(error, QueueFull):
            response.headers["Retry-After"] = str(error.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in error.errors()[:5]
        )
        return respond(
            request, 400, error_body(400, message or "invalid request", ".".join(loc) or None, "invalid_parameter")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        status = error.status_code
        return respond(request, status, error_body(status, str(error.detail), None, status))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception):
        log.exception("unhandled error (X-Request-Id %s)", request_id(request.scope))
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
        # /ready is open: it names no paths and quotes no logs (the server's log has the error)
        failed = [f"{alias} failed to load (see the server's log)" for alias in sorted(served.failed)]
        detail = "; ".join(failed) or f"loading {', '.join(pending)}"
        return JSONResponse(error_body(503, f"not ready ({detail})", None, "not_ready"), status_code=503)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _openai_router(served: Served, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1")

    chat_serving, completion_serving = ServingChat(metrics, served.limits), ServingCompletion(metrics, served.limits)

    @router.get(
        "/models", response_model=ModelList, response_model_exclude_none=True, responses=openapi_responses(None)
    )
    async def list_models() -> ModelList:
        data = [
            ModelCard(id=alias, root=engine.name, max_model_len=engine.max_model_len, nvfp4=engine.card())
            for alias, engine in served.models.items()
        ]
        data += [
            ModelCard(id=name, root=name, parent=alias, max_model_len=engine.max_model_len)
            for name, (alias, engine) in served.by_name.items()
            if name not in served.models
        ]
        return ModelList(data=data)

    @router.post("/chat/completions", responses=openapi_responses(ChatCompletionResponse, stream=True))
    async def chat(body: ChatCompletionRequest, request: Request):
        alias, engine = _model(served, body.model, request)
        return await chat_serving.create(body, alias, engine, served.admission[alias], request)

    @router.post("/completions", responses=openapi_responses(CompletionResponse, stream=True))
    async def completions(body: CompletionRequest, request: Request):
        alias, engine = _model(served, body.model, request)
        _check_echo_size(body, engine.max_model_len)
        return await completion_serving.create(body, alias, engine, served.admission[alias], request)

    return router


def _tokenize_router(served: Served) -> APIRouter:
    """vLLM's /tokenize and /detokenize (outside /v1, as vLLM serves them)."""
    router, serving = APIRouter(), ServingTokenization()

    @router.post(
        "/tokenize",
        response_model=TokenizeResponse,
        response_model_exclude_none=True,
        responses=openapi_responses(TokenizeResponse),
    )
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        return await serving.tokenize(body, _model(served, body.model, request, default_first=True)[1])

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=openapi_responses(DetokenizeResponse))
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        return await serving.detokenize(body, _model(served, body.model, request, default_first=True)[1])

    return router


def _check_echo_size(body: CompletionRequest, max_model_len: int) -> None:
    """400 for an echo whose prompt log-probabilities (tokens x n x (1 + logprobs)) pass ECHO_LOGPROBS_LIMIT,
    before any tokenizing: a text's tokens are counted as its UTF-8 bytes and BOS (never fewer than its
    tokens), each prompt as at most the context."""
    if not body.echo or body.logprobs is None:
        return
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    tokens = sum(min(len(p.encode()) + 1 if isinstance(p, str) else len(p), max_model_len) for p in prompts)
    count = tokens * body.n * (1 + body.logprobs)
    if count > ECHO_LOGPROBS_LIMIT:
        raise APIError(
            400,
            f"echo with logprobs would return up to {count} log-probabilities (prompt tokens x n x "
            f"(1 + logprobs), a text prompt's tokens counted as its bytes); at most {ECHO_LOGPROBS_LIMIT} "
            f"per request: send fewer or shorter prompts (or token ids), or lower n or logprobs",
            "logprobs",
            "echo_too_large",
        )


def _model(served: Served, name: str | None, request: Request, default_first: bool = False) -> tuple[str, Engine]:
    alias, engine = served.get_or_first(name) if default_first else served.get(name)
    request.state.model = alias
    return alias, engine
