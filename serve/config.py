"""ServeConfig: everything `nvfp4 serve OUT` takes, checked once where it is made.

A bad value is a UserError worded by its field in backquotes (`api_key`, `limits.max_queue`); the command
rewrites the field as the flag that set it (serve/cli.py SERVE_FLAGS). A leaf besides Limits: it imports
nothing heavy, so a config can be built (and refused) before the serve extras load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from nvfp4.errors import UserError
from nvfp4.exposure import check_key
from nvfp4.serve.limits import Limits

ENGINES = ("native", "vllm", "trtllm", "llamacpp")  # all but native: serve/adapters/
DEVICES = ("cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
LIMIT_RANGES = {  # Limits field -> (lowest, highest or None)
    "max_body_bytes": (1024, None),
    "max_choices": (1, None),
    "max_stop_chars": (1, None),
    "max_num_seqs": (1, 1024),
    "max_queue": (0, None),
}


@dataclass(frozen=True)
class NativeSettings:
    """The native engine's own settings."""

    device: str = "cpu"  # where the models and KV cache live (cuda: the Triton W4A16 kernel)
    compile: bool = False  # torch.compile the decode step
    prefix_caching: bool = True  # reuse the KV of prompt prefixes seen before (block-hashed, across requests)


@dataclass(frozen=True)
class AdapterSettings:
    """The engine-process settings of `engine` vllm, trtllm and llamacpp (serve/adapters/)."""

    args: tuple[str, ...] = ()  # passed through to the engine's own server
    vllm_bin: str | None = None  # default: $NVFP4_VLLM_BIN, then PATH
    trtllm_bin: str | None = None  # default: $NVFP4_TRTLLM_BIN, then PATH
    ready_timeout: float = 900.0  # seconds an engine process may take to become ready

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))


@dataclass(frozen=True)
class ConnectionLimits:
    """What the server holds for clients that have not sent a request yet (slowloris): uvicorn keeps a
    half-sent head, or a body trickling in, open for ever."""

    max_connections: int = 1024  # open at once; beyond, the longest idle one is closed
    header_timeout: float = 10.0  # seconds from connecting, or from the last answer, to a complete request head
    body_timeout: float = 60.0  # seconds a /v1 body may take to arrive (408 after)
    backlog: int = 2048  # the listen queue (uvicorn's), and what asyncio accepts in one go: fitted to the files


@dataclass(frozen=True)
class ServeConfig:
    out: Path  # a `nvfp4 convert` output folder
    teacher: str | None = None  # a path, "none" (the student alone), or None (report.json's source)
    engine: str = "native"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # a secret: kept out of logs and reprs
    published_on: str | None = None  # in a container: the host interface its port is published on
    key_metrics: bool = False  # /metrics needs the key too
    limits: Limits = field(default_factory=Limits)
    max_model_len: int = 2048
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running requests
    max_connections: int = ConnectionLimits.max_connections
    header_timeout: float = ConnectionLimits.header_timeout
    body_timeout: float = ConnectionLimits.body_timeout
    threads: int | None = None  # torch threads per served model (None: the cores split between them)
    native: NativeSettings = field(default_factory=NativeSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    ui: bool = False  # mount the side-by-side chat page at /ui
    log_level: str = "info"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        _one_of(self.engine, ENGINES, "engine")
        _one_of(self.native.device, DEVICES, "native.device")
        _one_of(self.log_level, LOG_LEVELS, "log_level")
        _within(self.port, 0, 65535, "port")
        _within(self.max_model_len, 16, None, "max_model_len")
        _within(self.drain_timeout, 0, None, "drain_timeout")
        _within(self.max_connections, 4, None, "max_connections")
        _within(self.header_timeout, 0.1, None, "header_timeout")
        _within(self.body_timeout, 0.1, None, "body_timeout")
        _within(self.adapter.ready_timeout, 1, None, "adapter.ready_timeout")
        if self.threads is not None:
            _within(self.threads, 1, None, "threads")
        for limit in fields(Limits):
            _within(getattr(self.limits, limit.name), *LIMIT_RANGES[limit.name], f"limits.{limit.name}")
        check_key(self.api_key, self.host, self.published_on)
        self._check_engine_settings()

    @property
    def connections(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.header_timeout, self.body_timeout)

    def _check_engine_settings(self) -> None:
        """Settings of one kind of engine given to the other."""
        if self.engine == "native" and self.adapter.args:
            raise UserError(
                f"`adapter.args` ({' '.join(self.adapter.args)}) go to engine vllm, trtllm or llamacpp, not native",
                field="adapter.args",
            )
        if self.engine != "native" and self.native.device != "cpu":
            raise UserError(
                f"`native.device` is the native engine's; engine {self.engine} places its models itself",
                field="native.device",
            )


def _one_of(value, choices: tuple, name: str) -> None:
    if value not in choices:
        raise UserError(f"`{name}` is {value!r}; choose one of {', '.join(choices)}", field=name)


def _within(value, low, high, name: str) -> None:
    if not low <= value or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"`{name}` is {value}; it must be {bound}", field=name)
