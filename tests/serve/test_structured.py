"""Structured outputs (response_format, vLLM's structured_outputs and guided_* fields) on the native engine, driven
by the openai client against a live tiny random Llama sampled at temperature 1: every constrained answer parses."""

import asyncio
import json
import os
import re

import httpx
import jsonschema
import pytest
import torch

from nvfp4.serve.app import build_app
from nvfp4.serve.native import NativeEngine
from nvfp4.serve.structured import Constraint, ConstraintError, Guide, check
from support.serve import FakeEngine, LiveServer, load_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MESSAGES = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "colour", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = NativeEngine("tiny", lambda: load_tiny(tiny_model_dir, packed=False), max_num_seqs=16)
    with LiveServer(build_app({"tiny": engine})) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.mark.timeout(300)
def test_json_schema_answers_sampled_at_temperature_1_all_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answers = []
    for seed in range(7):  # 7 x 16 = 112 answers
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, n=16, seed=16 * seed, max_tokens=200, response_format=fmt
        )
        answers += reply.choices
    assert len(answers) == 112
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in answers}) > 50  # sampled, not one greedy answer


def test_json_object_choice_regex_and_grammar_constrain(client):
    def texts(**extra) -> list[str]:
        reply = client.completions.create(
            model="tiny", prompt="The answer:", temperature=1.0, n=12, seed=3, max_tokens=60, extra_body=extra
        )
        assert all(c.finish_reason == "stop" for c in reply.choices), [c.text for c in reply.choices]
        return [c.text for c in reply.choices]

    choices = ["yes", "no", 'say "maybe"']
    assert set(texts(guided_choice=choices)) <= set(choices)
    assert set(texts(structured_outputs={"choice": choices})) <= set(choices)
    assert all(re.fullmatch(r"[a-z]{3}-[0-9]{2}", t) for t in texts(structured_outputs={"regex": r"[a-z]{3}-[0-9]{2}"}))
    assert all(re.fullmatch(r"[A-C]{2}", t) for t in texts(guided_regex=r"[A-C]{2}"))
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    assert all(re.fullmatch(r"\(\d(\+\d)*\)", t) for t in texts(structured_outputs={"grammar": grammar}))
    small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    assert all(json.loads(t)["n"] in range(10) for t in texts(guided_json=small))
    objects = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=300, response_format={"type": "json_object"}
    )
    if objects.choices[0].finish_reason == "stop":  # any object may run past max_tokens: then it is cut
        assert isinstance(json.loads(objects.choices[0].message.content), dict)


def test_an_answer_cut_by_max_tokens_ends_with_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, response_format=fmt)
    assert reply.choices[0].finish_reason == "length"
    text = reply.choices[0].message.content
    assert '{"name": "'.startswith(text) or text.startswith('{"name": "')  # a prefix of the schema's shape
    with pytest.raises(json.JSONDecodeError):  # cut: not JSON
        json.loads(text)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, response_format=fmt, stream=True)
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_*"),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}, "response_format"),
    ],
)
def test_a_bad_constraint_is_a_400_with_an_openai_error(server, extra, param):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hi"})):
        response = httpx.post(server.url + path, json={"model": "tiny", "max_tokens": 4, **body, **extra}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if error["param"] and "." not in error["param"]:
            assert error["param"] == param


def test_the_constraint_reaches_every_engine_in_its_sampling_params():
    engine = FakeEngine(reply='{"a": 1}')

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app({"fake": engine})), base_url="http://t"
        ) as c:
            return await c.post(
                "/v1/completions",
                json={"model": "fake", "prompt": "x", "n": 2, "structured_outputs": {"regex": "[ab]+"}},
            )

    assert asyncio.run(go()).status_code == 200
    assert [r.params.constraint for r in engine.submitted] == [Constraint("regex", "[ab]+")] * 2


def test_a_guide_allows_only_the_grammar_and_then_a_stop_token(tiny_model_dir):
    _, tokenizer = load_tiny(tiny_model_dir, packed=False)
    vocab, stop = len(tokenizer), tokenizer.eos_token_id
    guide = Guide(tokenizer, vocab, (stop,), Constraint.choice(["yes", "no"]))
    for token in tokenizer.encode("yes", add_special_tokens=False):
        row = torch.zeros(vocab)
        guide.mask(row)
        assert row[token] == 0 and torch.isinf(row).sum() > vocab - 100
        assert guide.accept(token)
    row = torch.zeros(vocab)
    guide.mask(row)
    assert torch.isfinite(row).nonzero().flatten().tolist() == [stop]
    assert guide.accept(stop) and guide.done
    row = torch.full((vocab,), -float("inf"))  # penalties left nothing finite: the allowed tokens come back
    Guide(tokenizer, vocab, (stop,), Constraint.choice(["yes"])).mask(row)
    assert torch.isfinite(row).sum() >= 1


def test_check_refuses_what_xgrammar_cannot_compile():
    check(Constraint.json_schema({"type": "object"}))
    with pytest.raises(ConstraintError, match="objekt"):
        check(Constraint.json_schema({"type": "objekt"}))
    with pytest.raises(ConstraintError):
        check(Constraint("regex", "("))


def test_adapters_pass_the_constraint_on_or_refuse_it_with_a_400(tiny_model_dir):
    from nvfp4.serve.adapters.base import UpstreamError
    from nvfp4.serve.adapters.llamacpp import LlamaCppEngine
    from nvfp4.serve.adapters.trtllm import TRTLLMEngine
    from nvfp4.serve.adapters.vllm import VLLMEngine
    from nvfp4.serve.interface import SamplingParams

    _, tokenizer = load_tiny(tiny_model_dir, packed=False)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = {
        kind: SamplingParams(constraint=c)
        for kind, c in (
            ("json", Constraint.json_schema(schema)),
            ("choice", Constraint.choice(["x", 'y"'])),
            ("regex", Constraint("regex", "[ab]+")),
            ("grammar", Constraint("grammar", 'root ::= "a"')),
        )
    }
    vllm = VLLMEngine("m", "/nowhere", tokenizer, 256)
    assert vllm.request_body([1], params["json"])["structured_outputs"] == {"json": schema}
    assert vllm.request_body([1], params["choice"])["structured_outputs"] == {"choice": ["x", 'y"']}
    assert vllm.request_body([1], params["regex"])["structured_outputs"] == {"regex": "[ab]+"}
    assert "structured_outputs" not in vllm.request_body([1], SamplingParams())
    llama = LlamaCppEngine("m", "/nowhere.gguf", tokenizer, 256)
    assert '"\\"a\\""' in llama.request_body([1], params["json"])["grammar"]
    assert llama.request_body([1], params["choice"])["grammar"] == 'root ::= "x" | "y\\""'
    assert llama.request_body([1], params["grammar"])["grammar"] == 'root ::= "a"'
    for engine, refused in ((llama, params["regex"]), (TRTLLMEngine("m", "/nowhere", tokenizer, 256), params["json"])):
        with pytest.raises(UpstreamError) as raised:
            engine.request_body([1], refused)
        assert raised.value.status == 400


def test_a_grammar_no_token_can_continue_ends_with_a_400_not_a_500(server):
    # xgrammar finds no token of this vocabulary for a 4-byte character inside a regex (schemathesis found it)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "guided_regex": "ab\U0005df0c"}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "cannot go on" in response.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
        frames = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert [f["error"]["code"] for f in frames if "error" in f] == ["generation_error"]
    assert [f["error"]["type"] for f in frames if "error" in f] == ["invalid_request_error"]
