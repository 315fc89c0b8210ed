"""build_ui(base_url) -> gradio.Blocks: the teacher and the NVFP4 student of one OpenAI-compatible
endpoint, side by side. HTTP only (the openai client): no weights, nothing imported from serve/."""

from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import gradio as gr
import openai

EXAMPLES = [
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that reverses a string.",
    "What is the capital of Australia? Answer in one word.",
    "List three tips for a good night's sleep.",
]
DEFAULT_SYSTEM = "You are a helpful assistant."
# Scoring prompt: the server applies chat templates on /v1/chat/completions only and /v1/completions
# takes raw text. When the teacher's /v1/models entry carries `nvfp4.chat_template` the page renders
# the conversation exactly as the chat route would; otherwise the teacher scores the answer after a
# plain "Role: text" transcript (a proxy: the teacher never saw that format in chat).
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    greedy: bool = True

    def kwargs(self) -> dict:
        if self.greedy:  # exact comparison: both models take the argmax at every step
            return {"temperature": 0.0, "top_p": 1.0, "max_tokens": self.max_tokens, "seed": 0}
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass
class Answer:
    """One streamed reply and its timings."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    ttft: float | None = None
    decode_seconds: float = 0.0
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.tokens)

    @property
    def tokens_per_s(self) -> float | None:
        if self.num_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.num_tokens - 1) / self.decode_seconds  # decode rate: tokens after the first

    def snapshot(self) -> Answer:
        """A copy that later chunks do not change: what the page shows is what the history keeps."""
        return replace(self, tokens=list(self.tokens))


@dataclass
class Score:
    """The teacher's log-probability of each token of an answer."""

    tokens: list[str]
    logprobs: list[float]

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.mean_nll, 700.0))


def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def describe_error(error: Exception, url: str, model: str | None = None) -> str:
    """One readable line for the page (never a traceback)."""
    if isinstance(error, openai.APIConnectionError):
        return f"Cannot reach the endpoint at {url}: is `nvfp4 serve` running there? ({type(error.__cause__ or error).__name__})"
    if isinstance(error, openai.NotFoundError):
        return f"The endpoint at {url} does not serve the model `{model}` (choose one with --teacher-model / --student-model)."
    if isinstance(error, openai.APIStatusError):
        message = (error.body or {}).get("message") if isinstance(error.body, dict) else None
        return f"`{model}`: HTTP {error.status_code}: {message or error.message}"
    return f"`{model}`: {type(error).__name__}: {error}"


class Endpoint:
    """The OpenAI-compatible server both models live behind."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        self.url = base_url.rstrip("/")
        self.client = openai.AsyncOpenAI(
            base_url=api_base(base_url), api_key=api_key or "none", max_retries=0, timeout=timeout
        )

    async def models(self) -> dict[str, dict]:
        """id -> /v1/models entry (extra fields kept: `nvfp4` {scheme, weight_bytes, heldout_kl} when served)."""
        page = await self.client.models.list()
        return {m.id: m.to_dict() for m in page.data}

    async def chat(self, model: str, messages: list[dict], sampling: Sampling) -> AsyncIterator[Answer]:
        """Yield the growing answer after every streamed chunk; errors end up in answer.error."""
        answer, start = Answer(), time.perf_counter()
        first = None
        try:
            stream = await self.client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                logprobs=True,
                stream_options={"include_usage": True},
                **sampling.kwargs(),
            )
            async with stream:  # Stop cancels this task: closing the response makes the server abort the request
                async for chunk in stream:
                    if chunk.usage is not None:
                        answer.completion_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices[:1]:
                        delta = choice.delta.content or ""
                        if delta and first is None:
                            first = time.perf_counter()
                            answer.ttft = first - start
                        answer.text += delta
                        entries = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
                        answer.tokens += [e.token for e in entries] if entries else ([delta] if delta else [])
                        answer.finish_reason = choice.finish_reason or answer.finish_reason
                    if first is not None:
                        answer.decode_seconds = time.perf_counter() - first
                    yield answer
        except Exception as error:  # shown in the pane's status line
            answer.error = describe_error(error, self.url, model)
            yield answer

    async def score(self, model: str, context: str, answer: str) -> Score:
        """Teacher log-probs of `answer` following `context`, via /v1/completions echo + logprobs."""
        out = await self.client.completions.create(
            model=model, prompt=context + answer, max_tokens=1, temperature=0.0, echo=True, logprobs=0
        )
        lp = out.choices[0].logprobs
        generated = out.usage.completion_tokens if out.usage else 1
        tokens, values = lp.tokens[: len(lp.tokens) - generated], lp.token_logprobs[: len(lp.tokens) - generated]
        ends, total = [], 0
        for token in tokens:
            total += len(token)
            ends.append(total)
        start = total - len(answer)  # echoed text may carry a BOS string before the context
        keep = [i for i, end in enumerate(ends) if end > start and values[i] is not None]
        return Score([tokens[i] for i in keep], [float(values[i]) for i in keep])


def first_divergence(teacher: list[str], student: list[str]) -> int | None:
    """Index of the first student token that differs from the teacher's (None when identical)."""
    for i, (a, b) in enumerate(zip(teacher, student)):
        if a != b:
            return i
    return None if len(teacher) == len(student) else min(len(teacher), len(student))


def transcript(messages: list[dict]) -> str:
    """Plain-text conversation ending with the assistant cue (the fallback scoring context)."""
    lines = [f"{ROLE_LABELS.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant: "


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """A Hugging Face chat template rendered as transformers does (sandboxed jinja, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
    )


def scoring_context(entry: dict | None, messages: list[dict]) -> tuple[str, bool]:
    """(text the answer is appended to, whether it is the model's own chat template)."""
    meta = (entry or {}).get("nvfp4") or {}
    if meta.get("chat_template"):
        try:
            return render_chat(
                meta["chat_template"], messages, meta.get("bos_token") or "", meta.get("eos_token") or ""
            ), True
        except Exception:  # a template this renderer cannot run: fall back to the transcript
            pass
    return transcript(messages), False


# ----------------------------------------------------------------------------------- rendering


def _esc(text: str) -> str:
    return html.escape(text).replace("\n", "↵")  # strips stay one flowing line per answer


def _window(tokens: list[str], keep: int, tail: bool) -> str:
    """At most `keep` tokens (the last ones when tail), with an ellipsis for the rest."""
    if len(tokens) <= keep:
        return "".join(tokens)
    return "…" + "".join(tokens[-keep:]) if tail else "".join(tokens[:keep]) + "…"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def header_html(role: str, alias: str, entry: dict | None) -> str:
    if entry is None:
        return f"<div class='nv-head'><b>{role}</b> <code>{html.escape(alias)}</code> <span class='nv-bad'>not served</span></div>"
    facts = [f"<span class='nv-name'>{html.escape(str(entry.get('root') or alias))}</span>"]
    meta = entry.get("nvfp4") or {}
    if meta.get("scheme"):
        facts.append(html.escape(str(meta["scheme"])))
    if meta.get("weight_bytes"):
        facts.append(f"weights {_size(float(meta['weight_bytes']))}")
    if meta.get("heldout_kl") is not None:
        facts.append(f"held-out KL {float(meta['heldout_kl']):.3f}")
    return f"<div class='nv-head'><b>{role}</b> <code>{html.escape(alias)}</code> · " + " · ".join(facts) + "</div>"


def metrics_html(answer: Answer | None) -> str:
    if answer is None:
        return "<div class='nv-metrics'>no answer yet</div>"
    if answer.error:
        return f"<div class='nv-metrics nv-bad'>{html.escape(answer.error)}</div>"
    ttft = "–" if answer.ttft is None else f"{answer.ttft * 1000:.0f} ms"
    rate = "–" if answer.tokens_per_s is None else f"{answer.tokens_per_s:.1f}"
    cells = [
        ("TTFT", ttft),
        ("tokens/s", rate),
        ("tokens", str(answer.num_tokens)),
        ("finish", answer.finish_reason or "…"),
    ]
    return (
        "<div class='nv-metrics'>"
        + "".join(f"<span class='nv-cell'><small>{k}</small> <b>{v}</b></span>" for k, v in cells)
        + "</div>"
    )


def agreement_html(teacher: Answer | None, student: Answer | None) -> str:
    if not teacher or not student or teacher.error or student.error or not (teacher.tokens or student.tokens):
        return ""
    at = first_divergence(teacher.tokens, student.tokens)
    if at is None:
        return (
            f"<div class='nv-agree'><b>Agreement:</b> the student's answer equals the teacher's "
            f"({len(student.tokens)} tokens).</div>"
        )
    same = _window(student.tokens[:at], 60, tail=True)
    left = student.tokens[at] if at < len(student.tokens) else "⟨end⟩"
    wanted = teacher.tokens[at] if at < len(teacher.tokens) else "⟨end⟩"
    rest = _window(student.tokens[at + 1 :], 60, tail=False)
    return (
        f"<div class='nv-agree'><b>Agreement:</b> the student leaves the teacher at token {at} "
        f"(teacher: <code>{html.escape(repr(wanted))}</code>, student: <code>{html.escape(repr(left))}</code>)"
        f"<div class='nv-strip'><span class='nv-same'>{_esc(same)}</span>"
        f"<mark class='nv-diverge' title='first token that differs from the teacher'>{_esc(left)}</mark>"
        f"<span class='nv-rest'>{_esc(rest)}</span></div></div>"
    )


def _colour(logprob: float) -> str:
    """Green when the teacher is sure of the token, red when it is not (p from 1 to ~e^-6)."""
    x = max(0.0, min(1.0, -logprob / 6.0))
    return f"hsl({120 * (1 - x):.0f}, 75%, {88 - 10 * x:.0f}%)"


def score_html(student: Score, teacher: Score | None, templated: bool = False) -> str:
    if not student.tokens:
        return "<div class='nv-score'>The student's answer is empty: nothing to score.</div>"
    spans = "".join(
        f"<span class='nv-tok' style='background:{_colour(lp)}' title='log p = {lp:.3f}'>{_esc(tok)}</span>"
        for tok, lp in zip(student.tokens, student.logprobs)
    )
    summary = (
        f"mean −log p (KL proxy) <b>{student.mean_nll:.3f}</b> nats/token · perplexity "
        f"<b>{student.perplexity:.2f}</b> · {len(student.tokens)} tokens"
    )
    if teacher is not None and teacher.tokens:
        summary += f" · teacher's own answer: {teacher.mean_nll:.3f} nats/token, perplexity {teacher.perplexity:.2f}"
    how = (
        "conversation in the teacher's chat template"
        if templated
        else "after a plain-text transcript: the server does not expose its chat template, so values are a proxy"
    )
    return (
        f"<div class='nv-score'><b>Student's answer under the teacher</b> (green: the teacher agrees, red: it "
        f"would not have said it)<div class='nv-strip'>{spans}</div><div>{summary}</div>"
        f"<div class='nv-note'>Scored {how}.</div></div>"
    )


def status_html(message: str | None) -> str:
    return f"<div class='nv-banner'>⚠ {html.escape(message)}</div>" if message else ""


STYLE = """<style>
.nv-title h1 {margin:0; font-size:1.5em}
.nv-title p {margin:2px 0 0 0; opacity:.75}
.nv-head {padding:6px 10px; border-radius:8px; background:var(--block-background-fill); border:1px solid var(--border-color-primary)}
.nv-name {font-weight:600}
.nv-metrics {display:flex; gap:8px; flex-wrap:wrap; padding:2px 0}
.nv-cell {padding:3px 10px; border-radius:12px; background:var(--background-fill-secondary); border:1px solid var(--border-color-primary)}
.nv-cell small {opacity:.7}
.nv-bad {color:#c0392b; font-weight:600}
.nv-banner {padding:10px 14px; border-radius:8px; background:#fdecea; color:#8a1c12; border:1px solid #f5c2bd; font-weight:600}
.nv-agree, .nv-score {padding:8px 12px; border-radius:8px; border:1px solid var(--border-color-primary)}
.nv-strip {margin-top:6px; line-height:1.9; font-family:var(--font-mono); font-size:.9em; white-space:pre-wrap; max-height:9.5em; overflow-y:auto}
.nv-same {background:#e3f6e5; color:#1d4d24}
.nv-diverge {background:#ffb3a7; color:#000; outline:2px solid #c0392b; border-radius:3px}
.nv-rest {opacity:.6}
.nv-note {opacity:.65; font-size:.85em}
.nv-tok {border-radius:3px; padding:1px 0; margin-right:1px; color:#111}
</style>"""


# ----------------------------------------------------------------------------------- the page


@dataclass
class Conversation:
    """Per-pane histories (each model continues its own answers) and the last answers."""

    teacher: list[dict] = field(default_factory=list)
    student: list[dict] = field(default_factory=list)
    last: dict[str, Answer] = field(default_factory=dict)
    stopped: bool = False


def _with_system(system: str, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + history


def _close_turn(conv: Conversation) -> None:
    """End an open turn with the answers so far (Stop cancels the stream before the turn is closed)."""
    for role in ("teacher", "student"):
        history = getattr(conv, role)
        if history and history[-1]["role"] == "user":
            answer = conv.last.get(role)
            if answer is None or answer.error:
                history.pop()  # a failed turn is dropped, so the conversation resumes cleanly
            else:
                history.append({"role": "assistant", "content": answer.text})


def _chat_view(history: list[dict], answer: Answer | None) -> list[dict]:
    view = [dict(m) for m in history]
    if answer is not None and history and history[-1]["role"] == "user":  # the turn is still streaming
        view.append({"role": "assistant", "content": answer.text or ("…" if not answer.error else "⚠ " + answer.error)})
    return view


async def _merge(streams: dict[str, AsyncIterator[Answer]]) -> AsyncIterator[tuple[str, Answer]]:
    """Interleave both answer streams as chunks arrive, so both panes stream at the same time."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(name: str, stream: AsyncIterator[Answer]) -> None:
        try:
            async for answer in stream:
                await queue.put((name, answer.snapshot()))
        finally:
            await queue.put((name, None))

    tasks = [asyncio.create_task(pump(n, s)) for n, s in streams.items()]
    try:
        open_streams = len(tasks)
        while open_streams:
            name, answer = await queue.get()
            if answer is None:
                open_streams -= 1
            else:
                yield name, answer
    finally:
        for task in tasks:
            task.cancel()


def build_ui(
    base_url: str, teacher_model: str = "teacher", student_model: str = "student", api_key: str | None = None
) -> gr.Blocks:
    """The side-by-side page for the two models of the endpoint at base_url (root or .../v1)."""
    endpoint = Endpoint(base_url, api_key)
    names = {"teacher": teacher_model, "student": student_model}

    async def headers() -> tuple[str, str, str]:
        try:
            served = await endpoint.models()
        except Exception as error:
            return (
                status_html(describe_error(error, endpoint.url)),
                header_html("Teacher", teacher_model, {}),
                header_html("Student", student_model, {}),
            )
        missing = [m for m in names.values() if m not in served]
        note = None
        if missing:
            note = (
                f"The endpoint at {endpoint.url} does not serve {', '.join(f'`{m}`' for m in missing)}; it serves: "
                f"{', '.join(sorted(served)) or 'nothing'} (choose with --teacher-model / --student-model)."
            )
        return (
            status_html(note),
            header_html("Teacher", teacher_model, served.get(teacher_model)),
            header_html("Student", student_model, served.get(student_model)),
        )

    async def send(message, system, conv: Conversation, temperature, top_p, max_tokens, seed, greedy):
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        status, head_t, head_s = await headers()
        _close_turn(conv)
        sampling = Sampling(
            float(temperature), float(top_p), int(max_tokens), None if seed in (None, "") else int(seed), bool(greedy)
        )
        conv.last, conv.stopped = {}, False
        conv.teacher.append({"role": "user", "content": message})
        conv.student.append({"role": "user", "content": message})
        streams = {
            role: endpoint.chat(names[role], _with_system(system, getattr(conv, role)), sampling) for role in names
        }
        yield _outputs(conv, "", status, head_t, head_s)
        async for role, answer in _merge(streams):
            if conv.stopped:
                break
            conv.last[role] = answer
            yield _outputs(conv, "", status, head_t, head_s)
        _close_turn(conv)
        errors = [a.error for a in conv.last.values() if a.error]
        yield _outputs(conv, "", status_html(errors[0]) if errors else status, head_t, head_s)

    def _outputs(conv: Conversation, box: str, status: str, head_t: str, head_s: str) -> tuple:
        t, s = conv.last.get("teacher"), conv.last.get("student")
        view_t, view_s = _chat_view(conv.teacher, t), _chat_view(conv.student, s)
        return (
            box,
            view_t,
            view_s,
            metrics_html(t),
            metrics_html(s),
            agreement_html(t, s),
            status,
            head_t,
            head_s,
            conv,
        )

    async def score(system, conv: Conversation):
        student = conv.last.get("student")
        if student is None or student.error:
            return "<div class='nv-score'>Send a message first: the student's last answer is scored.</div>"
        teacher = conv.last.get("teacher")
        try:
            entry = (await endpoint.models()).get(teacher_model)
            context, templated = scoring_context(entry, _with_system(system, conv.student[:-1]))
            jobs = [endpoint.score(teacher_model, context, student.text)]
            if teacher is not None and teacher.text and not teacher.error:
                own, _ = scoring_context(entry, _with_system(system, conv.teacher[:-1]))
                jobs.append(endpoint.score(teacher_model, own, teacher.text))
            scores = await asyncio.gather(*jobs)
        except Exception as error:
            return status_html(describe_error(error, endpoint.url, teacher_model))
        return score_html(scores[0], scores[1] if len(scores) > 1 else None, templated)

    def stop(conv: Conversation) -> tuple:
        """Freeze the answers where they are and show exactly what the history keeps."""
        conv.stopped = True
        _close_turn(conv)
        t, s = conv.last.get("teacher"), conv.last.get("student")
        return (
            _chat_view(conv.teacher, t),
            _chat_view(conv.student, s),
            metrics_html(t),
            metrics_html(s),
            agreement_html(t, s),
            conv,
        )

    def clear():
        conv = Conversation()
        return ("", [], [], metrics_html(None), metrics_html(None), "", "", conv)

    with gr.Blocks(title="nvfp4 · teacher vs student", analytics_enabled=False) as demo:
        gr.HTML(
            STYLE + "<div class='nv-title'><h1>Teacher vs NVFP4 student</h1>"
            f"<p>Every message goes to both models of <code>{html.escape(endpoint.url)}</code>. "
            "Greedy decoding compares them token for token.</p></div>"
        )
        status = gr.HTML(elem_id="status")
        conv = gr.State(Conversation())
        with gr.Row(equal_height=True):
            with gr.Column():
                head_t = gr.HTML(header_html("Teacher", teacher_model, {}), elem_id="teacher-header")
                chat_t = gr.Chatbot(label=f"Teacher · {teacher_model}", height=380, elem_id="teacher-chat")
                metrics_t = gr.HTML(metrics_html(None), elem_id="teacher-metrics")
            with gr.Column():
                head_s = gr.HTML(header_html("Student", student_model, {}), elem_id="student-header")
                chat_s = gr.Chatbot(label=f"Student · {student_model}", height=380, elem_id="student-chat")
                metrics_s = gr.HTML(metrics_html(None), elem_id="student-metrics")
        with gr.Row(equal_height=True):
            box = gr.Textbox(
                placeholder="Ask both models…", show_label=False, scale=6, elem_id="prompt", autofocus=True
            )
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        gr.Examples(EXAMPLES, inputs=[box], label="Examples")
        agreement = gr.HTML(elem_id="agreement")
        score_btn = gr.Button("Score the student's answer with the teacher", elem_id="score")
        scored = gr.HTML(elem_id="score-strip")
        with gr.Accordion("System prompt and sampling", open=False):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2)
            with gr.Row():
                greedy = gr.Checkbox(True, label="Greedy (exact comparison)")
                temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 2048, 256, step=1, label="Max tokens", elem_id="max-tokens")
                seed = gr.Number(None, label="Seed", precision=0)

        inputs = [box, system, conv, temperature, top_p, max_tokens, seed, greedy]
        outputs = [box, chat_t, chat_s, metrics_t, metrics_s, agreement, status, head_t, head_s, conv]
        sent = send_btn.click(send, inputs, outputs, api_name="send")
        submitted = box.submit(send, inputs, outputs, api_name=False)
        stop_btn.click(
            stop,
            conv,
            [chat_t, chat_s, metrics_t, metrics_s, agreement, conv],
            cancels=[sent, submitted],
            api_name=False,
        )
        clear_btn.click(
            clear, None, [box, chat_t, chat_s, metrics_t, metrics_s, agreement, scored, conv], api_name="clear"
        )
        score_btn.click(score, [system, conv], scored, api_name="score")
        demo.load(headers, None, [status, head_t, head_s], api_name="models")
    return demo


def mount_page(app, base_url: str, teacher_model: str, student_model: str, api_key: str | None, path: str = "/ui"):
    """The page for the endpoint at base_url mounted on `app` (an ASGI app, such as the server's own) at `path`."""
    return gr.mount_gradio_app(app, build_ui(base_url, teacher_model, student_model, api_key), path=path)
