"""SIGTERM: the server stops accepting, finishes running requests and exits 0 (real subprocess)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from support.serve import free_port, wait_ready

SCRIPT = """
import sys
from nvfp4.serve.app import build_app
from nvfp4.serve.cli import run_server
from support.serve import tiny_engines
app = build_app(tiny_engines(sys.argv[1]), drain_timeout=30)
run_server(app, "127.0.0.1", int(sys.argv[2]), drain_timeout=30, log_level="warning")
"""

TESTS = Path(__file__).resolve().parents[1]  # `-c` puts the working directory on sys.path: support/ imports


def test_sigterm_drains_running_requests(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(port)], cwd=TESTS)
    try:
        wait_ready(url, process)
        body = {
            "model": "student",
            "prompt": "Drain",
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(lines))
            process.send_signal(signal.SIGTERM)
            events += [line for line in lines if line]
        payloads = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert events[-1] == "data: [DONE]"
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(60) == 0
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("still accepting connections after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if process.poll() is None:
            process.kill()
