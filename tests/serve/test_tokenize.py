"""vLLM's /tokenize and /detokenize, /v1/models' max_model_len and X-Request-Id (issue 38 B): a scripted engine over
ASGI, then the tiny model on a live server (its /tokenize counts what its chat route bills)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from nvfp4.serve.app import build_app
from nvfp4.serve.interface import Engine
from support.serve import FakeEngine, serve_tiny

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def call(engine: Engine, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        app_kwargs = {key: kwargs.pop(key) for key in ("api_key", "limits") if key in kwargs}
        app = build_app({"student": engine}, **app_kwargs)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def generation_prompt_engine() -> FakeEngine:
    engine = FakeEngine()
    engine.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return engine


def test_tokenize_a_prompt_and_detokenize_it_back():
    tokenized = call(FakeEngine(), "POST", "/tokenize", json={"model": "student", "prompt": "héllo"})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json() == {"count": 5, "max_model_len": 4096, "tokens": [ord(c) for c in "héllo"]}
    back = call(FakeEngine(), "POST", "/detokenize", json={"model": "student", "tokens": tokenized.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "héllo"}


def test_tokenize_messages_as_the_chat_route_renders_them():
    messages = [{"role": "user", "content": "hi <|end|>"}]  # typed control text stays text, as in a chat
    opened = call(generation_prompt_engine(), "POST", "/tokenize", json={"model": "student", "messages": messages})
    closed = call(
        generation_prompt_engine(),
        "POST",
        "/tokenize",
        json={"model": "student", "messages": messages, "add_generation_prompt": False},
    )
    engine = generation_prompt_engine()
    tokenizer = engine.tokenizer
    user_turn = tokenizer.encode("<|user|>") + [ord(c) for c in "hi <|end|>"] + tokenizer.encode("<|end|>")
    assert opened.json()["tokens"] == user_turn + tokenizer.encode("<|assistant|>")
    assert closed.json()["tokens"] == user_turn and closed.json()["count"] == len(user_turn)


def test_tokenize_without_a_model_uses_the_first_and_can_return_token_strings():
    response = call(FakeEngine(), "POST", "/tokenize", json={"prompt": "ab", "return_token_strs": True})
    assert response.status_code == 200 and response.json()["token_strs"] == ["a", "b"]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"model": "student", "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": "student", "tokens": [0x110000 + 4]}, 400, "tokens"),  # past the vocabulary
        ("/detokenize", {"model": "student", "tokens": [2**70]}, 400, "tokens"),
        ("/detokenize", {"model": "student", "tokens": ["a"]}, 400, "tokens.0"),
        ("/tokenize", {"model": "student"}, 400, None),  # neither prompt nor messages
        ("/tokenize", {"model": "student", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, None),
        ("/tokenize", {"model": "student", "messages": []}, 400, "messages"),
        ("/tokenize", {"model": "student", "prompt": "x" * 2**20}, 400, "prompt"),  # cannot fit the context
    ],
)
def test_a_clients_mistake_is_an_openai_4xx(path, body, status, param):
    response = call(FakeEngine(), "POST", path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS
    if param is not None:
        assert error["param"] == param


def test_tokenize_bodies_are_read_under_the_body_limit():
    from nvfp4.serve.limits import Limits

    response = call(FakeEngine(), "POST", "/tokenize", json={"prompt": "x" * 4096}, limits=Limits(max_body_bytes=1024))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_model_cards_carry_max_model_len():
    cards = call(FakeEngine(), "GET", "/v1/models").json()["data"]
    assert {card["id"]: card["max_model_len"] for card in cards} == {"student": 4096, "fake": 4096}


def test_a_clients_request_id_is_echoed_on_answers_and_errors():
    headers = {"X-Request-Id": "client-42.a:b_c"}
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/tokenize", {"model": "nope", "prompt": "x"}),
        ("POST", "/v1/completions", {"model": "student", "prompt": "hi", "max_tokens": 2}),
        ("GET", "/health", None),
        ("GET", "/missing", None),
    ]:
        response = call(FakeEngine(), method, path, json=body, headers=headers)
        assert response.headers.get_list("x-request-id") == ["client-42.a:b_c"], (path, response.status_code)
    refused = call(FakeEngine(), "GET", "/v1/models", headers=headers, api_key="secret")
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "client-42.a:b_c"


@pytest.mark.parametrize("given", [None, "", "x" * 129, "a b", "a\tb", "é", "<script>"])
def test_a_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(given):
    headers = {} if given is None else {"X-Request-Id": given.encode("utf-8")}
    first = call(FakeEngine(), "GET", "/v1/models", headers=headers).headers["x-request-id"]
    second = call(FakeEngine(), "GET", "/v1/models", headers=headers).headers["x-request-id"]
    assert GENERATED_ID.fullmatch(first) and first != second


class _BrokenDecode(FakeEngine):
    def __init__(self):
        super().__init__()
        self.tokenizer.decode = lambda ids, **_: 1 / 0


def test_a_server_error_carries_the_request_id_too(caplog):
    response = call(_BrokenDecode(), "POST", "/detokenize", json={"tokens": [65]}, headers={"X-Request-Id": "r-500"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-500"
    assert set(response.json()["error"]) == OPENAI_ERROR_KEYS
    assert "X-Request-Id r-500" in caplog.text  # the log line of the traceback names it


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    with serve_tiny(tiny_model_dir, max_num_seqs=2, max_model_len=256) as server:
        yield server


def test_tiny_model_tokenize_counts_what_a_chat_bills(live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    tokenized = httpx.post(f"{live.url}/tokenize", json={"model": "student", "messages": messages}, timeout=30).json()
    chat = live.openai().chat.completions.create(model="student", messages=messages, max_tokens=1, temperature=0)
    assert tokenized["count"] == chat.usage.prompt_tokens == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == 256
    prompt = httpx.post(f"{live.url}/tokenize", json={"model": "teacher", "prompt": "Hello world"}, timeout=30).json()
    completion = live.openai().completions.create(model="teacher", prompt="Hello world", max_tokens=1)
    assert prompt["count"] == completion.usage.prompt_tokens
    text = httpx.post(f"{live.url}/detokenize", json={"model": "teacher", "tokens": prompt["tokens"]}, timeout=30)
    assert text.json()["prompt"].endswith("Hello world")
    cards = httpx.get(f"{live.url}/v1/models", timeout=30).json()["data"]
    assert all(card["max_model_len"] == 256 for card in cards)
