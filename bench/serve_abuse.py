"""64 concurrent streams with bad requests mixed in, against `nvfp4 serve OUT` on loopback.

    .venv/bin/python bench/serve_abuse.py OUT                      # native engine, then --engine llamacpp
    .venv/bin/python bench/serve_abuse.py OUT --engines native

Per engine: the good streams' greedy answers alone first, then all at once with near-zero temperatures,
oversized bodies, n=16 floods and clients that leave after the first chunk. It checks that every good
stream gives the tokens it gave alone, every bad request gets its 4xx, nothing gets a 5xx, the engine's
queues are empty at the end and the server's RSS (engine children included) is back within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["Explain why the sky is blue.", "Write a haiku about rain.", "Name three rivers in Europe.",
           "How do plants make food?", "Give me a tip for sleeping well.", "What is a prime number?",
           "Describe a cat in one sentence.", "Why do we dream?"]
MAX_TOKENS = 24


def rss_bytes(pid: int) -> int:
    """VmRSS of pid and all its descendants (an adapter's engine runs in children)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
            todo += [int(c) for t in Path(f"/proc/{current}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def start_server(out: str, engine: str, port: int) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("nvfp4")), "serve", out, "--teacher", "none", "--engine", engine,
               "--port", str(port), "--max-num-seqs", "8", "--max-queue", "96", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONSAFEPATH": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`nvfp4 serve --engine {engine}` exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def body(prompt: str, **fields) -> dict:
    return {"model": "student", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, **fields}


async def stream_text(client: httpx.AsyncClient, payload: dict, leave_after: int | None = None) -> tuple[int, str]:
    import json

    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, ""
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return 500, text
            text += "".join(c["delta"].get("content") or "" for c in data["choices"])
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return 200, text  # leaving: the context manager closes the connection mid-stream
    return 200, text


async def oversized(client: httpx.AsyncClient) -> tuple[int, str]:
    response = await client.post("/v1/chat/completions", content=b'{"model": "student", "messages": [' + b" " * (5 * 2**20) + b"]}",
                                 headers={"content-type": "application/json"})
    return response.status_code, ""


async def flood(client: httpx.AsyncClient) -> tuple[int, str]:
    payload = {"model": "student", "prompt": ["Count to ten."] * 8, "n": 16, "max_tokens": 8}
    response = await client.post("/v1/completions", json=payload)
    return response.status_code, ""


async def attack(url: str) -> dict:
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        alone = [(await stream_text(client, body(p)))[1] for p in PROMPTS]
        good = [stream_text(client, body(PROMPTS[i % len(PROMPTS)])) for i in range(32)]
        tiny = [stream_text(client, body(PROMPTS[i % len(PROMPTS)], temperature=1e-40, repetition_penalty=1.0))
                for i in range(8)]
        bad = [oversized(client) for _ in range(8)] + [flood(client) for _ in range(8)]
        leave = [stream_text(client, body(PROMPTS[i % len(PROMPTS)], max_tokens=400), leave_after=1) for i in range(8)]
        start = time.perf_counter()
        results = await asyncio.gather(*good, *tiny, *bad, *leave)
        wall = time.perf_counter() - start
        good_results, tiny_results = results[:32], results[32:40]
        bad_results, leave_results = results[40:56], results[56:]
        same = sum(status == 200 and text == alone[i % len(PROMPTS)] for i, (status, text) in enumerate(good_results + tiny_results))
        await asyncio.sleep(2.0)  # the left streams' aborts reach the engine
        metrics = (await client.get("/metrics")).text
    queued = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith(("nvfp4_num_requests_running{", "nvfp4_num_requests_waiting{")))
    statuses = [s for s, _ in results]
    return {"streams": len(results), "good same as alone": f"{same}/40",
            "bad 4xx": f"{sum(400 <= s < 500 for s, _ in bad_results)}/16",
            "left early": f"{sum(s == 200 for s, _ in leave_results)}/8", "5xx": sum(s >= 500 for s in statuses),
            "queues at end": int(queued), "wall s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a convert output with the trtllm and llamacpp targets")
    parser.add_argument("--engines", default="native,llamacpp")
    args = parser.parse_args()
    from nvfp4.serve.adapters.base import free_port

    rows = []
    for engine in args.engines.split(","):
        port = free_port()
        process = start_server(args.out, engine, port)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(attack(url))  # one round to warm every path up; RSS is measured from here
            before = rss_bytes(process.pid)
            row = asyncio.run(attack(url))
            after = rss_bytes(process.pid)
            rows.append({"engine": engine, **row, "RSS MB before": before // 2**20, "after": after // 2**20,
                         "RSS change": f"{(after - before) / before:+.1%}"})
        finally:
            process.terminate()
            process.wait(60)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
