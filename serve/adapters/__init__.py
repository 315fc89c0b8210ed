"""Real-engine adapters (`nvfp4 serve OUT --engine vllm|trtllm|llamacpp`).

Each adapter runs the engine's own OpenAI server as a child process and implements our Engine
interface over it, so routes, `student`/`teacher` aliases and our Prometheus series are the same
as with the native engine. The teacher runs on the same engine where it fits (an HF folder on vLLM
or TensorRT-LLM, a .gguf on llama.cpp), otherwise on the native engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nvfp4.converter.layout import STUDENT, student_folder
from nvfp4.errors import UserError
from nvfp4.serve.adapters.base import ProxyEngine
from nvfp4.serve.interface import Engine

ADAPTERS = {  # --engine NAME -> the ProxyEngine subclass that runs it, as module:class
    "vllm": "nvfp4.serve.adapters.vllm:VLLMEngine",
    "trtllm": "nvfp4.serve.adapters.trtllm:TRTLLMEngine",
    "llamacpp": "nvfp4.serve.adapters.llamacpp:LlamaCppEngine",
}


@dataclass(frozen=True)
class EngineOptions:
    engine: str
    max_model_len: int = 2048
    extra_args: tuple[str, ...] = ()  # passed through to the engine after `--`
    vllm_bin: str | None = None
    trtllm_bin: str | None = None
    threads: int | None = None
    ready_timeout: float = 600.0
    env: dict[str, str] = field(default_factory=dict)
    max_num_seqs: int = 16  # requests sent to the engine at once; the rest wait in our process

    def common(self) -> dict:
        """The keyword arguments every ProxyEngine takes."""
        return dict(
            extra_args=self.extra_args, ready_timeout=self.ready_timeout, env=self.env, max_num_seqs=self.max_num_seqs
        )


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def student_tokenizer_dir(out: Path) -> Path:
    for folder in (student_folder(out), out / "vllm"):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise UserError(f"no tokenizer in {out}/{STUDENT} or {out}/vllm (run `nvfp4 convert ... -o {out}`)")


def adapter(engine: str) -> type[ProxyEngine]:
    """The adapter class registered for `engine` (imported on demand: each pulls its own engine's helpers)."""
    if engine not in ADAPTERS:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ADAPTERS)}")
    module, name = ADAPTERS[engine].split(":")
    return getattr(importlib.import_module(module), name)


def teacher_engine(source: str | None, name: str, opts: EngineOptions, native: Callable[[], Engine]) -> Engine:
    """The teacher on the student's engine where that engine reads its format, else `native()`."""
    return adapter(opts.engine).for_teacher(source, name, opts) or native()


def adapter_models(
    out: Path, teacher: str | None, opts: EngineOptions, native_teacher: Callable[[str | None, str], Engine]
) -> dict[str, Engine]:
    """{"student": adapter, "teacher": adapter or native} as `nvfp4 serve --engine ADAPTER` serves them."""
    from nvfp4.converter.models import DEFAULT_MODEL_NAME, resolve_model
    from nvfp4.serve.native.loader import serves_teacher, teacher_source

    models: dict[str, Engine] = {"student": adapter(opts.engine).for_student(out, out.name + "-nvfp4", opts)}
    if serves_teacher(teacher):
        source = teacher_source(out, teacher)
        resolve_model(source)  # fail now, with one clear line, on a bad path
        name = Path(source).name if source else DEFAULT_MODEL_NAME
        models["teacher"] = teacher_engine(source, name, opts, lambda: native_teacher(source, name))
    return models


async def engine_metrics_text(models: dict[str, Engine]) -> str:
    """The engines' own expositions, merged: each sample gets a `served_model` label with our alias."""
    families: dict[str, list[str]] = {}  # a family's samples must stay together in the text format
    for alias, engine in models.items():
        if not isinstance(engine, ProxyEngine):
            continue
        try:
            parsed = list(text_string_to_metric_families(await engine.engine_metrics()))
        except ValueError:  # not Prometheus text (an engine version that answers JSON there)
            continue
        for family in parsed:
            lines = families.setdefault(
                family.name,
                [
                    f"# HELP {family.name} {_escape(family.documentation, quotes=False)}",
                    f"# TYPE {family.name} {family.type}",
                ],
            )
            for sample in family.samples:
                labels = {**sample.labels, "served_model": alias}
                body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{body}}} {_number(sample.value)}")
    return "".join(line + "\n" for lines in families.values() for line in lines)


def _escape(text: str, quotes: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quotes else text


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def mount_engine_metrics(app, models: dict[str, Engine]) -> None:
    """GET /metrics/engine: the wrapped engines' own Prometheus series (ours stay at /metrics)."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    async def engine_metrics() -> Response:
        return Response(await engine_metrics_text(models), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics/engine", engine_metrics, methods=["GET"], include_in_schema=False)
