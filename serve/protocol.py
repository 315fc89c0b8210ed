"""The OpenAI API subset we serve, as pydantic models: requests validate themselves, responses are built
through their models (so /openapi.json describes both), errors have one shape."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from nvfp4.serve.interface import SamplingParams
from nvfp4.serve.structured import Constraint

MAX_N = 16
MAX_LOGPROBS = 20
MAX_MESSAGES = 4096  # per chat, whatever the context: more is refused before any message is validated
MAX_TOOLS = 128
MAX_PROMPTS = 64  # list prompts of one completion request (the server's --max-choices bounds prompts x n)
# OpenAI fields we cannot honour: a 400 naming the field (as vLLM answers) rather than a silent ignore
UNSUPPORTED = ("functions", "function_call", "logit_bias", "suffix", "best_of", "audio", "modalities", "prediction")
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata...)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, [], {}) and not (name == "best_of" and data[name] == 1):
                    raise ValueError(f"`{name}` is not supported by this server")
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JSONSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`response_format` of type json_schema needs a `json_schema` object")
        return self


class StructuredOutputs(OpenAIModel):
    """vLLM's `structured_outputs` (its older `guided_*` fields map onto it): exactly one constraint."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> Constraint | None:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) > 1:
            raise APIError(400, "`structured_outputs` takes one of json, regex, choice, grammar", "structured_outputs")
        if not given:
            return None
        if given[0] == "json_":
            return Constraint.json_schema(self.json_)
        if given[0] == "json_object":
            return Constraint.json_schema(None)
        if given[0] == "choice":
            return Constraint.choice(self.choice)
        return Constraint(given[0], getattr(self, given[0]))


class _Sampling(OpenAIModel):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def output_constraint(self) -> Constraint | None:
        """The one output constraint of response_format, structured_outputs or guided_* (a 400 for several)."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            found.append(
                ("response_format", Constraint.json_schema(fmt.json_schema.schema_ if fmt.json_schema else None))
            )
        if self.structured_outputs is not None and (constraint := self.structured_outputs.constraint()):
            found.append(("structured_outputs", constraint))
        guided = StructuredOutputs.model_validate(
            {
                "json": self.guided_json,
                "regex": self.guided_regex,
                "choice": self.guided_choice,
                "grammar": self.guided_grammar,
            }
        )
        if (constraint := _guided(guided)) is not None:
            found.append(("guided_*", constraint))
        if len(found) > 1:
            names = " and ".join(f"`{name}`" for name, _ in found)
            raise APIError(400, f"{names} each constrain the output: send one", found[1][0])
        return found[0][1] if found else None

    def sampling(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        index: int,
        constraint: Constraint | None = None,
    ) -> SamplingParams:
        """Choice `index` of n gets seed + index, so n > 1 with a seed is reproducible and varied."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stops(),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
        )


def _guided(guided: StructuredOutputs) -> Constraint | None:
    try:
        return guided.constraint()
    except APIError as error:
        raise APIError(400, "the `guided_*` fields take one of json, regex, choice, grammar", "guided_json") from error


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict = "{}"


class ToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def text_length(self) -> int:
        if isinstance(self.content, list):
            return sum(len(part.text) for part in self.content)
        return len(self.content or "")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools", mode="before")
    @classmethod
    def _tools_are_functions(cls, value):
        if isinstance(value, list) and not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) for t in value
        ):
            raise ValueError('`tools`: each tool is {"type": "function", "function": {"name": ...}}')
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value):
        if isinstance(value, list) and len(value) > MAX_MESSAGES:  # before each one is validated (130,000: 1 s)
            raise ValueError(f"at most {MAX_MESSAGES} messages per request")
        return value

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    # list[int] before list[str]: a long token-id prompt is then validated once (trying list[str] on 700,000 ids
    # first made 700,000 errors: 0.25 s)
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=0, le=1_000_000)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data):
        if isinstance(data, dict) and any(data.get(name) not in (None, []) for name in ("tools", "tool_choice")):
            raise ValueError("`tools` and `tool_choice` are for /v1/chat/completions")
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_count(cls, value):
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    def prompt_count(self) -> int:
        return 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)


class TokenizeRequest(OpenAIModel):
    """vLLM's POST /tokenize: a `prompt` (tokenized as /v1/completions does), or chat `messages` (rendered by the
    chat template as /v1/chat/completions does). `model` defaults to the first one served."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool = True  # prompt only (the chat template writes its own)
    return_token_strs: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value):
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages per request")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` or `messages`")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- responses ---------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server answers with an OpenAI error (status, message, the parameter at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    detail = ErrorDetail(
        message=message,
        type=ERROR_TYPES.get(status, "internal_error"),
        param=param,
        code=code if code is not None else status,
    )
    return ErrorResponse(error=detail).model_dump()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_tool_calls(self, handler):
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "nvfp4"
    root: str
    parent: str | None = None  # the alias a real model name stands for
    max_model_len: int | None = None  # the context length, as vLLM's cards carry it
    nvfp4: dict | None = None  # scheme, sizes, held-out KL and chat template of the served checkpoint


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openapi_responses(ok: type[BaseModel] | None, stream: bool = False) -> dict:
    """The `responses` of a route: its 200 model (plus SSE where it streams) and the error shape."""
    responses: dict = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
    if ok is not None:
        responses[200] = {"model": ok, **({"content": {"text/event-stream": {}}} if stream else {})}
    return responses


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
