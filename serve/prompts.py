"""Prompt token ids from requests: the chat template rendered with markers standing in for the contents, the
contents tokenized as plain text, completion prompts tokenized or checked. Runs on worker threads, many at once,
so nothing here changes state that another request's tokenization reads."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from nvfp4.serve.interface import Engine
from nvfp4.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

PROMPT_WORKERS = 2  # threads rendering chat templates and tokenizing, for all the models of a server
UNKNOWN_TOKEN_CHARS = 64  # the longest token of a tokenizer that cannot list its vocabulary
_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> characters
_LONGEST_TOKEN_LOCK = threading.Lock()
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (plain, literal) Rust copies
_BACKENDS_LOCK = threading.Lock()
_WORKERS = ThreadPoolExecutor(PROMPT_WORKERS, thread_name_prefix="nvfp4-prompts")


async def on_prompt_workers(build, *args):
    """build(*args) on the prompt workers: never on the event loop, nor in its default executor (which others need
    meanwhile); at most PROMPT_WORKERS prompts at once, so their Python (templates) takes the GIL from the loop's
    thread only so often."""
    return await asyncio.get_running_loop().run_in_executor(_WORKERS, build, *args)


class PromptEncoder:
    """encode(text) and encode(text, literal=True) (special tokens typed in the text stay text), safe on many
    threads at once. transformers' `split_special_tokens` is a flag it sets on the tokenizer's one Rust backend
    before each encode: two threads encoding with different settings would get each other's. A fast
    tokenizer's backend is copied once per setting instead, each copy configured once and only read after
    (transformers' Python tokenizers take the setting per call)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backends = _fixed_backends(tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False, literal: bool = False) -> list[int]:
        if not text and not add_special_tokens:
            return []
        if self.backends is not None:
            return self.backends[literal].encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=literal)


def _fixed_backends(tokenizer) -> tuple | None:
    """(plain, literal): copies of a fast tokenizer's Rust backend with special-token splitting off and on; None
    for a tokenizer without one. Made once per tokenizer."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    with _BACKENDS_LOCK:
        if tokenizer not in _BACKENDS:
            _BACKENDS[tokenizer] = tuple(_backend_copy(backend, split_special_tokens=s) for s in (False, True))
        return _BACKENDS[tokenizer]


def _backend_copy(backend, split_special_tokens: bool):
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = split_special_tokens
    return copy


def chat_prompt(
    engine: Engine, body: ChatCompletionRequest, tools: list[dict] | None = None, add_generation_prompt: bool = True
) -> list[int]:
    """`tools` (as the template takes them) are rendered into the prompt where the template shows them; without
    add_generation_prompt (/tokenize's), the messages alone, with no opened assistant turn."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model `{body.model}` has no chat template; use /v1/completions", "messages")
    encoder = PromptEncoder(tokenizer)
    # each content becomes a marker while the template renders, then is tokenized with special-token parsing
    # off: `<|im_end|>` typed by a user is text, never a control token
    marker = f"\x00{secrets.token_hex(8)}\x00"
    contents = [m.text() for m in body.messages]
    messages = [
        {**_tool_fields(m), "role": "system" if m.role == "developer" else m.role, "content": f"{marker}{i}{marker}"}
        for i, m in enumerate(body.messages)
    ]
    _refuse_control_tokens(tokenizer, tools, messages)
    pieces = _render(tokenizer, messages, tools, add_generation_prompt).split(
        marker
    )  # template, content 0, template, content 1, ...
    if pieces[1::2] != [str(i) for i in range(len(contents))]:  # a template that edits or drops contents
        messages = [{**m, "content": c} for m, c in zip(messages, contents)]
        return encoder.encode(_render(tokenizer, messages, tools, add_generation_prompt))
    ids = []
    for i, piece in enumerate(pieces):
        ids += encoder.encode(piece) if i % 2 == 0 else encoder.encode(contents[int(piece)], literal=True)
        if len(ids) > engine.max_model_len:  # the contents after it need no tokenizing
            raise _too_long(engine, f"the messages have over {len(ids)} tokens", "messages")
    return ids


def _tool_fields(message) -> dict:
    """An assistant's earlier tool calls (arguments as objects, which templates print with `tojson`) and a tool
    answer's call id, as chat templates read them."""
    fields = {}
    if message.tool_calls:
        fields["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _as_object(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _as_object(arguments: str | dict):
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _refuse_control_tokens(tokenizer, tools: list[dict] | None, messages: list[dict]) -> None:
    """Tool definitions and earlier calls render as template text, which is tokenized with special-token parsing
    on: spelling a control token there would forge a turn."""
    calls = [m["tool_calls"] for m in messages if "tool_calls" in m]
    if not tools and not calls:
        return
    text = json.dumps([tools, calls], ensure_ascii=False)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    forged = next((t.content for t in added if getattr(t, "special", False) and t.content in text), None)
    if forged is not None:
        raise APIError(400, f"`tools` and `tool_calls` may not contain the control token {forged!r}", "tools")


def _render(
    tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True
) -> str:
    try:
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except Exception as error:  # jinja raises its own errors (e.g. role order the template rejects)
        raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from error


def completion_prompts(engine: Engine, body: CompletionRequest) -> list[list[int]]:
    """Each prompt's ids, checked as soon as it has them: one prompt past the context spares the rest their
    tokenizing."""
    encoder, prompts = PromptEncoder(engine.tokenizer), []
    for prompt in _each_prompt(body):
        ids = encoder.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) > engine.max_model_len:
            raise _too_long(engine, f"a prompt has {len(ids)} tokens", "prompt")
        limit = engine.token_id_limit()  # the model's embedding may have fewer rows than the tokenizer has tokens
        if not 0 <= min(ids) <= max(ids) < limit:
            raise APIError(400, f"prompt token ids must be in [0, {limit})", "prompt")
        prompts.append(ids)
    return prompts


def _each_prompt(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt


def max_prompt_chars(engine: Engine) -> int:
    """No prompt of more characters fits the context: a token stands for at most the characters of the longest
    vocabulary entry (a byte-level entry's characters are bytes, and a text character is at least one byte)."""
    return engine.max_model_len * _longest_token_chars(engine.tokenizer)


def _longest_token_chars(tokenizer) -> int:
    with _LONGEST_TOKEN_LOCK:
        if tokenizer not in _LONGEST_TOKEN:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            _LONGEST_TOKEN[tokenizer] = max(map(len, vocab), default=UNKNOWN_TOKEN_CHARS)
        return _LONGEST_TOKEN[tokenizer]


def check_chat_fits(engine: Engine, body: ChatCompletionRequest) -> None:
    """Before admission: refuse a chat that cannot fit the context, at the cost of a length check (each message
    takes a token at least)."""
    if len(body.messages) > engine.max_model_len:
        raise _too_long(engine, f"{len(body.messages)} messages", "messages")
    chars = sum(m.text_length() for m in body.messages)
    if chars > max_prompt_chars(engine):
        raise _too_long(engine, f"{chars} characters of content", "messages")


def check_completion_fits(engine: Engine, body: CompletionRequest) -> None:
    for prompt in _each_prompt(body):
        if isinstance(prompt, str) and len(prompt) > max_prompt_chars(engine):
            raise _too_long(engine, f"a prompt of {len(prompt)} characters", "prompt")
        if not isinstance(prompt, str) and len(prompt) > engine.max_model_len:
            raise _too_long(engine, f"a prompt has {len(prompt)} tokens", "prompt")


def _too_long(engine: Engine, what: str, param: str) -> APIError:
    return APIError(
        400,
        f"this model's maximum context length is {engine.max_model_len} tokens; {what} cannot fit in it",
        param,
        "context_length_exceeded",
    )
