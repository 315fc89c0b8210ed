"""`nvfp4 serve OUT`: the NVFP4 student and its BF16 teacher behind one OpenAI-compatible endpoint.

The click command maps its flags to a ServeConfig (serve/config.py) and calls `run(config)`, which does the
work; errors name config fields, which SERVE_FLAGS words as the flags that set them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import click

from nvfp4.converter.layout import STUDENT, canonical_target, student_folder
from nvfp4.errors import UserError, require
from nvfp4.serve.config import (
    DEVICES,
    ENGINES,
    LOG_LEVELS,
    AdapterSettings,
    ConnectionLimits,
    NativeSettings,
    ServeConfig,
)
from nvfp4.serve.limits import Limits

SERVE_FLAGS = {  # ServeConfig field -> the flag that sets it, as errors name it to CLI users
    "out": "OUT",
    "teacher": "--teacher",
    "engine": "--engine",
    "host": "--host",
    "port": "--port",
    "api_key": "--api-key (or NVFP4_API_KEY)",
    "published_on": "--published-on (or NVFP4_PUBLISHED_ON)",
    "key_metrics": "--key-metrics",
    "limits.max_body_bytes": "--max-body-bytes",
    "limits.max_choices": "--max-choices",
    "limits.max_stop_chars": "--max-stop-chars",
    "limits.max_num_seqs": "--max-num-seqs",
    "limits.max_queue": "--max-queue",
    "max_model_len": "--max-model-len",
    "drain_timeout": "--drain-timeout",
    "max_connections": "--max-connections",
    "header_timeout": "--header-timeout",
    "body_timeout": "--body-timeout",
    "threads": "--threads",
    "native.device": "--device",
    "native.compile": "--compile",
    "native.prefix_caching": "--no-prefix-caching (or --no-enable-prefix-caching)",
    "adapter.args": "arguments after `--`",
    "adapter.vllm_bin": "--vllm-bin",
    "adapter.trtllm_bin": "--trtllm-bin",
    "adapter.ready_timeout": "--engine-timeout",
    "ui": "--ui",
    "log_level": "--log-level",
}
MountUI = Callable[..., object]  # (app, base_url, teacher_model, student_model, api_key) -> app: nvfp4.cli.mount_ui


log = logging.getLogger(__name__)
ACCEPT_OUT_OF_FILES = "socket.accept() out of system resource"  # asyncio's words for EMFILE at accept()
RESERVED_FILES = 128  # what the server opens besides its clients: model files, engine pipes, logs


def run_server(
    app,
    host: str,
    port: int,
    drain_timeout: float,
    log_level: str = "info",
    connections: ConnectionLimits = ConnectionLimits(),
) -> None:
    """uvicorn handles SIGTERM/SIGINT: stop accepting, let requests finish (bounded), then lifespan shutdown.
    The open-file limit is raised to its hard limit first, and the connections fitted under it."""
    connections = fit_open_files(connections, raise_open_file_limit())
    guarded_server(app, host, port, drain_timeout, log_level, connections).run()


def guarded_server(app, host: str, port: int, drain_timeout: float, log_level: str, connections: ConnectionLimits):
    """A uvicorn.Server whose connections have a header deadline and a limit (guarded_protocol), whose loop
    logs refused accepts once per interval (AcceptErrorLog), and whose drained SIGTERM exits 0."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # uvicorn re-raises captured signals at exit; a drained SIGTERM exits 0
                self._captured_signals.remove(sig)

        async def startup(self, sockets=None) -> None:
            asyncio.get_running_loop().set_exception_handler(AcceptErrorLog())
            await super().startup(sockets)

    # past max_connections the idle ones close; uvicorn answers 503 only past the room fit_open_files keeps for
    # the connections of a burst not yet closed (a /health arriving in a flood would get it too)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout,
        http=guarded_protocol(AutoHTTPProtocol, connections),
        limit_concurrency=connections.max_connections + 4 * connections.backlog,
        backlog=connections.backlog,
    )
    return Server(config)


def guarded_protocol(base: type, limits: ConnectionLimits) -> type:
    """uvicorn's HTTP protocol (h11 or httptools), which holds a connection for ever until its request head
    is complete: here a connection must start a request within header_timeout of opening or of its last
    answer, and a connection past max_connections closes the one idle the longest (a half-sent head, a
    kept-alive client) so that /health still gets in."""

    class Guarded(base):
        idle_since, deadline = 0.0, None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.await_request()
            over = len(self.connections) > limits.max_connections  # (counting the closing ones only then)
            if over and sum(map(_is_open, self.connections)) > limits.max_connections:
                _close_longest_idle(self.connections, besides=self)

        def on_response_complete(self) -> None:
            self.await_request()  # before uvicorn starts a pipelined request
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def await_request(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.idle_since = self.loop.time()
            self.deadline = self.loop.call_later(limits.header_timeout, self.header_deadline_passed)

        def idle(self) -> bool:
            """No request in progress (none yet, or the last one answered); still HTTP (not a websocket), open."""
            return (
                (self.cycle is None or self.cycle.response_complete)
                and self.transport.get_protocol() is self
                and not self.transport.is_closing()
            )

        def header_deadline_passed(self) -> None:
            if self.idle():
                self.transport.close()

    return Guarded


def _is_open(connection) -> bool:
    transport = getattr(connection, "transport", None)
    return transport is not None and not transport.is_closing()


def _close_longest_idle(connections, besides) -> None:
    idle = [c for c in connections if c is not besides and hasattr(c, "idle") and c.idle()]
    if idle:
        min(idle, key=lambda c: c.idle_since).transport.close()


class AcceptErrorLog:
    """The server loop's exception handler. asyncio reports every accept() refused for want of file
    descriptors (521,467 lines in 43 s under a slowloris): one line per interval_s, with the count."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.reported_at: float | None = None
        self.refused = 0

    def __call__(self, loop, context: dict) -> None:
        if context.get("message") != ACCEPT_OUT_OF_FILES:
            return loop.default_exception_handler(context)
        self.refused += 1
        now = self.clock()
        if self.reported_at is None or now - self.reported_at >= self.interval_s:
            since = "" if self.reported_at is None else f" in the last {now - self.reported_at:.0f} s"
            log.error(
                "accept() refused %d connection(s)%s: the process is at its open-file limit (%s); they wait "
                "in the backlog",
                self.refused,
                since,
                context.get("exception"),
            )
            self.reported_at, self.refused = now, 0
        return None


def raise_open_file_limit() -> int | None:
    """The open-file soft limit raised to the hard one (a soft 1024 caps the connections a server can hold);
    -> the limit now in force, None where there is none."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # macOS refuses an unlimited hard limit
            log.info("the open-file limit stays %s (raising it to %s failed: %s)", soft, hard, error)
    return None if soft == resource.RLIM_INFINITY else soft


def fit_open_files(connections: ConnectionLimits, open_files: int | None) -> ConnectionLimits:
    """Connections and a listen backlog the open-file limit has room for (past it, accept() fails): asyncio
    accepts up to a backlog of connections in one go, and the limit closes the idle ones a few loop turns
    later, so four backlogs are kept free besides the server's own files."""
    if open_files is None:
        return connections
    backlog = min(connections.backlog, max(16, open_files // 16))
    room = max(4, open_files - RESERVED_FILES - 4 * backlog)
    if connections.max_connections > room:
        log.warning(
            "holding at most %d connections, not %d: the open-file limit is %d (raise `ulimit -n`)",
            room,
            connections.max_connections,
            open_files,
        )
    return replace(connections, backlog=backlog, max_connections=min(connections.max_connections, room))


def threads_per_model(threads: int | None, num_models: int, cpus: int | None = None) -> int:
    """Given, else the cores split between the served models: each computes at the same time as the other."""
    return threads or max(1, (cpus or os.cpu_count() or 1) // num_models)


def engine_threads(threads: int | None, teacher: str | None, cpus: int) -> int:
    """An engine process's threads: all the cores for the student alone (at one thread of two, llama.cpp
    decoded 72.6 tokens/s against 92.5), half beside a teacher."""
    from nvfp4.serve.native.loader import serves_teacher

    return threads_per_model(threads, 1 + serves_teacher(teacher), cpus)


def set_threads(threads: int | None, num_models: int) -> int:
    import torch

    threads = threads_per_model(threads, num_models)
    torch.set_num_threads(threads)
    return threads


def check_device(device: str) -> None:
    """The native engine runs on CPU, or on CUDA with the Triton kernels; refuse a device it cannot use."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"`native.device` cuda: torch {torch.__version__} sees no CUDA device here; serve with "
                f"`native.device` cpu",
                field="native.device",
            )
        require("triton", "triton")


def native_engines(config: ServeConfig) -> dict:
    """{"student": NativeEngine, "teacher": NativeEngine (unless `teacher` is none)}, sharing unquantized tensors."""
    from nvfp4.converter.models import DEFAULT_MODEL_NAME, resolve_model
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import (
        SharedTensors,
        check_native,
        load_student,
        load_teacher,
        serves_teacher,
        teacher_source,
    )

    out, device = config.out, config.native.device
    check_device(device)
    if not (student_folder(out) / "config.json").is_file():
        raise UserError(f"no student checkpoint at {student_folder(out)} (run `nvfp4 convert ... -o {out}` first)")
    check_native(student_folder(out), "student")
    kwargs = dict(
        max_num_seqs=config.limits.max_num_seqs,
        max_queue=config.limits.max_queue,
        max_model_len=config.max_model_len,
        compile=config.native.compile,
        prefix_caching=config.native.prefix_caching,
    )
    shared = SharedTensors()  # the student's unquantized tensors are the teacher's: held once
    engines = {"student": NativeEngine(out.name + "-nvfp4", shared.loader(lambda: load_student(out, device)), **kwargs)}
    if serves_teacher(config.teacher):
        source = teacher_source(out, config.teacher)
        check_native(resolve_model(source), "teacher")  # fail now, with one clear line
        name = Path(source).name if source else DEFAULT_MODEL_NAME
        engines["teacher"] = NativeEngine(name, shared.loader(lambda: load_teacher(source, device)), **kwargs)
    return engines


def adapter_engines(config: ServeConfig) -> dict:
    """The student (and the teacher where that engine reads its format) on `engine`'s own server process."""
    from nvfp4.converter.models import resolve_model
    from nvfp4.serve.adapters import EngineOptions, adapter_models
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import check_native, load_teacher

    settings, limits = config.adapter, config.limits
    opts = EngineOptions(
        config.engine,
        config.max_model_len,
        settings.args,
        settings.vllm_bin,
        settings.trtllm_bin,
        engine_threads(config.threads, config.teacher, os.cpu_count() or 1),
        settings.ready_timeout,
        max_num_seqs=limits.max_num_seqs,
    )

    def native_teacher(source, name):
        check_native(resolve_model(source), "teacher")
        return NativeEngine(
            name,
            lambda: load_teacher(source)[:2],
            max_num_seqs=limits.max_num_seqs,
            max_queue=limits.max_queue,
            max_model_len=config.max_model_len,
            prefix_caching=config.native.prefix_caching,
        )

    return adapter_models(config.out, config.teacher, opts, native_teacher)


def load_engines(config: ServeConfig) -> dict:
    """alias -> engine (not started yet), each with the facts OUT/report.json gives for it."""
    from nvfp4.serve.native.loader import report_facts

    if not config.out.is_dir():
        raise UserError(f"not a convert output folder: {config.out}")
    models = native_engines(config) if config.engine == "native" else adapter_engines(config)
    target = STUDENT if config.engine == "native" else canonical_target(config.engine)  # the folder it serves
    for alias, facts in report_facts(config.out, config.teacher, target).items():
        if alias in models:
            models[alias].facts = facts
    return models


def check_ui(config: ServeConfig, mount_ui: MountUI | None) -> None:
    """The /ui page comes from the ui package, which the `nvfp4` command stitches in (serve never imports it)."""
    if config.ui and mount_ui is None:
        raise UserError(
            "`ui` is mounted by the `nvfp4` command: run `nvfp4 serve OUT --ui` (or pass mount_ui)", field="ui"
        )


def serve_app(config: ServeConfig, models: dict, mount_ui: MountUI | None = None):
    """The FastAPI app over `models`: routes, key, limits, /metrics/engine for adapters, and the /ui page."""
    from nvfp4.serve.app import build_app

    app = build_app(
        models,
        api_key=config.api_key,
        drain_timeout=config.drain_timeout,
        limits=config.limits,
        open_metrics=not config.key_metrics,
        body_timeout=config.body_timeout,
        local_names_only=config.api_key is None,
    )  # keyless: loopback only (check_key)
    if config.engine != "native":
        from nvfp4.serve.adapters import mount_engine_metrics

        mount_engine_metrics(app, models)
    if config.ui:
        check_ui(config, mount_ui)
        teacher_alias = "teacher" if "teacher" in models else "student"
        local = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        app = mount_ui(app, f"http://{local}:{config.port}", teacher_alias, "student", config.api_key)
    return app


def run(config: ServeConfig, mount_ui: MountUI | None = None) -> None:
    """Load the engines, build the app and serve it until SIGTERM/SIGINT (then drain)."""
    require("serve", "fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx")
    check_ui(config, mount_ui)  # before the models load
    models = load_engines(config)
    set_threads(config.threads, len(models))
    run_server(
        serve_app(config, models, mount_ui),
        config.host,
        config.port,
        config.drain_timeout,
        config.log_level,
        config.connections,
    )


def config_from_flags(flags: dict) -> ServeConfig:
    """The command's keyword arguments (one per flag) as a ServeConfig."""
    flags = dict(flags)
    limits = Limits(**{limit.name: flags.pop(limit.name) for limit in fields(Limits)})
    native = NativeSettings(
        device=flags.pop("device"), compile=flags.pop("compile_decode"), prefix_caching=flags.pop("prefix_caching")
    )
    adapter = AdapterSettings(
        args=flags.pop("engine_args"),
        vllm_bin=flags.pop("vllm_bin"),
        trtllm_bin=flags.pop("trtllm_bin"),
        ready_timeout=flags.pop("engine_timeout"),
    )
    return ServeConfig(limits=limits, native=native, adapter=adapter, **flags)


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--teacher",
    default=None,
    help="Teacher model (HF folder or .gguf); `none` serves the student only. Default: report.json's source.",
)
@click.option("--host", default=ServeConfig.host, show_default=True, help="Interface to bind (0.0.0.0 exposes it).")
@click.option("--port", default=ServeConfig.port, show_default=True, type=click.IntRange(0, 65535))
@click.option("--engine", type=click.Choice(ENGINES), default=ServeConfig.engine, show_default=True)
@click.option(
    "--api-key",
    envvar="NVFP4_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` (or NVFP4_API_KEY) everywhere but /health and /ready; the /ui page takes it as a browser password.",
)
@click.option(
    "--published-on",
    envvar="NVFP4_PUBLISHED_ON",
    default=None,
    help="In a container: the host interface its port is published on (compose sets it). A key is required unless the server is reachable from this machine only.",
)
@click.option("--key-metrics", is_flag=True, help="Require the API key on /metrics too (Prometheus then sends it).")
@click.option(
    "--max-num-seqs",
    default=Limits.max_num_seqs,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Running batch size (KV slots).",
)
@click.option(
    "--max-queue",
    default=Limits.max_queue,
    show_default=True,
    type=click.IntRange(0),
    help="Waiting choices per model before 429 (every engine).",
)
@click.option(
    "--max-body-bytes",
    default=Limits.max_body_bytes,
    show_default=True,
    type=click.IntRange(1024),
    help="Largest request body (413 above).",
)
@click.option(
    "--max-choices",
    default=Limits.max_choices,
    show_default=True,
    type=click.IntRange(1),
    help="Prompts x n per request (400 above).",
)
@click.option(
    "--max-stop-chars",
    default=Limits.max_stop_chars,
    show_default=True,
    type=click.IntRange(1),
    help="Longest stop string (400 above).",
)
@click.option(
    "--max-model-len",
    default=ServeConfig.max_model_len,
    show_default=True,
    type=click.IntRange(16),
    help="Context length per sequence.",
)
@click.option(
    "--drain-timeout",
    default=ServeConfig.drain_timeout,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds SIGTERM waits for running requests.",
)
@click.option(
    "--max-connections",
    default=ServeConfig.max_connections,
    show_default=True,
    type=click.IntRange(4),
    help="Open connections at once; past it the longest idle one is closed (a half-sent request, a kept-alive client). At most the open-file limit allows.",
)
@click.option(
    "--header-timeout",
    default=ServeConfig.header_timeout,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds a connection may take to send a complete request head (from connecting, or from its last answer).",
)
@click.option(
    "--body-timeout",
    default=ServeConfig.body_timeout,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds a /v1 request body may take to arrive (408 after).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch CPU threads (default: cores / served models; small decode ops lose more to thread sync than they gain).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=NativeSettings.device,
    show_default=True,
    help="Native engine: where the models and KV cache live (cuda: the student's linears run the Triton W4A16 kernel, the teacher bf16).",
)
@click.option(
    "--compile/--no-compile",
    "compile_decode",
    default=NativeSettings.compile,
    show_default=True,
    help="Native engine: torch.compile the decode step (faster decode; the first start compiles for ~1 min per model, later starts reuse the cache).",
)
@click.option(
    "--prefix-caching/--no-prefix-caching",
    "--enable-prefix-caching/--no-enable-prefix-caching",
    "prefix_caching",
    default=NativeSettings.prefix_caching,
    show_default=True,
    help="Native engine: reuse the KV cache of prompt prefixes seen before (a shared system prompt is prefilled once); vLLM's --enable-prefix-caching/--no-enable-prefix-caching are accepted. Engine vllm: pass vLLM's flag after `--`.",
)
@click.option("--ui", is_flag=True, help="Mount the Gradio side-by-side chat at /ui.")
@click.option("--log-level", default=ServeConfig.log_level, type=click.Choice(LOG_LEVELS))
@click.option(
    "--vllm-bin",
    default=None,
    help="--engine vllm: the `vllm` executable, or a Python with vllm (default: $NVFP4_VLLM_BIN, PATH).",
)
@click.option(
    "--trtllm-bin",
    default=None,
    help="--engine trtllm: the `trtllm-serve` executable (default: $NVFP4_TRTLLM_BIN, PATH).",
)
@click.option(
    "--engine-timeout",
    default=AdapterSettings.ready_timeout,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds an engine process may take to become ready.",
)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def serve(glue: dict | None, **flags) -> None:
    """Serve OUT's NVFP4 student (`student`) and its teacher (`teacher`) with an OpenAI-compatible API.

    With --engine vllm|trtllm|llamacpp, arguments after `--` go to the engine's own server."""
    logging.basicConfig(level=flags["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(config_from_flags(flags), mount_ui=(glue or {}).get("mount_ui"))
    except UserError as error:
        raise UserError(error.worded(SERVE_FLAGS)) from error
