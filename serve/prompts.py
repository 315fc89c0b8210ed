"""Prompt token ids from requests: the chat template rendered with markers standing in for the contents, the
contents tokenized as plain text, completion prompts tokenized or checked. Runs on worker threads, many at once,
so nothing here changes state that another request's tokenization reads."""

from __future__ import annotations

import secrets
import threading
import weakref

from nvfp4.serve.interface import Engine
from nvfp4.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (plain, literal) Rust copies
_BACKENDS_LOCK = threading.Lock()


class PromptEncoder:
    """encode(text) and encode(text, literal=True) (special tokens typed in the text stay text), safe on many
    threads at once. transformers' `split_special_tokens` is a flag it sets on the tokenizer's one Rust backend
    before each encode: two threads encoding with different settings would get each other's. A fast
    tokenizer's backend is copied once per setting instead, each copy configured once and only read after."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backends = _fixed_backends(tokenizer)
        self.lock = threading.Lock()  # a tokenizer without a Rust backend is called one thread at a time

    def encode(self, text: str, add_special_tokens: bool = False, literal: bool = False) -> list[int]:
        if not text and not add_special_tokens:
            return []
        if self.backends is not None:
            return self.backends[literal].encode(text, add_special_tokens=add_special_tokens).ids
        with self.lock:
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


def chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model `{body.model}` has no chat template; use /v1/completions", "messages")
    encoder = PromptEncoder(tokenizer)
    # each content becomes a marker while the template renders, then is tokenized with special-token parsing
    # off: `<|im_end|>` typed by a user is text, never a control token
    marker = f"\x00{secrets.token_hex(8)}\x00"
    contents = [m.text() for m in body.messages]
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": f"{marker}{i}{marker}"}
                for i, m in enumerate(body.messages)]
    pieces = _render(tokenizer, messages).split(marker)  # template, content 0, template, content 1, ...
    if pieces[1::2] != [str(i) for i in range(len(contents))]:  # a template that edits or drops contents
        return encoder.encode(_render(tokenizer, [{**m, "content": c} for m, c in zip(messages, contents)]))
    ids = []
    for i, piece in enumerate(pieces):
        ids += encoder.encode(piece) if i % 2 == 0 else encoder.encode(contents[int(piece)], literal=True)
    return ids


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja raises its own errors (e.g. role order the template rejects)
        raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from error


def completion_prompts(engine: Engine, body: CompletionRequest) -> list[list[int]]:
    prompt, encoder = body.prompt, PromptEncoder(engine.tokenizer)
    if isinstance(prompt, str):
        prompts = [encoder.encode(prompt, add_special_tokens=True)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [encoder.encode(p, add_special_tokens=True) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = len(engine.tokenizer)
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return prompts
