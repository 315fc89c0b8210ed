"""Live server (uvicorn thread, tiny random Llama) driven by the openai client."""

import asyncio
import os

import httpx
import openai
import pytest
import torch

from support.serve import LiveServer, load_tiny, metric, serve_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serve_tiny(tiny_model_dir, max_num_seqs=16) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The same models in transformers, for greedy generate() and logprob references."""
    return {"student": load_tiny(tiny_model_dir, packed=True), "teacher": load_tiny(tiny_model_dir, packed=False)}


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("alias", ["student", "teacher"])
def test_chat_greedy_equals_transformers_and_stream_joins(client, reference, alias):
    model, tokenizer = reference[alias]
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(_hf_greedy(model, ids, 12), skip_special_tokens=True)
    kwargs = dict(model=alias, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"min_tokens": 12})
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content == expected
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == 12
    assert full.usage.total_tokens == len(ids) + 12
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids)


def test_completion_stop_string_across_tokens(client, reference):
    base = dict(
        model="teacher", prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**base).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters, most likely spanning two tokens
    assume_first = full.index(stop)
    stopped = client.completions.create(**base, stop=[stop, "\u2603never"])
    assert stopped.choices[0].text == full[:assume_first]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, stop=[stop], stream=True))
    assert streamed == full[:assume_first]


def test_seed_reproducible_and_n(client):
    kwargs = dict(model="student", prompt="Hello", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs, seed=7, n=2)
    again = client.completions.create(**kwargs, seed=7, n=2)
    other = client.completions.create(**kwargs, seed=8, n=2)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # choice i uses seed + i
    assert [c.text for c in first.choices] != [c.text for c in other.choices]
    assert first.usage.completion_tokens == 20


def test_echo_logprobs_score_the_prompt(client, reference):
    model, tokenizer = reference["teacher"]
    text = "The quick brown fox jumps"
    ids = tokenizer.encode(text)
    out = client.completions.create(model="teacher", prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=3)
    logprobs = out.choices[0].logprobs
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert out.choices[0].text.startswith(text)
    assert logprobs.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-3)
    generated = int(expected[-1].argmax())
    assert logprobs.token_logprobs[len(ids)] == pytest.approx(float(expected[-1, generated]), abs=1e-3)
    assert len(logprobs.top_logprobs[len(ids)]) == 3


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model="student", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy picks the top token


def test_models_listing_and_errors(server, client, reference):
    listed = {m.id: m for m in client.models.list().data}
    assert {"student", "teacher", "tiny-nvfp4", "tiny-bf16"} <= set(listed)
    tokenizer = reference["student"][1]
    card = listed["student"].model_extra["nvfp4"]  # the UI renders its scoring prompt in this template
    assert card["chat_template"] == tokenizer.chat_template and card["eos_token"] == tokenizer.eos_token
    by_real_name = client.completions.create(model="tiny-bf16", prompt="Hi", max_tokens=2)
    assert by_real_name.choices[0].text is not None
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-9", prompt="Hi", max_tokens=2)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="student", prompt="Hi", max_tokens=2, temperature=7)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="student", prompt="Hi " * 600, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "student"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_64_concurrent_streams(server, client):
    prompts = [f"Count to {i}:" for i in range(4)]
    expected = [
        client.completions.create(
            model="student", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model="student",
            prompt=prompts[i % 4],
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    async def run():
        async with server.async_openai() as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    assert asyncio.run(run()) == [expected[i % 4] for i in range(64)]


def test_metrics_match_requests(server, client):
    before = httpx.get(f"{server.url}/metrics").text
    out = client.completions.create(
        model="teacher", prompt="Metrics please", max_tokens=5, temperature=0, n=2, extra_body={"ignore_eos": True}
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    after = httpx.get(f"{server.url}/metrics").text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("nvfp4_generation_tokens_total", model="teacher") == 10
    assert delta("nvfp4_prompt_tokens_total", model="teacher") == out.usage.prompt_tokens
    assert delta("nvfp4_requests_total", model="teacher", finish_reason="length") == 2
    assert delta("nvfp4_time_to_first_token_seconds_count", model="teacher") == 2
    assert delta("nvfp4_inter_token_latency_seconds_count", model="teacher") == 8
    assert delta("nvfp4_request_generation_tokens_sum", model="teacher") == 10
    assert delta("nvfp4_request_errors_total", model="none", status="404") == 1
    assert "nvfp4_kv_cache_usage_ratio" in after and 'nvfp4_num_requests_running{model="student"}' in after


def test_disconnect_cancels(server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={
            "model": "student",
            "prompt": "Go",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        },
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    engine = server.app.state.served.models["student"]
    for _ in range(100):
        if engine.stats().running == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.stats().running == 0
    assert (
        metric(httpx.get(f"{server.url}/metrics").text, "nvfp4_requests_total", model="student", finish_reason="abort")
        >= 1
    )


def test_auth_and_queue_full(tiny_model_dir):
    with serve_tiny(tiny_model_dir, api_key="sekret", max_num_seqs=1, max_queue=1) as live:
        with pytest.raises(openai.AuthenticationError) as error:
            live.openai("wrong").models.list()
        assert error.value.status_code == 401 and error.value.body["type"] == "authentication_error"
        assert httpx.get(f"{live.url}/health").status_code == 200  # only /v1 needs the key
        client = live.openai("sekret")
        long = dict(model="student", prompt="Go", max_tokens=300, stream=True, extra_body={"ignore_eos": True})
        running = client.completions.create(**long)
        next(iter(running))  # admitted and decoding: the batch (1 slot) is full
        waiting = client.completions.create(**long)  # fills the queue of 1
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model="student", prompt="x", max_tokens=1)
        assert error.value.status_code == 429
        running.close()
        waiting.close()


def test_ready_503_until_loaded(tiny_model_dir):
    import threading

    from nvfp4.serve.app import build_app
    from nvfp4.serve.native import NativeEngine

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return load_tiny(tiny_model_dir, packed=True)

    with LiveServer(build_app({"student": NativeEngine("s", slow_load)}), wait_ready=False) as live:
        response = httpx.get(f"{live.url}/ready")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        with pytest.raises(openai.APIStatusError) as error:
            live.openai().completions.create(model="student", prompt="x", max_tokens=1)
        assert error.value.status_code == 503
        gate.set()
        live._poll("/ready", 60)
        assert live.openai().completions.create(model="student", prompt="x", max_tokens=1).choices


@pytest.mark.slow
def test_default_model_served(default_model_dir):
    """The real default model, teacher and packed student, through HTTP: greedy equals transformers."""
    from nvfp4.serve.app import build_app
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import pack_model

    def load(packed):
        from nvfp4.converter.models import load_causal_lm

        model, tokenizer, _ = load_causal_lm(default_model_dir)
        return (pack_model(model) if packed else model), tokenizer

    engines = {"student": NativeEngine("s", lambda: load(True)), "teacher": NativeEngine("t", lambda: load(False))}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with LiveServer(build_app(engines)) as live:
        client = live.openai()
        for alias, engine in engines.items():
            tokenizer = engine.tokenizer
            ids = tokenizer.encode(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )
            expected = engine.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
            out = client.chat.completions.create(model=alias, messages=messages, max_tokens=16, temperature=0)
            assert out.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
            assert out.usage.completion_tokens == len(expected)
