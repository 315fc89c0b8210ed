"""Tool calling: a chat's `tools` and `tool_choice` become a ToolPlan (the tools the chat template shows, the
grammar that forces a call for `required` and a named tool, the model's own call format for `auto`), and a
finished answer becomes `tool_calls` the way the OpenAI client reads them."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from nvfp4.serve.protocol import APIError, ChatCompletionRequest
from nvfp4.serve.structured import Constraint, ConstraintError, check

ANY_OBJECT = {"type": "object"}
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)  # Qwen2.5 / Qwen3 / Hermes
LLAMA_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict]  # as the chat template takes them
    constraint: Constraint | None = None  # required / named: the grammar of the call
    named: str | None = None
    call_format: str | None = None  # auto: "hermes" | "llama3_json"

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"

    def releasable(self, text: str) -> int:
        """While streaming: how many leading characters of the answer so far are content for sure (no tool call can
        begin in them); the rest is held back until more text comes or the answer ends."""
        if self.mode == "none":
            return len(text)
        if self.mode != "auto":
            return 0  # the whole answer is the call
        if self.call_format == "hermes":
            start = text.find("<tool_call>")
            end = start if start >= 0 else len(text) - _partial_suffix(text, "<tool_call>")
            return len(text[:end].rstrip())  # trailing blanks wait: the answer's content is stripped before a call
        head = text.lstrip()
        if not head or head.startswith("{") or LLAMA_TAG.startswith(head[: len(LLAMA_TAG)]):
            return 0  # Llama 3 writes a call as the whole answer
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished answer -> (content, calls); an answer that holds no well-formed call stays content."""
        if self.mode == "named":
            return _named_call(self.named, text)
        if self.mode == "required":
            return _required_calls(text)
        if self.mode == "auto":
            return (_hermes_calls if self.call_format == "hermes" else _llama_calls)(text)
        return text, []


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)


def tool_plan(body: ChatCompletionRequest, chat_template: str | None) -> ToolPlan | None:
    """None for a chat without tools; a 400 for a tool_choice that cannot be honoured."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none":
            raise APIError(400, "`tool_choice` needs `tools`", "tool_choice")
        return None
    tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in body.tools]
    schemas = _parameter_schemas(body)
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "required":
        return ToolPlan("required", tools, Constraint.json_schema(_calls_schema(schemas, body.parallel_tool_calls)))
    if choice == "auto":
        return ToolPlan("auto", tools, call_format=_call_format(chat_template))
    name = choice.function.name
    if name not in schemas:
        raise APIError(400, f"`tool_choice` names `{name}`, which is not among the `tools`", "tool_choice")
    return ToolPlan("named", tools, Constraint.json_schema(schemas[name]), named=name)


def _parameter_schemas(body: ChatCompletionRequest) -> dict[str, dict]:
    schemas = {}
    for tool in body.tools:
        function = tool.function
        if function.name in schemas:
            raise APIError(400, f"`tools` defines `{function.name}` twice", "tools")
        schemas[function.name] = function.parameters or ANY_OBJECT
        try:
            check(Constraint.json_schema(schemas[function.name]))
        except ConstraintError as error:
            raise APIError(400, f"`tools`: the parameters of `{function.name}`: {error}", "tools") from error
    return schemas


def _calls_schema(schemas: dict[str, dict], parallel: bool) -> dict:
    """vLLM's shape for tool_choice=required: a JSON array of {"name", "parameters"} objects."""
    call = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for name, schema in schemas.items()
    ]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": call}}


def _call_format(chat_template: str | None) -> str:
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if LLAMA_TAG in template or '"parameters": dictionary of argument name' in template:
        return "llama3_json"
    raise APIError(
        400,
        "this model's chat template defines no tool-call format, so `tool_choice` auto cannot be "
        'parsed; use tool_choice "required" or a named function',
        "tool_choice",
    )


def _arguments(value) -> str | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _named_call(name: str, text: str) -> tuple[str | None, list[ToolCall]]:
    arguments = _arguments(text)
    return (None, [ToolCall(name, arguments)]) if arguments is not None else (text, [])


def _required_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    calls = [_call(item, "parameters") for item in items] if isinstance(items, list) else [None]
    return (None, calls) if calls and None not in calls else (text, [])


def _call(item, arguments_key: str) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = _arguments(item.get(arguments_key, item.get("arguments", {})))
    return None if arguments is None else ToolCall(item["name"], arguments)


def _hermes_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in HERMES_CALL.findall(text[start:]):
        try:
            calls.append(_call(json.loads(block), "arguments"))
        except json.JSONDecodeError:
            return text, []
    if not calls or None in calls:
        return text, []
    return text[:start].strip() or None, calls


def _llama_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix(LLAMA_TAG).strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    parts = [body] if _is_json(body) else body.split(";")  # Llama 3.x separates parallel calls with `;`
    for part in parts:
        try:
            calls.append(_call(json.loads(part), "parameters"))
        except json.JSONDecodeError:
            return text, []
    return (None, calls) if calls and None not in calls else (text, [])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
