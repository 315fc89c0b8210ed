"""`nvfp4 serve OUT`: the NVFP4 student and its BF16 teacher behind one OpenAI-compatible endpoint."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from nvfp4.errors import UserError, require
from nvfp4.serve.limits import Limits

ENGINES = ("native", "vllm", "trtllm", "llamacpp")  # all but native: serve/adapters/
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_server(app, host: str, port: int, drain_timeout: float, log_level: str = "info") -> None:
    """uvicorn handles SIGTERM/SIGINT: stop accepting, let requests finish (bounded), then lifespan shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # uvicorn re-raises captured signals at exit; a drained SIGTERM exits 0
                self._captured_signals.remove(sig)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    Server(config).run()


def check_key(api_key: str | None, host: str, published_on: str | None) -> None:
    """An empty key is a mistake; no key is one too where other machines reach the server."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or NVFP4_API_KEY) is empty: set a real key, or leave it unset on a loopback host")
    reachable_on = published_on or host
    if api_key is None and reachable_on not in LOOPBACK:
        raise UserError(f"serving on {reachable_on} without a key lets any machine that reaches it use the models: "
                        f"set --api-key (or NVFP4_API_KEY), or bind 127.0.0.1")


def threads_per_model(threads: int | None, num_models: int, cpus: int | None = None) -> int:
    """Given, else the cores split between the served models: each computes at the same time as the other."""
    import os

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


def native_engines(out: Path, teacher: str | None, max_num_seqs: int, max_queue: int, max_model_len: int, device: str = "cpu",
                   compile: bool = False) -> dict:
    from nvfp4.converter.models import resolve_model
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import SharedTensors, check_native, load_student, load_teacher, serves_teacher, teacher_source

    check_device(device)
    if not (out / "trtllm" / "config.json").is_file():
        raise UserError(f"no student checkpoint at {out / 'trtllm'} (run `nvfp4 convert ... -o {out}` first)")
    check_native(out / "trtllm", "student")
    kwargs = dict(max_num_seqs=max_num_seqs, max_queue=max_queue, max_model_len=max_model_len, compile=compile)
    student_name = out.name + "-nvfp4"
    shared = SharedTensors()  # the student's unquantized tensors are the teacher's: held once
    engines = {"student": NativeEngine(student_name, shared.loader(lambda: load_student(out, device)), **kwargs)}
    if serves_teacher(teacher):
        source = teacher_source(out, teacher)
        check_native(resolve_model(source), "teacher")  # fail now, with one clear line
        name = Path(source).name if source else "SmolLM2-135M-Instruct"
        engines["teacher"] = NativeEngine(name, shared.loader(lambda: load_teacher(source, device)), **kwargs)
    return engines


def check_device(device: str) -> None:
    """The native engine runs on CPU, or on CUDA with the Triton kernels; refuse a device it cannot use."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; serve with --device cpu")
        require("triton", "triton")


def adapter_engines(out: Path, teacher, engine, engine_args, max_num_seqs, max_queue, max_model_len, threads,
                    vllm_bin, trtllm_bin, engine_timeout) -> dict:
    import os

    from nvfp4.converter.models import resolve_model
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import check_native, load_teacher
    from nvfp4.serve.adapters import EngineOptions, adapter_models

    opts = EngineOptions(engine, max_model_len, tuple(engine_args), vllm_bin, trtllm_bin,
                         engine_threads(threads, teacher, os.cpu_count() or 1), engine_timeout, max_num_seqs=max_num_seqs)

    def native_teacher(source, name):
        check_native(resolve_model(source), "teacher")
        kwargs = dict(max_num_seqs=max_num_seqs, max_queue=max_queue, max_model_len=max_model_len)
        return NativeEngine(name, lambda: load_teacher(source)[:2], **kwargs)

    return adapter_models(out, teacher, opts, native_teacher)


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--teacher", default=None, help="Teacher model (HF folder or .gguf); `none` serves the student only. Default: report.json's source.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--engine", type=click.Choice(ENGINES), default="native", show_default=True)
@click.option("--api-key", envvar="NVFP4_API_KEY", default=None, help="Require `Authorization: Bearer KEY` (or NVFP4_API_KEY) everywhere but /health and /ready; the /ui page takes it as a browser password.")
@click.option("--published-on", envvar="NVFP4_PUBLISHED_ON", default=None, help="In a container: the host interface its port is published on (compose sets it). A key is required unless the server is reachable from this machine only.")
@click.option("--key-metrics", is_flag=True, help="Require the API key on /metrics too (Prometheus then sends it).")
@click.option("--max-num-seqs", default=16, show_default=True, type=click.IntRange(1, 1024), help="Running batch size (KV slots).")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(0), help="Waiting choices per model before 429 (every engine).")
@click.option("--max-body-bytes", default=Limits.max_body_bytes, show_default=True, type=click.IntRange(1024), help="Largest request body (413 above).")
@click.option("--max-choices", default=Limits.max_choices, show_default=True, type=click.IntRange(1), help="Prompts x n per request (400 above).")
@click.option("--max-stop-chars", default=Limits.max_stop_chars, show_default=True, type=click.IntRange(1), help="Longest stop string (400 above).")
@click.option("--max-model-len", default=2048, show_default=True, type=click.IntRange(16), help="Context length per sequence.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0), help="Seconds SIGTERM waits for running requests.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: cores / served models; small decode ops lose more to thread sync than they gain).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Native engine: where the models and KV cache live (cuda: the student's linears run the Triton W4A16 kernel, the teacher bf16).")
@click.option("--compile/--no-compile", "compile_decode", default=False, show_default=True, help="Native engine: torch.compile the decode step (faster decode; the first start compiles for ~1 min per model, later starts reuse the cache).")
@click.option("--ui", is_flag=True, help="Mount the Gradio side-by-side chat at /ui.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--vllm-bin", default=None, help="--engine vllm: the `vllm` executable, or a Python with vllm (default: $NVFP4_VLLM_BIN, PATH).")
@click.option("--trtllm-bin", default=None, help="--engine trtllm: the `trtllm-serve` executable (default: $NVFP4_TRTLLM_BIN, PATH).")
@click.option("--engine-timeout", default=900.0, show_default=True, type=click.FloatRange(1), help="Seconds an engine process may take to become ready.")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def serve(glue: dict | None, out: Path, teacher, host, port, engine, api_key, published_on, key_metrics, max_num_seqs,
          max_queue, max_body_bytes, max_choices, max_stop_chars, max_model_len, drain_timeout, threads, device,
          compile_decode, ui, log_level, vllm_bin, trtllm_bin, engine_timeout, engine_args) -> None:
    """Serve OUT's NVFP4 student (`student`) and its teacher (`teacher`) with an OpenAI-compatible API.

    With --engine vllm|trtllm|llamacpp, arguments after `--` go to the engine's own server."""
    require("serve", "fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx")
    from nvfp4.serve.app import build_app
    from nvfp4.serve.native.loader import report_facts

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_key(api_key, host, published_on)
    if not out.is_dir():
        raise UserError(f"not a convert output folder: {out}")
    if engine == "native" and engine_args:
        raise UserError(f"arguments after `--` ({' '.join(engine_args)}) go to --engine vllm|trtllm|llamacpp, not native")
    if engine == "native":
        models = native_engines(out, teacher, max_num_seqs, max_queue, max_model_len, device, compile_decode)
    else:
        if device != "cpu":
            raise UserError(f"--device is the native engine's; --engine {engine} places its models itself")
        models = adapter_engines(out, teacher, engine, engine_args, max_num_seqs, max_queue, max_model_len, threads,
                                 vllm_bin, trtllm_bin, engine_timeout)
    for alias, facts in report_facts(out, teacher, "trtllm" if engine == "native" else engine).items():
        if alias in models:
            models[alias].facts = facts
    set_threads(threads, len(models))
    limits = Limits(max_body_bytes, max_choices, max_stop_chars, max_num_seqs, max_queue)
    app = build_app(models, api_key=api_key, drain_timeout=drain_timeout, limits=limits, open_metrics=not key_metrics)
    if engine != "native":
        from nvfp4.serve.adapters import mount_engine_metrics

        mount_engine_metrics(app, models)
    if ui:  # the page comes from the ui package, which the `nvfp4` command stitches in (serve never imports it)
        if not glue or "mount_ui" not in glue:
            raise UserError("--ui is mounted by the `nvfp4` command: run `nvfp4 serve OUT --ui`")
        teacher_alias = "teacher" if "teacher" in models else "student"
        app = glue["mount_ui"](app, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
                               teacher_alias, "student", api_key)
    run_server(app, host, port, drain_timeout, log_level)
