"""Engine-adapter helpers: our server as a real subprocess, process trees."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from support.serve import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]  # the repository


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = children_map(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def wait_gone(pids: set[int], deadline_s: float) -> set[int]:
    deadline = time.monotonic() + deadline_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


class ServerProcess:
    """`nvfp4 serve ...` in a subprocess on a free port (vLLM's RemoteOpenAIServer pattern)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-P",
            "-m",
            "nvfp4.cli",
            "serve",
            *args[:1],
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args[1:],
        ]
        self.process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def wait_ready(self, deadline_s: float = 180.0) -> None:
        wait_ready(self.url, self.process, deadline_s)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
