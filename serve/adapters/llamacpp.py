"""`--engine llamacpp`: OUT/llamacpp/model.gguf on llama.cpp through llama-cpp-python's OpenAI server.

llama-cpp-python's server takes text prompts only, so the prompt ids our routes built (chat template
applied) are decoded with special tokens kept; llama.cpp re-tokenizes them with special-token parsing. So,
unlike on the other engines, chat content that spells a special token (`<|im_end|>`) becomes that control
token here: the server takes no token-id prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from nvfp4.errors import UserError
from nvfp4.serve.adapters.base import ProxyEngine, UpstreamError
from nvfp4.serve.interface import SamplingParams
from nvfp4.serve.structured import Constraint


def check_installed() -> None:
    for module in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--engine llamacpp needs llama-cpp-python's server (pip install 'llama-cpp-python[server]'): no {module}"
            )


def student_gguf(out: Path) -> Path:
    gguf = out / "llamacpp" / "model.gguf"
    if not gguf.is_file():
        raise UserError(f"no GGUF at {gguf} (run `nvfp4 convert ... -o {out}` with the llamacpp target)")
    return gguf


class LlamaCppEngine(ProxyEngine):
    kind = "llamacpp"
    health_path = "/v1/models"  # the server loads the model before it listens
    metrics_path = None  # llama-cpp-python's server has no Prometheus endpoint

    def __init__(self, name: str, model: str, tokenizer, max_model_len: int, threads: int | None = None, **kwargs):
        super().__init__(name, model, tokenizer, max_model_len, **kwargs)
        self.threads = threads or max(1, os.cpu_count() or 1)

    @classmethod
    def for_student(cls, out: Path, name: str, opts) -> LlamaCppEngine:
        from nvfp4.serve.adapters import student_tokenizer_dir, tokenizer_of

        check_installed()
        return cls(
            name,
            str(student_gguf(out)),
            tokenizer_of(student_tokenizer_dir(out)),
            opts.max_model_len,
            threads=opts.threads,
            **opts.common(),
        )

    @classmethod
    def for_teacher(cls, source: str | None, name: str, opts) -> LlamaCppEngine | None:
        from nvfp4.converter.models import embedded_gguf, resolve_model
        from nvfp4.serve.adapters import tokenizer_of

        gguf = embedded_gguf() if source is None else Path(source) if str(source).endswith(".gguf") else None
        if gguf is None:
            return None
        return cls(
            name,
            str(gguf),
            tokenizer_of(resolve_model(source)),
            opts.max_model_len,
            threads=opts.threads,
            **opts.common(),
        )

    def command(self, port: int) -> list[str]:
        return [
            self.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            self.model,
            "--model_alias",
            self.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(self.max_model_len),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--interrupt_requests",
            "False",
            *self.extra_args,
        ]

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict:
        if params.logprobs is not None:
            raise UpstreamError(400, f"logprobs are not supported on --engine {self.kind}")
        if params.stop_token_ids:
            raise UpstreamError(400, f"stop_token_ids are not supported on --engine {self.kind}; use stop strings")
        body = {
            "model": self.name,
            "prompt": self.tokenizer.decode(prompt_ids, skip_special_tokens=False),
            "max_tokens": params.max_tokens,
            "min_tokens": params.min_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": max(params.top_k, 0),
            "min_p": 0.0,
            "seed": params.seed,
            "stop": list(params.stop),
            "repeat_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        if params.ignore_eos and self.tokenizer.eos_token_id is not None:
            body.update(logit_bias={str(self.tokenizer.eos_token_id): -1e9}, logit_bias_type="input_ids")
        if params.constraint is not None:
            body["grammar"] = gbnf(params.constraint, self.kind)
        return body


def gbnf(constraint: Constraint, kind: str = "llamacpp") -> str:
    """The constraint as the GBNF grammar llama-cpp-python's /v1/completions takes (its only constraint field): a
    JSON schema through llama-cpp-python's own converter, choices as literals, an EBNF grammar as written (xgrammar
    reads GBNF's dialect); a regex has no converter there."""
    if constraint.kind == "json":
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            return json_schema_to_gbnf(constraint.spec)
        except Exception as error:  # its converter raises plain exceptions for the schemas it cannot express
            raise UpstreamError(
                400, f"--engine {kind} cannot express this JSON schema as a grammar: {error}"
            ) from error
    if constraint.kind == "choice":
        return "root ::= " + " | ".join(json.dumps(option) for option in json.loads(constraint.spec))
    if constraint.kind == "grammar":
        return constraint.spec
    raise UpstreamError(
        400, f"a regex constraint is not supported on --engine {kind}; send a JSON schema, choices or a grammar"
    )
