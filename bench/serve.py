"""Load generator for `nvfp4 serve`: concurrency sweep, student and teacher side by side.

    .venv/bin/python bench/serve.py                      # in-process server, default model (PTQ student)
    .venv/bin/python bench/serve.py --out OUT            # student from OUT/modelopt, teacher from OUT/report.json
    .venv/bin/python bench/serve.py --url http://HOST:PORT  # an already running server
    .venv/bin/python bench/serve.py --compare --out OUT  # llama.cpp in process vs `nvfp4 serve` (llamacpp, native)

Every request streams with ignore_eos (fixed output length) from a fixed prompt set; TTFT is the
time to the first streamed token, ITL the gaps between streamed tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

PROMPTS = [
    "Explain in simple words why the sky is blue.",
    "Write a short poem about the sea.",
    "List three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "Describe a good breakfast.",
    "How do I make a cup of tea?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a name for a friendly robot.",
]


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - start if stamps else float("nan"),
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": tokens,
    }


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await _one(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": requests,
        "req_s": requests / wall,
        "tok_s": tokens / wall,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "itl_p50": _pct(itl, 50),
        "itl_p99": _pct(itl, 99),
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def serve_local(out: str | None, max_num_seqs: int, port: int) -> None:
    """Child process: student = OUT/modelopt (or the PTQ-packed default model), teacher; prints weight bytes."""
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.serve.app import build_app
    from nvfp4.serve.cli import run_server
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import (
        SharedTensors,
        hold_vocab_compact,
        load_student,
        load_teacher,
        pack_model,
        teacher_source,
    )

    if out:
        student = lambda: load_student(Path(out))[:2]  # noqa: E731
        source = teacher_source(Path(out), None)
    else:

        def student():
            model, tokenizer, _ = load_causal_lm(None)
            return hold_vocab_compact(pack_model(model)), tokenizer

        source = None
    shared = SharedTensors()  # as `nvfp4 serve` does
    engines = {
        "student": NativeEngine("student", shared.loader(student), max_num_seqs=max_num_seqs),
        "teacher": NativeEngine("teacher", shared.loader(lambda: load_teacher(source)), max_num_seqs=max_num_seqs),
    }
    app = build_app(engines)

    @app.get("/bench/weights")
    async def weights() -> dict:
        return {"rows": weight_table(engines)}

    run_server(app, "127.0.0.1", port, drain_timeout=5, log_level="warning")


def start_child(args) -> tuple[subprocess.Popen, str]:
    """The server runs in its own process so the load generator does not share its GIL."""
    from nvfp4.serve.adapters.base import free_port

    port = free_port()
    command = [sys.executable, __file__, "--serve-only", str(port), "--max-num-seqs", str(args.max_num_seqs)]
    command += ["--out", args.out] if args.out else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return _ready(subprocess.Popen(command, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}")


def _ready(child: subprocess.Popen, url: str) -> tuple[subprocess.Popen, str]:
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return child, url
        except httpx.TransportError:
            pass
        if child.poll() is not None:
            raise SystemExit("server process exited")
        time.sleep(0.5)
    child.kill()
    raise SystemExit("server not ready after 10 minutes")


def weight_table(engines) -> list[str]:
    from nvfp4.serve.native.loader import weight_bytes

    teacher = engines["teacher"].model
    bf16 = sum(p.numel() for p in teacher.parameters()) * 2
    rows = ["| model | resident weight bytes | vs teacher BF16 |", "|---|---:|---:|"]
    for alias, engine in engines.items():
        size = weight_bytes(engine.model)
        rows.append(f"| {alias} (as served, {_dtypes(engine.model)}) | {size / 2**20:.1f} MiB | {size / bf16:.2f}x |")
    own = weight_bytes(engines["student"].model, beside=teacher)
    rows.append(
        f"| student beyond the tensors it shares with the teacher | {own / 2**20:.1f} MiB | {own / bf16:.2f}x |"
    )
    rows.append(f"| teacher as BF16 (reference) | {bf16 / 2**20:.1f} MiB | 1.00x |")
    return rows


def _dtypes(model) -> str:
    counts: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel() * t.element_size()
    return ", ".join(
        f"{str(d).replace('torch.', '')} {b / 2**20:.0f} MiB" for d, b in sorted(counts.items(), key=lambda kv: -kv[1])
    )


def llamacpp_in_process(gguf: Path, max_tokens: int, threads: int, requests: int) -> float:
    """llama.cpp itself (llama-cpp-python, in this process) on the same chat prompts, one at a time, EOS masked:
    output tokens / wall seconds, prefill included, as the HTTP rows count them."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, verbose=False)
    no_eos = {llm.token_eos(): -1e9}
    tokens, start = 0, 0.0
    for i in range(requests + 1):  # the first is a warm-up
        if i == 1:
            tokens, start = 0, time.perf_counter()
        for chunk in llm.create_chat_completion(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
            logit_bias=no_eos,
            stream=True,
        ):
            tokens += bool(chunk["choices"][0]["delta"].get("content"))
    return tokens / (time.perf_counter() - start)


def nvfp4_server(out: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`nvfp4 serve OUT ...` in its own process, as a user runs it."""
    from nvfp4.serve.adapters.base import free_port

    port = free_port()
    command = [
        sys.executable,
        "-P",
        "-m",
        "nvfp4.cli",
        "serve",
        out,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    return _ready(subprocess.Popen(command, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}")


def compare(args) -> None:
    """One table: llama.cpp in process, then the student through `nvfp4 serve --engine llamacpp` and through the
    native engine at each concurrency (each alone, every core), then student and teacher served side by side as
    `nvfp4 serve OUT` serves them by default; ratios against llama.cpp in process."""
    cores = os.cpu_count() or 1
    levels = [int(c) for c in args.concurrency.split(",")]
    print(
        f"load average before: {os.getloadavg()[0]:.2f} on {cores} cores; {args.max_tokens} tokens per request, greedy, "
        f"EOS ignored"
    )
    gguf = Path(args.out) / "llamacpp" / "model.gguf"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:  # its threads end with it
        reference = child.submit(llamacpp_in_process, gguf, args.max_tokens, cores, args.requests).result()
    print("| path | model | streams | output tok/s | vs llama.cpp in process |\n|---|---|---:|---:|---:|")
    print(
        f"| llama.cpp in process (llama-cpp-python, {cores} threads) | student | 1 | {reference:.1f} | 1.00x |",
        flush=True,
    )
    compiled = [] if args.eager else ["--compile"]
    native = "`nvfp4 serve" + ("" if args.eager else " --compile")
    paths = [
        (
            "`nvfp4 serve --engine llamacpp --teacher none`",
            ["--engine", "llamacpp", "--teacher", "none"],
            {"student": levels},
        ),
        (f"{native} --teacher none` (native, {cores} threads)", ["--teacher", "none", *compiled], {"student": levels}),
        (
            f"{native}` (native, teacher beside: {max(1, cores // 2)} thread each)",
            compiled,
            {"student": [1], "teacher": [1]},
        ),
    ]
    for label, extra, models in paths:
        child, url = nvfp4_server(args.out, extra)
        try:
            for model, model_levels in models.items():
                for level in model_levels:
                    r = asyncio.run(run_level(url, model, level, max(level, args.requests), args.max_tokens))
                    print(
                        f"| {label} | {model} | {level} | {r['tok_s']:.1f} | {r['tok_s'] / reference:.2f}x |",
                        flush=True,
                    )
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--out")
    parser.add_argument("--concurrency", default="1,4,8,16,64")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--models", default="student,teacher")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default as `nvfp4 serve`: cores / 2 models)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="llama.cpp in process vs `nvfp4 serve` with each engine (needs --out)"
    )
    parser.add_argument("--eager", action="store_true", help="--compare: the native engine without --compile")
    parser.add_argument(
        "--requests", type=int, default=4, help="--compare: requests per row at least (one stream: one after another)"
    )
    parser.add_argument("--serve-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.compare:
        if not args.out:
            parser.error("--compare needs --out OUT (its llamacpp/model.gguf and modelopt/ checkpoint)")
        return compare(args)
    if args.serve_only:
        from nvfp4.serve.cli import set_threads

        set_threads(args.threads, 2)
        return serve_local(args.out, args.max_num_seqs, args.serve_only)
    child, url = (None, args.url) if args.url else start_child(args)
    try:
        sweep(url, args)
        if child:
            print("\n".join(httpx.get(f"{url}/bench/weights", timeout=60).json()["rows"]))
    finally:
        if child:
            child.send_signal(signal.SIGTERM)
            child.wait(30)


def sweep(url: str, args) -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; max_tokens={args.max_tokens}")
    print("| concurrency | model | requests | req/s | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    single: dict[str, float] = {}
    for level in [int(c) for c in args.concurrency.split(",")]:
        for model in args.models.split(","):  # interleaved so both see the same machine load
            r = asyncio.run(run_level(url, model, level, max(level, 4), args.max_tokens))
            single.setdefault(model, r["tok_s"])
            print(
                f"| {level} | {model} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} ({r['tok_s'] / single[model]:.1f}x) | "
                f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.0f} ms | {r['itl_p99'] * 1e3:.0f} ms |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
