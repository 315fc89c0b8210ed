"""Engine adapters against real processes: llama.cpp (llama-cpp-python's server) on a tiny converted
model for command line, readiness, proxying, errors, restart and orphans; vLLM / TensorRT-LLM
command lines (their processes: tests/e2e/test_engines_vllm.py, and GPU machines for TensorRT-LLM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from nvfp4.errors import UserError
from nvfp4.serve.adapters import EngineOptions, adapter, engine_metrics_text, mount_engine_metrics
from nvfp4.serve.adapters.base import ProxyEngine, UpstreamError
from nvfp4.serve.adapters.llamacpp import LlamaCppEngine
from nvfp4.serve.adapters.trtllm import TRTLLMEngine
from nvfp4.serve.adapters.vllm import find_vllm, vllm_argv
from nvfp4.serve.app import build_app
from nvfp4.serve.interface import GenerationRequest, NotReady, SamplingParams
from support.engines import ServerProcess, alive, cmdline, descendants, wait_gone
from support.serve import LiveServer, metric

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tiny_out(tiny_model_dir, tmp_path_factory):
    """`nvfp4 convert` output of the tiny Llama with the trtllm and llamacpp targets (W4A16)."""
    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.pipeline import ConvertConfig, convert

    out = tmp_path_factory.mktemp("engines") / "tiny"
    convert(
        ConvertConfig(
            out=out,
            source=str(tiny_model_dir),
            quant=QuantConfig(scheme="nvfp4-a16"),
            targets=("modelopt", "llamacpp"),
            calib_data="random",
            calib_tokens=128,
            evaluate=False,
        )
    )
    return out


def llamacpp_engine(out, **kwargs) -> LlamaCppEngine:
    opts = EngineOptions("llamacpp", max_model_len=512, threads=1, ready_timeout=120, **kwargs)
    engine = adapter(opts.engine).for_student(out, "tiny-nvfp4", opts)
    assert isinstance(engine, LlamaCppEngine)
    return engine


@pytest.fixture(scope="module")
def live(tiny_out):
    engine = llamacpp_engine(tiny_out)
    app = build_app({"student": engine})
    mount_engine_metrics(app, {"student": engine})
    with LiveServer(app) as server:
        server.engine = engine
        yield server


def llama_direct(out, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from llama.cpp itself (in process, same GGUF): what the proxy must pass through."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(out / "llamacpp" / "model.gguf"), n_ctx=512, n_threads=1, verbose=False)
    try:
        tokens = []
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1):
            tokens.append(token)
            if len(tokens) == n:
                return tokens
    finally:
        llm.close()


# --- command lines ------------------------------------------------------------------------------


def test_llamacpp_command_line(tiny_out):
    engine = llamacpp_engine(tiny_out, extra_args=("--n_batch", "64"))
    argv = engine.command(4321)
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert argv[argv.index("--model") + 1] == str(tiny_out / "llamacpp" / "model.gguf")
    assert argv[argv.index("--port") + 1] == "4321" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--model_alias") + 1] == "tiny-nvfp4" and argv[argv.index("--n_ctx") + 1] == "512"
    assert argv[-2:] == ["--n_batch", "64"], "pass-through arguments come last, so they win"


def test_vllm_command_lines(tiny_out, tmp_path):
    fake_bin = tmp_path / "vllm"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    opts = EngineOptions("vllm", max_model_len=1024, vllm_bin=str(fake_bin), extra_args=("--enforce-eager",))
    engine = adapter(opts.engine).for_student(tiny_out, "tiny-nvfp4", opts)  # no OUT/vllm: the ModelOpt checkpoint
    argv = engine.command(5555)
    assert argv[:3] == [str(fake_bin), "serve", str(tiny_out / "modelopt")]
    assert argv[argv.index("--quantization") + 1] == "modelopt_fp4"
    assert argv[argv.index("--port") + 1] == "5555" and argv[argv.index("--max-model-len") + 1] == "1024"
    assert argv[argv.index("--served-model-name") + 1] == "tiny-nvfp4" and argv[-1] == "--enforce-eager"
    assert vllm_argv("/x/bin/python3", "/m") == [
        "/x/bin/python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/m",
    ]
    (tiny_out / "vllm").mkdir()
    try:
        (tiny_out / "vllm" / "config.json").write_text("{}")
        argv = adapter(opts.engine).for_student(tiny_out, "s", opts).command(1)
        assert (
            argv[2] == str(tiny_out / "vllm") and "--quantization" not in argv
        )  # compressed-tensors: detected by vLLM
    finally:
        (tiny_out / "vllm" / "config.json").unlink()
        (tiny_out / "vllm").rmdir()


def test_trtllm_command_line(tiny_out, tmp_path):
    fake_bin = tmp_path / "trtllm-serve"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    opts = EngineOptions(
        "trtllm",
        max_model_len=4096,
        trtllm_bin=str(fake_bin),
        extra_args=("--kv_cache_free_gpu_memory_fraction", "0.5"),
    )
    engine = adapter("trtllm").for_student(tiny_out, "tiny-nvfp4", opts)
    assert isinstance(engine, TRTLLMEngine)
    argv = engine.command(7777)
    assert argv[:4] == [str(fake_bin), str(tiny_out / "modelopt"), "--backend", "pytorch"]
    assert argv[argv.index("--port") + 1] == "7777" and argv[argv.index("--max_seq_len") + 1] == "4096"
    assert argv[-2:] == ["--kv_cache_free_gpu_memory_fraction", "0.5"]
    assert engine.metrics_path == "/prometheus/metrics"


def test_missing_engine_binaries_are_user_errors(tiny_out, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("NVFP4_VLLM_BIN", raising=False)
    with pytest.raises(UserError, match="--vllm-bin"):
        find_vllm(None)
    with pytest.raises(UserError, match="no such executable"):
        find_vllm(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="trtllm-serve"):
        adapter("trtllm").for_student(tiny_out, "s", EngineOptions("trtllm"))
    with pytest.raises(UserError, match="no GGUF"):
        adapter("llamacpp").for_student(tmp_path, "s", EngineOptions("llamacpp"))


def test_cli_rejects_engine_args_for_native(tiny_out):
    result = subprocess.run(
        [sys.executable, "-P", "-m", "nvfp4.cli", "serve", str(tiny_out), "--", "--n_ctx", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "not native" in result.stderr


# --- the real llama.cpp server behind our app -------------------------------------------------------


def test_proxy_greedy_equals_llama_cpp_and_stream_joins(live, tiny_out):
    tokenizer = live.engine.tokenizer
    client = live.openai()
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(llama_direct(tiny_out, ids, 10), skip_special_tokens=True)
    kwargs = dict(model="student", messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content == expected
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    assert full.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected and len(deltas) > 1, "streaming must pass chunks through, not one blob"
    by_name = client.completions.create(model="tiny-nvfp4", prompt="Once upon", max_tokens=4, temperature=0)
    assert by_name.choices[0].finish_reason == "length"


def test_engine_errors_keep_the_openai_shape(live):
    body = {"model": "student", "prompt": "hello", "max_tokens": 4, "logprobs": 2}
    for stream in (False, True):
        response = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": stream}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "logprobs are not supported" in error["message"] and error["type"] == "invalid_request_error"


def test_failed_engine_generation_is_an_openai_error(tiny_out):
    """llama.cpp cannot fit a prompt longer than its --n_ctx (passed through after `--`): its server
    answers 200 and then an empty stream, or at times cuts the stream; either way our answer is a 502 in
    the OpenAI error shape, streaming or not."""
    engine = llamacpp_engine(tiny_out, extra_args=("--n_ctx", "32"))
    with LiveServer(build_app({"student": engine})) as server:
        prompt = "word " * 60
        for stream in (False, True):
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "student", "prompt": prompt, "max_tokens": 4, "stream": stream},
                timeout=60,
            )
            assert response.status_code == 502, response.text
            assert "ended the stream without finishing" in response.json()["error"]["message"]
        ok = server.openai().completions.create(model="student", prompt="short", max_tokens=2, temperature=0)
        assert ok.choices[0].finish_reason in ("length", "stop")


class _Cut(httpx.AsyncByteStream):
    """A 200 body that breaks off after one chunk, as a server whose generation failed mid-stream."""

    async def __aiter__(self):
        yield b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("failure, expected", [("cut", UpstreamError), ("refused", NotReady)])
def test_transport_failures_after_and_before_the_answer(failure, expected):
    """A stream the engine cut after answering is its failed request (502); no answer at all means the
    process went away (503, and the watcher restarts it)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if failure == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, stream=_Cut())

    class Fake(ProxyEngine):
        kind = "fake"

        def request_body(self, prompt_ids, params):
            return {"prompt": prompt_ids}

    async def drive():
        engine = Fake("student", "m", None, 64)
        engine._client, engine._ready = httpx.AsyncClient(transport=httpx.MockTransport(handler)), True
        texts = []
        with pytest.raises(expected) as raised:
            async for event in engine.generate(GenerationRequest("r", [1, 2], SamplingParams(max_tokens=4))):
                texts.append(event.text)
        await engine._client.aclose()
        return engine, texts, raised.value

    engine, texts, error = asyncio.run(drive())
    if expected is UpstreamError:
        assert error.status == 502 and texts == ["a"]
        assert "ended the stream without finishing" in str(error) and "RemoteProtocolError" in str(error)
    else:
        assert texts == [] and "went away: ConnectError" in str(error)
    assert engine.stats().running == 0


def test_metrics_measured_at_the_proxy(live):
    client = live.openai()
    before = httpx.get(f"{live.url}/metrics").text
    client.completions.create(
        model="student", prompt="Count:", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = httpx.get(f"{live.url}/metrics").text
    assert (
        metric(after, "nvfp4_generation_tokens_total", model="student")
        - metric(before, "nvfp4_generation_tokens_total", model="student")
        == 5
    )
    assert metric(after, "nvfp4_time_to_first_token_seconds_count", model="student") > metric(
        before, "nvfp4_time_to_first_token_seconds_count", model="student"
    )
    engine_metrics = httpx.get(f"{live.url}/metrics/engine")
    assert engine_metrics.status_code == 200 and engine_metrics.text == ""  # llama-cpp-python's server has none


def test_engine_metrics_are_relabelled_and_merged():
    class Fake(ProxyEngine):
        def __init__(self, text):
            self.text = text

        async def engine_metrics(self):
            return self.text

    text = '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 3.0\n'
    merged = asyncio.run(engine_metrics_text({"student": Fake(text), "teacher": Fake(text.replace("3.0", "1.0"))}))
    assert merged.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{model_name="m",served_model="student"} 3.0' in merged
    assert 'vllm:num_requests_running{model_name="m",served_model="teacher"} 1.0' in merged
    from prometheus_client.parser import text_string_to_metric_families

    assert len(list(text_string_to_metric_families(merged))[0].samples) == 2
    assert asyncio.run(engine_metrics_text({"student": Fake('{"iterations": []}')})) == ""  # JSON, not Prometheus


def test_dead_engine_is_reported_and_restarted(live):
    reaper = live.engine.process.pid
    server = [p for p in descendants(reaper) if "llama_cpp.server" in cmdline(p)]
    assert len(server) == 1
    os.kill(server[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{live.url}/ready").status_code == 200:
        assert time.monotonic() < deadline, "/ready kept answering 200 after the engine died"
        time.sleep(0.05)
    ready = httpx.get(f"{live.url}/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    down = httpx.post(f"{live.url}/v1/completions", json={"model": "student", "prompt": "x", "max_tokens": 2})
    assert down.status_code == 503 and "not ready" in down.json()["error"]["message"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{live.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the engine was not restarted"
        time.sleep(0.2)
    assert live.engine.restarts == 1 and live.engine.process.pid != reaper
    again = live.openai().completions.create(model="student", prompt="Back", max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_orphans_when_our_server_dies(tiny_out, sig):
    server = ServerProcess(
        [str(tiny_out), "--engine", "llamacpp", "--teacher", "none", "--threads", "1", "--max-model-len", "256"]
    )
    try:
        server.wait_ready(120)
        children = descendants(server.process.pid)
        assert any("llama_cpp.server" in cmdline(p) for p in children), "no engine process found"
        text = server.openai().completions.create(model="student", prompt="Hi", max_tokens=2, temperature=0)
        assert text.choices[0].finish_reason in ("length", "stop")
        card = server.openai().models.list().data[0].model_extra["nvfp4"]  # the CLI reads OUT/report.json
        report = json.loads((tiny_out / "report.json").read_text())
        assert card["scheme"] == "nvfp4-a16" and card["weight_bytes"] == report["sizes_bytes"]["llamacpp"]
        server.process.send_signal(sig)
        server.process.wait(60)
        left = wait_gone(children, 20)
        assert not left, f"orphans after {sig.name}: {[cmdline(p) for p in left]}"
    finally:
        server.stop()
        for pid in alive(descendants(server.process.pid)):
            os.kill(pid, signal.SIGKILL)


# --- the default model: llama.cpp's greedy text = the native engine's --------------------------------

# llama.cpp's CPU NVFP4 kernels quantize activations to Q8_0 before the dot product (see
# tests/converter/test_writer_gguf.py): a greedy step whose top-2 student logits are closer than this may flip,
# so texts must agree up to the first such near-tie.
NEAR_TIE = 0.5
CHAT_PROMPTS = ["What is the capital of France?", "Give me a tip for learning to cook.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def default_out(tmp_path_factory):
    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.pipeline import ConvertConfig, convert

    out = tmp_path_factory.mktemp("engines-default") / "smollm2"
    convert(
        ConvertConfig(
            out=out,
            quant=QuantConfig(scheme="nvfp4-a16"),
            targets=("modelopt", "llamacpp"),
            calib_data="random",
            calib_tokens=256,
            evaluate=False,
        )
    )
    return out


@pytest.mark.slow
def test_llamacpp_default_model_greedy_equals_native(default_out):
    import torch

    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import load_student

    student, tokenizer, _ = load_student(default_out)
    native = NativeEngine("native", lambda: load_student(default_out)[:2], max_model_len=512)
    llama = llamacpp_engine(default_out)
    checked = 0
    with LiveServer(build_app({"student": native})) as ours, LiveServer(build_app({"student": llama})) as theirs:
        for prompt in CHAT_PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = student.generate(
                    ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True
                )
            margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            sure = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(margins))
            prefix = tokenizer.decode(out.sequences[0, ids.shape[1] :][:sure], skip_special_tokens=True)
            kwargs = dict(
                model="student", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            native_text = ours.openai().chat.completions.create(**kwargs).choices[0].message.content
            llama_text = theirs.openai().chat.completions.create(**kwargs).choices[0].message.content
            assert native_text.startswith(prefix) and llama_text.startswith(prefix), (
                prompt,
                native_text,
                llama_text,
                sure,
            )
            checked += sure
    assert checked >= 8, f"only {checked} greedy tokens were clear of near-ties; pick other prompts"
