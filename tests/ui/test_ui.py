"""The side-by-side page driven by gradio_client against the real server (tiny random Llama), /ui mounted."""

import asyncio
import os
import re

import httpx
import pytest
import torch
from click.testing import CliRunner
from gradio_client import Client

from nvfp4.cli import cli
from nvfp4.serve.app import build_app
from nvfp4.ui.app import (
    Answer,
    Conversation,
    Endpoint,
    Score,
    _close_turn,
    build_ui,
    first_divergence,
    header_html,
    render_chat,
    score_html,
    scoring_context,
    transcript,
)
from support.serve import free_port, load_tiny, tiny_engines
from support.ui import live_on, serve_tiny_with_ui, text_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SYSTEM = "You are terse."
SEND = dict(system=SYSTEM, temperature=0.7, top_p=1.0, max_tokens=24, seed=None, greedy=True, api_name="/send")
OUT = [
    "box",
    "teacher",
    "student",
    "teacher_metrics",
    "student_metrics",
    "agreement",
    "status",
    "teacher_head",
    "student_head",
]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serve_tiny_with_ui(tiny_model_dir) as live:
        yield live


@pytest.fixture()
def page(server):
    return Client(server.url + "/ui/", verbose=False)


def send(page: Client, message: str, **overrides) -> dict:
    return dict(zip(OUT, page.predict(message=message, **{**SEND, **overrides})))


def greedy_tokens(server, model: str, messages: list[dict], n: int) -> tuple[str, list[str], str]:
    out = server.openai().chat.completions.create(
        model=model, messages=messages, max_tokens=n, temperature=0, logprobs=True
    )
    choice = out.choices[0]
    return choice.message.content, [e.token for e in choice.logprobs.content], choice.finish_reason


def metric_cells(html: str) -> dict[str, str]:
    return dict(re.findall(r"<small>([^<]+)</small> <b>([^<]+)</b>", html))


def test_first_divergence():
    assert first_divergence(["a", "b", "c"], ["a", "b", "c"]) is None
    assert first_divergence(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_divergence(["a", "b"], ["a", "b", "c"]) == 2  # the student runs on past the teacher's end
    assert first_divergence(["a", "b", "c"], ["a"]) == 1
    assert first_divergence([], ["a"]) == 0


def test_header_reads_nvfp4_fields_when_served():
    entry = {
        "id": "student",
        "root": "smol-nvfp4",
        "nvfp4": {"scheme": "nvfp4-a16", "weight_bytes": 104_857_600, "heldout_kl": 0.1234},
    }
    head = header_html("Student", "student", entry)
    assert "smol-nvfp4" in head and "nvfp4-a16" in head and "weights 104.9 MB" in head and "held-out KL 0.123" in head
    plain = header_html("Teacher", "teacher", {"id": "teacher", "root": "smol"})
    assert "smol" in plain and "KL" not in plain and "weights" not in plain
    assert "not served" in header_html("Teacher", "teacher", None)


def test_stopped_turn_keeps_partial_answer_and_failed_turn_is_dropped():
    conv = Conversation(teacher=[{"role": "user", "content": "hi"}], student=[{"role": "user", "content": "hi"}])
    conv.last = {"teacher": Answer(text="Hel"), "student": Answer(error="HTTP 503")}
    _close_turn(conv)
    assert conv.teacher == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert conv.student == []


def test_both_panes_stream_greedy_answers_with_metrics_and_divergence(server, page):
    out = send(page, "Hello there")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    expected = {m: greedy_tokens(server, m, messages, 24) for m in ("teacher", "student")}
    for role in ("teacher", "student"):
        chat = out[role]
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert (
            text_of(chat[1]) == expected[role][0].strip() and expected[role][0].strip()
        )  # the chatbot trims whitespace
        cells = metric_cells(out[f"{role}_metrics"])
        assert float(cells["TTFT"].removesuffix(" ms")) > 0 and float(cells["tokens/s"]) > 0
        assert int(cells["tokens"]) == len(expected[role][1]) and cells["finish"] == expected[role][2]
    at = first_divergence(expected["teacher"][1], expected["student"][1])
    assert at is not None, "the tiny NVFP4 student should leave its random teacher within 24 tokens"
    assert f"leaves the teacher at token {at}" in out["agreement"]
    assert out["agreement"].count("class='nv-diverge'") == 1
    assert out["status"] == "" and "tiny-bf16" in out["teacher_head"] and "tiny-nvfp4" in out["student_head"]


def test_score_with_teacher_matches_transformers(server, page, tiny_model_dir):
    """`nvfp4 serve` sends the teacher's chat template in /v1/models, so the page scores the answer in it."""
    send(page, "Hello there")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    answer = greedy_tokens(server, "student", messages, 24)[0]
    html = page.predict(system=SYSTEM, api_name="/score")
    assert "conversation in the teacher's chat template" in html
    shown = [float(v) for v in re.findall(r"title='log p = (-?[\d.]+)'", html)]
    model, tokenizer = load_tiny(tiny_model_dir, packed=False)
    context = render_chat(tokenizer.chat_template, messages, tokenizer.bos_token or "", tokenizer.eos_token or "")
    ids = tokenizer.encode(context + answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(len(ids) - len(shown), len(ids))]
    assert shown and shown == pytest.approx(expected, abs=2e-3)
    assert "".join(tokenizer.decode([t]) for t in ids[len(ids) - len(shown) :]).endswith(answer)
    mean = float(re.search(r"KL proxy\) <b>([\d.]+)</b>", html).group(1))
    assert mean == pytest.approx(-sum(expected) / len(expected), abs=2e-3)
    assert "perplexity" in html and "teacher's own answer" in html


@pytest.mark.parametrize(
    "templated, note", [(True, "in the teacher's chat template"), (False, "plain-text transcript")]
)
def test_score_names_how_the_conversation_was_scored(templated, note):
    """A server without our /v1/models card (a plain vLLM) gets the transcript proxy, and the page says so."""
    html = score_html(Score(["Hi", "!"], [-0.5, -1.5]), None, templated)
    assert note in html and "<b>1.000</b> nats/token" in html and html.count("class='nv-tok'") == 2


@pytest.mark.parametrize("turns", [1, 2], ids=["one-turn", "two-turns"])
@pytest.mark.parametrize("system", [SYSTEM, None], ids=["system", "no-system"])
def test_render_chat_equals_transformers_template(tiny_model_dir, turns, system):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
    if turns == 2:
        messages += [{"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "And then?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    entry = {
        "nvfp4": {
            "chat_template": tokenizer.chat_template,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
        }
    }
    assert render_chat(tokenizer.chat_template, messages, tokenizer.bos_token, tokenizer.eos_token) == expected
    assert scoring_context(entry, messages) == (expected, True)
    assert scoring_context({"id": "teacher"}, messages) == (transcript(messages), False)
    broken = {"nvfp4": {"chat_template": "{{ raise_exception('no system role') }}"}}
    assert scoring_context(broken, messages) == (transcript(messages), False)


def test_score_in_chat_template_matches_transformers(server, tiny_model_dir):
    """With the template exposed, the scoring prompt is token for token what the chat route feeds the teacher."""
    model, tokenizer = load_tiny(tiny_model_dir, packed=False)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    answer = greedy_tokens(server, "student", messages, 24)[0]
    context = render_chat(tokenizer.chat_template, messages)
    assert tokenizer.encode(context) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    score = asyncio.run(Endpoint(server.url).score("teacher", context, answer))
    ids = tokenizer.encode(context + answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    k = len(score.tokens)
    assert score.logprobs == pytest.approx(
        [float(logp[i - 1, ids[i]]) for i in range(len(ids) - k, len(ids))], abs=1e-3
    )
    assert "".join(score.tokens).endswith(answer) and not "".join(score.tokens[1:]).endswith(answer)  # no extra token


def test_multi_turn_history_per_pane_and_clear(server, page):
    first = send(page, "Hello there")
    second = send(page, "And then?")
    for role in ("teacher", "student"):
        opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
        reply = greedy_tokens(server, role, opening, 24)[0]
        assert text_of(first[role][1]) == reply.strip()
        history = opening + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        assert len(second[role]) == 4  # each pane continues its own answers
        assert text_of(second[role][3]) == greedy_tokens(server, role, history, 24)[0].strip()
    cleared = page.predict(api_name="/clear")
    assert cleared[1] == [] and cleared[2] == []
    assert len(send(page, "Hi")["teacher"]) == 2


def test_missing_model_is_reported_not_raised(server):
    page = Client(_launch(build_ui(server.url, "teacher", "nope")), verbose=False)
    status, _, student_head = page.predict(api_name="/models")
    assert "does not serve `nope`" in status and "not served" in student_head
    out = send(page, "Hi")
    assert "does not serve the model `nope`" in out["student_metrics"]
    assert text_of(out["teacher"][1])  # the other pane still answers


def test_endpoint_down_then_recovers(tiny_model_dir):
    port = free_port()
    page = Client(_launch(build_ui(f"http://127.0.0.1:{port}")), verbose=False)
    down = send(page, "Hi")
    assert "Cannot reach the endpoint at http://127.0.0.1:" in down["status"]
    assert "Cannot reach" in down["teacher_metrics"] and down["teacher"] == [] and down["student"] == []
    with live_on(build_app(tiny_engines(tiny_model_dir)), port):
        up = send(page, "Hi")
    assert up["status"] == "" and text_of(up["teacher"][1]) and text_of(up["student"][1])
    assert len(up["teacher"]) == 2  # the failed turn was dropped, not kept as an empty answer


def test_the_mounted_page_and_its_api_routes_need_the_key(tiny_model_dir):
    """The page's server side holds the key: without one, /ui and Gradio's callable routes are closed."""
    import base64

    from support.ui import serve_with_ui

    with serve_with_ui(tiny_engines(tiny_model_dir), api_key="sekret") as live:
        basic = {"authorization": "Basic " + base64.b64encode(b"me:sekret").decode()}
        page = httpx.get(f"{live.url}/ui/", timeout=30)
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{live.url}/ui/config", timeout=30).status_code == 401
        call = httpx.post(f"{live.url}/ui/gradio_api/call/send", json={"data": []}, timeout=30)
        assert call.status_code == 401
        assert httpx.get(f"{live.url}/ui/", headers=basic, timeout=30).status_code == 200
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200


def test_cli_rejects_bad_options():
    runner = CliRunner()
    result = runner.invoke(cli, ["ui", "--url", "localhost:8000"])
    assert result.exit_code == 2 and "--url must start with http://" in result.output
    result = runner.invoke(cli, ["ui", "--teacher-model", "a", "--student-model", "a"])
    assert result.exit_code == 2 and "choose two models" in result.output


_launched = []


def _launch(demo) -> str:
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    _launched.append(demo)
    return demo.local_url


@pytest.fixture(autouse=True, scope="module")
def _close_pages():
    yield
    for demo in _launched:
        demo.close()
